//! A private aitherd for the end-to-end suites (daemon, memory, bus): its own state directory,
//! socket and audit log under /var/tmp, the repository's policies, the workspace's aither-init.
//! Dropping it removes every agent it still has and stops it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::{poll_until, require_root, Workspace, AITHERCTL};

pub const AITHERD: &str = env!("CARGO_BIN_EXE_aitherd");

/// aither-init, built beside aitherctl by `cargo test --workspace`.
pub fn init_path() -> PathBuf {
    let p = Path::new(AITHERCTL).with_file_name("aither-init");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (`cargo test --workspace`, or `cargo build -p aither-init`)",
        p.display()
    );
    p
}

pub struct TestDaemon {
    pub state: tempfile::TempDir,
    pub child: Option<Child>,
    pub ws: Workspace,
    pub args: Vec<String>,
    /// Extra environment for aitherd and aitherctl (e.g. AITHER_GPUS).
    pub extra_env: Vec<(String, String)>,
}

impl TestDaemon {
    /// Starts a daemon whose state directory is named `<prefix>XXXXXX` under /var/tmp.
    pub fn start(prefix: &str, args: &[&str]) -> TestDaemon {
        Self::start_env(prefix, args, &[])
    }

    /// `start` with extra environment for the daemon (and the CLI).
    pub fn start_env(prefix: &str, args: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        require_root();
        let state = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .expect("state dir");
        let mut d = TestDaemon {
            state,
            child: None,
            ws: Workspace::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.launch();
        d
    }

    /// Copies the Python SDK (runtime/python/aither.py) into the workspace.
    pub fn with_python_sdk(self) -> TestDaemon {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python/aither.py");
        std::fs::copy(&sdk, self.ws.path().join("aither.py")).expect("copy aither.py");
        self
    }

    pub fn socket(&self) -> PathBuf {
        self.state.path().join("aitherd.sock")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.state.path().join("audit.jsonl")
    }

    /// Every record of the audit log so far (lines that are not JSON are skipped).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn env(&self, c: &mut Command) {
        c.env("AITHER_STATE_DIR", self.state.path().join("state"))
            .env("AITHER_SOCKET", self.socket())
            .env("AITHER_POLICY_DIR", super::policy_dir())
            .env("AITHER_INIT", init_path())
            .env("AITHER_STATS_INTERVAL_MS", "200")
            .env("AITHER_AUDIT_LOG", self.audit_log());
        c.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
    }

    /// Starts aitherd (again) and waits for its socket.
    pub fn launch(&mut self) {
        let mut c = Command::new(AITHERD);
        self.env(&mut c);
        c.args(&self.args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("aitherd.log"))
            .expect("daemon log");
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        self.child = Some(c.spawn().expect("start aitherd"));
        let ok = poll_until(Duration::from_secs(20), || {
            UnixStream::connect(self.socket()).is_ok()
        });
        assert!(ok, "aitherd did not come up: {}", self.log());
    }

    /// aitherd's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("aitherd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("daemon running");
        c.kill().expect("SIGKILL aitherd");
        c.wait().expect("reap aitherd");
    }

    pub fn sigterm(&mut self) {
        let mut c = self.child.take().expect("daemon running");
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        c.wait().expect("reap aitherd");
    }

    /// `aitherctl ARGS` against this daemon, in the workspace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AITHERCTL);
        self.env(&mut c);
        c.args(args).current_dir(self.ws.path());
        c
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run aitherctl")
    }

    /// `ctl`, asserting success; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "aitherctl {args:?} failed ({}): {}{}\n--- daemon log ---\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&String::from_utf8_lossy(
            &self.ctl(&["ps", "--json"]).stdout,
        )) {
            for a in v.as_array().into_iter().flatten() {
                if let Some(n) = a["name"].as_str() {
                    let _ = self.ctl(&["rm", "--force", n]);
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}
