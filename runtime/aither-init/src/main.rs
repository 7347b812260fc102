//! aither-init: the single-threaded launcher used by aitherd (a multithreaded tokio process
//! must not fork and then set up a sandbox). It builds the sandbox exactly as `aitherctl run`
//! does (the same library code: its pid 1 is a fork of this process).
//!
//!     aither-init < spec.json       a SandboxSpec: run it, exit with the agent's status
//!                                   (125/126/127 for Aither's own errors, as `aitherctl run`)
//!     aither-init shim < shim.json  supervised mode, one shim per agent (crates/aither-core/src/sandbox/shim.rs)
//!     aither-init exec < exec.json  a command inside a running sandbox (crates/aither-core/src/sandbox/exec.rs)
//!     aither-init exec --config-fd N
//!                                   the same, the config read from fd N: the command gets this
//!                                   process's stdin, stdout and stderr (`aitherctl exec`)

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
        Some("shim") => run_shim(),
        Some("exec") => run_exec(),
        Some(other) => {
            eprintln!("aither-init: unknown mode {other:?} (expected none, `shim` or `exec`)");
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
    let args: Vec<String> = std::env::args().skip(2).collect();
    match args.as_slice() {
        [] => Ok(None),
        [flag, n] if flag == "--config-fd" => {
            let n: i32 = n.parse().ok().filter(|n| *n > 2).ok_or_else(|| {
                format!("--config-fd {n:?}: expected a descriptor number above 2")
            })?;
            // Raw: the number may be closed, and nix's fcntl needs an open BorrowedFd.
            // SAFETY: F_GETFD only queries the number; a closed one fails.
            if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
                return Err(format!("--config-fd {n}: not open"));
            }
            // SAFETY: the daemon passed this descriptor for us alone; we own it from here.
            Ok(Some(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(n)
            }))
        }
        _ => Err(format!(
            "unexpected arguments {args:?} (expected --config-fd N)"
        )),
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
