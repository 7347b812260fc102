//! `aither-init shim`: the supervised mode aitherd uses. Each test spawns a shim as the daemon
//! would (config on stdin, one event line on stdout) and checks the log, exit.json and the
//! descriptors the agent gets. Needs root; fails loudly without it.

mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use support::{read_exit, require_root, spec, start_shim, ShimFds};

#[test]
fn shim_logs_stdout_and_stderr_and_writes_exit_json() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    let spec = spec(
        ws.path(),
        "shim-log",
        &[
            "/bin/sh",
            "-c",
            // /dev/stderr is reopened: the pipe must belong to the agent's host uid.
            "echo out-line; echo err-line >&2; echo reopened > /dev/stderr; exit 7",
        ],
        None,
    );
    let mut shim = start_shim(&spec, logs.path(), 1 << 20, 3, None);
    let started = shim.event();
    assert_eq!(started["event"], "started", "{started}");
    assert!(started["pid1"].as_i64().unwrap() > 1);
    let cgroup = started["cgroup"].as_str().unwrap();
    assert_eq!(cgroup, format!("{}-{}", spec.name, shim.child.id()));
    assert_eq!(shim.wait(), Some(7));
    // Each line a record of its stream, between the run's boundaries.
    let raw = std::fs::read_to_string(logs.path().join("agent.log")).unwrap();
    let tagged: Vec<String> = raw
        .lines()
        .map(|l| l.splitn(4, ' ').skip(1).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        tagged.first().map(String::as_str),
        Some("stdout F:aither-run run=1 event=started"),
        "{raw}"
    );
    assert_eq!(
        tagged.last().map(String::as_str),
        Some("stdout F:aither-run run=1 event=exited code=7"),
        "{raw}"
    );
    assert!(tagged.contains(&"stdout F out-line".to_string()), "{raw}");
    assert!(tagged.contains(&"stderr F err-line".to_string()), "{raw}");
    assert!(tagged.contains(&"stderr F reopened".to_string()), "{raw}");
    assert_eq!(
        support::agent_text(&logs.path().join("agent.log")),
        "out-line\nerr-line\nreopened\n"
    );
    let exit = read_exit(logs.path());
    assert_eq!(exit["code"], 7, "{exit}");
    assert_eq!(exit["signal"], serde_json::Value::Null);
    assert_eq!(exit["oom_killed"], false);
    assert_eq!(exit["timed_out"], false);
    assert_eq!(exit["launch_error"], serde_json::Value::Null);
    assert!(exit["finished_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(
        support::cgroup_dirs_of(&spec.name).is_empty(),
        "the shim removes its cgroup"
    );
}

#[test]
fn shim_rotates_the_agent_log() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    // 40 lines of 11 bytes, each a record of 51 bytes (2 KB), into files of at most 400 bytes,
    // 3 files kept: only the newest records remain, whole, in order.
    let spec = spec(
        ws.path(),
        "shim-rotate",
        &[
            "/bin/sh",
            "-c",
            "i=100; while [ $i -lt 140 ]; do echo line-$i..; i=$((i+1)); done",
        ],
        None,
    );
    let mut shim = start_shim(&spec, logs.path(), 400, 3, None);
    assert_eq!(shim.event()["event"], "started");
    assert_eq!(shim.wait(), Some(0));
    let path = |n: &str| logs.path().join(n);
    assert!(!path("agent.log.3").exists());
    for f in ["agent.log", "agent.log.1", "agent.log.2"] {
        let s = std::fs::read_to_string(path(f)).unwrap_or_default();
        assert!(
            !s.is_empty() && s.len() <= 400 && s.ends_with('\n'),
            "{f}: {s:?}"
        );
    }
    let all = format!(
        "{}{}{}",
        support::agent_text(&path("agent.log.2")),
        support::agent_text(&path("agent.log.1")),
        support::agent_text(&path("agent.log"))
    );
    assert!(all.ends_with("line-139..\n"), "{all}");
    assert!(all.len() < 440 && all.len() > 100, "{all}");
    let expected: String = (100..140).map(|i| format!("line-{i}..\n")).collect();
    assert!(
        expected.ends_with(&all),
        "the newest lines, in order: {all}"
    );
}

#[test]
fn shim_gives_the_agent_its_socket_as_fd_3_and_nothing_else() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    let (daemon_end, agent_end) = UnixStream::pair().unwrap();
    let spec = spec(
        ws.path(),
        "shim-fds",
        &[
            "/bin/sh",
            "-c",
            "echo AITHER_FD=$AITHER_FD; ls -l /proc/self/fd/ | sed -n 's/.* \\([0-9]*\\) -> \\(.*\\)$/fd \\1 \\2/p'; echo hello-daemon >&3",
        ],
        None,
    );
    let fds = ShimFds {
        channel: agent_end.into(),
        keep: daemon_end.try_clone().unwrap().into(),
    };
    let mut shim = start_shim(&spec, logs.path(), 1 << 20, 3, Some(fds));
    assert_eq!(shim.event()["event"], "started");
    assert_eq!(shim.wait(), Some(0));
    let log = support::agent_text(&logs.path().join("agent.log"));
    assert!(log.contains("AITHER_FD=3\n"), "{log}");
    let fds: Vec<(u32, String)> = log
        .lines()
        .filter_map(|l| l.strip_prefix("fd "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.parse().unwrap(), t.to_string())
        })
        .collect();
    let sockets: Vec<u32> = fds
        .iter()
        .filter(|(_, t)| t.starts_with("socket:"))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(
        sockets,
        vec![3],
        "fd 3 is the only socket (keep_fd stays out)\n{log}"
    );
    for (n, t) in &fds {
        assert!(
            *n <= 3 || t.starts_with("/proc/"),
            "unexpected fd {n} -> {t} in the sandbox\n{log}"
        );
    }
    assert!(
        fds.iter().any(|(n, t)| *n == 0 && t == "/dev/null"),
        "{log}"
    );
    assert!(
        fds.iter().any(|(n, t)| *n == 1 && t.starts_with("pipe:")),
        "{log}"
    );
    // The agent's writes reach the daemon's end; EOF follows: no copy stayed open in the shim.
    let mut got = String::new();
    let mut d = daemon_end;
    d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    d.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello-daemon\n");
}

#[test]
fn shim_reports_an_oom_kill() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    let spec = spec(
        ws.path(),
        "shim-oom",
        &["python3", "-c", "a = b'x' * (400 * 2**20)"],
        Some(64 << 20),
    );
    let mut shim = start_shim(&spec, logs.path(), 1 << 20, 3, None);
    assert_eq!(shim.event()["event"], "started");
    let code = shim.wait();
    let exit = read_exit(logs.path());
    assert_eq!(exit["oom_killed"], true, "{exit}");
    assert_eq!(exit["signal"], 9, "{exit}");
    assert_eq!(code, Some(137));
}

#[test]
fn shim_reports_a_failed_launch_on_stdout_and_in_exit_json() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    let spec = spec(ws.path(), "shim-nf", &["no-such-command-here"], None);
    let mut shim = start_shim(&spec, logs.path(), 1 << 20, 3, None);
    let ev = shim.event();
    assert_eq!(ev["event"], "failed", "{ev}");
    assert_eq!(ev["code"], 127);
    assert!(ev["error"].as_str().unwrap().contains("not found"), "{ev}");
    assert_eq!(shim.wait(), Some(127));
    let exit = read_exit(logs.path());
    assert_eq!(exit["code"], 127);
    assert!(exit["launch_error"]
        .as_str()
        .unwrap()
        .contains("no-such-command-here"));
    assert!(support::cgroup_dirs_of(&spec.name).is_empty());
}

#[test]
fn shim_forwards_sigterm_to_the_agent() {
    require_root();
    let ws = support::workspace();
    let logs = tempfile::tempdir().unwrap();
    let spec = spec(
        ws.path(),
        "shim-term",
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        None,
    );
    let mut shim = start_shim(&spec, logs.path(), 1 << 20, 3, None);
    let ev = shim.event();
    assert_eq!(ev["event"], "started");
    // The agent's host pid is known while it runs.
    let agent = ev["agent_pid"].as_i64().expect("agent_pid") as i32;
    let cmdline = std::fs::read(format!("/proc/{agent}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"/bin/sh\0-c\0trap"), "{cmdline:?}");
    let log = logs.path().join("agent.log");
    assert!(support::poll_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("ready"))
    }));
    let pid = nix::unistd::Pid::from_raw(shim.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(shim.wait(), Some(42));
    assert!(support::agent_text(&log).contains("got-term"));
    assert_eq!(read_exit(logs.path())["code"], 42);
}

#[test]
fn shim_config_garbage_is_a_failed_event() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aither-init"))
        .arg("shim")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"{\"spec\": 1}")?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], "failed");
    assert_eq!(v["code"], 125);
}

/// The daemon's hand-over (`receive_handed_fds`): on a socket stdin, the first byte must come
/// with exactly the two channel descriptors; a byte without them is a failed event (125) that
/// says so, and no config is read.
#[test]
fn a_socket_stdin_without_the_channel_descriptors_is_a_failed_event() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_aither-init"))
        .arg("shim")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ours.write_all(b"F{\"spec\": 1}").unwrap();
    drop(ours);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], "failed");
    assert_eq!(v["code"], 125);
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("expected one byte with 2 descriptors, got 1 byte(s) and 0"),
        "{error}"
    );
}
