//! Agent memory end to end, as root: a real aitherd (own state directory and socket), real
//! sandboxed Python agents using runtime/python/aither.py, and `aitherctl mem` as the
//! operator. Issue 6's "done when": an agent writes each tier, is killed and restarted, and
//! finds exactly what the tier semantics promise; quotas and grants hold; acknowledged writes
//! survive `kill -9` of the daemon.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{poll_until, unique};
use serde_json::Value;

use common::daemon::TestDaemon as Daemon;

fn daemon() -> Daemon {
    Daemon::start("aitherd-mem-", &[]).with_python_sdk()
}

/// What this suite asks of its daemon beyond the shared fixture (tests/common/daemon.rs).
trait MemoryExt {
    fn agent_log(&self, name: &str) -> String;
    fn wait_log(&self, name: &str, needle: &str, timeout: Duration) -> String;
    fn spawn(&self, name: &str, flags: &[&str], script: &str, args: &[&str]);
}

impl MemoryExt for Daemon {
    /// The agent's output so far (read from its log file: it survives the daemon).
    fn agent_log(&self, name: &str) -> String {
        let records = std::fs::read(
            self.state
                .path()
                .join(format!("state/agents/{name}/agent.log")),
        )
        .unwrap_or_default();
        // The agent's text of the shim's records (docs/daemon.md "Logs").
        String::from_utf8_lossy(&aither::logfmt::plain_text(&records)).into_owned()
    }

    fn wait_log(&self, name: &str, needle: &str, timeout: Duration) -> String {
        let ok = poll_until(timeout, || self.agent_log(name).contains(needle));
        let log = self.agent_log(name);
        assert!(
            ok,
            "{name}: no {needle:?} in its output:\n{log}\n--- events ---\n{}",
            String::from_utf8_lossy(&self.ctl(&["events", "--agent", name]).stdout)
        );
        log
    }

    fn spawn(&self, name: &str, flags: &[&str], script: &str, args: &[&str]) {
        let file = format!("{name}.py");
        std::fs::write(self.ws.path().join(&file), script).unwrap();
        let mut argv = vec!["spawn", "--json"];
        if !flags.contains(&"--token") && !flags.contains(&"--policy") {
            argv.extend(["--policy", "strict"]);
        }
        argv.push(name);
        argv.extend_from_slice(flags);
        argv.extend(["--", "python3", &file]);
        argv.extend_from_slice(args);
        self.ok(&argv);
    }
}

/// The agent of the tier test: the first run writes every tier and crashes; later runs report
/// what they find.
const TIERS_AGENT: &str = r#"
import aither, json, os, signal, sys, time
c = aither.Channel.from_env()
def check():
    out = {
        "working": c.mem_get("working", "scratch"),
        "session": c.mem_get("active", "session"),
        "short": c.mem_get("active", "short"),
        "persona": c.mem_get("spirit", "persona"),
        "fact": c.mem_get("knowledge", "fact"),
        "hits": [h["key"] for h in c.mem_search("ownership borrowing")],
        "graph": sorted(n["id"] for n in c.graph_neighbors("main", depth=2)["nodes"]),
        "working_keys": [e["key"] for e in c.mem_list("working")],
    }
    print("CHECK " + json.dumps(out, sort_keys=True), flush=True)
if c.mem_get("active", "session") is None:
    print("PERSONA " + json.dumps(c.mem_get("spirit", "persona")), flush=True)
    try:
        c.mem_put("spirit", "persona", "I rewrite myself")
        print("SPIRIT-WRITE-ALLOWED", flush=True)
    except aither.AitherError as e:
        print("spirit-denied: " + e.code + ": " + e.message, flush=True)
    c.mem_put("working", "scratch", {"tmp": [1, 2, 3]})
    c.mem_put("active", "session", {"step": 7})
    c.mem_put("active", "short", "gone soon", ttl_s=1)
    c.mem_put("knowledge", "fact", "Rust ownership and borrowing rules")
    c.mem_put("knowledge", "other", "Python has a global interpreter lock")
    for n in ("main", "parse", "lex", "far"):
        c.graph_add_node(n, "fn", {"file": "src/" + n + ".rs"})
    c.graph_add_edge("main", "parse", "calls")
    c.graph_add_edge("parse", "lex", "calls")
    c.graph_add_edge("lex", "far", "calls")
    check()
    print("WROTE", flush=True)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.2)  # past the 1 s TTL of "short"
check()
print("RUN-DONE", flush=True)
time.sleep(600)
"#;

fn checks(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| l.strip_prefix("CHECK "))
        .map(|j| serde_json::from_str(j).expect("CHECK JSON"))
        .collect()
}

#[test]
fn each_tier_keeps_what_it_promises_across_a_crash_a_kill_and_a_daemon_restart() {
    let mut d = daemon();
    let name = unique("tiers");
    // Spirit is the operator's to write; the strict policy lets the agent read it.
    d.ok(&[
        "mem",
        "put",
        &name,
        "--tier",
        "spirit",
        "persona",
        "You are a careful reviewer.",
    ]);
    d.spawn(&name, &["--backoff", "0"], TIERS_AGENT, &[]);
    let log = d.wait_log(&name, "WROTE", Duration::from_secs(30));
    assert!(
        log.contains("PERSONA \"You are a careful reviewer.\""),
        "{log}"
    );
    assert!(!log.contains("SPIRIT-WRITE-ALLOWED"), "{log}");
    assert!(
        log.contains("spirit-denied: denied:") && log.contains("memory_tiers.spirit.write"),
        "{log}"
    );
    let first = &checks(&log)[0];
    assert_eq!(first["working"], serde_json::json!({"tmp": [1, 2, 3]}));
    assert_eq!(first["short"], "gone soon");

    // The agent killed itself (SIGKILL): restarted on failure; the run's end cleared working.
    let log = d.wait_log(&name, "RUN-DONE", Duration::from_secs(30));
    let after = checks(&log);
    assert_eq!(after.len(), 2, "{log}");
    let c = &after[1];
    assert_eq!(
        c["working"],
        Value::Null,
        "working cleared at the run's end: {c}"
    );
    assert_eq!(c["working_keys"], serde_json::json!([]));
    assert_eq!(
        c["session"],
        serde_json::json!({"step": 7}),
        "active survives: {c}"
    );
    assert_eq!(
        c["short"],
        Value::Null,
        "an expired active entry is invisible: {c}"
    );
    assert_eq!(c["persona"], "You are a careful reviewer.");
    assert_eq!(c["fact"], "Rust ownership and borrowing rules");
    assert_eq!(c["hits"], serde_json::json!(["fact"]));
    assert_eq!(c["graph"], serde_json::json!(["lex", "main", "parse"]));

    // An operator's kill ends the run too (and it stays down: killed by us): working goes,
    // the rest stays; `restart` starts it again.
    d.ok(&["mem", "put", &name, "--tier", "working", "left", "over"]);
    d.ok(&["kill", &name]);
    assert!(poll_until(Duration::from_secs(10), || d
        .ok(&["mem", "ls", &name, "--tier", "working", "--json"])
        .trim()
        .is_empty()));
    d.ok(&["restart", &name]);
    assert!(
        poll_until(Duration::from_secs(20), || d
            .agent_log(&name)
            .matches("RUN-DONE")
            .count()
            >= 2),
        "not restarted after the kill:\n{}\n--- events ---\n{}",
        d.agent_log(&name),
        d.ok(&["events", "--agent", &name])
    );
    let ls = d.ok(&["mem", "ls", &name, "--tier", "working", "--json"]);
    assert_eq!(ls.trim(), "", "working after the kill: {ls}");

    // kill -9 of the daemon and a fresh start: durable tiers are on disk.
    d.kill9();
    d.launch();
    let v = d.json(&["mem", "get", &name, "--tier", "active", "session", "--json"]);
    assert_eq!(v["value"], serde_json::json!({"step": 7}));
    let hits = d.json(&[
        "mem",
        "search",
        &name,
        "--tier",
        "knowledge",
        "ownership",
        "--json",
    ]);
    assert_eq!(hits["hits"][0]["key"], "fact");
    let g = d.json(&["mem", "graph", &name, "neighbors", "lex", "--json"]);
    assert_eq!(g["nodes"].as_array().unwrap().len(), 3, "{g}");
    assert!(std::fs::metadata(d.state.path().join("state/memory.db")).is_ok());

    // Export, import into another name, and rm --purge-memory.
    let export = d.ok(&["mem", "export", &name]);
    assert_eq!(export.lines().count(), 4 + 4 + 3, "{export}");
    let file = d.ws.path().join("export.jsonl");
    std::fs::write(&file, &export).unwrap();
    let copy = unique("copy");
    d.ok(&["mem", "import", &copy, file.to_str().unwrap()]);
    assert_eq!(
        d.ok(&["mem", "get", &copy, "--tier", "spirit", "persona"])
            .trim(),
        "You are a careful reviewer."
    );
    d.ok(&["rm", "--force", "--purge-memory", &name]);
    let o = d.ctl(&["mem", "get", &name, "--tier", "active", "session"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_found"));
}

#[test]
fn quotas_refuse_with_a_clear_error_and_write_nothing() {
    let d = daemon();
    // strict, with small quotas on working and knowledge.
    let strict = std::fs::read_to_string(common::policy_dir().join("strict.toml")).unwrap();
    let mut policy = strict.replace("name = \"strict\"", "name = \"tiny\"");
    let cut = policy.find("[memory.working]").unwrap();
    policy.truncate(cut);
    policy.push_str(
        "[memory.working]\nread = true\nwrite = true\nquota_bytes = \"1K\"\nquota_entries = 5\n\n\
         [memory.knowledge]\nread = true\nwrite = true\nquota_bytes = \"100K\"\nquota_entries = 3\n",
    );
    let path = d.ws.path().join("tiny.toml");
    std::fs::write(&path, policy).unwrap();
    let script = r#"
import aither
c = aither.Channel.from_env()
for i in range(5):
    c.mem_put("working", "k%d" % i, "v")
for what, fn in [
    ("entries", lambda: c.mem_put("working", "k5", "v")),
    ("bytes", lambda: c.mem_put("working", "k0", "x" * 2000)),
    ("batch", lambda: c.mem_put_many("knowledge", {"a": "alpha", "b": "beta", "c": "gamma", "d": "delta"})),
    ("active", lambda: c.mem_get("active", "x")),
]:
    try:
        fn()
        print("ALLOWED " + what, flush=True)
    except aither.AitherError as e:
        print("REFUSED %s %s: %s" % (what, e.code, e.message), flush=True)
print("DONE", flush=True)
import time; time.sleep(600)
"#;
    let name = unique("quota");
    d.spawn(&name, &["--policy", path.to_str().unwrap()], script, &[]);
    let log = d.wait_log(&name, "DONE", Duration::from_secs(30));
    assert!(!log.contains("ALLOWED"), "{log}");
    let line = |what: &str| {
        log.lines()
            .find(|l| l.starts_with(&format!("REFUSED {what} ")))
            .unwrap_or_else(|| panic!("no refusal for {what}: {log}"))
            .to_string()
    };
    let e = line("entries");
    assert!(
        e.contains("quota: quota exceeded: entries of tier working")
            && e.contains("would be 6 (limit 5, memory_tiers.working.quota_entries)")
            && e.contains("nothing was written"),
        "{e}"
    );
    assert!(line("bytes").contains("memory_tiers.working.quota_bytes"));
    assert!(line("batch").contains("memory_tiers.knowledge.quota_entries"));
    let a = line("active");
    assert!(
        a.contains("denied") && a.contains("memory_tiers.active"),
        "{a}"
    );
    // Nothing half-written: five small entries, k0 unchanged, no knowledge at all.
    let ls = d.ok(&["mem", "ls", &name, "--tier", "working", "--json"]);
    assert_eq!(ls.lines().count(), 5, "{ls}");
    assert_eq!(
        d.ok(&["mem", "get", &name, "--tier", "working", "k0"])
            .trim(),
        "v"
    );
    let usage = d.json(&["mem", "usage", &name, "--json"]);
    assert_eq!(usage["knowledge"]["entries"], 0, "{usage}");
    assert_eq!(usage["working"]["entries"], 5, "{usage}");
}

#[test]
fn an_agent_reads_another_agents_memory_only_with_a_grant_and_never_writes_it() {
    let d = daemon();
    let owner = unique("owner");
    d.ok(&[
        "mem",
        "put",
        &owner,
        "--tier",
        "knowledge",
        "plan",
        "the migration runs on friday",
    ]);
    d.ok(&["mem", "put", &owner, "--tier", "active", "state", "private"]);
    let script = r#"
import aither, sys
c = aither.Channel.from_env()
owner = sys.argv[1]
for what, fn in [
    ("get", lambda: c.mem_get("knowledge", "plan", owner=owner)),
    ("search", lambda: [h["key"] for h in c.mem_search("migration", owner=owner)]),
    ("list", lambda: [e["key"] for e in c.mem_list("knowledge", owner=owner)]),
    ("active", lambda: c.mem_get("active", "state", owner=owner)),
    ("write", lambda: c.request("mem.put", tier="knowledge", key="plan", value="hijacked", owner=owner)),
]:
    try:
        print("OK %s %r" % (what, fn()), flush=True)
    except aither.AitherError as e:
        print("DENIED %s %s: %s" % (what, e.code, e.message), flush=True)
print("DONE", flush=True)
import time; time.sleep(600)
"#;
    // Without a grant: denied, naming the claim.
    let plain = unique("plain");
    d.spawn(&plain, &[], script, &[&owner]);
    let log = d.wait_log(&plain, "DONE", Duration::from_secs(30));
    for what in ["get", "search", "list", "active", "write"] {
        assert!(
            log.contains(&format!("DENIED {what} denied:")),
            "{what} without a grant:\n{log}"
        );
    }
    assert!(log.contains("memory_grants"), "{log}");

    // With a token that grants read of the owner's knowledge tier.
    let granted = unique("granted");
    let token_file = d.ws.path().join("granted.token");
    d.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        &granted,
        "--memory-grant",
        &format!("{owner}:knowledge"),
        "--out",
        token_file.to_str().unwrap(),
    ]);
    let shown = d.ok(&["token", "inspect", token_file.to_str().unwrap()]);
    assert!(
        shown.contains(&format!("grants      read {owner}:knowledge")),
        "{shown}"
    );
    d.spawn(
        &granted,
        &["--token", token_file.to_str().unwrap()],
        script,
        &[&owner],
    );
    let log = d.wait_log(&granted, "DONE", Duration::from_secs(30));
    assert!(
        log.contains("OK get 'the migration runs on friday'"),
        "{log}"
    );
    assert!(log.contains("OK search ['plan']"), "{log}");
    assert!(log.contains("OK list ['plan']"), "{log}");
    assert!(log.contains("DENIED active denied:"), "{log}");
    assert!(log.contains("DENIED write denied:"), "{log}");
    assert_eq!(
        d.ok(&["mem", "get", &owner, "--tier", "knowledge", "plan"])
            .trim(),
        "the migration runs on friday"
    );
}

#[test]
fn every_acknowledged_write_survives_kill_9_of_the_daemon_during_a_burst() {
    let mut d = daemon();
    let script = r#"
import aither, sys
c = aither.Channel.from_env()
i = 0
try:
    while True:
        c.mem_put("knowledge", "burst/%06d" % i, {"i": i, "pad": "x" * 200})
        print("ACK burst/%06d" % i, flush=True)
        i += 1
except aither.AitherError as e:
    print("CHANNEL-LOST after %d: %s" % (i, e), flush=True)  # when the channel closes
import time; time.sleep(600)
"#;
    let name = unique("burst");
    d.spawn(&name, &["--restart", "never"], script, &[]);
    assert!(
        poll_until(Duration::from_secs(30), || d
            .agent_log(&name)
            .matches("ACK ")
            .count()
            >= 300),
        "the burst did not start: {}",
        d.agent_log(&name)
    );
    d.kill9();
    let acked_while_up = d.agent_log(&name).matches("ACK ").count();
    d.launch();
    // The new daemon re-adopts the agent and recovers its channel: the burst may go on.
    // Stop it, then compare everything it was told with what is stored.
    std::thread::sleep(Duration::from_millis(500));
    d.ok(&["stop", &name]);
    let acked: BTreeSet<String> = d
        .agent_log(&name)
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .map(str::to_string)
        .collect();
    assert!(acked.len() >= acked_while_up);
    // Every acknowledged key is there, whole; at most the one in flight beyond them.
    let export = d.ok(&["mem", "export", &name]);
    let mut stored = BTreeSet::new();
    for line in export.lines() {
        let r: Value = serde_json::from_str(line).expect("an export line is whole JSON");
        let key = r["key"].as_str().unwrap().to_string();
        let i: u64 = key.strip_prefix("burst/").unwrap().parse().unwrap();
        assert_eq!(r["value"]["i"], i, "torn record {line}");
        assert_eq!(
            r["value"]["pad"].as_str().unwrap().len(),
            200,
            "torn record {line}"
        );
        stored.insert(key);
    }
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    // At most the writes in flight when the daemon was killed and when the agent was
    // stopped are stored without an acknowledgement.
    assert!(
        stored.len() <= acked.len() + 2,
        "{} stored, {} acked",
        stored.len(),
        acked.len()
    );
    assert!(acked.len() >= 300);
}

/// Issue 20: `mem search` prints a relevance that is never "-0.000", says "no matches" with
/// grep's status 1 when nothing matches; a read of a name that is no agent and holds no memory
/// is an error naming it (it was an empty table with status 0).
#[test]
fn search_and_ls_say_what_they_found() {
    let d = daemon();
    let owner = unique("kb");
    d.ok(&[
        "mem",
        "put",
        &owner,
        "--tier",
        "knowledge",
        "fact",
        "Rust ownership and borrowing rules",
    ]);
    let hit = d.ok(&["mem", "search", &owner, "ownership"]);
    assert!(!hit.contains("-0.000"), "{hit}");
    let row = hit.lines().find(|l| l.contains("fact")).expect(&hit);
    let rel: f64 = row.split_whitespace().next().unwrap().parse().expect(row);
    assert!(rel > 0.0, "relevance, higher is better: {hit}");

    let o = d.ctl(&["mem", "search", &owner, "nothing-like-this"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stdout.is_empty(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no matches"),
        "{o:?}"
    );

    let ghost = unique("ghost");
    for args in [
        vec!["mem", "ls", ghost.as_str()],
        vec!["mem", "search", ghost.as_str(), "x"],
    ] {
        let o = d.ctl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}: {o:?}");
        assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
        assert!(err.contains(&ghost) && err.contains("not_found"), "{err}");
    }
    // A name with memory but no agent (memory outlives its agent) still lists.
    let ls = d.ok(&["mem", "ls", &owner, "--tier", "knowledge"]);
    assert!(ls.contains("fact"), "{ls}");
}
