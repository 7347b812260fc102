//! aither-init: the single-threaded launcher used by aitherd (a multithreaded tokio process
//! must not fork and then set up a sandbox). It builds the sandbox exactly as `aitherctl run`
//! does (the same library code: its pid 1 is a fork of this process).
//!
//!     aither-init < spec.json       a SandboxSpec: run it, exit with the agent's status
//!                                   (125/126/127 for Aither's own errors, as `aitherctl run`)
//!     aither-init shim < shim.json  supervised mode, one shim per agent (crates/aither-core/src/sandbox/shim.rs)
//!     aither-init exec < exec.json  a command inside a running sandbox (crates/aither-core/src/sandbox/exec.rs)

use std::io::Read;
use std::process::ExitCode;

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
    match stdin_json::<ShimConfig>("ShimConfig") {
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

fn run_exec() -> i32 {
    let cfg: ExecConfig = match stdin_json("ExecConfig") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aither-init exec: error: {e}");
            return 125;
        }
    };
    let timeout = cfg.timeout_ms.map(std::time::Duration::from_millis);
    match sandbox::exec_in(&cfg.spec, cfg.pid1, &cfg.argv, timeout) {
        Ok(st) => st.code(),
        Err(e) => {
            eprintln!("aither-init exec: {e}");
            e.exit_code()
        }
    }
}
