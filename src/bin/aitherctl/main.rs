//! aitherctl: the command-line front door of Aither. Thin: argument parsing, output and exit
//! codes here; every mechanism lives in the `aither` library.

mod audit_cmd;
mod bus_cmd;
mod config_cmd;
mod cp_cmd;
mod daemon_cmd;
mod doctor_cmd;
mod escape;
mod exec_cmd;
mod export_cmd;
mod gpu_cmd;
mod layer_cmd;
mod logs_cmd;
mod mcp_cmd;
mod mcp_files;
mod mem_cmd;
mod policy_cmd;
mod relay;
mod run_cmd;
mod run_daemon;
mod secret_cmd;
mod shell_cmd;
mod stats_cmd;
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
/// `run` needs no daemon; `spawn`, `ps`, `logs` and the other agent commands talk to aitherd
/// (socket $AITHER_SOCKET or /run/aither/aitherd.sock).
///
/// Exit status of `run`: the agent's own; 128+N when killed by signal N; 124 on timeout;
/// 125 when Aither itself failed (nothing ran); 126 when the command cannot be executed;
/// 127 when it is not found in the sandbox. Of the daemon commands: 0 done; 1 refused or
/// failed (not found, conflict, launch failed, unsupported by the host); 2 bad usage; 3
/// aitherd not reachable. Commands that take several names (stop, kill, restart, pause,
/// resume, rm) act on each in turn and exit 1 when any failed.
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
    Spawn(daemon_cmd::SpawnArgs),
    Ps(daemon_cmd::PsArgs),
    Inspect(daemon_cmd::InspectArgs),
    Stats(stats_cmd::StatsArgs),
    Logs(logs_cmd::LogsArgs),
    Stop(daemon_cmd::StopArgs),
    Kill(daemon_cmd::KillArgs),
    Restart(daemon_cmd::RestartArgs),
    Pause(daemon_cmd::PauseArgs),
    Resume(daemon_cmd::ResumeArgs),
    Rm(daemon_cmd::RmArgs),
    Exec(exec_cmd::ExecArgs),
    Mcp(mcp_cmd::McpArgs),
    Cp(cp_cmd::CpArgs),
    Diff(layer_cmd::DiffArgs),
    Apply(layer_cmd::ApplyArgs),
    Discard(layer_cmd::DiscardArgs),
    Snapshot(layer_cmd::SnapshotArgs),
    Snapshots(layer_cmd::SnapshotsArgs),
    Restore(layer_cmd::RestoreArgs),
    Fork(layer_cmd::ForkArgs),
    Events(daemon_cmd::EventsArgs),
    Audit(audit_cmd::AuditArgs),
    #[command(subcommand)]
    Bus(bus_cmd::BusCmd),
    #[command(subcommand)]
    Mem(mem_cmd::MemCmd),
    #[command(subcommand)]
    Gpu(gpu_cmd::GpuCmd),
    #[command(subcommand)]
    Daemon(config_cmd::DaemonCmd),
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCmd),
    #[command(subcommand)]
    Token(token_cmd::TokenCmd),
    #[command(subcommand)]
    Secret(secret_cmd::SecretCmd),
    Doctor(doctor_cmd::DoctorArgs),
    #[command(subcommand)]
    Export(export_cmd::ExportCmd),
    Completions(shell_cmd::CompletionsArgs),
    Man(shell_cmd::ManArgs),
}

fn main() -> ExitCode {
    aither::trace::start();
    // `run` is on the launch path: its arguments are parsed by its own subcommand alone
    // (building the whole command tree costs ≈0.35 ms more, docs/performance.md); anything
    // that parser does not accept (help, version, a usage error) goes to the full parser
    // below, so what is printed stays the full parser's.
    if let Some(a) = run_cmd::parse_alone(std::env::args_os()) {
        aither::trace::mark("ctl", "args");
        warn_test_switches();
        return exit(run_cmd::run(a));
    }
    let cli = Cli::parse();
    aither::trace::mark("ctl", "args");
    warn_test_switches();
    let code = match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Spawn(a) => daemon_cmd::spawn(a),
        Command::Ps(a) => daemon_cmd::ps(a),
        Command::Inspect(a) => daemon_cmd::inspect(a),
        Command::Stats(a) => stats_cmd::run(a),
        Command::Logs(a) => logs_cmd::logs(a),
        Command::Stop(a) => daemon_cmd::stop(a),
        Command::Kill(a) => daemon_cmd::kill(a),
        Command::Restart(a) => daemon_cmd::restart(a),
        Command::Pause(a) => daemon_cmd::pause(a),
        Command::Resume(a) => daemon_cmd::resume(a),
        Command::Rm(a) => daemon_cmd::rm(a),
        Command::Exec(a) => exec_cmd::run(a),
        Command::Mcp(a) => mcp_cmd::run(a),
        Command::Cp(a) => cp_cmd::run(a),
        Command::Diff(a) => layer_cmd::diff(a),
        Command::Apply(a) => layer_cmd::apply(a),
        Command::Discard(a) => layer_cmd::discard(a),
        Command::Snapshot(a) => layer_cmd::snapshot(a),
        Command::Snapshots(a) => layer_cmd::snapshots(a),
        Command::Restore(a) => layer_cmd::restore(a),
        Command::Fork(a) => layer_cmd::fork(a),
        Command::Events(a) => daemon_cmd::events(a),
        Command::Audit(a) => audit_cmd::run(a),
        Command::Bus(b) => bus_cmd::run(b),
        Command::Mem(m) => mem_cmd::run(m),
        Command::Gpu(g) => gpu_cmd::run(g),
        Command::Daemon(c) => config_cmd::run(c),
        Command::Policy(p) => policy_cmd::run(p),
        Command::Token(t) => token_cmd::run(t),
        Command::Secret(s) => secret_cmd::run(s),
        Command::Doctor(a) => doctor_cmd::run(a),
        Command::Export(e) => export_cmd::run(e),
        Command::Completions(a) => shell_cmd::completions(a),
        Command::Man(a) => shell_cmd::man(a),
    };
    exit(code)
}

fn warn_test_switches() {
    for n in aither::testhooks::ignored() {
        eprintln!("aither: warning: {n} is a test switch and is ignored by a release build");
    }
}

fn exit(code: i32) -> ExitCode {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn argv(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    /// `run`'s own parser (the launch path's) gives what the full parser gives, and hands
    /// everything else (help, version, usage errors, other commands) to the full parser.
    #[test]
    fn run_alone_parses_as_the_full_parser_does() {
        for line in [
            "aitherctl run -- true",
            "aitherctl run --policy ci --timeout 10m --memory 256M -e A=B -e C=D -w /tmp -- make test -x",
            "aitherctl run -p strict --name x --cpus 0.5 --pids 10 --report r.json --workspace-as-owner --config c.toml -- sh -c x",
            "aitherctl run --token t -- a --policy b --help",
        ] {
            let alone = run_cmd::parse_alone(argv(line).into_iter()).expect(line);
            let Command::Run(full) = Cli::try_parse_from(argv(line)).expect(line).command else {
                panic!("{line}: not run");
            };
            assert_eq!(format!("{alone:?}"), format!("{full:?}"), "{line}");
        }
        for line in [
            "aitherctl run --help",
            "aitherctl run -h",
            "aitherctl run --version",
            "aitherctl run",
            "aitherctl run --policy a --token b -- x",
            "aitherctl run --bogus -- x",
            "aitherctl run --timeout soon -- x",
            "aitherctl ps",
            "aitherctl",
        ] {
            assert!(
                run_cmd::parse_alone(argv(line).into_iter()).is_none(),
                "{line}"
            );
        }
    }
}
