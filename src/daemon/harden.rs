//! Hardening of the manager itself (aitherd), done first in `main`, while the process is still
//! single-threaded (editing the environment is only sound then):
//! - non-dumpable: no core dump, no `/proc/<pid>/mem`, `environ` or ptrace for anyone without
//!   CAP_SYS_PTRACE, even a process of the same uid (the signing key and tokens live in its
//!   memory);
//! - RLIMIT_CORE 0 (soft and hard), so a crash writes nothing even if made dumpable again;
//! - the dynamic loader's and allocator's variables (`LD_*`, `MALLOC_*`, `GLIBC_TUNABLES`)
//!   removed from the environment, so nothing aitherd starts inherits them. Children are
//!   started with `env_clear()` in any case (src/daemon/shim.rs).
//!
//! The signing key is read through a close-on-exec descriptor and kept in memory only; the
//! shims get fds 0–4 and nothing else (tests/hostside.rs checks their fds and environment).

use std::io;

/// Environment variables removed at start (prefixes).
const SCRUBBED_PREFIXES: &[&str] = &["LD_", "MALLOC_", "GLIBC_TUNABLES"];

/// What [`harden_process`] did (logged at start), read back from the kernel.
#[derive(Debug, Default)]
pub struct Hardened {
    pub scrubbed: Vec<String>,
    /// PR_GET_DUMPABLE after the change (0 expected).
    pub dumpable: i32,
    /// RLIMIT_CORE (soft, hard) after the change.
    pub core: (Option<u64>, Option<u64>),
}

/// Makes this process non-dumpable, sets RLIMIT_CORE to 0 and scrubs the environment.
///
/// Must be called before any thread is started (it edits the environment).
pub fn harden_process() -> io::Result<Hardened> {
    // Order: the core limit first, so that no window exists in which a crash could dump.
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    let scrubbed: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    for k in &scrubbed {
        // Single-threaded here (documented precondition): no concurrent reader of environ.
        std::env::remove_var(k);
    }
    let dumpable = rustix::process::dumpable_behavior()? as i32;
    let core = rustix::process::getrlimit(rustix::process::Resource::Core);
    Ok(Hardened {
        scrubbed,
        dumpable,
        core: (core.current, core.maximum),
    })
}
