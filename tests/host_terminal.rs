//! The caller's terminal and what the host shows of itself (docs/security-model.md, "The
//! caller's terminal" and "Nothing of the host leaks in").
//!
//! Terminal tests run aitherctl on the slave of a real pty pair opened here (as a shell's
//! terminal would be), with that pty as its controlling terminal, and inspect the slave's
//! state from outside afterwards.

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::*;

/// A pty pair: the test holds the master (the "terminal emulator"), aitherctl gets the slave.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn cvt(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

impl Pty {
    fn open() -> Pty {
        // SAFETY: posix_openpt takes no pointers; the result is a new descriptor we own.
        let m = cvt(
            unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) },
            "posix_openpt",
        );
        // SAFETY: m was just returned by posix_openpt.
        let master = unsafe { OwnedFd::from_raw_fd(m) };
        // SAFETY: grantpt/unlockpt on our master.
        cvt(unsafe { libc::grantpt(m) }, "grantpt");
        // SAFETY: as above.
        cvt(unsafe { libc::unlockpt(m) }, "unlockpt");
        // SAFETY: TIOCGPTPEER opens the peer (slave) of our master; returns a new descriptor.
        let s = cvt(
            unsafe {
                libc::ioctl(
                    m,
                    libc::TIOCGPTPEER as _,
                    libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                )
            },
            "TIOCGPTPEER",
        );
        // SAFETY: s is a new descriptor we own.
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize.
        cvt(
            unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &ws as *const libc::winsize) },
            "TIOCSWINSZ",
        );
        Pty { master, slave }
    }

    fn termios(&self) -> libc::termios {
        // SAFETY: zeroed termios is a valid out-parameter.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on our slave.
        cvt(
            unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) },
            "tcgetattr",
        );
        t
    }

    fn line_discipline(&self) -> libc::c_int {
        let mut ld: libc::c_int = -1;
        // SAFETY: TIOCGETD writes one int.
        cvt(
            unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::TIOCGETD, &mut ld) },
            "TIOCGETD",
        );
        ld
    }

    fn winsize(&self) -> (u16, u16) {
        // SAFETY: zeroed winsize is a valid out-parameter.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize.
        cvt(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            "TIOCGWINSZ",
        );
        (ws.ws_row, ws.ws_col)
    }

    /// Runs `cmd` with the slave as stdin/stdout/stderr and controlling terminal, in a session
    /// of its own (as a login shell's job would be). Returns its exit code and everything the
    /// terminal received.
    fn run(&self, mut cmd: Command, input: &[u8]) -> (i32, String) {
        let slave = self.slave.as_raw_fd();
        for (i, dup) in [0, 1, 2].iter().enumerate() {
            // SAFETY: dup of our slave: a new descriptor handed to the child.
            let fd = unsafe { libc::dup(slave) };
            cvt(fd, "dup");
            // SAFETY: fd is new and ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let s = Stdio::from(fd);
            match (i, dup) {
                (0, _) => cmd.stdin(s),
                (1, _) => cmd.stdout(s),
                _ => cmd.stderr(s),
            };
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn on the pty");
        drop(cmd);
        // The reader: the master sees EIO once every slave descriptor of the child is closed
        // (the test keeps its own slave, so read until the child is gone instead).
        // SAFETY: dup of our master for the reader thread.
        let m = unsafe { libc::dup(self.master.as_raw_fd()) };
        cvt(m, "dup master");
        // SAFETY: m is new and ours.
        let mut master = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(m) });
        if !input.is_empty() {
            use std::io::Write;
            master.write_all(input).expect("type into the terminal");
        }
        // SAFETY: F_SETFL on our own (dup'ed, but separate open file description? no: shared)
        // master: non-blocking reads so the reader can stop when the child is gone.
        unsafe { libc::fcntl(m, libc::F_SETFL, libc::O_NONBLOCK) };
        let (tx, rx) = mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match master.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if rx.try_recv().is_ok() {
                            // The child is gone: what is left is in the buffer now.
                            match master.read(&mut buf) {
                                Ok(n) if n > 0 => {
                                    out.extend_from_slice(&buf[..n]);
                                    continue;
                                }
                                _ => break,
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        });
        let status = wait_with_deadline(&mut child, "aitherctl on a pty", RUN_DEADLINE);
        let _ = tx.send(());
        let out = reader.join().expect("reader");
        // SAFETY: back to blocking on the shared master description.
        unsafe { libc::fcntl(self.master.as_raw_fd(), libc::F_SETFL, 0) };
        (status.code().unwrap_or(128), out)
    }
}

/// pid 1 is a fork of aitherctl: its command line and environment were aitherctl's.
#[test]
fn pid1_shows_a_fixed_name_and_nothing_of_aitherctl() {
    let ws = Workspace::new();
    let name = unique("pid1");
    let mut c = ws.command(
        "strict",
        &["--env", "AGENT_VALUE=s3cr3t-env-value"],
        &[
            "sh",
            "-c",
            "cat /proc/1/comm; od -An -c /proc/1/cmdline; \
             cat /proc/1/environ >/dev/null 2>&1 || echo environ-refused; \
             echo ready; exec sleep 600",
        ],
        &name,
    );
    c.env("HOST_VALUE", "h0st-env-value");
    let mut child = c.stderr(Stdio::null()).spawn().expect("spawn aitherctl");
    let launcher = child.id();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
            if s.contains("ready\n") {
                let _ = tx.send(s.clone());
            }
        }
    });
    let inside = rx.recv_timeout(RUN_DEADLINE).expect("the agent's report");
    // Seen from the host (as root, who may read everything of it).
    let kids = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .expect("children");
    let pid1: i32 = kids.split_whitespace().next().unwrap().parse().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid1}/cmdline")).expect("cmdline");
    let environ = std::fs::read(format!("/proc/{pid1}/environ")).expect("environ");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(launcher as i32, libc::SIGTERM) };
    wait_with_deadline(&mut child, "aitherctl", RUN_DEADLINE);

    assert_eq!(
        cmdline, b"aither-init\0",
        "pid 1's command line from the host"
    );
    assert!(
        environ.iter().all(|&b| b == 0),
        "pid 1's environment holds nothing: {:?}",
        String::from_utf8_lossy(&environ)
    );
    let lines: Vec<&str> = inside.lines().map(str::trim).collect();
    assert_eq!(lines[0], "aither-init", "comm inside: {inside}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["a", "i", "t", "h", "e", "r", "-", "i", "n", "i", "t", "\\0"],
        "cmdline inside: {inside}"
    );
    assert_eq!(lines[2], "environ-refused", "{inside}");
    assert!(!inside.contains("s3cr3t") && !inside.contains("h0st"));
}

/// `mem ls` (a listing) always escapes; `mem get` escapes on a terminal and is raw on a pipe.
#[test]
fn agent_text_is_escaped_on_a_terminal_and_raw_on_a_pipe() {
    let d = TestDaemon::start("aither-term-", &[]);
    let agent = unique("esc");
    // OSC 52 (set the clipboard) in a key; a carriage return and a fake prompt in a value.
    let key = "k\x1b]52;c;cHduZWQ=\x07";
    let value = "line one\r\x1b[2Kaither$ fake\n";
    d.ok(&["mem", "put", &agent, "--tier", "spirit", key, value]);

    let ls = d.ok(&["mem", "ls", &agent, "--tier", "spirit"]);
    assert!(!ls.contains('\x1b') && !ls.contains('\x07'), "{ls:?}");
    assert!(ls.contains("k\\e]52;c;cHduZWQ=\\x07"), "{ls:?}");

    let piped = d.ok(&["mem", "get", &agent, "--tier", "spirit", key]);
    assert_eq!(piped, value, "raw to a pipe");

    let pty = Pty::open();
    let (code, shown) = pty.run(d.cmd(&["mem", "get", &agent, "--tier", "spirit", key]), b"");
    assert_eq!(code, 0, "{shown:?}");
    assert!(!shown.contains('\x1b'), "{shown:?}");
    assert!(shown.contains("line one\\r\\e[2Kaither$ fake"), "{shown:?}");
    let (code, shown) = pty.run(d.cmd(&["mem", "ls", &agent, "--tier", "spirit"]), b"");
    assert_eq!(code, 0, "{shown:?}");
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{shown:?}"
    );
}
