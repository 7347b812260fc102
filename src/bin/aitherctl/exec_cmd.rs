//! `aitherctl exec`: a command inside a running agent's sandbox (docs/daemon.md "exec").
//!
//! The command's stdin, stdout and stderr are sent to aitherd with the request (SCM_RIGHTS),
//! never named by a path. A pipe, a regular file or /dev/null goes as it is. Anything else
//! (a terminal without -t, a socket) is relayed through a new pipe by a thread here, so the
//! command never holds the caller's terminal or a socket of the host. With -t the caller's
//! terminal goes to aitherd's launcher, which gives the command a new pty and relays it
//! (crates/aither-core/src/sandbox/stdio.rs, as `aitherctl run` does).

use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::mpsc;

use aither::daemon;
use aither::daemon::client::Client;
use aither::daemon::exec::Terminals;
use aither::daemon::proto::{ExecRequest, Request};
use clap::Args;

use crate::relay::{stream, wait_relays, Stream};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::termios;

/// Aither's own failures (nothing ran, or the result is unknown), as `docker exec`.
pub const EXIT_AITHER: i32 = 125;

/// Run a command inside a running agent's sandbox.
///
/// The command is confined exactly as the agent is: the agent's uid, namespaces (it sees the
/// agent's filesystem view, workspace, processes and network), cgroup (the agent's memory and
/// pids limits count it), Landlock rules, seccomp filter, no capabilities and no_new_privs. It
/// gets the agent's environment plus --env, and starts in the agent's working directory (or
/// -w DIR). It has a Landlock domain of its own: where the kernel scopes signals (Landlock
/// ABI 6), it cannot signal the agent's processes (`aitherctl kill` does).
///
/// Its stdout and stderr are yours. Its stdin is /dev/null unless -i. Without -t the command
/// never gets your terminal: output to a terminal is relayed through a pipe. With -t it gets
/// a new pseudo-terminal of its own (never yours: TIOCSTI and the like reach only that pty),
/// relayed to yours, which is in raw mode while it runs (^C goes to the command).
///
/// Only the agent's owner, root and members of aither-admin may exec into an agent; every exec
/// is audited with its command and caller. An agent runs at most 4 exec'd commands at a time.
/// If aitherctl goes away (killed, or ^C without -t), the command is killed.
///
/// -it runs in the foreground only: the relay is aitherd's, outside your shell's job
/// control. The pty takes your window size as it changes.
///
/// Exit status: the command's own; 128+N when killed by signal N; 126 when it cannot be
/// executed; 127 when it is not found in the sandbox; 125 when Aither failed (no such agent,
/// not running, refused, aitherd not reachable); 2 for bad usage.
///
/// Examples:
///   aitherctl exec web -- ls -l
///   echo data | aitherctl exec -i web -- cat
///   aitherctl exec -it web -- sh
///   aitherctl exec --env DEBUG=1 -w src web -- make test
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ExecArgs {
    /// The agent (running: starting, running, ready or unhealthy).
    name: String,
    /// Pass stdin to the command (without: /dev/null).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give the command a new pseudo-terminal, relayed to yours.
    #[arg(long, short = 't')]
    tty: bool,
    /// Set an environment variable for the command (repeatable); on top of the agent's.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The working directory inside the sandbox (relative: to the agent's).
    #[arg(long = "workdir", short = 'w', value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// The command and its arguments (after `--` when an argument starts with `-`).
    #[arg(
        required = true,
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

pub fn run(a: ExecArgs) -> i32 {
    match exec(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aither: error: {e}");
            EXIT_AITHER
        }
    }
}

fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let mut env = a.env;
    if a.tty && !env.iter().any(|kv| kv.starts_with("TERM=")) {
        // As `docker exec -t`: the command's terminal type is the caller's.
        if let Ok(term) = std::env::var("TERM") {
            env.push(format!("TERM={term}"));
        }
    }
    // With -t our terminal is read by aitherd's launcher, outside our shell's job control:
    // only in the foreground, or it would take keys typed for the shell.
    if a.tty && a.interactive && !foreground() {
        anyhow::bail!(
            "exec -it runs in the foreground of its terminal only (a background job would read \
             keys meant for your shell); drop -t, or run it in the foreground"
        );
    }
    let (done_tx, done_rx) = mpsc::channel();
    let streams = [
        if a.interactive {
            stream(0, Terminals::with_tty(a.tty), None, None)?
        } else {
            Stream::Pass(aither::sys::open(
                std::path::Path::new("/dev/null"),
                libc::O_RDONLY,
            )?)
        },
        stream(1, Terminals::with_tty(a.tty), None, Some(done_tx.clone()))?,
        stream(2, Terminals::with_tty(a.tty), None, Some(done_tx))?,
    ];
    let req = Request::Exec(ExecRequest {
        name: a.name,
        argv: a.command,
        env,
        cwd: a.workdir,
        tty: a.tty,
        copy: None,
    });
    // Our terminal's settings, restored whatever happens to the launcher that sets it raw
    // (also when we are ended by SIGTERM, SIGHUP, SIGINT or SIGQUIT).
    let _restore = a.tty.then(Termios::save).flatten();
    let mut client = Client::connect(&daemon::socket_path())?;
    let fds: Vec<BorrowedFd<'_>> = streams.iter().map(Stream::fd).collect();
    let reply = client.call_with_fds(&req, &fds);
    drop(fds);
    // Our copies of the pipes' far ends close: a relay sees EOF when the command's do.
    let outputs = streams[1..]
        .iter()
        .filter(|s| matches!(s, Stream::Relay(_)))
        .count();
    drop(streams);
    let reply = reply?;
    wait_relays(&done_rx, outputs);
    match (reply.ok, reply.error) {
        (true, _) => {
            let code = reply
                .data
                .as_ref()
                .and_then(|d| d.get("exit_code"))
                .and_then(|c| c.as_i64())
                .ok_or_else(|| anyhow::anyhow!("aitherd's reply has no exit code"))?;
            Ok(code as i32)
        }
        (false, Some(e)) => anyhow::bail!("{} ({})", e.message, e.code),
        (false, None) => anyhow::bail!("aitherd refused without a reason"),
    }
}

/// Whether we are in the foreground process group of the terminal on stdin.
fn foreground() -> bool {
    nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|g| g == nix::unistd::getpgrp())
}

/// The settings the signal handler puts back (set once, before the handler is installed).
static SAVED: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

/// SIGTERM and friends: our terminal's settings back, then the conventional status. The
/// connection closes with us, so aitherd kills the command.
extern "C" fn restore_and_exit(sig: libc::c_int) {
    if let Some(t) = SAVED.get() {
        // Raw: nix's Termios (a RefCell) cannot be the static this handler reads.
        // SAFETY: tcsetattr is async-signal-safe; `t` was written before the handler existed.
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, t) };
    }
    // Raw: nix has no _exit, and std's exit is not async-signal-safe.
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Our stdin terminal's settings, put back on drop.
struct Termios {
    saved: termios::Termios,
}

impl Termios {
    fn save() -> Option<Termios> {
        let t = termios::tcgetattr(io::stdin()).ok()?;
        let _ = SAVED.set(t.clone().into());
        for sig in [
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGINT,
            Signal::SIGQUIT,
        ] {
            // SAFETY: a handler that only calls async-signal-safe functions.
            let _ = unsafe { signal::signal(sig, SigHandler::Handler(restore_and_exit)) };
        }
        Some(Termios { saved: t })
    }
}

impl Drop for Termios {
    fn drop(&mut self) {
        // Restores the settings read before the command ran.
        let _ = termios::tcsetattr(io::stdin(), termios::SetArg::TCSADRAIN, &self.saved);
    }
}
