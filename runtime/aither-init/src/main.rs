//! aither-init: the single-threaded launcher used by aitherd (a multithreaded tokio process
//! must not fork and then set up a sandbox). It reads one `SandboxSpec` as JSON on stdin,
//! builds the sandbox exactly as `aitherctl run` does (the same library code: its pid 1 is a
//! fork of this process), waits for it and exits with the agent's status (125/126/127 for
//! Aither's own errors, as `aitherctl run`).
//!
//!     aither-init < spec.json

use std::io::Read;
use std::process::ExitCode;

use aither::sandbox::{self, SandboxSpec};

fn main() -> ExitCode {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aither-init: error: {e:#}");
            125
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn run() -> anyhow::Result<i32> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let spec: SandboxSpec = serde_json::from_str(&input)
        .map_err(|e| anyhow::anyhow!("stdin is not a SandboxSpec: {e}"))?;
    match sandbox::run(&spec) {
        Ok(out) if out.timed_out => Ok(124),
        Ok(out) => Ok(out.status.code()),
        Err(e) => {
            eprintln!("aither-init: {e}");
            Ok(e.exit_code())
        }
    }
}
