//! Resource limits, set while the sandbox's pid 1 still holds its capabilities: raising a hard
//! limit inside a user namespace fails later (DESIGN.md §11).

use std::io;

use super::spec::SandboxSpec;

fn set(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &lim) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Applies the spec's limits (soft = hard).
pub fn apply(spec: &SandboxSpec) -> io::Result<()> {
    set(libc::RLIMIT_NOFILE, spec.rlimit_nofile)?;
    set(libc::RLIMIT_CORE, spec.rlimit_core)?;
    if let Some(n) = spec.rlimit_nproc {
        set(libc::RLIMIT_NPROC, n)?;
    }
    if let Some(n) = spec.rlimit_fsize {
        set(libc::RLIMIT_FSIZE, n)?;
    }
    Ok(())
}
