//! `aitherctl run` handed to aitherd (docs/daemon.md "run"): when the control socket accepts
//! a connection, the launch is aitherd's, with this process's streams, signals and exit status.
//!
//! Order, and why:
//! 1. Connect first: a refused or absent socket (no daemon) costs a few µs and the standalone
//!    path runs, as it always did.
//! 2. The forwarded signals are blocked before any thread exists (threads inherit the mask),
//!    so none is lost or kills us between the request and the thread that forwards them.
//! 3. The streams: a pipe, a regular file, /dev/null or a terminal go as they are (aitherd's
//!    launcher gives the agent a pty of its own for a terminal); anything else (a socket) is
//!    relayed here through a pipe, as `aitherctl exec` does. The stdin relay reads nothing
//!    until aitherd says the run started: a refusal or an older daemon leaves stdin unread
//!    for the standalone path.
//! 4. The request, with the descriptors (SCM_RIGHTS) and the workspace opened with our own
//!    rights (as `spawn`).
//! 5. `{"started": true}`, or: a daemon that does not know `run` (an older one) or answers
//!    `unsupported` → standalone; any other refusal → its message, exit 125.
//! 6. Signals go to aitherd as `RunSignal` frames on the same connection; the final reply
//!    holds the exit code. If we die, the connection closes and aitherd kills the run.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

use aither::daemon::exec::Terminals;
use aither::daemon::proto::{self, ErrorCode, Reply, Request, RunRequest, RunSignal};
use aither::trace;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::relay::{stream, wait_relays, Stream};
use crate::run_cmd::RunArgs;

/// Aither's own failures (nothing ran, or the result is unknown).
const EXIT_AITHER: i32 = 125;

/// The signals forwarded to the agent, as the standalone launcher forwards them.
const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// What became of the hand-off.
pub enum Handoff {
    /// aitherd ran it (or refused it): this is aitherctl's exit status.
    Done(i32),
    /// No aitherd serves it: run it standalone.
    Standalone,
}

/// Runs `a` through aitherd when its socket accepts a connection.
pub fn try_daemon(a: &RunArgs) -> Handoff {
    let path = aither::daemon::socket_path();
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            trace::mark("ctl", "no daemon");
            return match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Handoff::Standalone,
                // Root may run standalone; anyone else needs aitherd (the launch needs root).
                io::ErrorKind::PermissionDenied if nix::unistd::geteuid().is_root() => {
                    Handoff::Standalone
                }
                io::ErrorKind::PermissionDenied => {
                    eprintln!(
                        "aither: error: {}: permission denied: only root and members of group \
                         aither may use aitherd",
                        path.display()
                    );
                    Handoff::Done(EXIT_AITHER)
                }
                _ => {
                    eprintln!(
                        "aither: error: connecting to aitherd at {}: {e}",
                        path.display()
                    );
                    Handoff::Done(EXIT_AITHER)
                }
            };
        }
    };
    trace::mark("ctl", "daemon connect");
    let mut old = SigSet::empty();
    let set: SigSet = FORWARDED.iter().copied().collect();
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old));
    let out = match handoff(a, sock, set) {
        Ok(h) => h,
        Err(e) => {
            crate::print_error(&e);
            Handoff::Done(EXIT_AITHER)
        }
    };
    if matches!(out, Handoff::Standalone) {
        // The standalone launcher sets its own mask from ours.
        let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    out
}

fn handoff(a: &RunArgs, sock: UnixStream, signals: SigSet) -> anyhow::Result<Handoff> {
    let req = request(a)?;
    let (done_tx, done_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let streams = [
        stream(0, Terminals::Relayed, Some(go_rx), None)?,
        stream(1, Terminals::Relayed, None, Some(done_tx.clone()))?,
        stream(2, Terminals::Relayed, None, Some(done_tx))?,
    ];
    let ws = open_workspace(&req)?;
    let mut fds: Vec<BorrowedFd<'_>> = streams.iter().map(Stream::fd).collect();
    if let Some(w) = &ws {
        fds.push(w.as_fd());
    }
    // Our terminal's settings, put back at the end whatever happened to the launcher that
    // sets it raw (killed with the connection).
    let _restore = Termios::save();
    proto::write_frame_fds(&sock, &Request::Run(Box::new(req)), &fds)?;
    drop(fds);
    drop(ws);
    // Our copies of the pipes' far ends close: a relay sees EOF when the agent's do.
    let outputs = streams[1..]
        .iter()
        .filter(|s| matches!(s, Stream::Relay(_)))
        .count();
    drop(streams);
    trace::mark("ctl", "daemon request sent");
    let mut reader = &sock;
    let first = read_reply(&mut reader)?;
    if let Some(e) = &first.error {
        // An older daemon does not know `run`; `unsupported`: this run is not one aitherd
        // serves (docs/daemon.md "run"). Nothing ran, nothing was read from stdin.
        let unknown = e.code == ErrorCode::BadRequest && e.message.contains("unknown variant");
        if unknown || e.code == ErrorCode::Unsupported {
            trace::mark("ctl", "daemon declined");
            return Ok(Handoff::Standalone);
        }
        eprintln!(
            "aither: aitherd refused the run: {} ({})",
            e.message, e.code
        );
        return Ok(Handoff::Done(EXIT_AITHER));
    }
    trace::mark("ctl", "daemon started");
    let _ = go_tx.send(());
    let writer = sock.try_clone()?;
    std::thread::spawn(move || forward_signals(writer, signals));
    let last = match read_reply(&mut reader) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aither: error: aitherd went away during the run: {e:#}");
            return Ok(Handoff::Done(EXIT_AITHER));
        }
    };
    wait_relays(&done_rx, outputs);
    match (last.ok, last.error) {
        (true, _) => {
            let code = last
                .data
                .as_ref()
                .and_then(|d| d.get("exit_code"))
                .and_then(|c| c.as_i64())
                .ok_or_else(|| anyhow::anyhow!("aitherd's reply has no exit code"))?;
            Ok(Handoff::Done(code as i32))
        }
        (false, Some(e)) => {
            eprintln!("aither: error: {} ({})", e.message, e.code);
            Ok(Handoff::Done(EXIT_AITHER))
        }
        (false, None) => anyhow::bail!("aitherd failed without a reason"),
    }
}

fn read_reply(r: &mut &UnixStream) -> anyhow::Result<Reply> {
    let body = proto::read_frame_limit(r, proto::MAX_REPLY)?
        .ok_or_else(|| anyhow::anyhow!("aitherd closed the connection without a reply"))?;
    Ok(serde_json::from_slice(&body)?)
}

/// The request: what the standalone path would decide from, for aitherd to decide.
fn request(a: &RunArgs) -> anyhow::Result<RunRequest> {
    let cwd = std::env::current_dir()?;
    let token = match &a.token {
        Some(arg) => Some(crate::token_cmd::read_token_arg(arg)?.encode()),
        None => None,
    };
    // A policy file is resolved here: aitherd's working directory is not ours.
    let policy = a.policy.as_ref().map(|p| {
        if p.contains('/') || p.ends_with(".toml") {
            std::fs::canonicalize(p)
                .map(|c| c.display().to_string())
                .unwrap_or_else(|_| p.clone())
        } else {
            p.clone()
        }
    });
    Ok(RunRequest {
        name: a.name.clone(),
        policy,
        token,
        argv: a.command.clone(),
        // Absolute, lexically only: aitherd opens it without following links.
        workspace: a.workspace.as_ref().map(|w| {
            if w.is_absolute() {
                w.clone()
            } else {
                cwd.join(w)
            }
        }),
        cwd,
        env: a.env.clone(),
        pass_env: std::env::vars().collect(),
        timeout_ms: a.timeout.map(|t| t.as_millis() as u64),
        memory: a.memory.map(|m| m.0),
        cpus: a.cpus,
        pids: a.pids,
        workspace_as_owner: a.workspace_as_owner,
    })
}

/// The workspace opened with our own rights (aitherd checks this descriptor, so it never
/// reaches a directory we could not). `-w` that cannot be opened is an error; the default
/// (the current directory) goes when it can be opened, and aitherd decides.
fn open_workspace(req: &RunRequest) -> anyhow::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path: &Path = req.workspace.as_deref().unwrap_or(&req.cwd);
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if req.workspace.is_some() => {
            anyhow::bail!("workspace {}: {e}", path.display())
        }
        Err(_) => Ok(None),
    }
}

/// Sends each forwarded signal we receive to aitherd, until the connection is gone.
fn forward_signals(mut sock: UnixStream, set: SigSet) {
    while let Ok(sig) = set.wait() {
        let frame = RunSignal { signal: sig as i32 };
        if proto::write_frame(&mut sock, &frame).is_err() {
            return;
        }
    }
}

/// Our stdin terminal's settings, put back on drop (none when stdin is not a terminal).
struct Termios {
    saved: nix::sys::termios::Termios,
}

impl Termios {
    fn save() -> Option<Termios> {
        let saved = nix::sys::termios::tcgetattr(io::stdin()).ok()?;
        Some(Termios { saved })
    }
}

impl Drop for Termios {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            io::stdin(),
            nix::sys::termios::SetArg::TCSADRAIN,
            &self.saved,
        );
    }
}
