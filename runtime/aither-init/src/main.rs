//! aither-init: the single-threaded launcher used by aitherd (a multithreaded tokio process
//! must not fork and then set up a sandbox). It builds the sandbox exactly as `aitherctl run`
//! does (the same library code: its pid 1 is a fork of this process).
//!
//!     aither-init < spec.json       a SandboxSpec: run it, exit with the agent's status
//!                                   (125/126/127 for Aither's own errors, as `aitherctl run`)
//!     aither-init shim < shim.json  supervised mode, one shim per agent (crates/aither-core/src/sandbox/shim.rs)
//!     aither-init exec < exec.json  a command inside a running sandbox (crates/aither-core/src/sandbox/exec.rs)
//!     aither-init --config-fd N [--status-fd M]
//!                                   the same, the spec read from fd N, for `aitherctl run`
//!                                   through aitherd: this process's stdin, stdout and stderr
//!                                   are the caller's, and the run's messages go to its
//!                                   stderr as `aitherctl run` writes them; with M, the run's
//!                                   code ("N\n") is written to fd M as soon as the agent is
//!                                   done (nothing of it left), before the teardown, and
//!                                   0–2 are /dev/null from then on
//!     aither-init exec --config-fd N
//!                                   the same, the config read from fd N: the command gets this
//!                                   process's stdin, stdout and stderr (`aitherctl exec`)
//!     aither-init pool --control-fd N < template.json
//!                                   a prepared sandbox for aitherd's warm start: prepares the
//!                                   template, then runs ONE final spec sent on fd N (a
//!                                   SOCK_SEQPACKET socket) with the caller's stdio
//!                                   (crates/aither-core/src/sandbox/pool.rs)

use std::io::Read;
use std::process::ExitCode;

use aither_core::cgroup::delegate;
use aither_core::sandbox::shim::{self, ShimConfig, ShimEvent};
use aither_core::sandbox::ExecConfig;
use aither_core::sandbox::{self, SandboxSpec};

fn main() -> ExitCode {
    let mode = std::env::args().nth(1);
    let code = match mode.as_deref() {
        None => plain(),
        Some("--config-fd") => for_caller(),
        Some("shim") => run_shim(),
        Some("exec") => run_exec(),
        Some("pool") => run_pool(),
        Some(other) => {
            eprintln!(
                "aither-init: unknown mode {other:?} (expected none, `shim`, `exec` or `pool`)"
            );
            125
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn stdin_json<T: serde::de::DeserializeOwned>(what: &str) -> Result<T, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    serde_json::from_str(&input).map_err(|e| format!("stdin is not a {what}: {e}"))
}

fn plain() -> i32 {
    let spec: SandboxSpec = match stdin_json("SandboxSpec") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aither-init: error: {e}");
            return 125;
        }
    };
    match sandbox::run(&spec) {
        Ok(out) if out.timed_out => 124,
        Ok(out) => out.status.code(),
        Err(e) => {
            eprintln!("aither-init: {e}");
            e.exit_code()
        }
    }
}

fn run_shim() -> i32 {
    // systemd as pid 1 on pure v2, aitherd in no delegated leaf (systemd 251-253 with the
    // unit's own cgroup, older systemd, aitherd started by hand): never write into cgroups
    // systemd owns. Re-executed in a transient scope of its own with Delegate=yes (same pid,
    // stdio and inherited fds), then the sandbox's cgroup goes below that scope, where aitherd
    // finds it (aither_core::cgroup::delegate). First: before stdin is read. Its failure is
    // reported as any launch failure is.
    let scoped = delegate::into_own_scope(delegate::ScopeKind::Shim).map_err(|e| e.to_string());
    let handed = scoped.and_then(|()| shim::receive_handed_fds().map_err(|e| e.to_string()));
    match handed.and_then(|()| stdin_json::<ShimConfig>("ShimConfig")) {
        Ok(cfg) => shim::run(cfg),
        Err(e) => {
            // No log_dir to write a record into: the event line is the only report.
            println!(
                "{}",
                serde_json::to_string(&ShimEvent::Failed {
                    code: 125,
                    error: e.clone()
                })
                .unwrap_or_default()
            );
            eprintln!("aither-init shim: {e}");
            125
        }
    }
}

/// The config's descriptor of `exec --config-fd N`; `None` without the flag.
fn config_fd() -> Result<Option<std::fs::File>, String> {
    fd_arg("--config-fd")
}

/// The descriptor of `MODE FLAG N`; `None` without the flag.
fn fd_arg(want: &str) -> Result<Option<std::fs::File>, String> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    match args.as_slice() {
        [] => Ok(None),
        [flag, n] if flag == want => passed_fd(flag, n).map(Some),
        _ => Err(format!("unexpected arguments {args:?} (expected {want} N)")),
    }
}

/// The descriptor number `n` given with `flag`, open and above 2, owned from here.
fn passed_fd(flag: &str, n: &str) -> Result<std::fs::File, String> {
    let n: i32 = n
        .parse()
        .ok()
        .filter(|n| *n > 2)
        .ok_or_else(|| format!("{flag} {n:?}: expected a descriptor number above 2"))?;
    // Raw: the number may be closed, and nix's fcntl needs an open BorrowedFd.
    // SAFETY: F_GETFD only queries the number; a closed one fails.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(format!("{flag} {n}: not open"));
    }
    // SAFETY: the daemon passed this descriptor for us alone; we own it from here.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(n) })
}

/// `aither-init --config-fd N`: `aitherctl run` served by aitherd. The caller's three
/// descriptors are this process's stdio, so the launch treats them exactly as `aitherctl run`
/// treats its own (a terminal gets the agent a pty of its own); the messages are the ones
/// `aitherctl run` prints, on the caller's stderr. (A run with egress grants is not served
/// by aitherd: no gateway listener leaves this process.)
fn for_caller() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--status-fd M` (aitherd): the run's code is written there as soon as the agent is
    // done, before the sandbox's teardown (docs/architecture.md, "Warm start").
    let (fd, status) = match args.as_slice() {
        [c, n] => (passed_fd(c, n), Ok(None)),
        [c, n, s, m] if s == "--status-fd" => (passed_fd(c, n), passed_fd(s, m).map(Some)),
        _ => (
            Err(format!(
                "unexpected arguments {args:?} (expected --config-fd N [--status-fd M])"
            )),
            Ok(None),
        ),
    };
    // As `aitherctl run`: never write into cgroups systemd owns (pure v2 with systemd as pid
    // 1); before anything is read, created or started.
    let scoped = delegate::into_own_scope(delegate::ScopeKind::Run).map_err(|e| e.to_string());
    let spec = scoped.and(fd).and_then(|mut f| {
        let mut input = String::new();
        f.read_to_string(&mut input)
            .map_err(|e| format!("reading the spec: {e}"))?;
        serde_json::from_str::<SandboxSpec>(&input)
            .map_err(|e| format!("the spec is not a SandboxSpec: {e}"))
    });
    let (spec, status) = match (spec, status) {
        (Ok(s), Ok(st)) => (s, st),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("aither: error: {e}");
            return 125;
        }
    };
    if let Some(w) = &spec.warning {
        eprintln!("aither: WARNING: {w}");
    }
    // Whether the notes were printed (and the caller's streams given back) already.
    let reported = std::cell::Cell::new(false);
    let io = sandbox::LaunchIo {
        on_exited: status.map(|file| {
            let (spec, reported) = (&spec, &reported);
            Box::new(move |out: &sandbox::Outcome| {
                for n in out.notes(spec) {
                    eprintln!("{n}");
                }
                reported.set(true);
                // The caller's descriptors (this process's 0–2) close before the caller hears
                // of the end: a reader of its pipe sees EOF once the caller is gone too.
                give_back_stdio();
                use std::io::Write;
                let _ = (&file).write_all(format!("{}\n", out.code()).as_bytes());
                drop(file);
            }) as sandbox::launch::OnExited<'_>
        }),
        ..Default::default()
    };
    match sandbox::run_with(&spec, io) {
        Ok(out) => {
            if !reported.get() {
                for n in out.notes(&spec) {
                    eprintln!("{n}");
                }
            }
            out.code()
        }
        Err(e) => {
            let mut text = format!("aither: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                text.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{text}");
            e.exit_code()
        }
    }
}

/// /dev/null on fds 0–2 in place of the caller's descriptors (nothing is written there
/// afterwards).
fn give_back_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // Raw: nix's dup2 wants the target as an OwnedFd (std owns 0–2).
            // SAFETY: dup2 onto the standard descriptors, which stay open (now /dev/null).
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn exec_config() -> Result<ExecConfig, String> {
    match config_fd()? {
        None => stdin_json("ExecConfig"),
        Some(mut f) => {
            let mut input = String::new();
            f.read_to_string(&mut input)
                .map_err(|e| format!("reading the config: {e}"))?;
            serde_json::from_str(&input)
                .map_err(|e| format!("the config is not an ExecConfig: {e}"))
        }
    }
}

fn run_exec() -> i32 {
    let cfg: ExecConfig = match exec_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aither-init exec: error: {e}");
            return 125;
        }
    };
    match sandbox::exec_in(&cfg) {
        Ok(st) => st.code(),
        Err(e) => {
            eprintln!("aither-init exec: {e}");
            e.exit_code()
        }
    }
}

fn run_pool() -> i32 {
    let control = match fd_arg("--control-fd") {
        Ok(Some(f)) => std::os::fd::OwnedFd::from(f),
        Ok(None) => {
            eprintln!("aither-init pool: error: --control-fd N is required");
            return 125;
        }
        Err(e) => {
            eprintln!("aither-init pool: error: {e}");
            return 125;
        }
    };
    // Close-on-exec: nothing this process starts may inherit aitherd's socket (the sandbox's
    // pid 1 closes its copy right after the clone).
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&control),
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        )
    };
    let template: SandboxSpec = match stdin_json("SandboxSpec") {
        Ok(s) => s,
        Err(e) => {
            let _ = sandbox::pool::send(
                std::os::fd::AsFd::as_fd(&control),
                &sandbox::pool::PoolMsg::Refused(e.clone()),
            );
            eprintln!("aither-init pool: error: {e}");
            return 125;
        }
    };
    sandbox::pool::serve(control, &template)
}
