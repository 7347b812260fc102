//! aitherctl: the command-line front door of Aither. Thin: argument parsing, output and exit
//! codes here; every mechanism lives in the `aither` library.

mod policy_cmd;
mod run_cmd;
mod token_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run AI agents (or any command) in fail-closed Linux sandboxes.
///
/// Every agent gets its own user, pid, mount, network, IPC, UTS and cgroup namespaces, a
/// cgroup with memory/CPU/pids limits, a seccomp allowlist, Landlock rules and no capabilities,
/// all derived from the verified claims of a capability token (`aitherctl token`), minted from a
/// policy (see `aitherctl policy ls`).
///
/// Exit status of `run`: the agent's own; 128+N when killed by signal N; 124 on timeout;
/// 125 when Aither itself failed (nothing ran); 126 when the command cannot be executed;
/// 127 when it is not found in the sandbox.
#[derive(Parser)]
#[command(
    name = "aitherctl",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(run_cmd::RunArgs),
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCmd),
    #[command(subcommand)]
    Token(token_cmd::TokenCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Policy(p) => policy_cmd::run(p),
        Command::Token(t) => token_cmd::run(t),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// clap value parser for durations ("30s", "10m").
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    aither::units::parse_duration(s).map_err(|e| e.to_string())
}

/// clap value parser for sizes ("512M").
pub fn parse_size(s: &str) -> Result<aither::units::Size, String> {
    aither::units::parse_size(s).map_err(|e| e.to_string())
}

/// Prints an error the one way aitherctl prints errors, with its causes.
pub fn print_error(e: &anyhow::Error) {
    let mut msg = format!("aither: error: {e}");
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(&format!(": {c}"));
        }
    }
    eprintln!("{msg}");
}
