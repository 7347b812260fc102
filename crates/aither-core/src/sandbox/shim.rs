//! Supervised mode (`aither-init shim`): one shim process per agent, spawned by aitherd (like
//! conmon or containerd-shim). The shim is the sandbox's launcher and outlives daemon restarts:
//! it owns the agent's log, its exit record and the daemon's end of the agent's socket.
//!
//! Contract with the daemon:
//! - stdin: one `ShimConfig` (JSON). When stdin is a socket (aitherd's way), its first byte
//!   comes with the agent channel's two ends (SCM_RIGHTS), put at fds 3 and 4
//!   ([`receive_handed_fds`]); otherwise they are inherited there.
//! - stdout: exactly one JSON line (`ShimEvent`), then closed: `started` once the agent has
//!   been exec'ed, or `failed` (and the shim exits with its code, 125/126/127).
//! - `log_dir/agent.log`: the agent's stdout and stderr in arrival order, as records of the
//!   CRI log format (src/logfmt.rs: time, stream, partial or full line), with a record where
//!   each run starts and ends; rotated at `log_max_bytes` into `agent.log.1` …
//!   `agent.log.{log_keep-1}`. `log_dir/run` numbers the runs.
//! - `log_dir/exit.json` (`ExitRecord`, written atomically) when the sandbox has ended or the
//!   launch failed; the shim then exits with the shell-convention status.
//! - SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2, SIGWINCH are forwarded to the agent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::launch::{self, LaunchError, LaunchIo, LogSink, Outcome};
use super::spec::SandboxSpec;
use crate::logfmt::{self, RunEvent, Stream};
use crate::sys::ExitStatus;

/// Errors of the shim before or around the launch (launch errors have their own type).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{what} {fd}: {reason}")]
    BadFd {
        what: &'static str,
        fd: RawFd,
        reason: String,
    },
    #[error("starting a new session (setsid): {0}")]
    Session(#[source] io::Error),
    #[error("opening the agent log in {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}: {source}")]
    ExitRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

impl ShimError {
    /// The exit status (and `failed` event code): 125, or the launch's 126/127.
    pub fn exit_code(&self) -> i32 {
        match self {
            ShimError::Launch(e) => e.exit_code(),
            _ => 125,
        }
    }
}

/// What the daemon writes on the shim's stdin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShimConfig {
    pub spec: SandboxSpec,
    /// Holds agent.log, its rotations and exit.json (created if missing).
    pub log_dir: PathBuf,
    /// agent.log never grows past this (0: no rotation).
    pub log_max_bytes: u64,
    /// Log files kept, agent.log included (agent.log.1 … agent.log.{log_keep-1}).
    pub log_keep: u32,
    /// An inherited socket given to the agent as fd 3 (`AITHER_FD=3`).
    pub channel_fd: Option<RawFd>,
    /// An inherited descriptor the shim holds, untouched, for its whole life (the daemon
    /// recovers it with pidfd_getfd after a restart). Never enters the sandbox.
    pub keep_fd: Option<RawFd>,
}

/// The single line the shim prints on stdout (a wire type of aither-proto), with the typed
/// enforcement report.
pub type ShimEvent = aither_proto::ShimEvent<Box<super::report::Report>>;

/// `log_dir/exit.json` (a wire type of aither-proto).
pub use aither_proto::ExitRecord;

/// The record of a run that ended.
fn finished_record(out: &Outcome) -> ExitRecord {
    let (code, signal) = match out.status {
        ExitStatus::Exited(c) => (Some(c), None),
        ExitStatus::Signaled(s) => (None, Some(s)),
    };
    ExitRecord {
        code,
        signal,
        oom_killed: out.oom_killed,
        timed_out: out.timed_out,
        launch_error: None,
        finished_unix_ms: unix_ms(),
    }
}

/// The record of a launch that failed.
fn failed_record(code: i32, error: String) -> ExitRecord {
    ExitRecord {
        code: Some(code),
        signal: None,
        oom_killed: false,
        timed_out: false,
        launch_error: Some(error),
        finished_unix_ms: unix_ms(),
    }
}

/// Writes `dir/exit.json` atomically: a new file (O_EXCL, synced: a reader never sees a
/// torn record) renamed over the name inside `dir`, opened without following links
/// (src/hostpath.rs): a link at either name is replaced, never followed.
pub fn write_exit_record(rec: &ExitRecord, dir: &Path) -> Result<(), ShimError> {
    let path = dir.join("exit.json");
    let err = |source| ShimError::ExitRecord {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec(rec).map_err(|e| err(io::Error::other(e)))?;
    let d = crate::hostpath::open_dir_nofollow(dir).map_err(|e| err(io::Error::other(e)))?;
    crate::hostpath::replace_file_at(
        std::os::fd::AsFd::as_fd(&d),
        std::ffi::OsStr::new("exit.json"),
        &body,
        0o640,
    )
    .map_err(|e| err(io::Error::other(e)))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The agent's log (docs/daemon.md "Logs"): records of the CRI log format (src/logfmt.rs), in
/// one file rotated by size. A record is never split across files; agent.log passes the limit
/// only when a single record (with the `continued` record that starts every rotated-to file)
/// is larger than it.
pub struct RotatingLog {
    /// The directory, opened without following links; every name below is used through it.
    dir: OwnedFd,
    max: u64,
    keep: u32,
    file: File,
    size: u64,
    /// Bytes of the `continued` record at the top of the current file (not worth a rotation).
    header: u64,
    /// The run being logged, named again at the top of each file rotated to.
    run: Option<u64>,
}

/// Holds the number of the last run (a decimal), in the log directory.
const RUN_FILE: &str = "run";

impl RotatingLog {
    pub fn open(dir: &Path, max: u64, keep: u32) -> io::Result<RotatingLog> {
        fs::create_dir_all(dir)?;
        let dir = crate::hostpath::open_dir_nofollow(dir).map_err(io::Error::other)?;
        let file = Self::open_file(&dir, "agent.log")?;
        let size = file.metadata()?.len();
        let mut log = RotatingLog {
            dir,
            max,
            keep,
            file,
            size,
            header: 0,
            run: None,
        };
        // A file of the old raw format may end inside a line: records start on a line of
        // their own.
        let mut last = [0u8; 1];
        if size > 0
            && std::os::unix::fs::FileExt::read_at(&log.file, &mut last, size - 1)? == 1
            && last[0] != b'\n'
        {
            log.file.write_all(b"\n")?;
            log.size += 1;
        }
        Ok(log)
    }

    /// agent.log in `dir`, appended to (read only for its last byte); never through a link,
    /// only a regular file.
    fn open_file(dir: &OwnedFd, name: &str) -> io::Result<File> {
        use rustix::fs::{Mode, OFlags};
        let fd = crate::hostpath::open_at_nofollow(
            std::os::fd::AsFd::as_fd(dir),
            Path::new(name),
            OFlags::CREATE | OFlags::APPEND | OFlags::RDWR,
            Mode::from_raw_mode(0o640),
        )
        .map_err(io::Error::other)?;
        let kind = crate::hostpath::check_fd(std::os::fd::AsFd::as_fd(&fd))?.kind;
        if kind != crate::hostpath::Kind::File {
            return Err(io::Error::other(format!(
                "{name} is {kind}, not a regular file"
            )));
        }
        Ok(File::from(fd))
    }

    fn path(&self, n: u32) -> String {
        match n {
            0 => "agent.log".into(),
            n => format!("agent.log.{n}"),
        }
    }

    /// agent.log.{keep-1} deleted, agent.log.N → agent.log.N+1, agent.log → agent.log.1, and a
    /// new agent.log, which starts by naming the run. With `keep` ≤ 1 agent.log is simply
    /// started anew.
    fn rotate(&mut self) -> io::Result<()> {
        let gone = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        // Names inside the directory fd: unlinkat and renameat act on the names themselves.
        let d = &self.dir;
        let rm = |n: String| rustix::fs::unlinkat(d, n, rustix::fs::AtFlags::empty());
        let mv = |a: String, b: String| rustix::fs::renameat(d, a, d, b);
        if self.keep <= 1 {
            gone(rm(self.path(0)).map_err(io::Error::from))?;
        } else {
            gone(rm(self.path(self.keep - 1)).map_err(io::Error::from))?;
            for n in (1..self.keep - 1).rev() {
                gone(mv(self.path(n), self.path(n + 1)).map_err(io::Error::from))?;
            }
            gone(mv(self.path(0), self.path(1)).map_err(io::Error::from))?;
        }
        self.file = Self::open_file(&self.dir, "agent.log")?;
        self.size = 0;
        self.header = 0;
        if let Some(run) = self.run {
            let mut rec = Vec::new();
            logfmt::encode_run(logfmt::now_ns(), run, &RunEvent::Continued, &mut rec);
            self.file.write_all(&rec)?;
            self.size = rec.len() as u64;
            self.header = self.size;
        }
        Ok(())
    }

    /// Appends one whole record, after a rotation if it would take agent.log past the limit.
    fn append(&mut self, rec: &[u8]) -> io::Result<()> {
        if self.max > 0 && self.size > self.header && self.size + rec.len() as u64 > self.max {
            self.rotate()?;
        }
        self.file.write_all(rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    /// Numbers a new run (one more than the last one this directory saw) and logs its start.
    /// A counter that cannot be written does not keep the run from being logged (its number
    /// may then repeat in a later run). Not fsynced (one fsync per start, before the launch):
    /// after a power cut the counter may be older, with that same outcome, and the log it
    /// numbers is not fsynced either.
    pub fn start_run(&mut self) -> io::Result<u64> {
        let run = self.last_run().unwrap_or(0) + 1;
        let counted = crate::hostpath::replace_file_at_unsynced(
            std::os::fd::AsFd::as_fd(&self.dir),
            std::ffi::OsStr::new(RUN_FILE),
            format!("{run}\n").as_bytes(),
            0o640,
        );
        if let Err(e) = counted {
            eprintln!("aither-init shim: writing the run counter: {e}");
        }
        self.run = Some(run);
        let mut rec = Vec::new();
        logfmt::encode_run(logfmt::now_ns(), run, &RunEvent::Started, &mut rec);
        self.append(&rec)?;
        Ok(run)
    }

    /// Logs how the current run ended.
    pub fn end_run(&mut self, event: &RunEvent) -> io::Result<()> {
        let Some(run) = self.run else { return Ok(()) };
        let mut rec = Vec::new();
        logfmt::encode_run(logfmt::now_ns(), run, event, &mut rec);
        self.append(&rec)
    }

    /// The number in `run` (opened without following links, read bounded).
    fn last_run(&self) -> Option<u64> {
        use rustix::fs::{Mode, OFlags};
        let fd = crate::hostpath::open_at_nofollow(
            std::os::fd::AsFd::as_fd(&self.dir),
            Path::new(RUN_FILE),
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .ok()?;
        if crate::hostpath::check_fd(std::os::fd::AsFd::as_fd(&fd))
            .ok()?
            .kind
            != crate::hostpath::Kind::File
        {
            return None;
        }
        let mut buf = [0u8; 24];
        let n = std::os::unix::fs::FileExt::read_at(&File::from(fd), &mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
    }
}

impl LogSink for RotatingLog {
    /// Each line as a record (longer ones in parts), all stamped with the time of the read;
    /// write errors are dropped (logging never stops supervision).
    fn output(&mut self, stream: Stream, bytes: &[u8]) {
        let ts = logfmt::now_ns();
        let mut rec = Vec::with_capacity(logfmt::MAX_TEXT + 64);
        logfmt::split_output(bytes, |text, partial| {
            rec.clear();
            logfmt::encode_output(ts, stream, partial, text, &mut rec);
            let _ = self.append(&rec);
        });
    }

    fn flush(&mut self) {
        let _ = self.file.flush();
    }
}

/// The run boundary record for a launch's result.
fn end_event(res: &Result<Outcome, LaunchError>) -> RunEvent {
    match res {
        Ok(out) => {
            let (code, signal) = match out.status {
                ExitStatus::Exited(c) => (Some(c), None),
                ExitStatus::Signaled(s) => (None, Some(s)),
            };
            RunEvent::Exited {
                code,
                signal,
                oom_killed: out.oom_killed,
            }
        }
        Err(e) => RunEvent::Failed {
            code: e.exit_code(),
        },
    }
}

/// Prints the one event line and closes stdout (the daemon reads to EOF). fd 1 then points at
/// /dev/null, so that no later descriptor can take its number and receive stray output.
fn emit(event: &ShimEvent) {
    let mut line = serde_json::to_string(event).unwrap_or_default();
    line.push('\n');
    let mut out = io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
    if let Ok(null) = File::open("/dev/null") {
        // Onto fd 1, which std's stdout keeps using (now /dev/null).
        let _ = nix::unistd::dup2_stdout(&null);
    }
}

/// Where the daemon's two channel descriptors end up in the shim: the agent's end (it becomes
/// the agent's fd 3) and the daemon's own end (kept for a restarted daemon's pidfd_getfd).
pub const HANDED_FDS: [RawFd; 2] = [3, 4];

/// The daemon's hand-over (src/daemon/shim.rs): when stdin is a socket, its first byte comes
/// with the two channel descriptors (SCM_RIGHTS), which are put at [`HANDED_FDS`] here, before
/// the config is read. The daemon can then start the shim with `posix_spawn` (no copy of its
/// page tables per spawn) instead of a fork that moves them in a `pre_exec`. With stdin not a
/// socket the descriptors were inherited at those numbers (the earlier contract; the tests'
/// harness): nothing to do.
pub fn receive_handed_fds() -> Result<(), ShimError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let bad = |fd: RawFd, reason: String| ShimError::BadFd {
        what: "handed fd",
        fd,
        reason,
    };
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // Raw: fd 0 may be closed (nix's fstat would need it as a BorrowedFd).
    // SAFETY: fstat of a descriptor number; a closed one fails with EBADF.
    let stat = unsafe { libc::fstat(0, &mut st) };
    if stat != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(());
    }
    // A descriptor already at 3 or 4 is a stray aitherd inherited without close-on-exec (from
    // whoever started it) and passed on: nothing in the shim owns it, and the handed ones
    // take those numbers (as the earlier fork's dup2 did). Closed first, so the kernel does
    // not give the received ones a number it is about to reuse.
    for fd in HANDED_FDS {
        // Raw: a number nothing here owns, which may be closed already (EBADF, ignored).
        // SAFETY: closing a descriptor number no Rust object owns.
        unsafe { libc::close(fd) };
    }
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (n, truncated, got) = loop {
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(0, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => {
                let mut got: Vec<OwnedFd> = Vec::new();
                for c in m.cmsgs().map_err(|e| bad(0, e.to_string()))? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: the kernel just installed these descriptors in this process;
                        // nothing else owns them.
                        got.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                break (m.bytes, m.flags.contains(MsgFlags::MSG_CTRUNC), got);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(bad(0, format!("receiving the channel: {e}"))),
        }
    };
    if n != 1 || truncated || got.len() != HANDED_FDS.len() {
        return Err(bad(
            0,
            format!(
                "expected one byte with {} descriptors, got {n} byte(s) and {}",
                HANDED_FDS.len(),
                got.len()
            ),
        ));
    }
    // Out of the way first (the kernel gave them the lowest free numbers, which may be 3 and
    // 4 in either role), then each onto its number; dup2 leaves the copy inheritable.
    let high = got
        .into_iter()
        .map(|f| nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)))
        .collect::<nix::Result<Vec<RawFd>>>()
        .map_err(|e| bad(0, e.to_string()))?;
    for (h, target) in high.iter().zip(HANDED_FDS) {
        // Raw: nothing owns the target number (closed above).
        // SAFETY: dup2 of an open descriptor onto a free number.
        let r = Errno::result(unsafe { libc::dup2(*h, target) });
        // SAFETY: `h` is our F_DUPFD_CLOEXEC copy, closed once here.
        unsafe { libc::close(*h) };
        r.map_err(|e| bad(target, e.to_string()))?;
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor named in the config, after checking it is open
/// (and, for the agent's channel, a socket).
fn inherited(what: &'static str, fd: RawFd, socket: bool) -> Result<OwnedFd, ShimError> {
    let bad = |reason: String| ShimError::BadFd { what, fd, reason };
    if fd < 3 {
        return Err(bad("must not be stdin, stdout or stderr".into()));
    }
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // Raw: a number not yet known to be open, which nix's fstat would need as a BorrowedFd.
    // SAFETY: fstat of a descriptor number; an unopened one fails with EBADF.
    if let Err(e) = Errno::result(unsafe { libc::fstat(fd, &mut st) }) {
        return Err(bad(io::Error::from(e).to_string()));
    }
    if socket && st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    // SAFETY: the daemon handed this open descriptor to the shim (the contract), nothing else
    // in this process owns it, and it is taken once (the two numbers are checked distinct).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fds 0–2 open (on /dev/null if the daemon closed one), so that no descriptor opened later
/// takes a standard number and gets written to by accident.
fn ensure_stdio() {
    let dup2_to: [fn(&File) -> nix::Result<()>; 3] = [
        |f| nix::unistd::dup2_stdin(f),
        |f| nix::unistd::dup2_stdout(f),
        |f| nix::unistd::dup2_stderr(f),
    ];
    for (fd, dup2) in (0..=2).zip(dup2_to) {
        // Raw: queries a number that may be closed (nix's fcntl needs a BorrowedFd, an open
        // one).
        // SAFETY: F_GETFD only queries a descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
                // Onto the free standard number; `null` is closed after.
                let _ = dup2(&null);
            }
        }
    }
}

/// Runs the shim: launches `cfg.spec` supervised, returns the shim's exit status.
pub fn run(cfg: ShimConfig) -> i32 {
    serve(&cfg, &emit, launch::run_with)
}

/// A prepared sandbox's launcher (`aither-init pool`, sandbox/pool.rs) become `cfg`'s shim:
/// the contract of `run` (the log, exit.json, the channel's ends at [`HANDED_FDS`] which the
/// caller has put there, setsid, the forwarded signals), the launch being
/// `Prepared::finish_supervised`, the one event going to `report` instead of stdout. Works in
/// `cfg.log_dir` as a shim does (a restarted aitherd tells its shims by their working
/// directory).
pub fn run_prepared(
    cfg: ShimConfig,
    prepared: launch::Prepared,
    report: &dyn Fn(&ShimEvent),
) -> i32 {
    if let Err(e) = std::env::set_current_dir(&cfg.log_dir) {
        let e = ShimError::Log {
            path: cfg.log_dir.clone(),
            source: e,
        };
        // `prepared` drops: torn down.
        return failed(&cfg, report, e);
    }
    serve(&cfg, report, |spec, io| {
        prepared.finish_supervised(spec, io)
    })
}

/// The shim's life around one launch: the setup, `launch`, the exit record.
fn serve(
    cfg: &ShimConfig,
    report: &dyn Fn(&ShimEvent),
    launch: impl FnOnce(&SandboxSpec, LaunchIo<'_>) -> Result<Outcome, LaunchError>,
) -> i32 {
    match supervise(cfg, report, launch) {
        Ok(out) => {
            if let Err(e) = write_exit_record(&finished_record(&out), &cfg.log_dir) {
                eprintln!("aither-init shim: {e}");
            }
            out.status.code()
        }
        Err(e) => failed(cfg, report, e),
    }
}

/// A launch that failed: the `failed` event, the record, the code. Also for a pool launcher
/// that could not become the shim (sandbox/pool.rs `become_shim`).
pub fn failed(cfg: &ShimConfig, report: &dyn Fn(&ShimEvent), e: ShimError) -> i32 {
    let code = e.exit_code();
    let msg = e.to_string();
    report(&ShimEvent::Failed {
        code,
        error: msg.clone(),
    });
    // A restarted daemon learns of the failure from the record, not from our stdout.
    let _ = fs::create_dir_all(&cfg.log_dir);
    if let Err(e) = write_exit_record(&failed_record(code, msg), &cfg.log_dir) {
        eprintln!("aither-init shim: {e}");
    }
    code
}

fn supervise(
    cfg: &ShimConfig,
    report: &dyn Fn(&ShimEvent),
    launch: impl FnOnce(&SandboxSpec, LaunchIo<'_>) -> Result<Outcome, LaunchError>,
) -> Result<Outcome, ShimError> {
    // Our own session first: terminal signals meant for the daemon's session must not reach
    // the shim (it outlives the daemon). Already a session leader is fine.
    if let Err(e) = nix::unistd::setsid() {
        if nix::unistd::getsid(None) != Ok(nix::unistd::Pid::this()) {
            return Err(ShimError::Session(e.into()));
        }
    }
    // A daemon that went away must not kill us through a write to its closed pipe.
    // SAFETY: SIG_IGN installs no handler, so nothing runs in signal context.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
    // Before any descriptor is opened, so that none takes a standard number.
    ensure_stdio();
    if cfg.channel_fd.is_some() && cfg.channel_fd == cfg.keep_fd {
        return Err(ShimError::BadFd {
            what: "channel_fd",
            fd: cfg.channel_fd.unwrap_or(-1),
            reason: "is also keep_fd".into(),
        });
    }
    // Held until the shim exits; pid 1 closes its copy with every other inherited fd.
    let _keep = cfg
        .keep_fd
        .map(|fd| inherited("keep_fd", fd, false))
        .transpose()?;
    let channel = cfg
        .channel_fd
        .map(|fd| inherited("channel_fd", fd, true))
        .transpose()?;
    let mut log =
        RotatingLog::open(&cfg.log_dir, cfg.log_max_bytes, cfg.log_keep).map_err(|source| {
            ShimError::Log {
                path: cfg.log_dir.clone(),
                source,
            }
        })?;
    // The egress gateway's socket, kept at SHIM_EGRESS_FD for the daemon to take (and take
    // again after a restart) with pidfd_getfd.
    let mut egress: Option<OwnedFd> = None;
    let keep_egress = |fd: OwnedFd| egress = keep_at(fd, SHIM_EGRESS_FD);
    // The sandbox's network namespace, kept at SHIM_NETNS_FD likewise (published ports).
    let mut netns: Option<OwnedFd> = None;
    let keep_netns = |fd: OwnedFd| netns = keep_at(fd, SHIM_NETNS_FD);
    // Logged before the launch, so that nothing of the run comes before its start.
    let _ = log.start_run();
    let res = launch(
        &cfg.spec,
        LaunchIo {
            agent_channel: channel,
            log: Some(&mut log),
            during_setup: None,
            on_egress: Some(Box::new(keep_egress)),
            on_netns: Some(Box::new(keep_netns)),
            on_exited: None,
            on_started: Some(Box::new(|s| {
                report(&ShimEvent::Started {
                    pid1: s.pid1,
                    agent_pid: s.agent_pid,
                    cgroup: s.cgroup.clone(),
                    report: s.report.clone().map(Box::new),
                })
            })),
        },
    );
    let _ = log.end_run(&end_event(&res));
    drop(egress);
    drop(netns);
    Ok(res?)
}

/// Where the shim keeps the egress gateway's listening socket.
pub const SHIM_EGRESS_FD: RawFd = 100;
/// Where the shim keeps a descriptor of the sandbox's network namespace.
pub const SHIM_NETNS_FD: RawFd = 101;

/// `fd` moved to descriptor number `at` (which must be free), close-on-exec.
fn keep_at(fd: OwnedFd, at: RawFd) -> Option<OwnedFd> {
    // Raw: queries a number that is normally closed (nix's fcntl needs an open BorrowedFd).
    // SAFETY: F_GETFD only queries a descriptor number.
    if unsafe { libc::fcntl(at, libc::F_GETFD) } >= 0 {
        eprintln!("aither-init shim: descriptor {at} is taken; it is not kept");
        return None;
    }
    // Raw: nix's dup3 wants the target as an OwnedFd, and nothing owns that free number yet.
    // SAFETY: dup3 onto a free descriptor number; the new descriptor is owned below.
    let r = Errno::result(unsafe { libc::dup3(fd.as_raw_fd(), at, libc::O_CLOEXEC) }).ok()?;
    // SAFETY: `r` is the new descriptor dup3 just created; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The records of one file, as (stream or "run", partial, text).
    fn records(text: &str) -> Vec<(String, bool, String)> {
        text.lines()
            .map(|l| match logfmt::parse_line(l.as_bytes()) {
                logfmt::Record::Output {
                    stream,
                    partial,
                    text,
                    ts_ns,
                } => {
                    assert!(ts_ns.is_some(), "{l}");
                    (
                        stream.as_str().to_string(),
                        partial,
                        String::from_utf8_lossy(text).into_owned(),
                    )
                }
                logfmt::Record::Run { run, event, .. } => {
                    ("run".into(), false, format!("{run} {event:?}"))
                }
            })
            .collect()
    }

    #[test]
    fn the_log_rotates_at_record_boundaries_and_names_the_run_in_each_file() {
        let d = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(d.path(), 200, 3).unwrap();
        assert_eq!(log.start_run().unwrap(), 1);
        log.output(Stream::Stdout, b"one\ntw");
        log.output(Stream::Stderr, b"err\n");
        log.output(Stream::Stdout, b"o\n");
        log.end_run(&RunEvent::Exited {
            code: Some(3),
            signal: None,
            oom_killed: false,
        })
        .unwrap();
        let f = files(d.path());
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["agent.log", "agent.log.1", "agent.log.2", "run"]);
        assert_eq!(f[3].1, "1\n");
        for (name, body) in &f[..3] {
            assert!(body.ends_with('\n'), "{name}: whole records only: {body:?}");
            let n = body.lines().count();
            assert!(body.len() <= 200 || n == 1, "{name}: {body:?}");
        }
        // Oldest first: every file after the first starts by naming run 1.
        let all: Vec<(String, bool, String)> = [&f[2].1, &f[1].1, &f[0].1]
            .iter()
            .flat_map(|b| records(b))
            .filter(|r| r.2 != "1 Continued")
            .collect();
        assert_eq!(records(&f[0].1)[0].2, "1 Continued");
        assert_eq!(records(&f[1].1)[0].2, "1 Continued");
        let want = [
            ("run", false, "1 Started"),
            ("stdout", false, "one"),
            ("stdout", true, "tw"),
            ("stderr", false, "err"),
            ("stdout", false, "o"),
            (
                "run",
                false,
                "1 Exited { code: Some(3), signal: None, oom_killed: false }",
            ),
        ];
        // The oldest file may have been rotated away; what is kept is the newest, in order.
        let want: Vec<(String, bool, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), *b, c.to_string()))
            .collect();
        assert!(want.ends_with(&all), "{all:?}");
        assert!(all.len() >= 3, "{all:?}");
        // The next shim of this directory numbers its run 2.
        let mut again = RotatingLog::open(d.path(), 200, 3).unwrap();
        assert_eq!(again.start_run().unwrap(), 2);
    }

    #[test]
    fn a_huge_line_is_stored_in_bounded_parts_and_an_old_log_is_continued_on_a_new_line() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("agent.log"), "old raw text without newline").unwrap();
        let mut log = RotatingLog::open(d.path(), 0, 3).unwrap();
        let big = vec![b'x'; 3 * logfmt::MAX_TEXT + 5];
        log.output(Stream::Stdout, &big);
        log.output(Stream::Stdout, b"\n");
        let text = fs::read_to_string(d.path().join("agent.log")).unwrap();
        assert!(
            text.starts_with("old raw text without newline\n"),
            "{text:.80}"
        );
        let recs = records(text.split_once('\n').unwrap().1);
        assert_eq!(recs.len(), 5);
        assert!(recs[..4]
            .iter()
            .all(|r| r.1 && r.2.len() <= logfmt::MAX_TEXT));
        assert_eq!(recs[4], ("stdout".into(), false, String::new()));
        assert_eq!(
            logfmt::plain_text(text.as_bytes()),
            [&b"old raw text without newline\n"[..], &big, b"\n"].concat()
        );
    }

    #[test]
    fn keep_one_restarts_the_log_and_zero_max_never_rotates() {
        let d = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(d.path(), 60, 1).unwrap();
        log.output(Stream::Stdout, b"abc\n");
        log.output(Stream::Stdout, b"de\n");
        let f = files(d.path());
        assert_eq!(f.len(), 1);
        assert_eq!(logfmt::plain_text(f[0].1.as_bytes()), b"de\n");
        let d = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(d.path(), 0, 3).unwrap();
        log.output(Stream::Stdout, &[b'x'; 10_000]);
        assert_eq!(files(d.path()).len(), 1);
    }

    #[test]
    fn exit_record_and_events_have_the_documented_shape() {
        let d = tempfile::tempdir().unwrap();
        write_exit_record(&failed_record(127, "nope".into()), d.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(d.path().join("exit.json")).unwrap()).unwrap();
        assert_eq!(v["code"], 127);
        assert_eq!(v["signal"], serde_json::Value::Null);
        assert_eq!(v["oom_killed"], false);
        assert_eq!(v["launch_error"], "nope");
        assert!(v["finished_unix_ms"].as_u64().unwrap() > 0);
        assert_eq!(
            serde_json::to_string(&ShimEvent::Started {
                pid1: 5,
                agent_pid: None,
                cgroup: "a-1".into(),
                report: None,
            })
            .unwrap(),
            r#"{"event":"started","pid1":5,"agent_pid":null,"cgroup":"a-1"}"#
        );
        assert_eq!(
            serde_json::to_string(&ShimEvent::Failed {
                code: 125,
                error: "x".into()
            })
            .unwrap(),
            r#"{"event":"failed","code":125,"error":"x"}"#
        );
    }
}
