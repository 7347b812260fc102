//! `aither-init exec`: a command run inside a running sandbox (a sandboxed `sleep 30` started
//! by `aither-init shim`) shares its namespaces and cgroup and is confined as its agent.
//! Needs root; fails loudly without it.

mod support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use aither_core::sandbox::{ExecConfig, SandboxSpec};
use support::{require_root, spec, start_shim, Shim};

/// A sandboxed `sleep 30` under a shim, stopped (SIGTERM to the shim) when dropped.
struct Running {
    spec: SandboxSpec,
    pid1: i32,
    cgroup: String,
    shim: Shim,
    ws: tempfile::TempDir,
    _logs: tempfile::TempDir,
}

impl Running {
    fn start(tag: &str) -> Running {
        require_root();
        let ws = support::workspace();
        let logs = tempfile::tempdir().unwrap();
        let spec = spec(ws.path(), tag, &["sleep", "30"], None);
        let mut shim = start_shim(&spec, logs.path(), 1 << 20, 2, None);
        let ev = shim.event();
        assert_eq!(ev["event"], "started", "{ev}");
        let pid1 = ev["pid1"].as_i64().unwrap() as i32;
        Running {
            spec,
            pid1,
            cgroup: ev["cgroup"].as_str().unwrap().to_string(),
            shim,
            ws,
            _logs: logs,
        }
    }

    fn exec(&self, argv: &[&str], timeout_ms: Option<u64>) -> Output {
        self.spawn_exec(argv, timeout_ms)
            .wait_with_output()
            .unwrap()
    }

    fn spawn_exec(&self, argv: &[&str], timeout_ms: Option<u64>) -> std::process::Child {
        let mut cfg = ExecConfig::new(
            self.spec.clone(),
            self.pid1,
            argv.iter().map(|s| s.to_string()).collect(),
            None,
        );
        cfg.timeout_ms = timeout_ms;
        let mut c = Command::new(support::AITHER_INIT)
            .arg("exec")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(serde_json::to_string(&cfg).unwrap().as_bytes())
            .unwrap();
        c
    }

    fn sh(&self, script: &str) -> (Option<i32>, String, String) {
        let o = self.exec(&["/bin/sh", "-c", script], Some(20_000));
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Our own child (the shim forwards SIGTERM to the agent).
        let pid = nix::unistd::Pid::from_raw(self.shim.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.shim.wait();
    }
}

#[test]
fn exec_shares_the_sandboxs_namespaces() {
    let r = Running::start("exec-ns");
    let (code, out, err) = r.sh(
        "cat /proc/1/comm; hostname; for p in /proc/[0-9]*; do cat $p/comm; done | sort -u | tr '\\n' ' '",
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "aither-init", "pid 1 is the sandbox's: {out}");
    assert_eq!(lines[1], r.spec.hostname);
    // Only the sandbox's processes: its pid 1, the agent, and this command.
    let comms: Vec<&str> = lines[2].split_whitespace().collect();
    for c in &comms {
        assert!(
            ["aither-init", "sleep", "sh", "cat", "sort", "tr"].contains(c),
            "a process outside the sandbox is visible: {c} ({out})"
        );
    }
    assert!(comms.contains(&"sleep"), "the agent is visible: {out}");
}

#[test]
fn exec_is_confined_as_the_agent() {
    let r = Running::start("exec-confined");
    let file = r.ws.path().join("from-exec");
    let (code, out, err) = r.sh(&format!(
        "id -u; id -g; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; echo hi > {}",
        file.display()
    ));
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], r.spec.uid.to_string());
    assert_eq!(lines[1], r.spec.gid.to_string());
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // The workspace is writable, and the file lands with the workspace owner's uid.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "hi\n");
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), 0);
    // Host secrets stay out of reach, as for the agent.
    let secret = PathBuf::from(format!("/root/aither-exec-secret-{}", std::process::id()));
    std::fs::write(&secret, "TOP SECRET").unwrap();
    let (code, out, err) = r.sh(&format!(
        "cat /etc/shadow; echo rc=$?; cat {}; echo rc=$?; echo x > /usr/aither-exec-x; echo rc=$?",
        secret.display()
    ));
    let _ = std::fs::remove_file(&secret);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "rc=1\nrc=1\nrc=2\n", "{err}");
    assert!(err.contains("/etc/shadow: No such file"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!err.contains("TOP SECRET") && !out.contains("TOP SECRET"));
}

#[test]
fn exec_runs_in_the_agents_cgroup() {
    let r = Running::start("exec-cgroup");
    let (code, out, err) = r.sh("cat /proc/self/cgroup");
    assert_eq!(code, Some(0), "{err}");
    // In the sandbox's cgroup namespace, its own cgroup is "/" in every hierarchy Aither
    // manages (memory, cpu, pids and the cgroup2 one); the hierarchies it leaves alone show
    // the launcher's cgroup relative to that root.
    let mut seen = 0;
    for line in out.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let managed = ctrls.is_empty()
            || ctrls
                .split(',')
                .any(|c| ["memory", "cpu", "pids"].contains(&c));
        if managed {
            seen += 1;
            assert_eq!(path, "/", "not in the agent's cgroup: {line}\n{out}");
        }
    }
    assert!(seen >= 2, "{out}");
    // The host agrees: the agent's memory cgroup lists `aither-init exec` and its command
    // while they run.
    let procs = PathBuf::from("/sys/fs/cgroup/memory/aither")
        .join(&r.cgroup)
        .join("cgroup.procs");
    let before = std::fs::read_to_string(&procs).unwrap().lines().count();
    let mut c = r.spawn_exec(&["sleep", "2"], Some(20_000));
    let exec_pid = c.id().to_string();
    assert!(
        support::poll_until(Duration::from_secs(10), || {
            let s = std::fs::read_to_string(&procs).unwrap_or_default();
            s.lines().any(|l| l == exec_pid) && s.lines().count() >= before + 2
        }),
        "exec and its command in {}",
        procs.display()
    );
    assert!(c.wait().unwrap().success());
}

#[test]
fn exec_reports_status_timeout_and_missing_commands() {
    let r = Running::start("exec-status");
    assert_eq!(r.sh("exit 5").0, Some(5));
    let t = Instant::now();
    let o = r.exec(&["sleep", "20"], Some(300));
    assert_eq!(o.status.code(), Some(124));
    assert!(t.elapsed() < Duration::from_secs(10));
    let o = r.exec(&["no-such-command-here"], None);
    assert_eq!(o.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
    // The sandbox is unharmed: its agent still runs.
    assert_eq!(r.sh("cat /proc/[0-9]*/comm | grep -qx sleep").0, Some(0));
}

#[test]
fn exec_into_a_process_that_is_no_sandbox_is_refused() {
    require_root();
    let ws = support::workspace();
    let spec = spec(ws.path(), "exec-none", &["true"], None);
    let cfg = ExecConfig::new(spec, std::process::id() as i32, vec!["true".into()], None);
    let mut c = Command::new(support::AITHER_INIT)
        .arg("exec")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cfg).unwrap().as_bytes())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a sandbox"));
}
