//! `aitherctl run`: one command in one sandbox, in the foreground, no daemon.

use std::path::PathBuf;
use std::time::Duration;

use aither::policy::Policy;
use aither::sandbox::{self, LaunchError, RunOptions, SandboxSpec};
use aither::units::{self, format_duration, Size};
use clap::Args;

/// Run a command in a sandbox built from a policy, in the foreground.
///
/// The workspace (default: the current directory) is mounted read-write at the same path and
/// is the working directory; everything else follows the policy. Flags may only narrow what
/// the policy grants. stdin, stdout and stderr pass through; SIGINT, SIGTERM, SIGHUP and SIGQUIT
/// are forwarded; if aitherctl dies, the sandbox dies with it.
///
/// Examples:
///   aitherctl run --policy strict -- python3 agent.py
///   aitherctl run --policy ci --timeout 10m --memory 256M -- make test
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Policy name (installed or built-in) or path to a policy file.
    #[arg(long, short = 'p', value_name = "NAME|PATH", default_value = "strict")]
    policy: String,
    /// Directory mounted read-write at the same path (default: current directory).
    #[arg(long, short = 'w', value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Name of the agent (cgroup name, AITHER_AGENT).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Set an environment variable inside (repeatable). The environment otherwise starts empty
    /// but for the policy's variables.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Wall-clock limit (e.g. 30s, 10m): SIGTERM, then SIGKILL 2s later; exit status 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Memory limit (e.g. 256M), at most the policy's.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<Size>,
    /// CPU limit in CPUs (e.g. 0.5), at most the policy's.
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Maximum number of processes and threads, at most the policy's.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<Size, String> {
    units::parse_size(s).map_err(|e| e.to_string())
}

pub fn run(a: RunArgs) -> i32 {
    let spec = match build_spec(&a) {
        Ok(s) => s,
        Err(e) => {
            crate::print_error(&e);
            return 125;
        }
    };
    if let Some(w) = &spec.warning {
        eprintln!("aither: WARNING: {w}");
    }
    match sandbox::run(&spec) {
        Ok(out) => {
            for s in &out.skipped {
                eprintln!("aither: best-effort: {s} was not enforced on this host (policy {:?} allows it)", spec.policy);
            }
            if out.timed_out {
                let t = spec.timeout.map(format_duration).unwrap_or_default();
                eprintln!("aither: timeout: the agent was stopped after {t}");
                return 124;
            }
            if out.oom_killed {
                let m = spec
                    .limits
                    .memory
                    .map(|m| Size(m).to_string())
                    .unwrap_or_default();
                eprintln!("aither: the agent was killed by the OOM killer (memory limit {m})");
            }
            out.status.code()
        }
        Err(e) => {
            let code = e.exit_code();
            match &e {
                LaunchError::NotFound { .. } | LaunchError::NotExecutable { .. } => {
                    eprintln!("aither: {e}")
                }
                _ => crate::print_error(&anyhow::Error::new(e)),
            }
            code
        }
    }
}

fn build_spec(a: &RunArgs) -> anyhow::Result<SandboxSpec> {
    let loaded = Policy::load(&a.policy)?;
    let opts = RunOptions {
        name: a.name.clone(),
        workspace: a.workspace.clone(),
        env: a.env.clone(),
        timeout: a.timeout,
        memory: a.memory,
        cpus: a.cpus,
        pids: a.pids,
        argv: a.command.clone(),
    };
    let cwd = std::env::current_dir()?;
    Ok(SandboxSpec::derive(
        &loaded.policy,
        &opts,
        &|k| std::env::var(k).ok(),
        &cwd,
    )?)
}
