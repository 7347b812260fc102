//! `aitherctl run`'s standard streams: the agent never gets the caller's terminal, and nothing
//! of the caller's is chowned or chmodded (docs/security-model.md, "The caller's terminal").
//!
//! Each of the caller's fds 0–2 is, for the agent:
//! - a terminal: the slave of a new pty (one for all three), relayed by the launcher to and
//!   from the caller's terminal, which is put in raw mode for the run (as `docker run -t`
//!   does) and restored when the launcher ends, on every path but SIGKILL. The window size
//!   follows the caller's (SIGWINCH). The pty is the controlling terminal of the sandbox's
//!   session, so ^C reaches the agent through its own line discipline; TIOCSTI, TIOCSETD,
//!   TCSETS or TIOCEXCL on it change the agent's pty only.
//! - a pipe or FIFO: a new pipe, owned by the agent's host uid (so that `echo x >
//!   /dev/stderr` reopens it), relayed to or from the caller's. stdout and stderr on the
//!   same pipe share one relay pipe, so their order is kept.
//! - anything else (/dev/null, a regular file, a socket): the caller's descriptor as is. It is
//!   never chowned, so reopening it through /dev/stdout inside fails (EACCES): write to the
//!   descriptor instead. A descriptor the caller closed stays closed when nothing is relayed,
//!   and is /dev/null otherwise.
//!
//! Like `docker run -i`, the relay reads a caller's stdin pipe ahead of the agent (up to the
//! relay pipe's capacity plus one 16 KiB chunk): what the agent did not read is not left in the
//! caller's pipe for the next reader.
//!
//! The relay runs in the launcher's supervise loop. Writes to the caller's descriptors (which
//! stay blocking: their flags are shared with the caller's shell) happen only after POLLOUT and
//! at most PIPE_BUF bytes at a time, so a slow reader never stalls signal forwarding.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::termios::{self, SetArg, Termios};

/// The caller's descriptor `fd`, borrowed for the relay's lifetime.
fn caller(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only called for a number that `kind` found open: the launcher's own 0–2
    // (nothing in the launcher closes them, so they stay open for as long as it runs), or one
    // of the caller's descriptors a prepared sandbox's finish received, which the `Relay`
    // owns (`Relay::_callers`) and closes only after everything that borrows it (its last
    // field).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// A copy of `fd` at a number ≥ 3, close-on-exec (the child places it at 0–2).
fn dup_high(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    crate::sys::dup_above(fd, 3)
}

/// O_NONBLOCK on a descriptor we own (never a caller's: its flags are shared with the shell).
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// fchown of an inode we created (a new pipe or pty), held open.
fn fchown_to(fd: BorrowedFd<'_>, uid: u32) -> io::Result<()> {
    use nix::unistd::{Gid, Uid};
    Ok(nix::unistd::fchown(
        fd,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(uid)),
    )?)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Terminal,
    Pipe(libc::dev_t, libc::ino_t),
    Other,
    /// Not open in the caller: /dev/null for the agent (when anything is relayed at all).
    Closed,
}

fn kind(fd: RawFd) -> Kind {
    // Raw: the number may be closed, and nix's fcntl needs an open BorrowedFd.
    // SAFETY: F_GETFD only queries the descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Kind::Closed;
    }
    if nix::unistd::isatty(caller(fd)) == Ok(true) {
        return Kind::Terminal;
    }
    match nix::sys::stat::fstat(caller(fd)) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFIFO => Kind::Pipe(st.st_dev, st.st_ino),
        _ => Kind::Other,
    }
}

/// One direction of the relay.
struct Pump {
    src: RawFd,
    /// -1: read and discard (the pty's echo when no caller stream is a terminal).
    dst: RawFd,
    /// Our own ends (closed when the pump ends: EOF for the agent's stdin, EPIPE for a writer
    /// whose reader went away).
    own_src: Option<OwnedFd>,
    own_dst: Option<OwnedFd>,
    buf: Vec<u8>,
    off: usize,
    done: bool,
    /// Towards the agent (stdin): not drained at the end.
    inbound: bool,
}

impl Pump {
    fn new(src: RawFd, dst: RawFd, inbound: bool) -> Pump {
        Pump {
            src,
            dst,
            own_src: None,
            own_dst: None,
            buf: Vec::new(),
            off: 0,
            done: false,
            inbound,
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.buf.clear();
        self.off = 0;
        self.own_src = None;
        self.own_dst = None;
    }

    fn pollfd(&self) -> libc::pollfd {
        let (fd, events) = if self.done {
            (-1, 0)
        } else if self.off < self.buf.len() {
            (self.dst, libc::POLLOUT)
        } else {
            (self.src, libc::POLLIN)
        };
        libc::pollfd {
            fd,
            events,
            revents: 0,
        }
    }

    /// One step after poll reported `revents` on this pump's descriptor.
    fn step(&mut self, revents: libc::c_short) {
        if self.done || revents == 0 {
            return;
        }
        if self.off < self.buf.len() {
            // At most PIPE_BUF bytes: a blocking descriptor that reported POLLOUT takes them
            // without blocking.
            let end = self.buf.len().min(self.off + libc::PIPE_BUF);
            // Raw (as the read below): `dst` and `src` are numbers (the caller's 0–2, or the
            // pty master that two pumps share); nix's read/write need a BorrowedFd.
            // SAFETY: writing from a live buffer of the stated length.
            let n = Errno::result(unsafe {
                libc::write(
                    self.dst,
                    self.buf[self.off..end].as_ptr().cast(),
                    end - self.off,
                )
            });
            match n {
                Ok(n) if n > 0 => {
                    self.off += n as usize;
                    if self.off == self.buf.len() {
                        self.buf.clear();
                        self.off = 0;
                    }
                }
                Err(e) if !retry(e) => self.finish(),
                _ => {}
            }
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        // Raw: `src` is a number (as the write above), which nix's read needs as a BorrowedFd.
        // SAFETY: reading into a buffer of the stated length.
        let n =
            Errno::result(unsafe { libc::read(self.src, chunk.as_mut_ptr().cast(), chunk.len()) });
        match n {
            Ok(n) if n > 0 => {
                if self.dst >= 0 {
                    self.buf.extend_from_slice(&chunk[..n as usize]);
                }
            }
            // EAGAIN or EINTR: later.
            Err(e) if retry(e) => {}
            // EOF, or EIO from a pty master whose slave is closed everywhere.
            _ => self.finish(),
        }
    }
}

fn retry(e: Errno) -> bool {
    matches!(e, Errno::EAGAIN | Errno::EINTR)
}

/// The caller's terminal in raw mode; its settings are restored on drop.
struct RawMode {
    fd: BorrowedFd<'static>,
    saved: Termios,
}

impl RawMode {
    fn enter(fd: BorrowedFd<'static>, saved: Termios) -> io::Result<RawMode> {
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Restores the settings read before the run.
        let _ = termios::tcsetattr(self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The relay between the caller's streams and the agent's.
pub(crate) struct Relay {
    /// The agent's 0–2 until the clone has copied them into the child.
    agent: Option<[OwnedFd; 3]>,
    pumps: Vec<Pump>,
    /// The pty's master, when a caller stream is a terminal.
    master: Option<OwnedFd>,
    /// The agent's fd (0–2) that is the pty slave: its controlling terminal.
    ctty: Option<RawFd>,
    /// The caller's terminal whose size the pty follows.
    winsize_from: Option<RawFd>,
    /// The caller's stdin terminal and its settings, for raw mode.
    raw_from: Option<(BorrowedFd<'static>, Termios)>,
    raw: Option<RawMode>,
    /// The caller's descriptors when they were handed over (`for_caller`), not the
    /// launcher's own 0–2. Last: dropped after `raw` (which restores the terminal through one).
    _callers: Option<[OwnedFd; 3]>,
}

impl Relay {
    /// What the agent gets for the caller's fds 0–2 (see the module docs), or `None` when all
    /// three pass through unchanged (nothing to relay).
    pub(crate) fn new(agent_uid: u32) -> io::Result<Option<Relay>> {
        Relay::with_callers(agent_uid, [0, 1, 2], None)
    }

    /// `new` for the caller's stdin, stdout and stderr handed over as descriptors (a prepared
    /// sandbox's finish: aitherd passes its caller's by SCM_RIGHTS), exactly as if they were
    /// the launcher's own 0–2. Returns the relay, or, when nothing is relayed, the three
    /// descriptors for the agent as they are.
    pub(crate) fn for_caller(
        agent_uid: u32,
        fds: [OwnedFd; 3],
    ) -> io::Result<(Option<Relay>, Option<[OwnedFd; 3]>)> {
        let nums = [0, 1, 2].map(|i| fds[i].as_raw_fd());
        if nums
            .iter()
            .all(|&n| !matches!(kind(n), Kind::Terminal | Kind::Pipe(..)))
        {
            return Ok((None, Some(fds)));
        }
        Ok((Relay::with_callers(agent_uid, nums, Some(fds))?, None))
    }

    fn with_callers(
        agent_uid: u32,
        nums: [RawFd; 3],
        callers: Option<[OwnedFd; 3]>,
    ) -> io::Result<Option<Relay>> {
        let kinds = nums.map(kind);
        if kinds
            .iter()
            .all(|k| matches!(k, Kind::Other | Kind::Closed))
        {
            return Ok(None);
        }
        let mut relay = Relay {
            agent: None,
            pumps: Vec::new(),
            master: None,
            ctty: None,
            winsize_from: None,
            raw_from: None,
            raw: None,
            _callers: callers,
        };
        let mut slave: Option<OwnedFd> = None;
        if kinds.contains(&Kind::Terminal) {
            let (m, s) = open_pty()?;
            fchown_to(s.as_fd(), agent_uid)?;
            let tty = (0..3)
                .find(|&i| kinds[i as usize] == Kind::Terminal)
                .unwrap_or(0);
            // The agent starts with the caller's settings and window size.
            if let Ok(t) = termios::tcgetattr(caller(nums[tty as usize])) {
                let _ = termios::tcsetattr(&s, SetArg::TCSANOW, &t);
                if kinds[0] == Kind::Terminal {
                    relay.raw_from = Some((caller(nums[0]), t));
                }
            }
            relay.winsize_from = Some(nums[tty as usize]);
            copy_winsize(nums[tty as usize], m.as_raw_fd());
            set_nonblocking(m.as_fd())?;
            relay.ctty = (0..3).find(|&i| kinds[i as usize] == Kind::Terminal);
            relay.master = Some(m);
            slave = Some(s);
        }
        let master = relay.master.as_ref().map(|m| m.as_raw_fd());
        let mut agent: Vec<OwnedFd> = Vec::with_capacity(3);
        // A relay pipe shared by stdout and stderr when the caller's are one pipe.
        // (the pipe's id, the index in `agent` of the relay pipe's write end)
        let mut out_pipe: Option<((libc::dev_t, libc::ino_t), usize)> = None;
        for (i, k) in kinds.iter().enumerate() {
            let fd = nums[i];
            let mine = match k {
                Kind::Terminal => dup_high(slave.as_ref().expect("pty opened").as_fd())?,
                Kind::Other => dup_high(caller(fd))?,
                Kind::Closed => {
                    let null = crate::sys::open(std::path::Path::new("/dev/null"), libc::O_RDWR)?;
                    dup_high(null.as_fd())?
                }
                Kind::Pipe(..) if i == 0 => {
                    let (r, w) = crate::sys::pipe()?;
                    fchown_to(r.as_fd(), agent_uid)?;
                    set_nonblocking(w.as_fd())?;
                    let mut p = Pump::new(fd, w.as_raw_fd(), true);
                    p.own_dst = Some(w);
                    relay.pumps.push(p);
                    r
                }
                Kind::Pipe(dev, ino) => match out_pipe {
                    Some((id, w)) if id == (*dev, *ino) => dup_high(agent[w].as_fd())?,
                    _ => {
                        let (r, w) = crate::sys::pipe()?;
                        fchown_to(w.as_fd(), agent_uid)?;
                        set_nonblocking(r.as_fd())?;
                        let mut p = Pump::new(r.as_raw_fd(), fd, false);
                        p.own_src = Some(r);
                        relay.pumps.push(p);
                        // `w` is pushed to `agent` just below.
                        out_pipe = Some(((*dev, *ino), agent.len()));
                        w
                    }
                },
            };
            agent.push(mine);
        }
        if let Some(m) = master {
            if kinds[0] == Kind::Terminal {
                relay.pumps.push(Pump::new(nums[0], m, true));
            }
            // The pty's output (and echo) goes to the caller's first terminal among 1, 2, 0.
            let to = [1, 2, 0]
                .into_iter()
                .find(|&i| kinds[i] == Kind::Terminal)
                .map_or(-1, |i| nums[i]);
            relay.pumps.push(Pump::new(m, to, false));
        }
        let [a, b, c]: [OwnedFd; 3] = agent
            .try_into()
            .map_err(|_| io::Error::other("three stdio descriptors"))?;
        relay.agent = Some([a, b, c]);
        Ok(Some(relay))
    }

    /// The agent's 0–2, for the child (called in the child after the clone).
    pub(crate) fn take_agent(&mut self) -> Option<[OwnedFd; 3]> {
        self.agent.take()
    }

    /// Which of the agent's 0–2 is the pty (its controlling terminal), if any.
    pub(crate) fn ctty(&self) -> Option<RawFd> {
        self.ctty
    }

    /// In the launcher after the clone: the agent's ends close here (so that EOF and EIO
    /// arrive when the sandbox is done with them), and the caller's terminal goes raw.
    pub(crate) fn started(&mut self) -> io::Result<()> {
        self.agent = None;
        if let Some((fd, saved)) = self.raw_from.take() {
            self.raw = Some(RawMode::enter(fd, saved)?);
        }
        Ok(())
    }

    /// The pollfd entries of the pumps, in order (a negative fd for an idle one).
    pub(crate) fn pollfds(&self) -> Vec<libc::pollfd> {
        self.pumps.iter().map(Pump::pollfd).collect()
    }

    /// Moves data for the entries `poll` reported (same order as `pollfds`).
    pub(crate) fn step(&mut self, fds: &[libc::pollfd]) {
        for (p, f) in self.pumps.iter_mut().zip(fds) {
            if f.fd >= 0 {
                p.step(f.revents);
            }
        }
    }

    /// Every stream from the agent (its stdout and stderr pipes, the pty's output) reached EOF
    /// and was written out to the caller: no process holds a writing end any more.
    pub(crate) fn outbound_done(&self) -> bool {
        self.pumps.iter().all(|p| p.inbound || p.done)
    }

    /// SIGWINCH: the pty takes the caller's size (the kernel signals the pty's foreground
    /// process group). Returns false when there is no pty (then the signal is forwarded).
    pub(crate) fn winch(&self) -> bool {
        match (self.winsize_from, &self.master) {
            (Some(from), Some(m)) => {
                copy_winsize(from, m.as_raw_fd());
                true
            }
            _ => false,
        }
    }

    /// After the sandbox ended: what the agent wrote and the caller has not got yet. Every
    /// writer died with the pid namespace, so EOF (or EIO) comes at once; the bound only
    /// guards against a caller that stopped reading.
    pub(crate) fn drain(&mut self) {
        for p in self.pumps.iter_mut().filter(|p| p.inbound) {
            p.finish();
        }
        let until = Instant::now() + Duration::from_secs(2);
        while self.pumps.iter().any(|p| !p.done) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut fds = self.pollfds();
            // Raw: an idle pump's entry has a negative fd, which nix's PollFd (a BorrowedFd)
            // cannot hold.
            // SAFETY: valid pollfd entries (negative fds are skipped).
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    left.as_millis().min(100) as libc::c_int,
                )
            };
            if n < 0 {
                continue;
            }
            if n == 0 {
                // Nothing readable and nothing writable for 100 ms: done with what we have.
                if self.pumps.iter().all(|p| p.off >= p.buf.len()) {
                    break;
                }
                continue;
            }
            self.step(&fds);
        }
    }
}

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_write_int_bad!(tiocgptpeer, libc::TIOCGPTPEER);

fn copy_winsize(from: RawFd, to: RawFd) {
    // SAFETY: zeroed winsize is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize; TIOCSWINSZ reads one.
    unsafe {
        if tiocgwinsz(from, &mut ws).is_ok() {
            let _ = tiocswinsz(to, &ws);
        }
    }
}

/// A new pty: (master, slave), both close-on-exec, neither our controlling terminal.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    // grantpt is a no-op on devpts.
    nix::pty::unlockpt(&master)?;
    // TIOCGPTPEER opens the slave through the master: no path lookup in /dev/pts.
    // SAFETY: TIOCGPTPEER takes open(2) flags and returns a new descriptor.
    let s = unsafe {
        tiocgptpeer(
            master.as_raw_fd(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    }?;
    // SAFETY: s is new and ours.
    Ok((master.into(), unsafe { OwnedFd::from_raw_fd(s) }))
}
