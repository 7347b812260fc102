//! The launcher's side of supervised mode (`aither-init shim`, docs/daemon.md): the one line
//! it prints on stdout, and the exit record it leaves in the agent's log directory. The shim's
//! and exec's stdin configs (`ShimConfig`, `ExecConfig`) hold a `SandboxSpec` and stay with
//! the sandbox.

use serde::{Deserialize, Serialize};

/// The single line the shim prints on stdout. `R` is the enforcement report: the launcher
/// writes its typed report, the daemon reads it as JSON and keeps it as text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ShimEvent<R = serde_json::Value> {
    /// The agent has been exec'ed.
    Started {
        pid1: i32,
        #[serde(default)]
        agent_pid: Option<i32>,
        cgroup: String,
        /// The enforcement report (when the spec asks for one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<R>,
    },
    /// The sandbox could not be built; the shim exits with `code` (125, 126, 127).
    Failed { code: i32, error: String },
}

/// `log_dir/exit.json`: how the run ended, written atomically by the shim.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExitRecord {
    /// The exit code; for a failed launch, 125/126/127.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub launch_error: Option<String>,
    #[serde(default)]
    pub finished_unix_ms: u64,
}
