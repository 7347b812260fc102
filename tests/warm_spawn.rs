//! Supervised spawns served by aitherd's pool of prepared sandboxes (issue 21: "`spawn` uses
//! the same pool"; docs/daemon.md "Warm start"), seen from outside. A shape's first spawn is
//! launched cold (an `aither-init shim`) and makes the shape known; the pool prepares
//! sandboxes for it; the next spawn of that shape takes one, whose launcher (`aither-init
//! pool`) becomes the agent's shim: its output is in `aitherctl logs`, `stop` ends it with its
//! exit record, its view is the strict one, it outlives a SIGKILLed aitherd and a restarted
//! aitherd adopts it, while the prepared sandboxes not yet used die with aitherd. A spawn the
//! pool cannot serve (published ports) stays cold.
//!
//! Needs root (the daemon and the sandboxes).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::TestDaemon;
use common::poll_until;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// `/proc/PID/stat`'s ppid.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

fn is_pool_launcher(pid: i32) -> bool {
    let cl = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cl.split(|b| *b == 0).nth(1) == Some(b"pool".as_slice())
}

/// The prepared sandboxes of `daemon` still waiting: its `aither-init pool` children that are
/// not (yet) a spawn's shim (a shim works in its agent's log directory).
fn waiting(d: &TestDaemon) -> Vec<i32> {
    let agents = agents_dir(d);
    let mut v: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            ppid(*p) == Some(d.pid())
                && is_pool_launcher(*p)
                && std::fs::read_link(format!("/proc/{p}/cwd"))
                    .map_or(true, |c| !c.starts_with(&agents))
        })
        .collect();
    v.sort();
    v
}

fn agents_dir(d: &TestDaemon) -> PathBuf {
    d.state.path().join("state/agents")
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn inspect(d: &TestDaemon, name: &str) -> Value {
    d.json(&["inspect", name])
}

fn wait_state(d: &TestDaemon, name: &str, state: &str) {
    assert!(
        poll_until(WAIT, || inspect(d, name)["state"] == state),
        "{name} did not reach {state}: {}\n--- its log ---\n{}\n--- aitherd ---\n{}",
        inspect(d, name),
        std::fs::read_to_string(agents_dir(d).join(name).join("agent.log"))
            .unwrap_or_default()
            .lines()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n"),
        d.log()
    );
}

/// `aitherctl logs NAME` once it contains `needle`.
fn wait_log(d: &TestDaemon, name: &str, needle: &str) -> String {
    let mut last = String::new();
    let ok = poll_until(WAIT, || {
        last = String::from_utf8_lossy(&d.ctl(&["logs", name]).stdout).into_owned();
        last.contains(needle)
    });
    assert!(ok, "{name}'s log never had {needle:?}: {last}\n{}", d.log());
    last
}

fn spawn(d: &TestDaemon, name: &str, flags: &[&str], script: &str) -> Value {
    let mut args = vec!["spawn", "--json", "--policy", "strict"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[name, "--", "sh", "-c", script]);
    d.json(&args)
}

fn exit_record(d: &TestDaemon, name: &str) -> Value {
    let p = agents_dir(d).join(name).join("exit.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// aitherd's `agent launched` lines for `name`: whether each was warm.
fn launches(d: &TestDaemon, name: &str) -> Vec<bool> {
    d.log()
        .lines()
        .filter(|l| l.contains("agent launched") && l.contains(&format!("agent={name}")))
        .map(|l| l.contains("warm=true"))
        .collect()
}

/// What the probe prints, then it sleeps (so that `stop` has something to end).
const PROBE: &str = "echo ns=$(readlink /proc/self/ns/pid); \
     grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; \
     cat /etc/shadow >/dev/null 2>&1 && echo shadow=readable || echo shadow=denied; \
     echo tmp=[$(ls -A /tmp)]; touch /tmp/left-behind; \
     echo on-stderr >&2; echo probed; exec sleep 600";

#[test]
fn a_shapes_second_spawn_is_served_warm_logged_strict_and_stopped_with_its_exit_record() {
    let d = TestDaemon::start("aitherd-warm-spawn-", &[]);
    assert!(waiting(&d).is_empty(), "nothing prepared before a shape");
    // First spawn of the shape: cold, the shape is learnt.
    spawn(&d, "first", &[], PROBE);
    wait_log(&d, "first", "probed");
    assert_eq!(inspect(&d, "first")["warm"], false);
    assert!(
        poll_until(WAIT, || waiting(&d).len() == 2),
        "the pool did not prepare 2 sandboxes for the spawn's shape: {:?}\n{}",
        waiting(&d),
        d.log()
    );
    let prepared = waiting(&d);

    // Second spawn, same shape: a prepared sandbox's launcher becomes its shim.
    let out = spawn(&d, "second", &[], PROBE);
    let i = inspect(&d, "second");
    assert_eq!(i["warm"], true, "{i}\n{}", d.log());
    let shim = i["shim_pid"].as_i64().unwrap() as i32;
    assert!(prepared.contains(&shim), "{shim} not one of {prepared:?}");
    assert_eq!(out["pid1"], i["pid1"], "{out}");
    assert_eq!(i["cgroup"], format!("pool-{shim}"), "{i}");
    let ps = d.json(&["ps", "--json"]);
    let warm_of = |n: &str| {
        ps.as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == n)
            .map(|a| a["warm"].clone())
    };
    assert_eq!(warm_of("second"), Some(Value::Bool(true)), "{ps}");
    assert_eq!(warm_of("first"), Some(Value::Bool(false)), "{ps}");
    assert_eq!(launches(&d, "first"), [false], "{}", d.log());
    assert_eq!(launches(&d, "second"), [true], "{}", d.log());
    let started: Vec<Value> = d
        .ok(&["events", "--json", "--agent", "second"])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "started")
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["data"]["warm"], true, "{:?}", started);

    // Its output is captured in its log, both streams; its view is the strict one: no new
    // privileges, seccomp filtering, /etc/shadow unreadable, its own pid namespace, an empty
    // /tmp (the first agent's file is not there).
    let log2 = wait_log(&d, "second", "probed");
    let log1 = wait_log(&d, "first", "probed");
    for want in [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "shadow=denied",
        "tmp=[]",
        "on-stderr",
    ] {
        assert!(
            log2.contains(want),
            "{want:?} not in the warm agent's log: {log2}"
        );
    }
    let ns = |log: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix("ns=").map(str::to_string))
            .unwrap_or_default()
    };
    assert!(ns(&log2).starts_with("pid:["), "{log2}");
    assert_ne!(ns(&log1), ns(&log2), "two agents, one pid namespace");

    // The pool refills the shape once the spawn is served.
    assert!(
        poll_until(WAIT, || waiting(&d).len() == 2),
        "the pool was not refilled: {:?}",
        waiting(&d)
    );

    // `stop` ends it as it ends a cold one: stopped, its sandbox gone, the same exit record
    // (sleep ended by SIGTERM).
    let pid1 = i["pid1"].as_i64().unwrap() as i32;
    d.ok(&["stop", "second"]);
    d.ok(&["stop", "first"]);
    wait_state(&d, "second", "stopped");
    wait_state(&d, "first", "stopped");
    assert!(poll_until(WAIT, || !alive(pid1) && !alive(shim)));
    let (r1, r2) = (exit_record(&d, "first"), exit_record(&d, "second"));
    for k in ["code", "signal", "oom_killed", "launch_error"] {
        assert_eq!(r1[k], r2[k], "{k}: cold {r1} warm {r2}");
    }
    assert_eq!(r2["signal"], 15, "{r2}");
    // The shim's log says where the run started and ended.
    assert!(
        String::from_utf8_lossy(&d.ctl(&["logs", "second"]).stdout).contains("probed"),
        "the log survives the stop"
    );
}

#[test]
fn a_warm_agent_outlives_a_killed_aitherd_and_is_adopted_while_unused_prepared_sandboxes_die() {
    let mut d = TestDaemon::start("aitherd-warm-adopt-", &[]);
    let counting = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done";
    spawn(&d, "cold", &[], counting);
    wait_log(&d, "cold", "tick 2");
    assert!(
        poll_until(WAIT, || waiting(&d).len() == 2),
        "{:?}\n{}",
        waiting(&d),
        d.log()
    );
    // The warm agent speaks on its channel (readiness now, a status line once `go` exists,
    // after aitherd's restart): the channel's two ends are where a shim keeps them.
    let notify = Path::new(common::AITHERCTL).with_file_name("aither-notify");
    assert!(
        notify.is_file(),
        "build the workspace: aither-notify is missing"
    );
    std::fs::copy(&notify, d.ws.path().join("aither-notify")).unwrap();
    let talking = "./aither-notify --ready && echo notified; i=0; while :; do i=$((i+1)); \
         echo tick $i; if [ -e go ] && [ -z \"$said\" ]; then \
         ./aither-notify --status after-restart && echo status-ok; said=1; fi; sleep 0.1; done";
    spawn(&d, "warm", &["--wait-ready"], talking);
    wait_state(&d, "warm", "ready");
    let i = inspect(&d, "warm");
    assert_eq!(i["warm"], true, "{i}");
    let (shim, pid1) = (
        i["shim_pid"].as_i64().unwrap() as i32,
        i["pid1"].as_i64().unwrap() as i32,
    );
    wait_log(&d, "warm", "tick 2");
    assert!(poll_until(WAIT, || waiting(&d).len() == 2));
    let unused = waiting(&d);

    d.kill9();
    // The warm agent's shim and sandbox run on, and keep logging, without aitherd.
    let log = agents_dir(&d).join("warm/agent.log");
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let before = size();
    assert!(
        poll_until(WAIT, || size() > before),
        "logging stopped without aitherd"
    );
    assert!(
        alive(shim) && alive(pid1),
        "the warm agent died with aitherd"
    );
    // The prepared sandboxes nobody took go with aitherd, cgroups and all.
    assert!(
        poll_until(WAIT, || unused.iter().all(|p| !alive(*p))),
        "prepared sandboxes outlived aitherd: {unused:?}"
    );
    for p in &unused {
        assert!(
            poll_until(WAIT, || common::cgroup_dirs_of("pool")
                .iter()
                .all(|c| !c.ends_with(format!("pool-{p}")))),
            "cgroups of the prepared sandbox {p} are left"
        );
    }

    // A new aitherd adopts it: the same sandbox, running, warm, under control.
    d.launch();
    // Adopted as a run that had been ready (running: no new READY is awaited).
    wait_state(&d, "warm", "running");
    let j = inspect(&d, "warm");
    assert_eq!(j["pid1"].as_i64(), Some(pid1 as i64), "{j}");
    assert_eq!(j["shim_pid"].as_i64(), Some(shim as i64), "{j}");
    assert_eq!(j["warm"], true, "{j}");
    let ev = d.ok(&["events", "--agent", "warm"]);
    assert!(ev.contains("adopted"), "{ev}");
    // aitherd's end of the channel, taken back from the shim: the agent's message arrives.
    std::fs::write(d.ws.path().join("go"), "").unwrap();
    wait_log(&d, "warm", "status-ok");
    assert_eq!(inspect(&d, "warm")["status_text"], "after-restart");
    d.ok(&["stop", "warm"]);
    wait_state(&d, "warm", "stopped");
    assert!(poll_until(WAIT, || !alive(pid1) && !alive(shim)));
    assert_eq!(exit_record(&d, "warm")["signal"], 15);
    // The cold one was adopted too.
    wait_state(&d, "cold", "running");
}

#[test]
fn a_spawn_the_pool_cannot_serve_stays_cold_and_prepares_nothing() {
    let d = TestDaemon::start("aitherd-warm-cold-", &[]);
    // Published ports: aitherd needs the sandbox's namespace per run (not poolable).
    for (name, svc) in [("pub-a", "svc-a=8123"), ("pub-b", "svc-b=8123")] {
        d.ok(&[
            "spawn",
            "--policy",
            "standard",
            "--publish",
            svc,
            name,
            "--",
            "sleep",
            "600",
        ]);
        wait_state(&d, name, "running");
        assert_eq!(inspect(&d, name)["warm"], false);
    }
    assert_eq!(launches(&d, "pub-b"), [false], "{}", d.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiting(&d).is_empty(),
        "a shape that is not poolable was prepared: {:?}",
        waiting(&d)
    );
}

#[test]
fn an_agents_restarts_take_prepared_sandboxes_too() {
    let d = TestDaemon::start("aitherd-warm-restart-", &[]);
    // Another agent teaches the shape; the pool prepares for it.
    spawn(&d, "teacher", &[], "exec sleep 600");
    assert!(
        poll_until(WAIT, || waiting(&d).len() == 2),
        "{:?}\n{}",
        waiting(&d),
        d.log()
    );
    // Each run fails after a moment: restarted at once, through the same launch.
    spawn(
        &d,
        "crasher",
        &["--restart", "on-failure", "--backoff", "0"],
        "echo ran; sleep 0.3; exit 1",
    );
    assert!(
        poll_until(WAIT, || launches(&d, "crasher").len() >= 3),
        "{:?}\n{}",
        launches(&d, "crasher"),
        d.log()
    );
    let l = launches(&d, "crasher");
    assert_eq!(
        &l[..2],
        [true, true],
        "the spawn and its first restart were not served warm: {l:?}\n{}",
        d.log()
    );
    // Every run logged into the same agent log.
    let log = wait_log(&d, "crasher", "ran");
    assert!(log.matches("ran").count() >= 2, "{log}");
    d.ok(&["rm", "--force", "crasher"]);
}
