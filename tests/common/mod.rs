//! Shared helpers of the end-to-end suites (`hostile`, `real_work`).
//!
//! Every sandbox run goes through [`Workspace::run`], which also checks what a run must never
//! leave behind on the host: a cgroup directory of the run, or a mount in the host's mount
//! namespace. The suites need root (cgroups, user namespaces with a range of host ids) and
//! fail loudly without it.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

pub mod daemon;
pub mod users;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the suites' commands look for aitherd unless a test names its own daemon (tests
/// that start one set `AITHER_SOCKET` on each command, tests/common/daemon.rs): a path that
/// does not exist. `aitherctl run` hands its launch to a reachable aitherd (docs/daemon.md
/// "run"), so without this a daemon running on the host (an installed aitherd) would serve
/// the suites' standalone runs with its own policies, keys and audit log.
pub const NO_DAEMON_SOCKET: &str = "/nonexistent/aither-tests/aitherd.sock";

/// Runs before `main` of every test binary that uses this module, while it is still
/// single-threaded (so setting the environment races nothing): points `AITHER_SOCKET` at
/// `NO_DAEMON_SOCKET` unless the environment already names a socket. Every `aitherctl` the
/// suites start inherits it.
#[used]
#[link_section = ".init_array"]
static NO_HOST_DAEMON: extern "C" fn() = {
    extern "C" fn no_host_daemon() {
        if std::env::var_os("AITHER_SOCKET").is_none() {
            std::env::set_var("AITHER_SOCKET", NO_DAEMON_SOCKET);
        }
    }
    no_host_daemon
};

pub const AITHERCTL: &str = env!("CARGO_BIN_EXE_aitherctl");
pub const PROBE: &str = env!("CARGO_BIN_EXE_aither-probe");

/// No single sandbox run in these suites should take longer; a hang fails the test instead of
/// blocking the whole suite.
pub const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// Controllers (v1 hierarchies) where aither creates `aither/<name>-<launcher pid>`.
pub const CGROUP_HIERARCHIES: &[&str] = &["memory", "cpu", "pids", "unified"];

/// The repository's own policies: the suites test these files, not installed ones.
pub fn policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// Panics unless running as root: these tests must never silently skip.
pub fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "the aither end-to-end tests must run as root (they create cgroups and map host id ranges \
         into user namespaces); euid is {euid}. Run them as root, e.g. `sudo -E cargo test --test hostile`"
    );
}

/// A name unique to this test process and call, short enough to survive aither's 48-character
/// limit on agent names (so that the cgroup directory is `<name>-<pid>` exactly).
pub fn unique(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(20)
        .collect();
    format!("t{}-{}-{}", std::process::id(), next_id(), tag)
}

/// The audit log the suites' aitherctl runs write (outside every workspace).
pub fn test_audit_log() -> PathBuf {
    PathBuf::from(format!(
        "/var/tmp/aither-test-audit-{}.jsonl",
        std::process::id()
    ))
}

/// A number unique within this test process.
pub fn next_id() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Number of lines of the host's (this process's) mountinfo.
pub fn host_mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read /proc/self/mountinfo")
        .lines()
        .count()
}

/// Cgroup directories of the run named `name` (`aither/<name>-<pid>`) that exist now.
pub fn cgroup_dirs_of(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    let mut found = Vec::new();
    for h in CGROUP_HIERARCHIES {
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

/// The outcome of one `aitherctl` invocation.
#[derive(Debug)]
pub struct RunResult {
    pub name: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunResult {
    /// The exit code; panics (with the whole output) if aitherctl itself died of a signal.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self.status.code() {
            Some(c) => c,
            None => panic!(
                "aitherctl was killed by signal {:?}\n{}",
                self.status.signal(),
                self.describe()
            ),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "run {}: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.name, self.status, self.stdout, self.stderr
        )
    }

    /// Asserts exit status 0 and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code(), 0, "expected success\n{}", self.describe());
        &self.stdout
    }

    /// The single `RESULT <check> ...` line of a probe run (asserting there is exactly one).
    pub fn result_line(&self, check: &str) -> String {
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.starts_with("RESULT "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one RESULT line\n{}",
            self.describe()
        );
        let prefix = format!("RESULT {check} ");
        assert!(
            lines[0].starts_with(&prefix),
            "RESULT line is for another check\n{}",
            self.describe()
        );
        lines[0].to_string()
    }
}

/// Drains a pipe on a thread so that a chatty child never blocks on a full pipe.
fn drain(r: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Waits for `child` until `deadline` has passed since `start`; kills it and panics on expiry.
pub fn wait_with_deadline(child: &mut Child, what: &str, deadline: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary workspace under /var/tmp holding a copy of the probe.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Workspace {
    pub fn new() -> Workspace {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("aither-e2e-")
            .tempdir_in("/var/tmp")
            .expect("create a workspace under /var/tmp");
        let probe = dir.path().join("aither-probe");
        std::fs::copy(PROBE, &probe).expect("copy aither-probe into the workspace");
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755))
            .expect("chmod aither-probe");
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the workspace, as a string (the sandbox sees the same absolute path).
    pub fn at(&self, rel: &str) -> String {
        self.dir
            .path()
            .join(rel)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    /// `aitherctl run --policy P --workspace WS --name <unique> FLAGS -- CMD` with the
    /// repository's policies, stdin from /dev/null.
    pub fn command(&self, policy: &str, flags: &[&str], cmd: &[&str], name: &str) -> Command {
        let mut c = Command::new(AITHERCTL);
        // The suites' runs are audited in a log of their own, not the host's.
        c.env("AITHER_AUDIT_LOG", test_audit_log());
        c.env("AITHER_POLICY_DIR", policy_dir())
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--workspace")
            .arg(self.path())
            .arg("--name")
            .arg(name)
            .args(flags)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs CMD in a sandbox and checks that the run left no cgroup directory and no mount
    /// behind on the host.
    pub fn run(&self, policy: &str, flags: &[&str], cmd: &[&str]) -> RunResult {
        let tag = Path::new(cmd.first().copied().unwrap_or("run"))
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = unique(&tag);
        let mounts_before = host_mount_count();
        let mut child = self
            .command(policy, flags, cmd, &name)
            .spawn()
            .expect("spawn aitherctl");
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let status =
            wait_with_deadline(&mut child, &format!("aitherctl run {cmd:?}"), RUN_DEADLINE);
        let r = RunResult {
            name: name.clone(),
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        };
        assert_clean_after(&r, mounts_before);
        r
    }

    /// Runs the probe in a sandbox and returns its RESULT line (asserting aitherctl exit 0).
    pub fn probe(&self, policy: &str, flags: &[&str], check_and_args: &[&str]) -> String {
        let mut cmd = vec!["./aither-probe"];
        cmd.extend_from_slice(check_and_args);
        let r = self.run(policy, flags, &cmd);
        assert_eq!(r.code(), 0, "the probe must exit 0\n{}", r.describe());
        r.result_line(check_and_args[0])
    }

    /// Asserts that `check` gives exactly `expected` (e.g. "err EPERM") under `policy`.
    pub fn expect(&self, policy: &str, flags: &[&str], check_and_args: &[&str], expected: &str) {
        let line = self.probe(policy, flags, check_and_args);
        assert_eq!(
            line,
            format!("RESULT {} {expected}", check_and_args[0]),
            "probe {check_and_args:?} under {policy} {flags:?}"
        );
    }

    /// The control of every denial: in the same workspace, a write inside it succeeds and
    /// the file belongs on the host to the workspace's owner (root).
    pub fn assert_writable(&self, policy: &str) {
        let name = format!("writable-{}", unique("w"));
        let target = self.at(&name);
        self.expect(policy, &[], &["write-file", &target], "ok");
        let md = std::fs::metadata(&target).expect("the probe's file exists on the host");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&md),
            0,
            "a file the agent wrote is owned by the workspace owner on the host"
        );
    }
}

/// Runs the probe directly on the host, unsandboxed (controls that show the check itself
/// works when nothing stands in its way). Only for checks that are harmless as root.
pub fn probe_on_host(check_and_args: &[&str]) -> String {
    let out = Command::new(PROBE)
        .args(check_and_args)
        .stdin(Stdio::null())
        .output()
        .expect("run aither-probe on the host");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "host probe failed: {s}");
    s
}

/// Asserts that a finished run left no cgroup directory and no mount on the host.
pub fn assert_clean_after(r: &RunResult, mounts_before: usize) {
    let left = cgroup_dirs_of(&r.name);
    assert!(
        left.is_empty(),
        "cgroup directories of the run were left behind: {left:?}\n{}",
        r.describe()
    );
    let mounts_after = host_mount_count();
    assert_eq!(
        mounts_before,
        mounts_after,
        "the host's mount table changed across the run\n{}",
        r.describe()
    );
}

/// Pids of host processes whose command line is exactly `argv`.
pub fn pids_with_cmdline(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0u8])).collect();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cl) = std::fs::read(e.path().join("cmdline")) {
            if cl == want {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Writes a stop file when dropped, so that a sandboxed loop waiting for it ends even when an
/// assertion fails first (no sandbox is left running by a failed test).
pub struct StopOnDrop(pub String);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}
