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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A raw call's result, the errno on -1. Raw: fcntl, fchown, tcsetattr and the pty calls here
/// act on RawFds shared with the caller's shell; nix would need an unsafe `borrow_raw` each.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    Ok(nix::errno::Errno::result(r)?)
}

/// A copy of `fd` at a number ≥ 3, close-on-exec (the child places it at 0–2).
fn dup_high(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor, which we own.
    let n = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own (never a caller's).
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) }).map(drop)
}

fn fchown_to(fd: RawFd, uid: u32) -> io::Result<()> {
    // SAFETY: fchown of an inode we created (a new pipe or pty), held open.
    cvt(unsafe { libc::fchown(fd, uid, uid) }).map(drop)
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
    // SAFETY: F_GETFD only queries the descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Kind::Closed;
    }
    // SAFETY: isatty only queries the descriptor.
    if unsafe { libc::isatty(fd) } == 1 {
        return Kind::Terminal;
    }
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a descriptor number; a closed one just fails.
    if unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO {
        return Kind::Pipe(st.st_dev, st.st_ino);
    }
    Kind::Other
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
            // SAFETY: writing from a live buffer of the stated length.
            let n = unsafe {
                libc::write(
                    self.dst,
                    self.buf[self.off..end].as_ptr().cast(),
                    end - self.off,
                )
            };
            if n > 0 {
                self.off += n as usize;
                if self.off == self.buf.len() {
                    self.buf.clear();
                    self.off = 0;
                }
            } else if n < 0 && !retry(io::Error::last_os_error()) {
                self.finish();
            }
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        // SAFETY: reading into a buffer of the stated length.
        let n = unsafe { libc::read(self.src, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n > 0 {
            if self.dst >= 0 {
                self.buf.extend_from_slice(&chunk[..n as usize]);
            }
        } else if n == 0 || !retry(io::Error::last_os_error()) {
            // EOF, or EIO from a pty master whose slave is closed everywhere.
            self.finish();
        }
    }
}

fn retry(e: io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// The caller's terminal in raw mode; its settings are restored on drop.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd, saved: libc::termios) -> io::Result<RawMode> {
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr on the caller's terminal with a valid termios.
        cvt(unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) })?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read before the run.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
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
    raw_from: Option<(RawFd, libc::termios)>,
    raw: Option<RawMode>,
}

impl Relay {
    /// What the agent gets for the caller's fds 0–2 (see the module docs), or `None` when all
    /// three pass through unchanged (nothing to relay).
    pub(crate) fn new(agent_uid: u32) -> io::Result<Option<Relay>> {
        let kinds = [kind(0), kind(1), kind(2)];
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
        };
        let mut slave: Option<OwnedFd> = None;
        if kinds.contains(&Kind::Terminal) {
            let (m, s) = open_pty()?;
            fchown_to(s.as_raw_fd(), agent_uid)?;
            let tty = (0..3)
                .find(|&i| kinds[i as usize] == Kind::Terminal)
                .unwrap_or(0);
            // The agent starts with the caller's settings and window size.
            // SAFETY: zeroed termios is a valid out-parameter.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: tcgetattr of the caller's terminal; tcsetattr of our new pty.
            if unsafe { libc::tcgetattr(tty, &mut t) } == 0 {
                // SAFETY: as above.
                unsafe { libc::tcsetattr(s.as_raw_fd(), libc::TCSANOW, &t) };
                if kinds[0] == Kind::Terminal {
                    relay.raw_from = Some((0, t));
                }
            }
            relay.winsize_from = Some(tty);
            copy_winsize(tty, m.as_raw_fd());
            set_nonblocking(m.as_raw_fd())?;
            relay.ctty = (0..3).find(|&i| kinds[i as usize] == Kind::Terminal);
            relay.master = Some(m);
            slave = Some(s);
        }
        let master = relay.master.as_ref().map(|m| m.as_raw_fd());
        let mut agent: Vec<OwnedFd> = Vec::with_capacity(3);
        // A relay pipe shared by stdout and stderr when the caller's are one pipe.
        let mut out_pipe: Option<((libc::dev_t, libc::ino_t), RawFd)> = None;
        for (fd, k) in kinds.iter().enumerate() {
            let fd = fd as RawFd;
            let mine = match k {
                Kind::Terminal => dup_high(slave.as_ref().expect("pty opened").as_raw_fd())?,
                Kind::Other => dup_high(fd)?,
                Kind::Closed => {
                    let null = crate::sys::open(std::path::Path::new("/dev/null"), libc::O_RDWR)?;
                    dup_high(null.as_raw_fd())?
                }
                Kind::Pipe(..) if fd == 0 => {
                    let (r, w) = crate::sys::pipe()?;
                    fchown_to(r.as_raw_fd(), agent_uid)?;
                    set_nonblocking(w.as_raw_fd())?;
                    let mut p = Pump::new(0, w.as_raw_fd(), true);
                    p.own_dst = Some(w);
                    relay.pumps.push(p);
                    r
                }
                Kind::Pipe(dev, ino) => match out_pipe {
                    Some((id, w)) if id == (*dev, *ino) => dup_high(w)?,
                    _ => {
                        let (r, w) = crate::sys::pipe()?;
                        fchown_to(w.as_raw_fd(), agent_uid)?;
                        set_nonblocking(r.as_raw_fd())?;
                        let mut p = Pump::new(r.as_raw_fd(), fd, false);
                        p.own_src = Some(r);
                        relay.pumps.push(p);
                        out_pipe = Some(((*dev, *ino), w.as_raw_fd()));
                        w
                    }
                },
            };
            agent.push(mine);
        }
        if let Some(m) = master {
            if kinds[0] == Kind::Terminal {
                relay.pumps.push(Pump::new(0, m, true));
            }
            // The pty's output (and echo) goes to the caller's first terminal among 1, 2, 0.
            let to = [1, 2, 0]
                .into_iter()
                .find(|&i| kinds[i as usize] == Kind::Terminal)
                .unwrap_or(-1);
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

fn copy_winsize(from: RawFd, to: RawFd) {
    // SAFETY: zeroed winsize is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize; TIOCSWINSZ reads one.
    unsafe {
        if libc::ioctl(from, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(to, libc::TIOCSWINSZ, &ws);
        }
    }
}

/// A new pty: (master, slave), both close-on-exec, neither our controlling terminal.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes no pointers; the result is a new descriptor.
    let m = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: m is new and ours.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: unlockpt on our master (grantpt is a no-op on devpts).
    cvt(unsafe { libc::unlockpt(m) })?;
    // TIOCGPTPEER opens the slave through the master: no path lookup in /dev/pts.
    // SAFETY: the ioctl returns a new descriptor.
    let s = cvt(unsafe {
        libc::ioctl(
            m,
            libc::TIOCGPTPEER as _,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: s is new and ours.
    Ok((master, unsafe { OwnedFd::from_raw_fd(s) }))
}
