//! The caller's terminal and what the host shows of itself (docs/security-model.md, "The
//! caller's terminal" and "Nothing of the host leaks in").
//!
//! Terminal tests run aitherctl on the slave of a real pty pair opened here (as a shell's
//! terminal would be), with that pty as its controlling terminal, and inspect the slave's
//! state from outside afterwards.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use aither::daemon::client::Client;
use aither::daemon::proto::{ExecRequest, Request};
use common::daemon::TestDaemon;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A pty pair: the test holds the master (the "terminal emulator"), aitherctl gets the slave.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

nix::ioctl_write_int_bad!(tiocgptpeer, libc::TIOCGPTPEER);
nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_read_bad!(tiocgetd, libc::TIOCGETD, libc::c_int);
nix::ioctl_read_bad!(tiocgexcl, libc::TIOCGEXCL, libc::c_int);
nix::ioctl_write_int_bad!(tiocsctty, libc::TIOCSCTTY);

/// TIOCSWINSZ on our master (the kernel signals the foreground process group).
fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    unsafe { tiocswinsz(master.as_raw_fd(), &ws) }.expect("TIOCSWINSZ");
}

impl Pty {
    fn open() -> Pty {
        use nix::fcntl::OFlag;
        let m = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .expect("posix_openpt");
        nix::pty::grantpt(&m).expect("grantpt");
        nix::pty::unlockpt(&m).expect("unlockpt");
        // SAFETY: TIOCGPTPEER opens the peer (slave) of our master; returns a new descriptor.
        let s = unsafe {
            tiocgptpeer(
                m.as_raw_fd(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        }
        .expect("TIOCGPTPEER");
        // SAFETY: s is a new descriptor we own.
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        let master = OwnedFd::from(m);
        set_winsize(&master, 33, 101);
        Pty { master, slave }
    }

    fn termios(&self) -> libc::termios {
        nix::sys::termios::tcgetattr(&self.slave)
            .expect("tcgetattr")
            .into()
    }

    fn line_discipline(&self) -> libc::c_int {
        let mut ld: libc::c_int = -1;
        // SAFETY: TIOCGETD writes one int.
        unsafe { tiocgetd(self.slave.as_raw_fd(), &mut ld) }.expect("TIOCGETD");
        ld
    }

    fn winsize(&self) -> (u16, u16) {
        // SAFETY: zeroed winsize is a valid out-parameter.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize.
        unsafe { tiocgwinsz(self.master.as_raw_fd(), &mut ws) }.expect("TIOCGWINSZ");
        (ws.ws_row, ws.ws_col)
    }

    /// Runs `cmd` with the slave as stdin/stdout/stderr and controlling terminal, in a session
    /// of its own (as a login shell's job would be), types `input`, and returns its exit code
    /// and everything the terminal received.
    fn run(&self, cmd: Command, input: &[u8]) -> (i32, String) {
        let r = self.spawn(cmd);
        if !input.is_empty() {
            r.type_in(input);
        }
        r.finish()
    }

    fn spawn(&self, mut cmd: Command) -> Running {
        for i in 0..3 {
            // A new descriptor of our slave, handed to the child.
            let s = Stdio::from(nix::unistd::dup(&self.slave).expect("dup"));
            match i {
                0 => cmd.stdin(s),
                1 => cmd.stdout(s),
                _ => cmd.stderr(s),
            };
        }
        // SAFETY: only async-signal-safe calls between fork and exec, none that allocates
        // (nix's setsid, ioctl and sigaction wrappers do not).
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                tiocsctty(0, 0)?;
                // As an interactive shell starts a foreground job: ^C and ^\ at their
                // defaults. The suite itself may run with them ignored (a background job of a
                // non-interactive shell, as a CI script can be), and an exec'ed program
                // inherits an ignored signal: ^C then ended nothing.
                use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
                let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
                for sig in [Signal::SIGINT, Signal::SIGQUIT] {
                    sigaction(sig, &dfl)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on the pty");
        drop(cmd);
        // Our master for the reader thread.
        let master = nix::unistd::dup(&self.master).expect("dup master");
        let out = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags};
                let mut buf = [0u8; 4096];
                loop {
                    let mut p = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
                    if let Ok(0) = poll(&mut p, 20u16) {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        continue;
                    }
                    let n = match nix::unistd::read(&master, &mut buf) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    out.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        Running {
            child,
            out,
            stop,
            reader: Some(reader),
            master: nix::unistd::dup(&self.master).expect("dup master"),
        }
    }
}

/// aitherctl running on a `Pty`.
struct Running {
    child: std::process::Child,
    out: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    master: OwnedFd,
}

impl Running {
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until the terminal has shown `what`.
    fn wait_for(&self, what: &str) {
        assert!(
            poll_until(RUN_DEADLINE, || self.output().contains(what)),
            "the terminal never showed {what:?}: {:?}",
            self.output()
        );
    }

    fn type_in(&self, input: &[u8]) {
        let n = nix::unistd::write(&self.master, input);
        assert_eq!(n, Ok(input.len()), "typing into the terminal");
    }

    fn finish(mut self) -> (i32, String) {
        let status = wait_with_deadline(&mut self.child, "aitherctl on a pty", RUN_DEADLINE);
        // What the relay wrote before exiting is in the master's buffer now.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.reader.take().unwrap().join();
        let code = status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        });
        (code, self.output())
    }
}

/// `r` (aitherctl on `pty`) raw once it printed "started"; SIGTERM to it ends it by that
/// signal with the caller's settings `before` back.
fn sigterm_once_started_restores(pty: &Pty, r: Running, before: &libc::termios) {
    r.wait_for("started");
    assert_eq!(pty.termios().c_lflag & libc::ICANON, 0, "raw");
    // Our own, not yet reaped, child.
    let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGTERM);
    let (code, out) = r.finish();
    assert_eq!(code, 128 + libc::SIGTERM, "{out:?}");
    assert!(
        same_termios(&pty.termios(), before),
        "restored after SIGTERM"
    );
}

fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

fn excl(pty: &Pty) -> libc::c_int {
    let mut v: libc::c_int = -1;
    // SAFETY: TIOCGEXCL writes one int.
    unsafe { tiocgexcl(pty.slave.as_raw_fd(), &mut v) }.expect("TIOCGEXCL");
    v
}

/// The agent gets a pty of its own with the caller's window size; what it does to it
/// (exclusive mode, line discipline N_NULL, raw mode, a tiny window, TIOCSTI) leaves the
/// caller's terminal exactly as it was.
#[test]
fn the_agent_gets_its_own_pty_and_cannot_change_the_callers() {
    let ws = Workspace::new();
    let pty = Pty::open();
    let before = pty.termios();
    assert_eq!(pty.line_discipline(), 0, "N_TTY before");
    let (code, out) = pty.run(
        ws.command(
            "strict",
            &[],
            &["./aither-probe", "tty-attack"],
            &unique("tty"),
        ),
        b"",
    );
    // The agent's pty discards its output once N_NULL is set: the result is in a file.
    let got = std::fs::read_to_string(ws.path().join("tty-attack.out")).unwrap_or_default();
    assert_eq!(code, 0, "{out:?} {got:?}");
    // Each ioctl worked on the agent's own pty (TIOCSTI is refused by seccomp regardless).
    assert_eq!(
        got, "size=33x101 excl=ok tcsets=ok winsz=ok sti=EPERM setd=ok",
        "{out:?}"
    );
    assert_eq!(pty.line_discipline(), 0, "the caller's line discipline");
    assert!(
        same_termios(&pty.termios(), &before),
        "the caller's terminal settings are restored"
    );
    assert_eq!(pty.winsize(), (33, 101), "the caller's window size");
    assert_eq!(excl(&pty), 0, "the caller's terminal is not exclusive");
}

/// During the run the caller's terminal is raw (keys go to the agent's pty unprocessed, ^C
/// included: the agent's line discipline turns it into SIGINT for the agent); after it, the
/// settings are back, also when the run ends by SIGTERM to aitherctl, a timeout, or a command
/// that does not exist.
#[test]
fn raw_mode_during_the_run_and_the_callers_settings_restored_on_every_end() {
    let ws = Workspace::new();
    let pty = Pty::open();
    let before = pty.termios();

    let r = pty.spawn(ws.command(
        "strict",
        &[],
        &["sh", "-c", "echo started; exec sleep 600"],
        &unique("ctrlc"),
    ));
    r.wait_for("started");
    let during = pty.termios();
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw"
    );
    r.type_in(b"\x03");
    let (code, out) = r.finish();
    assert_eq!(
        code,
        128 + libc::SIGINT,
        "^C ends the agent with SIGINT: {out:?}"
    );
    assert!(same_termios(&pty.termios(), &before), "restored after ^C");

    // SIGTERM to aitherctl (forwarded to the agent): restored too.
    let r = pty.spawn(ws.command(
        "strict",
        &[],
        &["sh", "-c", "echo started; exec sleep 600"],
        &unique("term"),
    ));
    sigterm_once_started_restores(&pty, r, &before);

    let (code, out) = pty.run(
        ws.command(
            "strict",
            &["--timeout", "1s"],
            &["sleep", "600"],
            &unique("tmo"),
        ),
        b"",
    );
    assert_ne!(code, 0, "{out:?}");
    assert!(
        same_termios(&pty.termios(), &before),
        "restored after a timeout"
    );

    let (code, out) = pty.run(
        ws.command("strict", &[], &["no-such-command"], &unique("nf")),
        b"",
    );
    assert_eq!(code, 127, "{out:?}");
    assert!(
        same_termios(&pty.termios(), &before),
        "restored after a failed start"
    );
}

/// A new window size reaches the agent (SIGWINCH on its own pty).
#[test]
fn the_window_size_follows_the_callers() {
    let ws = Workspace::new();
    let pty = Pty::open();
    let r = pty.spawn(ws.command(
        "strict",
        &[],
        &[
            "sh",
            "-c",
            "trap 'stty size; exit 0' WINCH; stty size; i=0; \
             while [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; echo no-winch",
        ],
        &unique("winch"),
    ));
    r.wait_for("33 101");
    // The kernel signals aitherctl's process group.
    set_winsize(&pty.master, 40, 120);
    r.wait_for("40 120");
    let (code, out) = r.finish();
    assert_eq!(code, 0, "{out:?}");
}

/// Pipes and FIFOs pass through a relay: nothing of the caller's is chowned or chmodded, and
/// the agent can still reopen /dev/stdout.
#[test]
fn a_root_fifo_stays_root_0600_and_pipes_stay_roots() {
    use std::os::unix::fs::MetadataExt;
    let ws = Workspace::new();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let fifo = dir.path().join("out.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut cmd = ws.command(
        "strict",
        &[],
        &[
            "sh",
            "-c",
            "echo one; echo two > /dev/stdout; chmod 0777 /dev/stdout 2>/dev/null; \
             chmod 0777 /proc/self/fd/1 2>/dev/null; echo three",
        ],
        &unique("fifo"),
    );
    cmd.stdout(w);
    let status = cmd.status().expect("run");
    // The Command holds our write end until dropped: the reader's EOF waits for it.
    drop(cmd);
    let got = reader.join().unwrap();
    assert!(status.success(), "{got:?}");
    assert_eq!(got, "one\ntwo\nthree\n");
    let m = std::fs::metadata(&fifo).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (0, 0, 0o600),
        "the FIFO as it was"
    );

    // An anonymous pipe: its inode (seen through our end) is still root's and 0600.
    let (r, w) = aither::sys::pipe().unwrap();
    let mut cmd = ws.command(
        "strict",
        &[],
        &["sh", "-c", "chmod 0666 /dev/stdout 2>/dev/null; echo piped"],
        &unique("pipe"),
    );
    let st_before = std::fs::File::from(r.try_clone().unwrap())
        .metadata()
        .unwrap();
    cmd.stdout(w);
    let status = cmd.status().expect("run");
    drop(cmd);
    assert!(status.success());
    let st_after = std::fs::File::from(r).metadata().unwrap();
    assert_eq!(
        (st_after.uid(), st_after.mode()),
        (st_before.uid(), st_before.mode()),
        "the caller's pipe is unchanged"
    );
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
    let _ = kill(Pid::from_raw(launcher as i32), Signal::SIGTERM);
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

/// The documented decision on inotify over the read-only system binds (security-model.md):
/// an agent sees that a system file was opened on the host (the bind is the host's inode).
/// If this ever fails, the channel is closed and the documentation must say so.
#[test]
fn inotify_on_a_system_bind_sees_host_opens_as_documented() {
    let ws = Workspace::new();
    let target = "/usr/bin/env";
    let mut child = ws
        .command(
            "strict",
            &[],
            &["./aither-probe", "watch-open", target, "120"],
            &unique("watch"),
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let opener = {
        let done = done.clone();
        // Bounded: opens the file on the host until the agent has answered (or 120 s).
        std::thread::spawn(move || {
            for _ in 0..2400 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let _ = std::fs::File::open(target);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let mut s = String::new();
    let _ = out.read_to_string(&mut s);
    done.store(true, Ordering::SeqCst);
    let _ = opener.join();
    wait_with_deadline(&mut child, "watch-open", RUN_DEADLINE);
    assert_eq!(s.trim(), "RESULT watch-open ok IN_OPEN");
}

/// `logs` is raw to a pipe (the agent's bytes, for the next program) and escaped on a
/// terminal: an agent printing OSC 52 and a fake prompt does not reach the operator's terminal.
#[test]
fn agent_logs_are_escaped_on_a_terminal_and_raw_on_a_pipe() {
    let d = TestDaemon::start("aither-term-", &[]);
    let name = unique("logs");
    let spawn = d.ok(&[
        "spawn",
        "--policy",
        "strict",
        &name,
        "--",
        "sh",
        "-c",
        "printf 'osc\\033]52;c;cHduZWQ=\\007 fake\\r\\033[2Kaither$ \\n'; echo logged-end; exec sleep 60",
    ]);
    assert!(
        poll_until(RUN_DEADLINE, || d
            .ok(&["logs", &name])
            .contains("logged-end")),
        "{spawn}"
    );
    let piped = d.ok(&["logs", &name]);
    assert!(
        piped.contains("osc\x1b]52;c;cHduZWQ=\x07 fake\r\x1b[2Kaither$ \n"),
        "raw to a pipe: {piped:?}"
    );
    let pty = Pty::open();
    let (code, shown) = pty.run(d.cmd(&["logs", &name]), b"");
    assert_eq!(code, 0, "{shown:?}");
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{shown:?}"
    );
    assert!(
        shown.contains("osc\\e]52;c;cHduZWQ=\\x07 fake\\r\\e[2Kaither$ "),
        "{shown:?}"
    );
    d.ok(&["rm", "-f", &name]);
}

/// The state letter of process `pid` (`T`: stopped), from /proc/PID/stat.
fn proc_state(pid: u32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The name is in parentheses and may contain spaces: the state follows the last ')'.
    s.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

/// Issue 17, finding 5: `aitherctl run … &` from an interactive shell with job control (bash
/// on the pty, its session leader; the job in a background process group, the shell's in the
/// foreground) is stopped by the kernel when it touches the terminal, never reads what is typed
/// for the foreground, and works once brought to the foreground with `fg`.
#[test]
fn a_background_run_never_reads_keystrokes_typed_for_the_foreground() {
    let ws = Workspace::new();
    let pty = Pty::open();
    let before = pty.termios();
    let mut shell = Command::new("bash");
    // No line editing: the shell reads lines in canonical mode, so the terminal goes raw only
    // when aitherctl makes it so.
    shell
        .args(["--norc", "--noprofile", "--noediting", "-i"])
        .env("PS1", "$ ")
        .env("TERM", "dumb");
    let r = pty.spawn(shell);
    // The agent answers with a computed marker, so the shell's echo of the command line
    // never matches what only a run prints.
    r.type_in(
        format!(
            "AITHER_AUDIT_LOG={} AITHER_POLICY_DIR={} {AITHERCTL} run --policy strict \
             --workspace {} --name {} -- sh -c 'read x; echo \"GOT-$((2*3)):[$x]\"' & \
             echo \"PID-$((1+1)):$!.\"\n",
            test_audit_log().display(),
            policy_dir().display(),
            ws.path().display(),
            unique("bg"),
        )
        .as_bytes(),
    );
    r.wait_for("PID-2:");
    let out = r.output();
    let pid: u32 = out
        .split("PID-2:")
        .nth(1)
        .and_then(|s| s.split('.').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    // The kernel stops the background job when it touches the terminal (SIGTTOU for raw
    // mode, SIGTTIN for a read).
    assert!(
        poll_until(RUN_DEADLINE, || proc_state(pid) == 'T'),
        "the background aitherctl was never stopped (state {}): {:?}",
        proc_state(pid),
        r.output()
    );
    r.type_in(b"jobs -l\n");
    r.wait_for("Stopped");
    // What is typed for the foreground reaches the foreground.
    r.type_in(b"read line; echo \"FG-$((3*3)):[$line]\"\n");
    r.type_in(b"secret\n");
    r.wait_for("FG-9:[secret]");
    assert!(!r.output().contains("GOT-6"), "{:?}", r.output());
    assert_eq!(proc_state(pid), 'T', "{:?}", r.output());
    // The shell's terminal settings are its own while the job waits.
    assert!(same_termios(&pty.termios(), &before));
    // In the foreground the run gets the terminal (raw, relayed) and the agent reads.
    r.type_in(b"fg\n");
    assert!(
        poll_until(RUN_DEADLINE, || pty.termios().c_lflag
            & (libc::ICANON | libc::ECHO | libc::ISIG)
            == 0),
        "never raw after fg: {:?}",
        r.output()
    );
    r.type_in(b"later\r");
    r.wait_for("GOT-6:[later]");
    assert!(!r.output().contains("GOT-6:[secret]"), "{:?}", r.output());
    // The shell's `exit` is typed once the run has ended: typed while aitherctl still relays
    // the terminal, it would go to the agent's pty (and be lost with it).
    assert!(
        poll_until(RUN_DEADLINE, || matches!(proc_state(pid), '?' | 'Z')),
        "the run did not end after its agent: {:?}",
        r.output()
    );
    r.type_in(b"exit\n");
    let (code, out) = r.finish();
    assert_eq!(code, 0, "{out:?}");
    assert!(same_termios(&pty.termios(), &before), "{out:?}");
}

/// `aitherctl exec` (docs/daemon.md "exec") on a terminal: without -t the command gets pipes
/// relayed by aitherctl; with -t a new pty of its own, with the caller's window size, never
/// the caller's terminal; what it does to its pty (exclusive mode,
/// N_NULL, raw mode, a tiny window, TIOCSTI) leaves the caller's terminal as it was. During
/// the command the caller's terminal is raw, and ^C reaches the command as SIGINT.
#[test]
// One scenario on one terminal: each step checks the state the steps before it left.
#[allow(clippy::too_many_lines)]
fn exec_gives_the_command_pipes_or_a_pty_of_its_own_never_the_callers_terminal() {
    let d = TestDaemon::start("aither-term-", &[]);
    let name = unique("exec-t");
    d.ok(&[
        "spawn",
        "--policy",
        "strict",
        &name,
        "--",
        "sh",
        "-c",
        "echo up; exec sleep 300",
    ]);
    assert!(
        poll_until(RUN_DEADLINE, || d.ok(&["logs", &name]).contains("up")),
        "{} did not start",
        name
    );
    let pty = Pty::open();
    let before = pty.termios();
    let caller_tty =
        std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let caller_tty = caller_tty.to_string_lossy().into_owned();
    assert!(caller_tty.starts_with("/dev/pts/"), "{caller_tty}");

    // Without -t the command never gets the terminal: aitherd refuses one ...
    let null = std::fs::File::open("/dev/null").unwrap();
    let req = Request::Exec(ExecRequest {
        name: name.clone(),
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        tty: false,
        copy: None,
    });
    let r = Client::connect(&d.socket())
        .unwrap()
        .call_with_fds(&req, &[null.as_fd(), pty.slave.as_fd(), null.as_fd()])
        .unwrap();
    let e = r.error.expect("a terminal without -t is refused");
    assert!(e.message.contains("stdout is a terminal"), "{}", e.message);
    // ... and aitherctl relays it through pipes.
    let (code, out) = pty.run(
        d.cmd(&[
            "exec",
            "-i",
            &name,
            "--",
            "sh",
            "-c",
            "test -t 0 || test -t 1 || echo no-tty; readlink /proc/self/fd/0 /proc/self/fd/1; cat",
        ]),
        b"typed\n\x04",
    );
    assert_eq!(code, 0, "{out:?}");
    assert!(out.contains("no-tty"), "{out:?}");
    assert_eq!(out.matches("pipe:[").count(), 2, "{out:?}");
    // Echoed by the caller's terminal, then printed by cat.
    assert_eq!(out.matches("typed").count(), 2, "{out:?}");
    assert!(same_termios(&pty.termios(), &before), "untouched");

    // A terminal, but not the caller's.
    let (code, out) = pty.run(
        d.cmd(&[
            "exec",
            "-it",
            &name,
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; echo \"tty=$(readlink /proc/self/fd/0)\"",
        ]),
        b"",
    );
    assert_eq!(code, 0, "{out:?}");
    assert!(out.contains("is-a-tty"), "{out:?}");
    let theirs = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("tty="))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(
        !theirs.is_empty() && theirs != caller_tty,
        "{theirs} vs {caller_tty}"
    );
    assert!(same_termios(&pty.termios(), &before), "restored");

    // Its own pty takes every terminal ioctl; TIOCSTI is refused; the caller's is untouched.
    let (code, out) = pty.run(
        d.cmd(&["exec", "-it", &name, "--", "./aither-probe", "tty-attack"]),
        b"",
    );
    let got = std::fs::read_to_string(d.ws.path().join("tty-attack.out")).unwrap_or_default();
    assert_eq!(code, 0, "{out:?} {got:?}");
    assert_eq!(
        got, "size=33x101 excl=ok tcsets=ok winsz=ok sti=EPERM setd=ok",
        "{out:?}"
    );
    assert_eq!(pty.line_discipline(), 0, "the caller's line discipline");
    assert!(
        same_termios(&pty.termios(), &before),
        "the caller's settings"
    );
    assert_eq!(pty.winsize(), (33, 101), "the caller's window size");
    assert_eq!(excl(&pty), 0, "the caller's terminal is not exclusive");

    // Raw while it runs; ^C is the command's SIGINT; the settings come back.
    let r = pty.spawn(d.cmd(&[
        "exec",
        "-it",
        &name,
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 600",
    ]));
    r.wait_for("started");
    assert_eq!(
        pty.termios().c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw"
    );
    r.type_in(b"\x03");
    let (code, out) = r.finish();
    assert_eq!(code, 128 + libc::SIGINT, "^C ends the command: {out:?}");
    assert!(same_termios(&pty.termios(), &before), "restored after ^C");

    // SIGTERM to aitherctl: it puts the settings back itself (aitherd kills the launcher that
    // set them raw, and the command with it).
    let r = pty.spawn(d.cmd(&[
        "exec",
        "-it",
        &name,
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 4444",
    ]));
    sigterm_once_started_restores(&pty, r, &before);
    assert!(
        poll_until(RUN_DEADLINE, || pids_with_cmdline(&["sleep", "4444"])
            .is_empty()),
        "the command outlived its client"
    );

    // The window size follows the caller's.
    let r = pty.spawn(d.cmd(&[
        "exec",
        "-it",
        &name,
        "--",
        "sh",
        "-c",
        "trap 'stty size; exit 0' WINCH; stty size; i=0; \
         while [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done; echo no-winch",
    ]));
    r.wait_for("33 101");
    set_winsize(&pty.master, 40, 120);
    r.wait_for("40 120");
    let (code, out) = r.finish();
    assert_eq!(code, 0, "{out:?}");

    // A background `exec -it` is refused: aitherd's launcher, outside the shell's job
    // control, would read keys typed for the shell.
    let mut shell = Command::new("bash");
    shell
        .args(["--norc", "--noprofile", "--noediting", "-i"])
        .env("PS1", "$ ")
        .env("TERM", "dumb");
    d.env(&mut shell);
    let r = pty.spawn(shell);
    r.type_in(
        format!("{AITHERCTL} exec -it {name} -- true & wait $!; echo \"BG-$((2*3)):$?.\"\n")
            .as_bytes(),
    );
    r.wait_for("BG-6:");
    r.type_in(b"exit\n");
    let (_, out) = r.finish();
    assert!(out.contains("BG-6:125."), "{out:?}");
    assert!(out.contains("in the foreground"), "{out:?}");
    assert!(
        same_termios(&pty.termios(), &before),
        "the shell's settings"
    );
    d.ok(&["rm", "-f", &name]);
}

#[test]
fn stats_redraws_its_table_in_place_on_a_terminal_until_interrupted() {
    let d = TestDaemon::start("aither-term-", &[]);
    let name = unique("stats");
    d.ok(&["spawn", "--policy", "strict", &name, "--", "sleep", "600"]);
    const REDRAW: &str = "\x1b[H\x1b[2J";
    let pty = Pty::open();
    let r = pty.spawn(d.cmd(&["stats", &name]));
    // Each sample: home, clear, the table (one header, one row each time).
    let three = || r.output().matches(REDRAW).count() >= 3;
    assert!(poll_until(RUN_DEADLINE, three), "{:?}", r.output());
    // ^C (the terminal's SIGINT to its foreground) ends it.
    let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGINT);
    let (code, shown) = r.finish();
    assert_eq!(code, 128 + libc::SIGINT, "{shown:?}");
    for frame in shown.split(REDRAW).skip(1).take(2) {
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines.len(), 2, "header and row: {frame:?}");
        assert!(
            lines[0].starts_with("NAME") && lines[1].starts_with(&name),
            "{frame:?}"
        );
    }
    // --no-stream on a terminal: one table, nothing redrawn.
    let (code, shown) = pty.run(d.cmd(&["stats", "--no-stream", &name]), b"");
    assert_eq!(code, 0, "{shown:?}");
    assert!(!shown.contains('\x1b'), "{shown:?}");
    assert_eq!(shown.lines().count(), 2, "{shown:?}");
    d.ok(&["rm", "-f", &name]);
}

/// `inspect` on a terminal is a summary a person reads (issue 20); `--json` there, and any
/// pipe, get every field as JSON, as before.
#[test]
fn inspect_is_a_summary_on_a_terminal_and_json_to_a_pipe() {
    let d = TestDaemon::start("aither-term-", &[]);
    let name = unique("insp");
    d.ok(&[
        "spawn", "--policy", "strict", "--label", "team=x", "--memory", "128M", &name, "--",
        "sleep", "600",
    ]);
    // Running, with its first resource sample taken.
    assert!(poll_until(RUN_DEADLINE, || {
        let v = d.json(&["inspect", &name]);
        v["state"] == "running" && v["memory_bytes"].is_u64()
    }));
    let pty = Pty::open();
    let (code, shown) = pty.run(d.cmd(&["inspect", &name]), b"");
    assert_eq!(code, 0, "{shown:?}");
    let shown = shown.replace("\r\n", "\n");
    assert!(
        shown.starts_with(&format!("{name} (root) - running\n")),
        "{shown}"
    );
    for want in [
        "  Policy:      strict  (token ",
        "  Command:     sleep 600\n",
        "  Labels:      team=x\n",
        " / 128M, tasks ",
        "  Restart:     on-failure (backoff 1s up to 5m; stop timeout 10s)\n",
        &format!("aitherctl inspect --json {name}\n"),
    ] {
        assert!(shown.contains(want), "no {want:?} in:\n{shown}");
    }
    assert!(!shown.contains('{'), "{shown}");
    let (code, json) = pty.run(d.cmd(&["inspect", "--json", &name]), b"");
    assert_eq!(code, 0, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.replace("\r\n", "\n")).unwrap();
    assert_eq!(v["labels"]["team"], "x", "{v}");
    // A pipe: JSON without asking.
    assert_eq!(d.json(&["inspect", &name])["name"], name.as_str());
    d.ok(&["rm", "--force", &name]);
}
