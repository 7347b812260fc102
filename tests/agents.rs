//! The example agents of agents/ end to end, as root: a real aitherd (own state directory and
//! socket), each example spawned the way docs/agents.md tells a user to, `aitherctl spawn -f
//! agents/NAME.toml`, in its `strict` sandbox, and observed only through what a user sees:
//! `aitherctl ps/inspect`, `logs`, `events` and `mem`.
//!
//! The workspace holds a copy of the repository's agents/ directory, with this branch's
//! runtime/python/aither.py beside each agent's script (it shadows an installed, possibly
//! older copy in /usr/local/lib/python3.11/dist-packages).

mod common;

use std::path::Path;
use std::time::Duration;

use common::poll_until;
use serde_json::Value;

use common::daemon::TestDaemon as Daemon;

const WAIT: Duration = Duration::from_secs(60);

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A daemon whose workspace has agents/ with the SDK beside every agent script.
fn daemon() -> Daemon {
    let d = Daemon::start("aitherd-agents-", &[]);
    copy_dir(&repo("agents"), &d.ws.path().join("agents"));
    for e in std::fs::read_dir(d.ws.path().join("agents")).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && p.file_name().unwrap() != "policies" {
            std::fs::copy(repo("runtime/python/aither.py"), p.join("aither.py")).unwrap();
        }
    }
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else if e.file_name() != "aither.py"
            && !e.path().to_string_lossy().contains("__pycache__")
        {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

trait AgentsExt {
    fn spawn_file(&self, file: &str, extra: &[&str]) -> Value;
    fn inspect(&self, name: &str) -> Value;
    fn logs(&self, name: &str) -> String;
    fn wait_log(&self, name: &str, needle: &str) -> String;
    fn events(&self, name: &str) -> Vec<Value>;
    fn wait_event(&self, name: &str, kind: &str, n: usize) -> Vec<Value>;
    fn diagnose(&self, name: &str) -> String;
}

impl AgentsExt for Daemon {
    /// `aitherctl spawn --json -f agents/FILE EXTRA...`, run in the workspace.
    fn spawn_file(&self, file: &str, extra: &[&str]) -> Value {
        let path = format!("agents/{file}");
        let mut argv = vec!["spawn", "--json", "-f", &path];
        argv.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&argv)).expect("spawn --json")
    }

    fn inspect(&self, name: &str) -> Value {
        self.json(&["inspect", "--json", name])
    }

    fn logs(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.ctl(&["logs", "--tail", "1000", name]).stdout).into_owned()
    }

    fn wait_log(&self, name: &str, needle: &str) -> String {
        let ok = poll_until(WAIT, || self.logs(name).contains(needle));
        assert!(
            ok,
            "{name}: no {needle:?} in its log\n{}",
            self.diagnose(name)
        );
        self.logs(name)
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.ok(&["events", "--json", "--agent", name])
            .lines()
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }

    fn wait_event(&self, name: &str, kind: &str, n: usize) -> Vec<Value> {
        let count = || {
            self.events(name)
                .iter()
                .filter(|e| e["kind"] == kind)
                .count()
        };
        let ok = poll_until(WAIT, || count() >= n);
        assert!(
            ok,
            "{name}: fewer than {n} {kind:?} events\n{}",
            self.diagnose(name)
        );
        self.events(name)
    }

    fn diagnose(&self, name: &str) -> String {
        format!(
            "--- logs ---\n{}\n--- events ---\n{}\n--- daemon ---\n{}",
            self.logs(name),
            String::from_utf8_lossy(&self.ctl(&["events", "--agent", name]).stdout),
            self.log()
        )
    }
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["kind"].as_str()).collect()
}

/// The JSON after `prefix` on each line of `log` that has it.
fn tagged(log: &str, prefix: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|j| serde_json::from_str(j).expect("tagged JSON"))
        .collect()
}

#[test]
fn heartbeat_worker_is_ready_keeps_its_watchdog_fed_and_is_restarted_when_it_hangs() {
    let d = daemon();
    let info = d.spawn_file("heartbeat-worker.toml", &[]);
    assert_eq!(info["name"], "heartbeat-worker");
    assert_eq!(info["policy"], "strict");
    assert_eq!(info["supervision"]["watchdog_ms"], 5000, "{info}");

    // READY came from the agent itself, and the watchdog (5 s) has been passed twice over
    // while it worked: job 20 comes after at least 10 s of 0.5 s pauses.
    d.wait_log("heartbeat-worker", "job 20 done");
    let i = d.inspect("heartbeat-worker");
    assert_eq!(i["state"], "ready", "{i}");
    assert_eq!(i["restarts"], 0, "{i}\n{}", d.diagnose("heartbeat-worker"));
    assert!(i["last_heartbeat_ms"].as_u64().is_some(), "{i}");
    assert!(
        i["status_text"].as_str().unwrap_or("").starts_with("job "),
        "{i}"
    );
    let ev = d.events("heartbeat-worker");
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "ready" && e["data"]["by"] == "agent"),
        "{:?}",
        kinds(&ev)
    );
    assert!(!kinds(&ev).contains(&"watchdog_miss"), "{:?}", kinds(&ev));

    // The same worker, hanging after its second job: the watchdog ends the run and the
    // restart policy starts a new one.
    d.spawn_file(
        "heartbeat-worker.toml",
        &["stalled", "-e", "STALL_AFTER=2", "--watchdog", "2s"],
    );
    d.wait_log("stalled", "job 2: stalling");
    let ev = d.wait_event("stalled", "started", 2);
    let k = kinds(&ev);
    let miss = k.iter().position(|k| *k == "watchdog_miss");
    let second_start = k.iter().rposition(|k| *k == "started");
    assert!(
        matches!((miss, second_start), (Some(m), Some(s)) if m < s),
        "a watchdog miss, then a new run: {k:?}"
    );
    // The first worker was never disturbed.
    assert_eq!(d.inspect("heartbeat-worker")["restarts"], 0);
}

#[test]
fn bus_pair_talks_over_the_bus_and_neither_can_speak_for_the_other() {
    let d = daemon();
    // ping first: its requests are lost until pong subscribes, and it sends them again.
    let ping = d.spawn_file("ping.toml", &[]);
    assert_eq!(ping["policy"], "strict");
    d.spawn_file("pong.toml", &[]);

    let log = d.wait_log("ping", "ping: 5 of 5 answered");
    for n in 1..=5 {
        assert!(
            log.contains(&format!("ping: {n} -> 'HELLO {n}' from pong")),
            "{log}"
        );
    }
    assert!(
        log.contains("ping: cannot speak for pong: "),
        "the token let ping publish on pong's subject:\n{log}"
    );
    assert!(!log.contains("FORGED"), "{log}");
    let pong = d.wait_log("pong", "answered 5");
    assert!(pong.contains("pong: answering ping"), "{pong}");
    for name in ["ping", "pong"] {
        let i = d.inspect(name);
        assert_eq!(i["state"], "ready", "{name}: {i}");
        assert_eq!(i["restarts"], 0, "{name}: {i}");
    }
    assert_eq!(d.inspect("ping")["status_text"], "done: 5 of 5 answered");
    // The forgery was refused by aitherd, and audited as such.
    let audit = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"bus\"") && l.contains("pair.pong.reply") && l.contains("ping")),
        "no audit record of ping's refused publish"
    );
}

#[test]
fn rememberer_remembers_across_a_restart_and_a_crash_and_forgets_its_scratch() {
    let d = daemon();
    d.spawn_file("rememberer.toml", &["-e", "CRASH_ON_RUN=2"]);
    d.wait_log("rememberer", "\"run\": 1");
    // A user's restart ends run 1; run 2 crashes (exit 3) after writing; the restart
    // policy starts run 3.
    d.ok(&["restart", "rememberer"]);
    d.wait_log("rememberer", "crashing on run 2");
    let log = d.wait_log("rememberer", "\"run\": 3");

    let runs = tagged(&log, "REMEMBERED ");
    let want = |run: u64, earlier: &[&str], chain: &[&str]| serde_json::json!({"run": run, "earlier_facts": earlier, "chain": chain, "scratch_left": null});
    assert_eq!(
        runs,
        [
            want(1, &[], &["run-1"]),
            want(2, &["run-1"], &["run-1", "run-2"]),
            want(3, &["run-1", "run-2"], &["run-1", "run-2", "run-3"]),
        ],
        "{log}"
    );
    let ev = d.events("rememberer");
    assert!(
        ev.iter().any(|e| e["kind"] == "exited"
            && e["data"]["reason"] == serde_json::json!({"kind": "exited", "code": 3})),
        "run 2's exit: {:?}",
        ev
    );
    assert!(kinds(&ev).contains(&"backoff"), "{:?}", kinds(&ev));
    // The operator sees the same memory.
    let runs_now = d.ok(&["mem", "get", "rememberer", "--tier", "active", "runs"]);
    assert_eq!(runs_now.trim(), "3");
}

/// The SDK's surface against the real daemon, from a strict sandbox: typed errors, the GPU
/// lease, a subscription read while a heartbeat thread beats.
#[test]
fn python_sdk_surface_against_aitherd_under_strict() {
    let d = daemon();
    let dir = d.ws.path().join("agents/sdk-check");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(repo("runtime/python/aither.py"), dir.join("aither.py")).unwrap();
    std::fs::write(
        dir.join("check.py"),
        r#"
import json, os, aither
me = os.environ["AITHER_AGENT"]
ch = aither.Channel.from_env()
out = {}
def expect(label, cls, fn, *a, **k):
    try:
        fn(*a, **k); out[label] = "ACCEPTED"
    except aither.AitherError as e:
        out[label] = [type(e).__name__, e.code, isinstance(e, cls)]
ch.ready()
expect("publish_other", aither.Denied, ch.publish, "agent.someone-else.x", 1)
expect("spirit_write", aither.Denied, ch.mem_put, "spirit", "k", "v")
expect("unknown", aither.UnknownOp, ch.request, "no.such.op")
expect("bad_tier", aither.InvalidRequest, ch.mem_put, "nosuch", "k", "v")
expect("big", aither.MessageTooLarge, ch.publish, f"agent.{me}.x", "x" * 40000)
expect("unsub", aither.NotFound, ch.unsubscribe, 99)
out["absent"] = ch.mem_get("active", "nothing", default="dflt")
try:
    lease = ch.gpu_lease()
    out["gpu"] = [lease.granted, lease.state, list(lease.devices)]
except aither.GpuUnavailable as e:
    out["gpu"] = ["unavailable", e.code]
out["pain"] = ch.pain("info", "just saying")
sub = ch.subscribe(f"agent.{me}.>")
with ch.heartbeat_every(0.05) as beat:
    assert sub.next(timeout=0.5) is None
    ch.publish(f"agent.{me}.a", {"n": 1})
    ch.publish(f"agent.{me}.b", {"n": 2})
    out["msgs"] = [[m["subject"], m["data"], m["sub"] == sub.id] for m in sub.messages(timeout=1)]
    out["beating"] = beat.running
out["usage_tiers"] = sorted(ch.mem_usage())
print("SDK " + json.dumps(out, sort_keys=True), flush=True)
import time; time.sleep(600)
"#,
    )
    .unwrap();
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "strict",
        "--workspace",
        "agents/sdk-check",
        "--watchdog",
        "1s",
        "sdk-check",
        "--",
        "python3",
        "-u",
        "check.py",
    ]);
    let log = d.wait_log("sdk-check", "SDK ");
    let out = &tagged(&log, "SDK ")[0];
    let t = |cls: &str, code: &str| serde_json::json!([cls, code, true]);
    assert_eq!(out["publish_other"], t("Denied", "denied"), "{out}");
    assert_eq!(out["spirit_write"], t("Denied", "denied"), "{out}");
    assert_eq!(out["unknown"], t("UnknownOp", "unknown_op"), "{out}");
    assert_eq!(out["bad_tier"], t("InvalidRequest", "invalid"), "{out}");
    assert_eq!(out["big"], t("MessageTooLarge", "msg_too_large"), "{out}");
    assert_eq!(out["unsub"], t("NotFound", "not_found"), "{out}");
    assert_eq!(out["absent"], "dflt");
    // Until aitherd has the GPU service: unavailable. With it: no claim in strict.
    assert!(
        out["gpu"] == serde_json::json!(["unavailable", "unknown_op"])
            || out["gpu"] == serde_json::json!([false, "none", []]),
        "{out}"
    );
    assert_eq!(out["pain"], "log");
    assert_eq!(
        out["msgs"],
        serde_json::json!([
            ["agent.sdk-check.a", {"n": 1}, true],
            ["agent.sdk-check.b", {"n": 2}, true]
        ])
    );
    assert_eq!(out["beating"], true);
    assert_eq!(
        out["usage_tiers"],
        serde_json::json!(["active", "codegraph", "knowledge", "spirit", "working"])
    );
    // Its 1 s watchdog was fed the whole time by the thread.
    let i = d.inspect("sdk-check");
    assert_eq!(i["restarts"], 0, "{i}\n{}", d.diagnose("sdk-check"));
    assert!(!kinds(&d.events("sdk-check")).contains(&"watchdog_miss"));
}

/// Every agent file in agents/ parses, and the pair runs under plain strict with its bus
/// subjects granted by its agent files.
#[test]
fn agent_files_parse_and_the_pair_is_strict_with_bus_grants() {
    use aither::daemon::agentfile::AgentFile;
    let mut parsed = Vec::new();
    for e in std::fs::read_dir(repo("agents")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        match AgentFile::load(&p) {
            Ok(f) => {
                let ws = f.resolve(f.workspace.as_deref().expect("a workspace"));
                assert!(ws.is_dir(), "{name}: workspace {}", ws.display());
                parsed.push(name);
            }
            Err(e) => panic!("{e}"),
        }
    }
    parsed.sort();
    for want in ["heartbeat-worker", "ping", "pong", "rememberer"] {
        assert!(
            parsed.iter().any(|p| p == want),
            "{want} missing: {parsed:?}"
        );
    }

    for f in ["ping", "pong"] {
        let file = AgentFile::load(&repo(&format!("agents/{f}.toml"))).unwrap();
        assert_eq!(file.policy.as_deref(), Some("strict"), "{f}");
        let bus = file.bus.expect("a [bus] grant");
        assert_eq!(bus.publish, ["pair.$self.>"], "{f}");
        assert_eq!(bus.subscribe, ["pair.>"], "{f}");
    }
}

/// An example of runtime/aither-sdk/examples, built by `cargo test --workspace` (or `cargo
/// build -p aither-sdk --examples`), copied into `dir` of the workspace.
fn rust_example(d: &Daemon, name: &str, dir: &str) {
    let bin = Path::new(common::AITHERCTL)
        .with_file_name("examples")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the SDK's examples (`cargo test --workspace`, or `cargo build -p aither-sdk --examples`)",
        bin.display()
    );
    let dest = d.ws.path().join(dir).join(name);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(&bin, &dest).unwrap();
}

#[test]
fn rust_sdk_examples_remember_across_a_restart_and_answer_a_python_agent_under_strict() {
    let d = daemon();
    rust_example(&d, "remember", "rust");
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "strict",
        "--workspace",
        "rust",
        "--wait-ready",
        "rust-remember",
        "--",
        "./remember",
    ]);
    d.wait_log("rust-remember", "\"run\":1");
    d.ok(&["restart", "rust-remember"]);
    let log = d.wait_log("rust-remember", "\"run\":2");
    assert_eq!(
        tagged(&log, "REMEMBERED "),
        [
            serde_json::json!({"run": 1, "earlier_facts": [], "chain": ["run-1"], "scratch_left": null}),
            serde_json::json!({"run": 2, "earlier_facts": ["run-1"], "chain": ["run-1", "run-2"], "scratch_left": null}),
        ],
        "{log}"
    );
    assert_eq!(d.inspect("rust-remember")["state"], "ready");

    // The Rust echo agent in pong's place: the Python ping gets its answers.
    rust_example(&d, "bus_echo", "agents/bus-pair");
    d.spawn_file("pong.toml", &["--", "./bus_echo"]);
    d.spawn_file("ping.toml", &[]);
    let log = d.wait_log("ping", "ping: 5 of 5 answered");
    assert!(log.contains("ping: 3 -> 'HELLO 3' from pong"), "{log}");
    assert!(d.logs("pong").contains("pong: answered 5"));
}

/// docs/agents.md's walk-through agent, as a new user types it: the files match the page,
/// `aitherctl spawn hello` runs it, it answers the operator over the bus, and remembers its
/// run count across `aitherctl restart`.
#[test]
fn the_walkthrough_agent_of_docs_agents_md_is_ready_answers_and_remembers() {
    let doc = std::fs::read_to_string(repo("docs/agents.md")).unwrap();
    for (file, lang) in [
        ("agents/hello/agent.py", "python"),
        ("agents/hello.toml", "toml"),
    ] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        assert!(
            doc.contains(&format!("```{lang}\n{text}```")),
            "{file} differs from its copy in docs/agents.md"
        );
    }
    let d = daemon();
    d.ok(&["spawn", "hello"]);
    d.wait_log("hello", "hello: run 1");
    let ok = poll_until(WAIT, || d.inspect("hello")["state"] == "ready");
    assert!(ok, "{}", d.diagnose("hello"));
    // The page's exec line: a command in the sandbox has the agent's (empty) capabilities.
    let shown = doc
        .split("$ aitherctl exec hello -- grep CapEff /proc/self/status")
        .nth(1)
        .and_then(|rest| rest.lines().nth(1))
        .and_then(|l| l.split_whitespace().next().zip(l.split_whitespace().nth(1)))
        .expect("the page's exec line");
    let real = d.ok(&["exec", "hello", "--", "grep", "CapEff", "/proc/self/status"]);
    assert_eq!(real, format!("{}\t{}\n", shown.0, shown.1));

    let ask_text = |text: &str, json: bool| -> String {
        let mut args = vec!["bus", "sub", "agent.hello.outbox", "-n", "1"];
        if json {
            args.push("--json");
        }
        let mut sub = d
            .cmd(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Live delivery: publish until the subscription (once it exists) has its answer.
        let ok = poll_until(WAIT, || {
            let printed = d.ok(&["bus", "pub", "agent.hello.inbox", text]);
            assert_eq!(printed, "", "a live publish prints nothing");
            std::thread::sleep(Duration::from_millis(200));
            sub.try_wait().unwrap().is_some()
        });
        if !ok {
            let _ = sub.kill();
        }
        let out = sub.wait_with_output().unwrap();
        assert!(ok, "no answer from hello\n{}", d.diagnose("hello"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ask = |text: &str| -> Value {
        let line = ask_text(text, true);
        let v: Value = serde_json::from_str(line.trim()).expect("bus sub --json");
        v["data"].clone()
    };
    // Issue 20: the page's bus lines are what `bus pub` and `bus sub` print (after the
    // timestamp, which is the run's own); a live publish prints nothing.
    let real = ask_text("\"hi\"", false);
    let shown = doc
        .split("$ aitherctl bus pub agent.hello.inbox '\"hi\"'\n")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the page's bus exchange");
    const TS: usize = "2026-11-25T18:53:01.443Z".len();
    assert_eq!(
        real.trim_end().get(TS..),
        shown.get(TS..),
        "real: {real:?}\npage: {shown:?}"
    );
    assert_eq!(d.inspect("hello")["status_text"], "got 'hi'");

    d.ok(&["restart", "hello"]);
    d.wait_log("hello", "hello: run 2");
    assert_eq!(
        ask("\"again\""),
        serde_json::json!({"echo": "again", "run": 2})
    );
    let i = d.inspect("hello");
    assert_eq!(i["supervision"]["watchdog_ms"], 5000, "{i}");
    assert!(!kinds(&d.events("hello")).contains(&"watchdog_miss"));
}

/// The GPU worker's script without a GPU claim (plain strict): it says why it has no GPU,
/// reports pain and exits 3, whether or not this aitherd has the GPU service yet. (With the
/// service and agents/gpu-worker.toml's `[gpu]` claim, the lead's GPU suite checks the lease.)
#[test]
fn gpu_worker_without_a_gpu_claim_reports_pain_and_exits() {
    let d = daemon();
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "strict",
        "--restart",
        "never",
        "--workspace",
        "agents/gpu-worker",
        "gpu-check",
        "--",
        "python3",
        "-u",
        "agent.py",
    ]);
    let ev = d.wait_event("gpu-check", "exited", 1);
    let log = d.logs("gpu-check");
    assert!(
        log.contains("gpu-worker: GPU service not available in this aitherd")
            || log.contains("gpu-worker: no GPU granted (state none)"),
        "{log}"
    );
    assert!(!log.contains("GPU-LEASE"), "{log}");
    let pain = ev
        .iter()
        .find(|e| e["kind"] == "pain")
        .expect("a pain event");
    assert_eq!(pain["data"]["severity"], "error", "{pain}");
    let exited = ev.iter().find(|e| e["kind"] == "exited").unwrap();
    assert_eq!(
        exited["data"]["reason"],
        serde_json::json!({"kind": "exited", "code": 3})
    );
}

/// Bus grants at spawn: they widen only a token aitherd mints (the operator's grant), are
/// refused beside a given token, and a bad pattern names the field.
#[test]
fn bus_grants_at_spawn_apply_to_minted_tokens_only() {
    let d = daemon();
    let v = d.json(&[
        "spawn",
        "--json",
        "--policy",
        "strict",
        "--restart",
        "never",
        "--bus-publish",
        "team.$self.>",
        "--bus-subscribe",
        "team.>",
        "granted",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(v["state"], "running", "{v}");
    let audit = std::fs::read_to_string(d.audit_log()).unwrap();
    let mint = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["kind"] == "token_mint" && e["agent"] == "granted")
        .expect("a token_mint record");
    assert_eq!(mint["data"]["bus_publish"][0], "team.$self.>", "{mint}");
    let tok = d.ws.path().join("t.tok");
    let o = d.ctl(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        "other",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.ctl(&[
        "spawn",
        "--token",
        tok.to_str().unwrap(),
        "--bus-publish",
        "x.>",
        "other",
        "--",
        "true",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("a given token already says"));
    let o = d.ctl(&[
        "spawn",
        "--policy",
        "strict",
        "--bus-publish",
        "a..b",
        "bad",
        "--",
        "true",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bus.publish"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    d.ok(&["rm", "--force", "granted"]);
}
