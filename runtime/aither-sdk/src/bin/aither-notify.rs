//! `aither-notify`: tell aitherd about this agent from a shell, like `systemd-notify`.

use std::ffi::OsString;
use std::process::ExitCode;

use aither_sdk::{Channel, SdkError, Severity};

const USAGE: &str = "\
Usage: aither-notify --ready
       aither-notify --heartbeat
       aither-notify --pain SEVERITY REASON
       aither-notify --status TEXT

Send one message to aitherd over the agent channel (the descriptor named by AITHER_FD)
and wait for its reply.

Options:
  --ready                  the agent is ready (like systemd-notify --ready)
  --heartbeat              keep the watchdog from restarting the agent
  --pain SEVERITY REASON   report a pain signal; SEVERITY is info, warning, error or
                           critical; REASON is at most 1024 bytes
  --status TEXT            set the agent's status line (at most 1024 bytes)
  -h, --help               print this help

Exit status: 0 when aitherd accepted the message; 1 when it refused it (its error is
printed) or the channel failed; 2 when not running under aitherd (AITHER_FD is not set);
64 on a usage error.

The agent channel should be owned by one process: aither-notify shares it for the length
of one request, and replies meant for another user of the descriptor are skipped.";

const EXIT_REFUSED: u8 = 1;
const EXIT_NO_CHANNEL: u8 = 2;
const EXIT_USAGE: u8 = 64;

enum Command {
    Help,
    Ready,
    Heartbeat,
    Pain(Severity, String),
    Status(String),
}

fn parse(args: Vec<OsString>) -> Result<Command, String> {
    let args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<Vec<String>, String>>()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["-h" | "--help", ..] => Ok(Command::Help),
        ["--ready"] => Ok(Command::Ready),
        ["--heartbeat"] => Ok(Command::Heartbeat),
        ["--pain", severity, reason] => {
            let severity = severity.parse::<Severity>().map_err(|e| e.to_string())?;
            Ok(Command::Pain(severity, (*reason).to_owned()))
        }
        ["--pain", ..] => Err("--pain takes two arguments: SEVERITY REASON".into()),
        ["--status", text] => Ok(Command::Status((*text).to_owned())),
        ["--status", ..] => Err("--status takes one argument: TEXT".into()),
        [] => Err("nothing to send".into()),
        ["--ready" | "--heartbeat", extra, ..] => Err(format!("unexpected argument {extra:?}")),
        [other, ..] => Err(format!("unknown option {other:?}")),
    }
}

fn send(command: Command) -> Result<(), SdkError> {
    let channel = Channel::from_env()?;
    match command {
        Command::Help => Ok(()),
        Command::Ready => channel.ready(),
        Command::Heartbeat => channel.heartbeat(),
        Command::Pain(severity, reason) => channel.pain(severity, &reason).map(drop),
        Command::Status(text) => channel.status(&text),
    }
}

fn main() -> ExitCode {
    let command = match parse(std::env::args_os().skip(1).collect()) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(command) => command,
        Err(msg) => {
            eprintln!("aither-notify: {msg}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match send(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ SdkError::NotUnderAitherd) => {
            eprintln!("aither-notify: {e}");
            ExitCode::from(EXIT_NO_CHANNEL)
        }
        Err(SdkError::Remote { code, message }) => {
            eprintln!("aither-notify: aitherd refused: {message} ({code})");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("aither-notify: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}
