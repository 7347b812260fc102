//! Helpers of the shim and exec suites: specs from the repository's strict policy, a shim
//! spawned as aitherd spawns it, its event line and exit record.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aither_core::policy::Policy;
use aither_core::sandbox::{RunOptions, SandboxSpec, ShimConfig};
use aither_core::units::Size;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const AITHER_INIT: &str = env!("CARGO_BIN_EXE_aither-init");
/// No shim in these suites should run longer.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "these tests create sandboxes and must run as root (CI runs them as root)"
    );
}

/// A workspace under /var/tmp (an id-mappable filesystem).
pub fn workspace() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aither-shim-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A strict-policy spec running `argv` in `ws`, with a unique name.
pub fn spec(ws: &Path, tag: &str, argv: &[&str], memory: Option<u64>) -> SandboxSpec {
    let policy = Policy::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../policies/strict.toml"
    ))
    .unwrap()
    .policy;
    let opts = RunOptions {
        name: Some(unique(tag)),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        memory: memory.map(Size),
        ..Default::default()
    };
    SandboxSpec::derive(&policy, &opts, &|_| None, ws).unwrap()
}

/// The two descriptors a daemon hands a shim: they appear in the shim as fds 3 and 4.
pub struct ShimFds {
    pub channel: OwnedFd,
    pub keep: OwnedFd,
}

pub struct Shim {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Shim {
    /// The event line (waits for it).
    pub fn event(&mut self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(DEADLINE)
            .expect("the shim printed its event line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// The shim's exit code (waits, with a deadline).
    pub fn wait(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("the shim did not finish within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Our own child (SIGTERM: it forwards, then cleans up).
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

pub fn start_shim(
    spec: &SandboxSpec,
    log_dir: &Path,
    log_max_bytes: u64,
    log_keep: u32,
    fds: Option<ShimFds>,
) -> Shim {
    start_shim_env(spec, log_dir, log_max_bytes, log_keep, fds, &[])
}

/// `start_shim` with extra environment for the shim (e.g. AITHER_CGROUP_MODE).
pub fn start_shim_env(
    spec: &SandboxSpec,
    log_dir: &Path,
    log_max_bytes: u64,
    log_keep: u32,
    fds: Option<ShimFds>,
    env: &[(&str, &str)],
) -> Shim {
    let cfg = ShimConfig {
        spec: spec.clone(),
        log_dir: log_dir.to_path_buf(),
        log_max_bytes,
        log_keep,
        channel_fd: fds.as_ref().map(|_| 3),
        keep_fd: fds.as_ref().map(|_| 4),
    };
    let mut cmd = Command::new(AITHER_INIT);
    cmd.arg("shim")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(f) = &fds {
        let (c, k) = (f.channel.as_raw_fd(), f.keep.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close), none that allocates,
        // between fork and exec; the sources are first moved out of the way of 3 and 4, then
        // placed there without close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                use std::os::fd::BorrowedFd;
                let c2 = fcntl(BorrowedFd::borrow_raw(c), FcntlArg::F_DUPFD(100))?;
                let k2 = fcntl(BorrowedFd::borrow_raw(k), FcntlArg::F_DUPFD(100))?;
                // Raw: nix's dup2 wants the target as an OwnedFd (nothing owns 3 or 4 here) and
                // its dup2_raw does not check dup2's result.
                Errno::result(libc::dup2(c2, 3))?;
                Errno::result(libc::dup2(k2, 4))?;
                let _ = nix::unistd::close(c2);
                let _ = nix::unistd::close(k2);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn aither-init shim");
    drop(fds);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cfg).unwrap().as_bytes())
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Shim { child, lines: rx }
}

pub fn read_exit(log_dir: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(log_dir.join("exit.json")).expect("exit.json written");
    serde_json::from_str(&s).unwrap()
}

/// Cgroup directories `aither/<name>-*` that exist now.
pub fn cgroup_dirs_of(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    let mut found = Vec::new();
    for h in ["memory", "cpu", "pids", "unified", ""] {
        let base = Path::new("/sys/fs/cgroup").join(h).join("aither");
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_dir() {
                found.push(e.path());
            }
        }
    }
    found
}

pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// The agent's text in a log file of the shim (records of the CRI log format), as it wrote it.
pub fn agent_text(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&aither_core::logfmt::plain_text(&bytes)).into_owned()
}
