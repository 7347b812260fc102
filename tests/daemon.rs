//! aitherd end to end, as root: a real daemon on a real unix socket, real sandboxes, real
//! cgroups and SQLite. Each test starts its own daemon (own state directory and socket).
//! Needs `aither-init` built beside aitherctl (`cargo test --workspace` builds it).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::TestDaemon as Daemon;
use common::{poll_until, unique, AITHERCTL};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn daemon() -> Daemon {
    Daemon::start("aitherd-test-", &[])
}

fn daemon_with(args: &[&str]) -> Daemon {
    Daemon::start("aitherd-test-", args)
}

/// What the daemon suite asks of its daemon beyond the shared fixture.
trait DaemonExt {
    fn audit(&self) -> Vec<Value>;
    fn inspect(&self, name: &str) -> Value;
    fn state_of(&self, name: &str) -> String;
    fn wait_state(&self, name: &str, state: &str, timeout: Duration);
    fn events(&self, name: &str) -> Vec<Value>;
    fn events_text(&self, name: &str) -> String;
    fn count(&self, name: &str, kind: &str) -> usize;
    fn wait_events(&self, name: &str, kind: &str, n: usize, timeout: Duration) -> Vec<Value>;
    fn spawn(&self, name: &str, flags: &[&str], cmd: &[&str]) -> Value;
    fn shims_of(&self, name: &str) -> Vec<i32>;
}

impl DaemonExt for Daemon {
    /// The audit records (as JSON) of this test's daemon and aitherctl calls.
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn inspect(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["inspect", name])).expect("inspect JSON")
    }

    fn state_of(&self, name: &str) -> String {
        self.inspect(name)["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn wait_state(&self, name: &str, state: &str, timeout: Duration) {
        let ok = poll_until(timeout, || self.state_of(name) == state);
        assert!(
            ok,
            "{name} did not reach {state}: {}\n--- events ---\n{}",
            self.inspect(name),
            self.events_text(name)
        );
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.ok(&["events", "--json", "--agent", name])
            .lines()
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }

    fn events_text(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.ctl(&["events", "--agent", name]).stdout).into_owned()
    }

    fn count(&self, name: &str, kind: &str) -> usize {
        self.events(name)
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    }

    fn wait_events(&self, name: &str, kind: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let ok = poll_until(timeout, || self.count(name, kind) >= n);
        assert!(
            ok,
            "{name}: fewer than {n} {kind:?} events\n{}",
            self.events_text(name)
        );
        self.events(name)
    }

    fn spawn(&self, name: &str, flags: &[&str], cmd: &[&str]) -> Value {
        let mut args = vec!["spawn", "--json", "--policy", "strict", name];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        serde_json::from_str(&self.ok(&args)).expect("spawn JSON")
    }

    /// Shim processes of an agent (its cgroups are named `<name>-<shim pid>`, or
    /// `pool-<shim pid>` for a spawn served by a prepared sandbox, whose shim works in the
    /// agent's log directory).
    fn shims_of(&self, name: &str) -> Vec<i32> {
        let log_dir = self.state.path().join("state/agents").join(name);
        let base = Path::new("/sys/fs/cgroup/pids/aither");
        let mut v: Vec<i32> = std::fs::read_dir(base)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        let (a, pid) = n.rsplit_once('-')?;
                        let pid: i32 = pid.parse().ok()?;
                        let warm = a == "pool"
                            && std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
                                == Some(log_dir.clone());
                        ((a == name || warm) && Path::new(&format!("/proc/{pid}")).exists())
                            .then_some(pid)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn ts(e: &Value) -> u64 {
    e["ts_ms"].as_u64().unwrap()
}

#[test]
fn spawn_ps_logs_stop_rm_round_trip() {
    let d = daemon();
    let name = unique("basic");
    let sock = d.socket().display().to_string();
    let script = format!(
        "echo out-line; echo err-line >&2; test -e {sock} && echo SOCKET-VISIBLE; echo fd3=$(readlink /proc/self/fd/3 | cut -c1-7) AITHER_FD=$AITHER_FD; exec sleep 60"
    );
    let v = d.spawn(&name, &[], &["sh", "-c", &script]);
    assert_eq!(v["state"], "running", "{v}");
    let pid1 = v["pid1"].as_i64().unwrap();
    assert!(Path::new(&format!("/proc/{pid1}")).exists());

    let ps = d.ok(&["ps"]);
    let header = ps.lines().next().unwrap();
    for col in [
        "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY", "GPU",
    ] {
        assert!(header.contains(col), "{ps}");
    }
    let row = ps
        .lines()
        .find(|l| l.starts_with(&name))
        .expect("row in ps");
    assert!(
        row.contains("running") && row.contains(&pid1.to_string()),
        "{ps}"
    );
    // The enforcement report of the supervised run.
    let rep = &d.inspect(&name)["report"];
    assert_eq!(rep["landlock"]["status"], "FullyEnforced", "{rep}");
    assert_eq!(rep["inside"]["status"]["NoNewPrivs"], "1");
    assert_eq!(rep["inside"]["status"]["CapEff"], "0000000000000000");
    let json: Value = serde_json::from_str(&d.ok(&["ps", "--json"])).unwrap();
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == name.as_str()));

    assert!(poll_until(Duration::from_secs(10), || d
        .ok(&["logs", &name])
        .contains("AITHER_FD")));
    let logs = d.ok(&["logs", &name]);
    assert!(
        logs.contains("out-line") && logs.contains("err-line"),
        "{logs}"
    );
    assert!(logs.contains("fd3=socket: AITHER_FD=3"), "{logs}");
    assert!(
        !logs.contains("SOCKET-VISIBLE"),
        "the daemon's socket is visible inside: {logs}"
    );
    assert_eq!(d.ok(&["logs", "--tail", "1", &name]).lines().count(), 1);

    // A second agent of the same name is refused while this one runs.
    let o = d.ctl(&["spawn", "--policy", "strict", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));

    // rm of a running agent is refused without --force.
    assert_eq!(d.ctl(&["rm", &name]).status.code(), Some(1));
    let t0 = Instant::now();
    d.ok(&["stop", &name]);
    assert_eq!(d.state_of(&name), "stopped");
    assert!(
        t0.elapsed() < Duration::from_secs(9),
        "sleep dies on SIGTERM at once"
    );
    assert!(!Path::new(&format!("/proc/{pid1}")).exists());
    assert!(poll_until(Duration::from_secs(5), || d
        .shims_of(&name)
        .is_empty()));
    assert!(common::cgroup_dirs_of(&name).is_empty());
    // Stopped stays stopped: no restart.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.state_of(&name), "stopped");

    d.ok(&["rm", &name]);
    let o = d.ctl(&["inspect", &name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no agent named"));
}

#[test]
fn restarts_on_failure_with_exponential_backoff() {
    let d = daemon();
    let name = unique("backoff");
    d.spawn(&name, &["--backoff", "200ms"], &["sh", "-c", "exit 3"]);
    let ev = d.wait_events(&name, "started", 4, Duration::from_secs(20));
    // The delays the daemon chose: 200, 400, 800 ms, each ±10 % (jitter); and no restart
    // came before its delay had passed. (How much later it came depends on the machine's load,
    // so that is not asserted.)
    let exits: Vec<u64> = ev
        .iter()
        .filter(|e| e["kind"] == "exited")
        .map(ts)
        .collect();
    let starts: Vec<u64> = ev
        .iter()
        .filter(|e| e["kind"] == "started")
        .map(ts)
        .collect();
    let backoffs: Vec<u64> = ev
        .iter()
        .filter(|e| e["kind"] == "backoff")
        .map(|e| e["data"]["delay_ms"].as_u64().unwrap())
        .collect();
    for (i, base) in [200u64, 400, 800].iter().enumerate() {
        let delay = backoffs[i];
        assert!(
            delay >= base * 9 / 10 && delay <= base * 11 / 10,
            "restart {}: a delay of {delay} ms, expected {base} ms ±10 %: {backoffs:?}",
            i + 1
        );
        let gap = starts[i + 1] - exits[i];
        assert!(
            gap + 1 >= delay, // timestamps are whole milliseconds
            "restart {} came {gap} ms after the exit, before its {delay} ms delay",
            i + 1
        );
    }
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "exited" && e["data"]["reason"]["code"] == 3));
    let info = d.inspect(&name);
    assert!(info["restarts"].as_u64().unwrap() >= 3, "{info}");
    // A success under on-failure is final.
    let ok = unique("success");
    d.spawn(&ok, &["--backoff", "50ms"], &["true"]);
    d.wait_state(&ok, "exited", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.count(&ok, "started"), 1);
}

#[test]
fn a_restart_burst_marks_the_agent_failed() {
    let d = daemon();
    let name = unique("burst");
    d.spawn(&name, &["--backoff", "20ms"], &["false"]);
    d.wait_state(&name, "failed", Duration::from_secs(20));
    // One start and five restarts, then it gave up.
    assert_eq!(d.count(&name, "started"), 6, "{}", d.events_text(&name));
    assert_eq!(d.count(&name, "failed"), 1);
    assert_eq!(d.inspect(&name)["restarts"], 5);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.count(&name, "started"), 6);
    // A user's restart gives it a fresh budget.
    d.ok(&["restart", &name]);
    d.wait_events(&name, "started", 7, Duration::from_secs(10));
}

#[test]
fn an_oom_kill_is_a_pain_event_and_restarts_the_agent() {
    let d = daemon();
    let name = unique("oom");
    d.spawn(
        &name,
        &["--memory", "48M", "--backoff", "100ms"],
        &["python3", "-c", "a = b'x' * (400 << 20)"],
    );
    let ev = d.wait_events(&name, "started", 2, Duration::from_secs(30));
    let pain: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "pain").collect();
    assert!(
        pain.iter()
            .any(|e| e["data"]["signal"] == "oom" && e["data"]["source"] == "kernel"),
        "no OOM pain event: {}",
        d.events_text(&name)
    );
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "oom_killed"));
    assert_eq!(
        d.inspect(&name)["last_reason"]["kind"],
        "oom_killed",
        "{}",
        d.inspect(&name)
    );
}

#[test]
fn a_missed_watchdog_restarts_the_agent_and_heartbeats_keep_it() {
    let d = daemon();
    let silent = unique("wd-silent");
    d.spawn(
        &silent,
        &["--watchdog", "300ms", "--backoff", "50ms"],
        &["sleep", "60"],
    );
    let ev = d.wait_events(&silent, "started", 2, Duration::from_secs(10));
    assert!(ev.iter().any(|e| e["kind"] == "watchdog_miss"));
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "watchdog_miss"));

    // The same watchdog with heartbeats every 100 ms (Python SDK): never restarted.
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python/aither.py");
    std::fs::copy(&sdk, d.ws.path().join("aither.py")).unwrap();
    let beating = unique("wd-beat");
    let script = "import aither, time\nc = aither.Channel.from_env()\nc.heartbeat_every(0.1)\ntime.sleep(60)\n";
    std::fs::write(d.ws.path().join("beat.py"), script).unwrap();
    d.spawn(&beating, &["--watchdog", "1s"], &["python3", "beat.py"]);
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(
        d.count(&beating, "watchdog_miss"),
        0,
        "{}",
        d.events_text(&beating)
    );
    assert_eq!(d.count(&beating, "started"), 1);
    assert!(d.inspect(&beating)["last_heartbeat_ms"].as_u64().is_some());
}

#[test]
fn the_agent_channel_ready_status_pain_and_denial() {
    let d = daemon();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python/aither.py");
    std::fs::copy(&sdk, d.ws.path().join("aither.py")).unwrap();
    let script = r#"
import aither, sys, time
c = aither.Channel.from_env()
time.sleep(0.3)
c.status("warming up")
c.ready()
c.pain("warning", "disk almost full")
try:
    c.request("status", agent="someone-else", text="x")
    print("OTHER-AGENT-ALLOWED", flush=True)
except aither.AitherError as e:
    print("denied:", e.code, flush=True)
try:
    c.request("no-such-op")
except aither.AitherError as e:
    print("unknown:", e.code, flush=True)
print("done", flush=True)
if sys.argv[1] == "critical":
    c.pain("critical", "cannot go on")
time.sleep(60)
"#;
    std::fs::write(d.ws.path().join("agent.py"), script).unwrap();
    let name = unique("chan");
    let v = d.spawn(&name, &["--wait-ready"], &["python3", "agent.py", "calm"]);
    assert_eq!(
        v["state"], "starting",
        "readiness asked: starting until READY"
    );
    d.wait_state(&name, "ready", Duration::from_secs(10));
    assert!(poll_until(Duration::from_secs(5), || d
        .ok(&["logs", &name])
        .contains("done")));
    let logs = d.ok(&["logs", &name]);
    assert!(logs.contains("denied: denied"), "{logs}");
    assert!(logs.contains("unknown: unknown_op"), "{logs}");
    assert!(!logs.contains("OTHER-AGENT-ALLOWED"));
    let info = d.inspect(&name);
    assert_eq!(info["status_text"], "warming up");
    let ev = d.events(&name);
    assert!(ev.iter().any(|e| e["kind"] == "pain"
        && e["data"]["source"] == "agent"
        && e["data"]["severity"] == "warning"
        && e["data"]["reason"] == "disk almost full"
        && e["data"]["action"] == "log"));

    // strict maps critical pain to restart.
    let crit = unique("critical");
    d.spawn(
        &crit,
        &["--backoff", "50ms"],
        &["python3", "agent.py", "critical"],
    );
    let ev = d.wait_events(&crit, "started", 2, Duration::from_secs(15));
    assert!(ev.iter().any(|e| e["kind"] == "pain"
        && e["data"]["severity"] == "critical"
        && e["data"]["action"] == "restart"));

    // Issue 20: under `--restart never` the same pain ends the run, and that is all.
    let once = unique("critical-never");
    d.spawn(
        &once,
        &["--backoff", "0", "--restart", "never"],
        &["python3", "agent.py", "critical"],
    );
    d.wait_state(&once, "exited", Duration::from_secs(15));
    let info = d.inspect(&once);
    assert_eq!(info["restarts"], 0, "{info}");
    assert_eq!(info["last_reason"]["kind"], "pain", "{info}");
    let ev = d.events(&once);
    assert_eq!(
        ev.iter().filter(|e| e["kind"] == "started").count(),
        1,
        "restarted under --restart never: {ev:?}"
    );
}

#[test]
fn a_shell_agent_reports_ready_with_aither_notify() {
    let d = daemon();
    let notify = Path::new(AITHERCTL).with_file_name("aither-notify");
    assert!(
        notify.is_file(),
        "build the workspace: aither-notify is missing"
    );
    std::fs::copy(&notify, d.ws.path().join("aither-notify")).unwrap();
    let name = unique("notify");
    d.spawn(
        &name,
        &["--wait-ready", "--startup-timeout", "20s"],
        &[
            "sh",
            "-c",
            "sleep 0.2; ./aither-notify --ready && echo notified; exec sleep 60",
        ],
    );
    d.wait_state(&name, "ready", Duration::from_secs(10));
    // The echo runs after aither-notify has returned, so its line may reach the log a little
    // after the state changed.
    assert!(
        poll_until(Duration::from_secs(10), || d
            .ok(&["logs", &name])
            .contains("notified")),
        "{}",
        d.ok(&["logs", &name])
    );
    // Without READY in time: a startup-timeout failure, restarted.
    let late = unique("late");
    d.spawn(
        &late,
        &[
            "--wait-ready",
            "--startup-timeout",
            "300ms",
            "--backoff",
            "50ms",
        ],
        &["sleep", "60"],
    );
    let ev = d.wait_events(&late, "started", 2, Duration::from_secs(10));
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "startup_timeout"));
}

#[test]
fn after_kill_9_the_daemon_readopts_running_agents_and_restarts_ended_ones() {
    let mut d = daemon();
    let a = unique("keep-a");
    let b = unique("keep-b");
    let c = unique("ends");
    let ticker = "while :; do echo tick; sleep 0.1; done";
    let pa = d.spawn(&a, &[], &["sh", "-c", ticker])["pid1"]
        .as_i64()
        .unwrap();
    let pb = d.spawn(&b, &[], &["sleep", "60"])["pid1"].as_i64().unwrap();
    let pc = d.spawn(&c, &["--backoff", "0"], &["sh", "-c", "sleep 1; exit 7"])["pid1"]
        .as_i64()
        .unwrap();
    d.kill9();
    // Without the daemon: the agents run on, and keep logging.
    let before = std::fs::metadata(d.state.path().join(format!("state/agents/{a}/agent.log")))
        .unwrap()
        .len();
    std::thread::sleep(Duration::from_millis(1500));
    let after = std::fs::metadata(d.state.path().join(format!("state/agents/{a}/agent.log")))
        .unwrap()
        .len();
    assert!(after > before, "logging stopped while the daemon was down");
    assert!(Path::new(&format!("/proc/{pa}")).exists());
    assert!(
        !Path::new(&format!("/proc/{pc}")).exists(),
        "c should have exited by now"
    );
    let o = d.ctl(&["ps"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("aitherd is not running"));

    d.launch();
    let ia = d.inspect(&a);
    let ib = d.inspect(&b);
    assert_eq!(ia["pid1"].as_i64(), Some(pa), "a re-adopted: {ia}");
    assert_eq!(ib["pid1"].as_i64(), Some(pb), "b re-adopted: {ib}");
    assert_eq!(ia["state"], "running");
    // c ended with 7 while the daemon was down: restarted per on-failure.
    assert!(poll_until(Duration::from_secs(10), || d.inspect(&c)
        ["pid1"]
        .as_i64()
        .is_some_and(|p| p != pc)));
    // None started twice: one shim each.
    assert_eq!(d.shims_of(&a).len(), 1);
    assert_eq!(d.shims_of(&b).len(), 1);
    let log = d.events_text(&a);
    assert!(log.contains("adopted"), "{log}");
    // The re-adopted agents are under control: stop works, and a crash is seen.
    d.ok(&["stop", &b]);
    assert!(!Path::new(&format!("/proc/{pb}")).exists());
    d.ok(&["kill", "--signal", "TERM", &a]);
    // An operator's signal is seen, and is not a crash (issue 20): exited, not restarted.
    d.wait_state(&a, "exited", Duration::from_secs(10));
    let ev = d.wait_events(&a, "exited", 1, Duration::from_secs(5));
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "killed_by_operator"));
}

#[test]
fn an_operators_term_is_not_a_crash_and_kill_says_what_it_sent() {
    let d = daemon();
    let name = unique("termed");
    d.spawn(
        &name,
        &[
            "--restart",
            "always",
            "--backoff",
            "0",
            "--health-cmd",
            "true",
            "--health-interval",
            "100ms",
        ],
        &["sleep", "60"],
    );
    d.wait_state(&name, "ready", Duration::from_secs(10));
    let out = d.ok(&["kill", "-s", "TERM", &name]);
    assert_eq!(out, format!("{name}: sent SIGTERM\n"));
    d.wait_state(&name, "exited", Duration::from_secs(10));
    let info = d.inspect(&name);
    assert_eq!(info["restarts"], 0, "{info}");
    assert_eq!(
        info["last_reason"],
        serde_json::json!({"kind": "killed_by_operator", "signal": libc::SIGTERM}),
        "{info}"
    );
    assert_eq!(d.count(&name, "started"), 1, "{}", d.events_text(&name));
    assert_eq!(d.count(&name, "backoff"), 0, "{}", d.events_text(&name));
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_leaves_agents_running() {
    let mut d = daemon();
    let name = unique("survive");
    let pid1 = d.spawn(&name, &[], &["sleep", "60"])["pid1"]
        .as_i64()
        .unwrap();
    // An agent that has been restarted: its count survives the daemon's restart.
    let flaky = unique("flaky");
    d.spawn(
        &flaky,
        &["--backoff", "20ms", "--restart", "always"],
        &["sh", "-c", "sleep 0.3"],
    );
    d.wait_events(&flaky, "started", 3, Duration::from_secs(10));
    d.ok(&["stop", &flaky]);
    let restarts = d.inspect(&flaky)["restarts"].as_u64().unwrap();
    assert!(restarts >= 2, "{restarts}");
    let _ = kill(Pid::from_raw(d.pid()), Signal::SIGTERM);
    let st = d.child.as_mut().unwrap().wait().unwrap();
    d.child = None;
    assert!(st.success(), "aitherd exit status {st}");
    assert!(!d.socket().exists(), "socket left behind");
    assert!(Path::new(&format!("/proc/{pid1}")).exists());
    d.launch();
    assert_eq!(d.inspect(&name)["pid1"].as_i64(), Some(pid1));
    assert!(d.events_text(&name).contains("adopted"));
    assert_eq!(d.inspect(&flaky)["restarts"].as_u64(), Some(restarts));
    assert_eq!(d.state_of(&flaky), "stopped");
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn reply(s: &mut UnixStream) -> Option<Value> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut b = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut b).ok()?;
    serde_json::from_slice(&b).ok()
}

#[test]
fn socket_abuse_gets_error_replies_and_the_daemon_keeps_serving() {
    let d = daemon();
    let connect = || {
        let s = UnixStream::connect(d.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut s = connect();
    // Not JSON, in a proper frame: an error, and the connection goes on.
    s.write_all(&frame(b"\x00\xffgarbage")).unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "bad_json");
    s.write_all(&frame(br#"{"op":"format_disk"}"#)).unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "bad_request");
    s.write_all(&frame(br#"{"op":"spawn","name":"x"}"#))
        .unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "bad_request");
    s.write_all(&frame(br#"{"op":"ping"}"#)).unwrap();
    assert_eq!(reply(&mut s).unwrap()["ok"], true);
    // Oversized: refused before reading it, then closed.
    let mut s = connect();
    s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "too_large");
    assert!(reply(&mut s).is_none(), "closed after an oversized frame");
    // Empty frame.
    let mut s = connect();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "bad_frame");
    // Truncated: a header promising 100 bytes, 10 sent, then the writer closes.
    let mut s = connect();
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(b"{\"op\":\"pi").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reply(&mut s).unwrap()["error"]["code"], "bad_frame");
    // Many half-open connections do not stop others.
    let idle: Vec<UnixStream> = (0..50).map(|_| connect()).collect();
    let name = unique("after-abuse");
    d.spawn(&name, &[], &["sleep", "30"]);
    assert_eq!(d.state_of(&name), "running");
    drop(idle);

    // Only root and group aither: the socket is not world-accessible, and a plain user is
    // turned away.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "socket mode {mode:o}");
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        AITHERCTL,
        "ps",
    ]);
    d.env(&mut c);
    let o = c.output().expect("setpriv (util-linux)");
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("permission denied"),
        "{o:?}"
    );
}

#[test]
fn many_spawns_at_once() {
    let d = daemon();
    let names: Vec<String> = (0..16).map(|i| unique(&format!("many{i}"))).collect();
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || {
                d.spawn(n, &[], &["sleep", "60"]);
            });
        }
    });
    let ps: Value = serde_json::from_str(&d.ok(&["ps", "--json"])).unwrap();
    let mut pids: Vec<i64> = ps
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "running")
        .map(|a| a["pid1"].as_i64().unwrap())
        .collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), names.len(), "{ps}");
    for n in &names {
        assert_eq!(d.shims_of(n).len(), 1, "{n}");
    }
}

#[test]
fn without_a_daemon_the_cli_says_how_to_start_one() {
    let o = Command::new(AITHERCTL)
        .args(["ps"])
        .env("AITHER_SOCKET", "/nonexistent/aitherd.sock")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("aitherd is not running") && e.contains("Start it"),
        "{e}"
    );
}

#[test]
fn agent_files_give_command_and_supervision_with_errors_that_point_at_the_line() {
    let d = daemon();
    let name = unique("file");
    std::fs::create_dir_all(d.ws.path().join("agents")).unwrap();
    std::fs::write(
        d.ws.path().join(format!("agents/{name}.toml")),
        "policy = \"strict\"\ncommand = \"echo from-file; exec sleep 60\"\nrestart = \"always\"\nwatchdog = \"1h\"\n",
    )
    .unwrap();
    let o = d.ok(&["spawn", &name]);
    assert!(o.contains("running"), "{o}");
    let i = d.inspect(&name);
    assert_eq!(i["supervision"]["restart"], "always");
    assert_eq!(i["supervision"]["watchdog_ms"], 3_600_000);
    std::fs::write(
        d.ws.path().join("agents/bad.toml"),
        "command = \"true\"\nrestart = \"sometimes\"\n",
    )
    .unwrap();
    let o = d.ctl(&["spawn", "bad"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("agents/bad.toml:2:") && e.contains("restart"),
        "{e}"
    );
}

#[test]
fn health_checks_run_inside_the_sandbox_and_failures_restart_the_agent() {
    let d = daemon();
    let name = unique("health");
    // /tmp is the sandbox's own tmpfs: the check can only see the file from inside.
    let v = d.spawn(
        &name,
        &[
            "--health-cmd",
            "test -f /tmp/healthy",
            "--health-interval",
            "200ms",
            "--health-threshold",
            "2",
            "--backoff",
            "50ms",
        ],
        &[
            "sh",
            "-c",
            "touch /tmp/healthy; sleep 2; rm /tmp/healthy; exec sleep 60",
        ],
    );
    assert_eq!(v["state"], "starting", "a health check gates readiness");
    d.wait_state(&name, "ready", Duration::from_secs(10));
    let ev = d.wait_events(&name, "started", 2, Duration::from_secs(20));
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "health_failed"),
        "{}",
        d.events_text(&name)
    );
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "health" && e["data"]["ok"] == false));
}

#[test]
fn revoking_its_token_stops_a_running_agent_and_it_is_not_restarted() {
    let d = daemon();
    let name = unique("revoke");
    let v = d.spawn(
        &name,
        &["--restart", "always", "--backoff", "50ms"],
        &["sleep", "60"],
    );
    let pid1 = v["pid1"].as_i64().unwrap();
    let id = v["token_id"].as_str().unwrap().to_string();
    d.ok(&["token", "revoke", "--reason", "test", &id]);
    d.wait_state(&name, "failed", Duration::from_secs(15));
    assert!(!Path::new(&format!("/proc/{pid1}")).exists());
    assert_eq!(
        d.count(&name, "token_invalid"),
        1,
        "{}",
        d.events_text(&name)
    );
    assert_eq!(d.count(&name, "started"), 1);
    // A user's restart re-checks the token: still refused.
    d.ok(&["restart", &name]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.state_of(&name), "failed");
    assert_eq!(d.count(&name, "started"), 1);
}

#[test]
fn kernel_cpu_throttling_is_pain_and_the_policy_can_map_it_to_throttle() {
    let d = daemon();
    // strict, with CPU throttling mapped to the `throttle` action.
    let strict = std::fs::read_to_string(common::policy_dir().join("strict.toml")).unwrap();
    let policy = d.ws.path().join("throttling.toml");
    std::fs::write(
        &policy,
        format!(
            "{}\n[pain]\ncpu_throttling = \"throttle\"\n",
            strict.replace("name = \"strict\"", "name = \"throttling\"")
        ),
    )
    .unwrap();
    let name = unique("throttle");
    let v: Value = serde_json::from_str(&d.ok(&[
        "spawn",
        "--json",
        "--policy",
        policy.to_str().unwrap(),
        "--cpus",
        "0.2",
        &name,
        "--",
        "sh",
        "-c",
        "while :; do :; done",
    ]))
    .unwrap();
    let cg = format!(
        "/sys/fs/cgroup/cpu/aither/{}/cpu.cfs_quota_us",
        v["cgroup"].as_str().unwrap()
    );
    let quota = || {
        std::fs::read_to_string(&cg)
            .unwrap_or_default()
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
    };
    assert_eq!(quota(), 20_000);
    let ev = d.wait_events(&name, "throttled", 1, Duration::from_secs(15));
    assert!(ev.iter().any(|e| e["kind"] == "pain"
        && e["data"]["source"] == "kernel"
        && e["data"]["signal"] == "cpu_throttling"
        && e["data"]["action"] == "throttle"));
    assert!(quota() < 20_000, "quota still {}", quota());
    assert_eq!(d.state_of(&name), "running");
}

#[test]
fn every_decision_lands_in_one_verifiable_audit_stream() {
    let d = daemon();
    let name = unique("audited");
    // Allowed: a spawn (with the token minted for it), an operator's stop.
    d.spawn(&name, &[], &["sleep", "60"]);
    // Denied: a spawn whose policy does not exist; a channel request naming another agent.
    assert_eq!(
        d.ctl(&[
            "spawn",
            "--policy",
            "no-such-policy",
            &unique("x"),
            "--",
            "true"
        ])
        .status
        .code(),
        Some(1)
    );
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/python/aither.py");
    std::fs::copy(&sdk, d.ws.path().join("aither.py")).unwrap();
    std::fs::write(
        d.ws.path().join("nosy.py"),
        "import aither, time\nc = aither.Channel.from_env()\ntry:\n    c.request('status', agent='someone-else', text='x')\nexcept aither.AitherError as e:\n    print('denied', flush=True)\ntime.sleep(60)\n",
    )
    .unwrap();
    let nosy = unique("nosy");
    d.spawn(&nosy, &[], &["python3", "nosy.py"]);
    assert!(poll_until(Duration::from_secs(10), || d
        .ok(&["logs", &nosy])
        .contains("denied")));
    d.ok(&["stop", &name]);
    // aitherctl's own decisions: a token minted, then revoked.
    let out = d.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        "someone",
    ]);
    assert!(!out.is_empty());
    // The restart policy's decision on a run that ended.
    let ends = unique("ends");
    d.spawn(&ends, &["--restart", "never"], &["sh", "-c", "exit 3"]);

    let ok = poll_until(Duration::from_secs(5), || {
        let a = d.audit();
        a.iter().any(|r| r["kind"] == "restart_decision")
            && a.iter().any(|r| r["kind"] == "channel")
            && a.iter().any(|r| r["kind"] == "stop")
    });
    let a = d.audit();
    assert!(ok, "{a:#?}");
    let has = |kind: &str, decision: &str, agent: Option<&str>| {
        a.iter().any(|r| {
            r["kind"] == kind
                && r["decision"] == decision
                && agent.is_none_or(|n| r["agent"] == n)
                && !r["rule"].as_str().unwrap_or("").is_empty()
        })
    };
    assert!(has("token_mint", "allow", Some(&name)), "{a:#?}");
    assert!(has("spawn", "allow", Some(&name)));
    assert!(has("spawn", "deny", None));
    assert!(has("channel", "deny", Some(&nosy)));
    assert!(has("stop", "allow", Some(&name)));
    assert!(has("restart_decision", "info", Some(&ends)));
    assert!(has("token_mint", "allow", Some("someone")));
    let denied = a.iter().find(|r| r["kind"] == "channel").unwrap();
    assert!(
        denied["rule"].as_str().unwrap().contains("someone-else"),
        "{denied}"
    );

    // Issue 20: the spawn record names the workspace.
    let spawned = a
        .iter()
        .find(|r| r["kind"] == "spawn" && r["decision"] == "allow" && r["agent"] == name.as_str())
        .unwrap();
    let ws = spawned["data"]["workspace"].as_str().unwrap_or("");
    assert_eq!(
        Path::new(ws).canonicalize().ok(),
        d.ws.path().canonicalize().ok(),
        "{spawned}"
    );
    // Issue 20: an operator's write to an agent's spirit tier (its instructions) is audited
    // with the caller; a working-tier write is not.
    d.ok(&["mem", "put", &name, "--tier", "spirit", "persona", "obey"]);
    d.ok(&["mem", "put", &name, "--tier", "working", "scratch", "x"]);
    let a = d.audit();
    let mem: Vec<&Value> = a.iter().filter(|r| r["kind"] == "mem").collect();
    assert_eq!(mem.len(), 1, "{mem:#?}");
    assert_eq!(mem[0]["decision"], "allow");
    assert_eq!(mem[0]["agent"], name.as_str());
    assert_eq!(mem[0]["caller_uid"], 0);
    assert_eq!(
        mem[0]["data"],
        serde_json::json!({"op": "mem.put", "tier": "spirit", "key": "persona"})
    );
    // Issue 20: `audit -n N` prints the last N records, as tail.
    let last2 = d.ok(&["audit", "-n", "2", "--json"]);
    let file = std::fs::read_to_string(d.audit_log()).unwrap();
    let file_lines: Vec<&str> = file.lines().collect();
    let got: Vec<&str> = last2.lines().collect();
    assert_eq!(got.len(), 2, "{last2}");
    let at = file_lines
        .iter()
        .position(|l| *l == got[0])
        .expect("a record of the log");
    assert_eq!(file_lines.get(at + 1), Some(&got[1]), "consecutive records");
    assert_eq!(d.ok(&["audit", "-n", "0"]), "");

    // The chain verifies; one edited byte breaks it.
    let o = d.ctl(&["audit", "verify"]);
    assert!(o.status.success(), "{o:?}");
    let listed = d.ok(&["audit", "--agent", &name]);
    assert!(
        listed.contains("spawn") && listed.contains("stop"),
        "{listed}"
    );
    let text = std::fs::read_to_string(d.audit_log()).unwrap();
    let edited = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allo\"", 1);
    assert_ne!(text, edited);
    std::fs::write(d.audit_log(), edited).unwrap();
    let o = d.ctl(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("BROKEN"));
}

#[test]
fn prometheus_metrics_count_agents_restarts_and_pain() {
    // A free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = daemon_with(&["--metrics", &addr]);
    let up = unique("m-up");
    d.spawn(&up, &[], &["sleep", "60"]);
    let crash = unique("m-crash");
    d.spawn(&crash, &["--backoff", "50ms"], &["sh", "-c", "exit 2"]);
    d.wait_events(&crash, "started", 3, Duration::from_secs(10));
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("aither_agents{state=\"running\"}"), "{m}");
    let restarts: u64 = m
        .lines()
        .find(|l| l.starts_with("aither_restarts_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(restarts >= 2, "{m}");
    assert!(
        m.contains(&format!("aither_agent_restarts{{agent=\"{crash}\"}}")),
        "{m}"
    );
    assert!(m.contains("aither_exits_total{reason=\"exited\"}"), "{m}");
    // The daemon publishes its events on the bus: the log is not empty.
    let last_seq: f64 = m
        .lines()
        .find(|l| l.starts_with("aither_bus_last_seq "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(last_seq > 0.0, "{m}");
    assert!(get("/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn the_audit_stream_survives_kill_9_of_the_daemon_in_a_burst() {
    let mut d = daemon();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (d, stop) = (&d, &stop);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each refused spawn is an audited decision.
                    let n = format!("burst{t}-{i}");
                    let _ = d.ctl(&["spawn", "--policy", "no-such-policy", &n, "--", "true"]);
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(700));
        let _ = kill(Pid::from_raw(d.pid()), Signal::SIGKILL);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    d.kill9(); // reaps it
    let before = d.audit().len();
    assert!(before > 0, "no decision recorded before the kill");
    let o = d.ctl(&["audit", "verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // The next daemon appends to the same chain.
    d.launch();
    let _ = d.ctl(&["spawn", "--policy", "no-such-policy", "after", "--", "true"]);
    assert!(poll_until(Duration::from_secs(5), || d.audit().len() > before));
    assert!(d.ctl(&["audit", "verify"]).status.success());
}

#[test]
fn a_bad_agent_name_is_refused_naming_the_field_and_the_rule() {
    let d = daemon();
    for bad in ["../x", "a/b", "a.b", &"a".repeat(49)] {
        let o = d.ctl(&["spawn", "--policy", "strict", bad, "--", "true"]);
        assert_ne!(o.status.code(), Some(0), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "invalid agent name {bad:?} in name: 1-48 letters, digits, '-' or '_', not starting with '-'"
            )),
            "{bad:?}: {err}"
        );
    }
}

/// The value of the counter an agent keeps in `file` of the workspace (0 before its first
/// write). The agent replaces the file with `mv`, so a read never sees half a number.
fn counter(d: &Daemon, file: &str) -> u64 {
    std::fs::read_to_string(d.ws.path().join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A shell agent that counts in `file`, about 50 steps a second.
fn counting(file: &str) -> String {
    format!("i=0; while :; do i=$((i+1)); echo $i > {file}.tmp && mv {file}.tmp {file}; sleep 0.02; done")
}

/// The v1 freezer directory of an agent's sandbox (from its pid 1's /proc/PID/cgroup), or
/// None where the host freezes through cgroup2.
fn freezer_dir(pid1: i64) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid1}/cgroup")).ok()?;
    let line = text
        .lines()
        .find(|l| l.split(':').nth(1) == Some("freezer"))?;
    let rel = line.splitn(3, ':').nth(2)?.trim_start_matches('/');
    Some(Path::new("/sys/fs/cgroup/freezer").join(rel))
}

/// `/proc/PID/stat` state letters of the processes in `dir`'s cgroup.
fn task_states(dir: &Path) -> Vec<(i32, char)> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some((p, state))
        })
        .collect()
}

#[test]
fn pause_freezes_every_process_of_the_agent_and_resume_lets_it_go_on() {
    let d = daemon();
    let frozen = unique("pause-me");
    let control = unique("pause-control");
    let v = d.spawn(&frozen, &[], &["sh", "-c", &counting("frozen.n")]);
    d.spawn(&control, &[], &["sh", "-c", &counting("control.n")]);
    let pid1 = v["pid1"].as_i64().unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || counter(&d, "frozen.n") > 2),
        "the agent never counted: {}",
        d.ok(&["logs", &frozen])
    );

    let out = d.ok(&["pause", &frozen]);
    assert_eq!(out.trim(), format!("{frozen}: paused"));
    assert_eq!(d.state_of(&frozen), "paused");
    let row = d
        .ok(&["ps"])
        .lines()
        .find(|l| l.starts_with(&frozen))
        .map(str::to_owned)
        .expect("row in ps");
    assert!(row.contains("paused"), "{row}");

    // The kernel's view: the freezer cgroup is FROZEN and every process in it sits in the
    // refrigerator (state D on v1).
    let fz = freezer_dir(pid1).expect("this host has the v1 freezer");
    assert_eq!(
        std::fs::read_to_string(fz.join("freezer.state"))
            .unwrap()
            .trim(),
        "FROZEN"
    );
    let states = task_states(&fz);
    assert!(states.len() >= 2, "sh and pid 1 at least: {states:?}");
    assert!(states.iter().all(|(_, s)| *s == 'D'), "{states:?}");

    // Stable while the unpaused control agent counts on: its 10 steps are time in which the
    // paused agent would have counted too.
    let before = counter(&d, "frozen.n");
    let c0 = counter(&d, "control.n");
    assert!(
        poll_until(Duration::from_secs(20), || counter(&d, "control.n")
            >= c0 + 10),
        "the control agent stopped counting"
    );
    assert_eq!(counter(&d, "frozen.n"), before, "a paused agent counted");
    // A second pause is refused; the agent stays paused.
    let o = d.ctl(&["pause", &frozen]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("paused already"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A command would freeze with the agent: exec is refused, naming the way out.
    let o = d.ctl(&["exec", &frozen, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is paused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let out = d.ok(&["resume", &frozen]);
    assert_eq!(out.trim(), format!("{frozen}: resumed (now running)"));
    assert_eq!(d.state_of(&frozen), "running");
    assert_eq!(
        std::fs::read_to_string(fz.join("freezer.state"))
            .unwrap()
            .trim(),
        "THAWED"
    );
    assert!(
        poll_until(Duration::from_secs(10), || counter(&d, "frozen.n") > before),
        "the resumed agent does not count"
    );
    // A resume of a running agent is refused.
    let o = d.ctl(&["resume", &frozen]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not paused"));
    let ev = d.events(&frozen);
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["kind"].as_str()).collect();
    let p = kinds
        .iter()
        .position(|k| *k == "paused")
        .expect("paused event");
    let r = kinds
        .iter()
        .position(|k| *k == "resumed")
        .expect("resumed event");
    assert!(p < r, "{kinds:?}");
    // Audited as operator actions, with the caller.
    let a = d.audit();
    for kind in ["pause", "resume"] {
        assert!(
            a.iter().any(|r| r["kind"] == kind
                && r["decision"] == "allow"
                && r["agent"] == frozen.as_str()
                && r["caller_uid"] == 0),
            "{kind}: {a:#?}"
        );
    }
    d.ok(&["stop", &frozen, &control]);
}

#[test]
fn a_paused_agent_is_not_restarted_by_its_watchdog_and_stop_ends_it() {
    let d = daemon().with_python_sdk();
    let beating = unique("pause-wd");
    let script = "import aither, time\nc = aither.Channel.from_env()\nc.heartbeat_every(0.1)\ntime.sleep(600)\n";
    std::fs::write(d.ws.path().join("beat.py"), script).unwrap();
    let v = d.spawn(
        &beating,
        &["--watchdog", "300ms", "--backoff", "50ms"],
        &["python3", "beat.py"],
    );
    let pid1 = v["pid1"].as_i64().unwrap();
    assert!(poll_until(Duration::from_secs(10), || d.inspect(&beating)
        ["last_heartbeat_ms"]
        .as_u64()
        .is_some()));
    d.ok(&["pause", &beating]);

    // A silent agent with the same watchdog, started after the pause: once it has missed its
    // heartbeat and been restarted, the paused one has gone as long without one.
    let silent = unique("pause-silent");
    d.spawn(
        &silent,
        &["--watchdog", "300ms", "--backoff", "50ms"],
        &["sleep", "60"],
    );
    d.wait_events(&silent, "started", 2, Duration::from_secs(20));
    let i = d.inspect(&beating);
    assert_eq!(i["state"], "paused", "{i}");
    assert_eq!(i["restarts"], 0, "{}", d.events_text(&beating));
    assert_eq!(d.count(&beating, "watchdog_miss"), 0);
    assert_eq!(d.count(&beating, "started"), 1);

    // Resumed, its heartbeats keep it; the watchdog counts from the resume.
    d.ok(&["resume", &beating]);
    let hb = d.inspect(&beating)["last_heartbeat_ms"].as_u64().unwrap();
    assert!(poll_until(Duration::from_secs(10), || d.inspect(&beating)
        ["last_heartbeat_ms"]
        .as_u64()
        .is_some_and(|t| t > hb)));
    assert_eq!(d.count(&beating, "watchdog_miss"), 0);

    // Paused again, a stop ends it (thawed to act on SIGTERM), and it stays stopped.
    d.ok(&["pause", &beating]);
    d.ok(&["stop", &beating]);
    assert_eq!(d.state_of(&beating), "stopped");
    assert!(!Path::new(&format!("/proc/{pid1}")).exists());
    assert_eq!(d.inspect(&beating)["restarts"], 0);
    d.ok(&["stop", &silent]);
}

#[test]
fn commands_take_several_names_and_any_failure_fails_the_command() {
    let d = daemon();
    let a = unique("multi-a");
    let b = unique("multi-b");
    let c = unique("multi-c");
    for n in [&a, &b, &c] {
        d.spawn(n, &[], &["sleep", "60"]);
    }
    let out = d.ok(&["pause", &a, &b]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [format!("{a}: paused"), format!("{b}: paused")]
    );
    assert_eq!(d.state_of(&a), "paused");
    assert_eq!(d.state_of(&b), "paused");
    d.ok(&["resume", &a, &b]);
    assert_eq!(d.state_of(&b), "running");

    // Both stopped, each on its line.
    let out = d.ok(&["stop", &a, &b]);
    assert!(
        out.contains(&format!("{a}: stopped")) && out.contains(&format!("{b}: stopped")),
        "{out}"
    );
    assert_eq!(d.state_of(&a), "stopped");
    assert_eq!(d.state_of(&b), "stopped");

    // A missing name fails the command and is named; the others are still done.
    let missing = unique("missing");
    let o = d.ctl(&["stop", &c, &missing]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&missing) && err.contains("not_found"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("{c}: stopped")));
    assert_eq!(d.state_of(&c), "stopped");

    // Pausing an agent that does not run: refused, saying so, exit 1.
    let o = d.ctl(&["pause", &a]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{a} is not running (stopped)")) && err.contains("(conflict)"),
        "{err}"
    );

    // restart and rm take several names too; rm --force takes a paused agent.
    d.ok(&["restart", &a, &b]);
    d.wait_state(&a, "running", Duration::from_secs(10));
    d.wait_state(&b, "running", Duration::from_secs(10));
    d.ok(&["pause", &a]);
    let pid1 = d.inspect(&a)["pid1"].as_i64().unwrap();
    let out = d.ok(&["rm", "--force", &a, &b, &c]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(!Path::new(&format!("/proc/{pid1}")).exists());
    let o = d.ctl(&["kill", &a, &missing]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_paused_agent_is_adopted_paused_after_kill_9_of_the_daemon_and_sigkill_ends_it_frozen() {
    let mut d = daemon();
    let name = unique("pause-adopt");
    let v = d.spawn(
        &name,
        &["--watchdog", "200ms", "--backoff", "50ms"],
        &["sh", "-c", &counting("adopt.n")],
    );
    let pid1 = v["pid1"].as_i64().unwrap();
    // A shell agent sends no heartbeats: only being paused keeps its watchdog off. Paused
    // before the first deadline or restarted (and then paused): either way paused now.
    let paused = poll_until(Duration::from_secs(10), || {
        d.ctl(&["pause", &name]).status.success()
    });
    assert!(paused, "{}", d.events_text(&name));
    let restarts = d.inspect(&name)["restarts"].as_u64().unwrap();
    let pid1 = d.inspect(&name)["pid1"].as_i64().unwrap_or(pid1);
    let fz = freezer_dir(pid1).expect("this host has the v1 freezer");

    d.kill9();
    d.launch();
    // Adopted, still frozen, still paused; its watchdog does not count the frozen time: a
    // second agent with the same watchdog started now misses it and is restarted first.
    d.wait_state(&name, "paused", Duration::from_secs(10));
    let i = d.inspect(&name);
    assert_eq!(i["pid1"].as_i64(), Some(pid1), "{i}");
    // Adopted straight into `paused`, not through `running`.
    let ev = d.events(&name);
    let adopted = ev
        .iter()
        .position(|e| e["kind"] == "adopted")
        .expect("adopted event");
    let states: Vec<&Value> = ev[adopted..]
        .iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| &e["data"]["to"])
        .collect();
    assert_eq!(states, [&Value::from("paused")], "{}", d.events_text(&name));
    assert_eq!(d.count(&name, "paused"), 1, "{}", d.events_text(&name));
    let silent = unique("pause-adopt-silent");
    d.spawn(
        &silent,
        &["--watchdog", "200ms", "--backoff", "50ms"],
        &["sleep", "60"],
    );
    d.wait_events(&silent, "started", 2, Duration::from_secs(20));
    let i = d.inspect(&name);
    assert_eq!(i["state"], "paused", "{i}");
    assert_eq!(i["restarts"].as_u64(), Some(restarts), "{i}");
    assert_eq!(
        std::fs::read_to_string(fz.join("freezer.state"))
            .unwrap()
            .trim(),
        "FROZEN"
    );

    // SIGKILL ends it frozen (v1: signalled, then thawed), as an operator's kill: no restart.
    d.ok(&["kill", &name]);
    assert!(
        poll_until(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{pid1}"
        ))
        .exists()),
        "pid 1 of a paused agent survived SIGKILL"
    );
    d.wait_state(&name, "exited", Duration::from_secs(10));
    assert_eq!(d.inspect(&name)["restarts"].as_u64(), Some(restarts));
    d.ok(&["stop", &silent]);
}

#[test]
fn health_checks_wait_while_an_agent_is_paused() {
    let d = daemon();
    let paused = unique("pause-health");
    let control = unique("pause-health-ctl");
    // Each check leaves a line in its agent's file, and fails once `fail` appears in the
    // shared workspace; one failure ends the run.
    let check = |file: &str| format!("echo . >> {}; test ! -e {}", d.ws.at(file), d.ws.at("fail"));
    let probes = |file: &str| {
        std::fs::read_to_string(d.ws.path().join(file))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // A check against a frozen sandbox would hang until aitherd gives up on it (the 200 ms
    // timeout plus 1 s): a failure, were it run. The control agent needs 15 failures in a row
    // (one per 100 ms), so its end comes after longer than that.
    let spawn = |name: &str, file: &str, threshold: &str| {
        let c = check(file);
        d.spawn(
            name,
            &[
                "--health-cmd",
                &c,
                "--health-interval",
                "100ms",
                "--health-timeout",
                "200ms",
                "--health-threshold",
                threshold,
                "--backoff",
                "50ms",
            ],
            &["sleep", "600"],
        );
    };
    spawn(&paused, "p.probes", "1");
    d.wait_state(&paused, "ready", Duration::from_secs(10));
    d.ok(&["pause", &paused]);
    let before = probes("p.probes");
    // The control agent, ready, then failing its check: time in which the paused agent would
    // have been checked several times, and failed.
    spawn(&control, "c.probes", "15");
    d.wait_state(&control, "ready", Duration::from_secs(10));
    std::fs::write(d.ws.path().join("fail"), "").unwrap();
    let ev = d.wait_events(&control, "exited", 1, Duration::from_secs(20));
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "exited" && e["data"]["reason"]["kind"] == "health_failed"),
        "{}",
        d.events_text(&control)
    );
    assert!(probes("c.probes") >= 16);
    let i = d.inspect(&paused);
    assert_eq!(i["state"], "paused", "{i}");
    assert_eq!(i["health_failures"], 0, "{i}");
    assert_eq!(i["restarts"], 0, "{i}");
    assert_eq!(d.count(&paused, "exited"), 0, "{}", d.events_text(&paused));
    assert!(
        probes("p.probes") <= before + 1,
        "checks ran while paused: {} then {}",
        before,
        probes("p.probes")
    );

    // Resumed with its check passing again: back to ready, checked again, still the first run.
    std::fs::remove_file(d.ws.path().join("fail")).unwrap();
    let n = probes("p.probes");
    let out = d.ok(&["resume", &paused]);
    assert_eq!(out.trim(), format!("{paused}: resumed (now ready)"));
    assert!(
        poll_until(Duration::from_secs(10), || probes("p.probes") >= n + 2),
        "no checks after the resume"
    );
    let i = d.inspect(&paused);
    assert_eq!(i["state"], "ready", "{i}");
    assert_eq!(i["restarts"], 0, "{i}");
    assert_eq!(i["health_failures"], 0, "{i}");
    d.ok(&["stop", &paused, &control]);
}

/// `stats --no-stream --json NAMES…`: one object per agent, by name.
fn stats_json(d: &Daemon, names: &[&str]) -> Vec<Value> {
    let mut args = vec!["stats", "--no-stream", "--json"];
    args.extend_from_slice(names);
    d.ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stats JSON line"))
        .collect()
}

#[test]
fn stats_shows_a_busy_agents_cpu_memory_and_tasks_against_its_limits() {
    let d = daemon();
    let busy = unique("stats-busy");
    let idle = unique("stats-idle");
    d.spawn(&busy, &[], &["sh", "-c", "while :; do :; done"]);
    d.spawn(&idle, &[], &["sleep", "600"]);

    // CPU % comes from two of aitherd's samples (every 200 ms here): wait for the second.
    let busy_now = || stats_json(&d, &[&busy]).remove(0);
    assert!(
        poll_until(Duration::from_secs(20), || busy_now()["cpu_percent"]
            .as_f64()
            .is_some_and(|c| c > 0.0)),
        "no CPU figure for a spinning agent: {}",
        busy_now()
    );
    let s = busy_now();
    assert_eq!(s["name"], busy.as_str(), "{s}");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["owner"], 0, "{s}");
    // strict: 512M of memory, 128 tasks.
    assert!(s["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["memory_limit"], 512u64 << 20, "{s}");
    let pct = s["memory_percent"].as_f64().unwrap();
    let want = s["memory_bytes"].as_f64().unwrap() * 100.0 / (512u64 << 20) as f64;
    assert!((pct - want).abs() <= 0.005 && pct < 100.0, "{s}");
    assert!(s["pids"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["pids_limit"], 128, "{s}");
    // No GPU claim, and strict grants no egress: nothing to count.
    assert!(s["gpu"].is_null(), "{s}");
    assert!(s["net"].is_null(), "{s}");

    // Without names: every agent (root sees all), sorted by name; with names, in that order.
    let all: Vec<String> = stats_json(&d, &[])
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = vec![busy.clone(), idle.clone()];
    sorted.sort();
    assert_eq!(all, sorted);
    let asked: Vec<String> = stats_json(&d, &[&idle, &busy])
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(asked, [idle.clone(), busy.clone()]);

    // The table: usage against limits, root's OWNER column.
    let table = d.ok(&["stats", "--no-stream", &busy]);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "NAME",
        "OWNER",
        "STATE",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "PIDS",
        "NET IN / OUT",
        "REQUESTS",
        "GPU",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let row: Vec<&str> = lines.next().expect("a row").split("  ").collect();
    let cells: Vec<&str> = row
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells[0], busy, "{table}");
    assert_eq!(cells[1], "root", "{table}");
    assert_eq!(cells[2], "running", "{table}");
    assert!(
        cells[3].ends_with('%') && cells[3] != "0.0%",
        "CPU % of a spinning agent: {table}"
    );
    assert!(cells[4].ends_with(" / 512M"), "{table}");
    assert!(cells[6].ends_with(" / 128"), "{table}");
    assert_eq!(lines.next(), None, "one agent asked, one row: {table}");

    // Paused: its memory and tasks stay, its CPU is not shown.
    d.ok(&["pause", &busy]);
    let s = busy_now();
    assert_eq!(s["state"], "paused", "{s}");
    assert!(s["cpu_percent"].is_null(), "{s}");
    assert!(s["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["pids"].as_u64().unwrap() >= 1, "{s}");

    // Stopped: its state, and no figures of a sandbox it no longer has.
    d.ok(&["stop", &busy, &idle]);
    let s = busy_now();
    assert_eq!(s["state"], "stopped", "{s}");
    for k in [
        "cpu_percent",
        "memory_bytes",
        "memory_limit",
        "pids",
        "pids_limit",
    ] {
        assert!(s[k].is_null(), "{k}: {s}");
    }
    let row = d.ok(&["stats", "--no-stream", &busy]);
    let row = row.lines().nth(1).unwrap();
    assert!(row.contains("stopped"), "{row}");
    assert!(
        !row.contains('%'),
        "a stopped agent has no CPU or memory: {row}"
    );
}

#[test]
fn stats_streams_a_sample_every_interval_until_interrupted() {
    let d = daemon();
    let name = unique("stats-stream");
    d.spawn(&name, &[], &["sleep", "600"]);
    // To a pipe: each sample its own table after a blank line; --json: a line per agent.
    for (json, want) in [(false, "NAME"), (true, "{")] {
        let mut args = vec!["stats", &name];
        if json {
            args.insert(1, "--json");
        }
        let mut child = d
            .cmd(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("aitherctl stats");
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
        let mut seen = Vec::new();
        while seen
            .iter()
            .filter(|l: &&String| l.starts_with(want))
            .count()
            < 3
        {
            match lines.next() {
                Some(Ok(l)) => seen.push(l),
                _ => panic!("the stream ended: {seen:?} {:?}", child.wait_with_output()),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if json {
            for l in &seen {
                let v: Value = serde_json::from_str(l).expect("a JSON object per line");
                assert_eq!(v["name"], name.as_str(), "{l}");
            }
        } else {
            // header, row, blank, header, row, blank, header
            assert_eq!(seen.len(), 7, "{seen:?}");
            assert_eq!(seen[2], "", "{seen:?}");
            assert!(
                seen[1].starts_with(&name) && seen[4].starts_with(&name),
                "{seen:?}"
            );
        }
    }
}

#[test]
fn stats_of_an_unknown_agent_fails_as_inspect_does() {
    let d = daemon();
    let name = unique("stats-known");
    d.spawn(&name, &[], &["sleep", "600"]);
    let ghost = unique("stats-ghost");
    for args in [
        vec!["stats", "--no-stream", &ghost],
        vec!["stats", "--no-stream", "--json", &name, &ghost],
        vec!["stats", &ghost],
        vec!["inspect", &ghost],
    ] {
        let o = d.ctl(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("no agent named {ghost:?}")),
            "{args:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
    }
    // A bad flag is usage (2), as everywhere.
    assert_eq!(d.ctl(&["stats", "--bogus"]).status.code(), Some(2));
}

/// Labels (issue 20): given at spawn (flags and the agent file), shown by `inspect`, and
/// `ps --filter` selects by them, by name, state and owner; a bad label or filter is refused
/// with the rule, by aitherctl and by aitherd (an agent file's labels reach aitherd unchecked).
#[test]
fn labels_at_spawn_are_shown_and_ps_filters_select_agents() {
    let d = daemon();
    let a = unique("lab-a");
    let b = unique("lab-b");
    d.spawn(
        &a,
        &["--label", "team=search", "-l", "tier=batch"],
        &["sleep", "600"],
    );
    d.spawn(&b, &["--label", "team=ingest"], &["sleep", "600"]);
    let v = d.json(&["inspect", &a]);
    assert_eq!(
        v["labels"],
        serde_json::json!({"team": "search", "tier": "batch"}),
        "{v}"
    );
    let names = |filters: &[&str]| -> Vec<String> {
        let mut args = vec!["ps", "--json"];
        for f in filters {
            args.extend(["--filter", f]);
        }
        let mut n: Vec<String> = d
            .json(&args)
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let both = {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    };
    assert_eq!(names(&[]), both);
    assert_eq!(names(&["label=team=search"]), vec![a.clone()]);
    assert_eq!(names(&["label=team"]), both);
    // Every label filter must match; filters of one other kind match any of their values.
    assert_eq!(names(&["label=team", "label=tier"]), vec![a.clone()]);
    assert_eq!(names(&["label=team=nobody"]), Vec::<String>::new());
    let (fa, fb) = (format!("name={a}"), format!("name={b}"));
    assert_eq!(names(&[&fa, &fb]), both);
    assert_eq!(names(&[&fa, "label=team=ingest"]), Vec::<String>::new());
    assert_eq!(names(&["owner=root", "label=tier=batch"]), vec![a.clone()]);
    d.ok(&["stop", &b]);
    d.wait_state(&b, "stopped", Duration::from_secs(30));
    assert_eq!(names(&["state=stopped"]), vec![b.clone()]);
    assert_eq!(names(&["state=running", "state=ready"]), vec![a.clone()]);
    // The table, as an operator reads it.
    let table = d.ok(&["ps", "--filter", "label=team=ingest"]);
    assert!(table.contains(&b) && !table.contains(&a), "{table}");
    // Refusals name the rule.
    let o = d.ctl(&[
        "spawn", "--policy", "strict", "--label", "team=a b", "lab-bad", "--", "true",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid value \"a b\" of label \"team\""),
        "{o:?}"
    );
    for bad in ["color=red", "state=asleep", "nolabel"] {
        let o = d.ctl(&["ps", "--filter", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
    }
    // aitherd checks too: an agent file's labels go to it as they are.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab-file.toml");
    std::fs::write(
        &file,
        "command = [\"true\"]\npolicy = \"strict\"\nlabels = { \"bad key\" = \"x\" }\n",
    )
    .unwrap();
    let o = d.ctl(&["spawn", "-f", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid label key \"bad key\""),
        "{o:?}"
    );
    for n in [&a, &b] {
        d.ok(&["rm", "--force", n]);
    }
}
