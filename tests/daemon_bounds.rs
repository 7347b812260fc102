//! The daemon charges work to the agent and bounds it (issue 17 item 6, docs/daemon.md
//! "Bounds"), end to end, as root: a private aitherd on a real socket, hostile Python agents
//! in `strict` sandboxes talking raw frames on their fd 3, the operator's CLI. Every test
//! asserts outcomes (replies, audit records, events, aitherd's RSS), never timings.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::daemon::TestDaemon as Daemon;
use common::{poll_until, unique};
use serde_json::{json, Value};

/// The hostile side: raw frames on fd 3, pipelined in batches, replies counted by code
/// (pushes skipped). `flood(req, n)` sends n copies of req.
const RAW: &str = r#"
import json, os, socket, struct, sys, time
s = socket.socket(fileno=3)
def send(objs):
    buf = b""
    for o in objs:
        b = json.dumps(o).encode()
        buf += struct.pack(">I", len(b)) + b
    s.sendall(buf)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("channel closed")
        b += c
    return b
def replies(n):
    out = []
    while len(out) < n:
        r = json.loads(exact(struct.unpack(">I", exact(4))[0]))
        if "push" in r:
            continue
        out.append(r)
    return out
def code(r):
    return "ok" if r.get("ok") else r["error"]["code"]
def call(req):
    send([dict(req, id=1)])
    return replies(1)[0]
def flood(req, n, batch=100):
    codes = {}
    for i in range(0, n, batch):
        k = min(batch, n - i)
        send([dict(req, id=i + j) for j in range(k)])
        for r in replies(k):
            c = code(r)
            codes[c] = codes.get(c, 0) + 1
    return codes
def flood_until_limited(req, most, batch):
    # Batches until one is answered rate_limited (or `most` requests): whether a fixed number
    # of requests exceeds a budget that refills with time depends on how fast this machine
    # answers them; sent until the budget answers, it does not.
    codes, sent = {}, 0
    while sent < most and "rate_limited" not in codes:
        for c, k in flood(req, batch, batch).items():
            codes[c] = codes.get(c, 0) + k
        sent += batch
    return codes
def done(name, v):
    with open(name + ".tmp", "w") as f:
        json.dump(v, f)
    os.rename(name + ".tmp", name)
"#;

trait BoundsExt {
    fn policy(&self, tag: &str, publish: &[&str], subscribe: &[&str]) -> String;
    fn spawn_raw(&self, name: &str, policy: &str, body: &str);
    fn result(&self, file: &str) -> Value;
    fn audit_of(&self, agent: &str) -> Vec<Value>;
    fn rss_kib(&self) -> u64;
}

impl BoundsExt for Daemon {
    /// `strict` with this `[bus]` section.
    fn policy(&self, tag: &str, publish: &[&str], subscribe: &[&str]) -> String {
        let strict = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/strict.toml"),
        )
        .unwrap();
        let body = strict.split("\n[bus]").next().unwrap();
        let rest = strict.split("\n[bus]").nth(1).unwrap_or("");
        // Keep what follows the [bus] table (the memory tiers).
        let after = rest.find("\n[").map(|i| &rest[i..]).unwrap_or("");
        let q = |v: &[&str]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "{}\n[bus]\npublish = [{}]\nsubscribe = [{}]\n{after}",
            body.replace("name = \"strict\"", &format!("name = \"bounds-{tag}\"")),
            q(publish),
            q(subscribe)
        );
        let p = self.state.path().join(format!("policy-{tag}.toml"));
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn spawn_raw(&self, name: &str, policy: &str, body: &str) {
        let file = format!("{name}.py");
        std::fs::write(self.ws.path().join(&file), format!("{RAW}\n{body}")).unwrap();
        self.ok(&[
            "spawn", "--json", "--policy", policy, name, "--", "python3", "-u", &file,
        ]);
    }

    /// The JSON an agent wrote with `done(file, ...)`, once it is there.
    fn result(&self, file: &str) -> Value {
        let p = self.ws.path().join(file);
        assert!(
            poll_until(Duration::from_secs(120), || p.exists()),
            "{file} never written; daemon log:\n{}",
            self.log()
        );
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    }

    /// The audit records about `agent`.
    fn audit_of(&self, agent: &str) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["agent"] == agent)
            .collect()
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

fn daemon(tag: &str) -> Daemon {
    Daemon::start(&format!("aitherd-bounds-{tag}-"), &[])
}

/// A daemon serving Prometheus metrics on a free loopback port; and that address.
fn daemon_with_metrics(tag: &str) -> (Daemon, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&format!("aitherd-bounds-{tag}-"), &["--metrics", &addr]);
    (d, addr)
}

fn get_metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Records written one by one plus the counts their summaries carry: what a flood of
/// `kind` records would have been without summarising.
fn accounted(records: &[Value], kind: &str) -> (u64, usize) {
    let of_kind: Vec<&Value> = records.iter().filter(|r| r["kind"] == kind).collect();
    let total = of_kind
        .iter()
        .map(|r| r["data"]["summary"]["count"].as_u64().unwrap_or(1))
        .sum();
    (total, of_kind.len())
}

/// Publishes `n` durable messages of `size` bytes on `subject` as the operator, pipelined on
/// one control connection; returns once every one is committed.
fn fill_log(d: &Daemon, subject: &str, n: usize, size: usize) {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    let data = "y".repeat(size);
    let mut buf = Vec::new();
    for _ in 0..n {
        let body =
            json!({"op": "bus_pub", "subject": subject, "data": data, "durable": true}).to_string();
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(body.as_bytes());
    }
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&buf).unwrap());
    for i in 0..n {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        let r: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(r["ok"], true, "publish {i}: {r}");
    }
    writer.join().unwrap();
}

/// The finding: 90 replaying subscriptions took aitherd from 13 MB to 562 MB. Now a hostile
/// agent asking for 90 (each with the largest queue, from the first message, never reading)
/// gets 64, is refused the rest with `limit`, and aitherd's RSS grows by less than 64 MiB:
/// its queues hold at most 8 MiB (bus::OUTBOX_QUEUE_BYTES), replays share one 16 MiB page
/// cache (bus::PAGE_CACHE_BYTES), the rest is buffers and SQLite's caches.
#[test]
fn ninety_replaying_subscriptions_keep_aitherd_rss_bounded() {
    let d = daemon("replay");
    // 24 MiB of log: 3000 messages of 8 KiB.
    fill_log(&d, "log.x", 3000, 8 * 1024);
    let pol = d.policy("replay", &[], &["log.>"]);
    let name = unique("replayer");
    let before = d.rss_kib();
    d.spawn_raw(
        &name,
        &pol,
        r#"
codes = {}
for i in range(90):
    c = code(call({"op": "bus.subscribe", "pattern": "log.>", "from_seq": 1, "queue": 65536}))
    codes[c] = codes.get(c, 0) + 1
done("replay.json", codes)
# Never reads again: aitherd's queues fill to their bounds and stay there.
time.sleep(600)
"#,
    );
    let codes = d.result("replay.json");
    assert_eq!(codes, json!({"ok": 64, "limit": 26}), "{codes}");
    // The queues fill (replay reads at 8 MiB/s, burst 32 MiB), then stay at their bound.
    let usage = |d: &Daemon| d.json(&["inspect", &name])["daemon_usage"].clone();
    assert!(
        poll_until(Duration::from_secs(60), || usage(&d)["bus_queued_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 4 << 20),
        "{}",
        usage(&d)
    );
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(d.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    let u = usage(&d);
    assert_eq!(u["bus_subscriptions"], 64, "{u}");
    assert!(u["bus_queued_bytes"].as_u64().unwrap() <= 8 << 20, "{u}");
    assert!(u["bus_replay_bytes"].as_u64().unwrap() > 4 << 20, "{u}");
    let grew = peak.saturating_sub(before);
    eprintln!("aitherd RSS {before} KiB before, peak {peak} KiB with 64 replays ({grew} KiB more); usage {u}");
    assert!(
        grew < 64 * 1024,
        "aitherd grew by {grew} KiB (from {before} to {peak})"
    );
}

/// The finding: 5,550 denied publishes in 3 s wrote 7 MB of audit. Now a flood of denied
/// publishes (a new subject each time) is answered, each request exactly once, `denied` or
/// (past the budget) `rate_limited`, and the audit stream holds a few records whose
/// summaries account for every one of them.
#[test]
fn a_flood_of_denied_publishes_yields_summary_records_not_thousands() {
    let (d, addr) = daemon_with_metrics("deny");
    let pol = d.policy("deny", &["agent.$self.>"], &[]);
    let name = unique("denied");
    d.spawn_raw(
        &name,
        &pol,
        r#"
codes = {}
for i in range(30):
    for c, n in flood({"op": "bus.publish", "subject": "other.s%d" % i, "data": "x"}, 100).items():
        codes[c] = codes.get(c, 0) + n
done("deny.json", codes)
time.sleep(600)
"#,
    );
    let codes = d.result("deny.json");
    let denied = codes["denied"].as_u64().unwrap_or(0);
    let limited = codes["rate_limited"].as_u64().unwrap_or(0);
    assert_eq!(denied + limited, 3000, "{codes}");
    assert!(denied >= 400 && limited > 0, "{codes}");
    // The summaries are written when their windows close (10 s).
    let settled = poll_until(Duration::from_secs(40), || {
        let a = d.audit_of(&name);
        accounted(&a, "bus").0 == denied && accounted(&a, "rate_limit").0 == limited
    });
    let a = d.audit_of(&name);
    assert!(
        settled,
        "bus {:?} rate_limit {:?} of {codes}:\n{a:#?}",
        accounted(&a, "bus"),
        accounted(&a, "rate_limit")
    );
    let (_, bus_records) = accounted(&a, "bus");
    let (_, rl_records) = accounted(&a, "rate_limit");
    assert!(bus_records <= 6 && rl_records <= 6, "{a:#?}");
    let summary = a
        .iter()
        .find(|r| r["kind"] == "bus" && r["data"]["summary"].is_object())
        .expect("a summary record");
    assert_eq!(summary["decision"], "deny");
    assert!(
        summary["rule"]
            .as_str()
            .unwrap()
            .contains("similar denials of bus:bus.publish in"),
        "{summary}"
    );
    // The subject of the first denial is in the summary; the flood's are not each written.
    assert!(a.iter().all(|r| r["kind"] != "channel"), "{a:#?}");
    // Charged to the agent, shown by inspect.
    let u = d.json(&["inspect", &name])["daemon_usage"].clone();
    assert_eq!(u["denied"], denied, "{u}");
    assert_eq!(u["rate_limited"], limited, "{u}");
    assert!(u["requests"].as_u64().unwrap() >= 3000, "{u}");
    assert!(u["bytes_in"].as_u64().unwrap() > 3000 * 50, "{u}");
    assert!(u["cpu_ms"].as_f64().unwrap() > 0.0, "{u}");
    // And in the metrics.
    let m = get_metrics(&addr);
    assert!(
        m.contains(&format!(
            "aither_agent_daemon_rate_limited_total{{agent=\"{name}\"}} {limited}"
        )),
        "{m}"
    );
}

/// The finding: 3,800 pain reports a second each made an event, a durable bus message and
/// an audit record, enough to rotate every agent's history away in under a minute. Now a
/// pain flood gets at most the event budget's worth of events (burst 20, 2/s): the rest is
/// answered `rate_limited` and leaves nothing; another agent's pain events are still there.
#[test]
fn a_pain_flood_is_rate_limited_and_another_agents_events_survive() {
    let d = daemon("pain");
    let pol = d.policy("pain", &["agent.$self.>"], &[]);
    let victim = unique("victim");
    d.spawn_raw(
        &victim,
        &pol,
        r#"
for i in range(3):
    r = call({"op": "pain", "severity": "info", "reason": "victim-marker-%d" % i})
    assert r["ok"], r
done("victim.json", {"ok": 3})
time.sleep(600)
"#,
    );
    d.result("victim.json");
    let hostile = unique("painful");
    d.spawn_raw(
        &hostile,
        &pol,
        r#"
codes = flood({"op": "pain", "severity": "info", "reason": "flood"}, 3000)
done("pain.json", codes)
time.sleep(600)
"#,
    );
    let codes = d.result("pain.json");
    let ok = codes["ok"].as_u64().unwrap_or(0);
    let limited = codes["rate_limited"].as_u64().unwrap_or(0);
    assert_eq!(ok + limited, 3000, "{codes}");
    // The burst, and the rate's refill while the flood ran (it runs for seconds, not minutes).
    assert!((20..=100).contains(&ok), "{codes}");
    let events = |n: &str| -> Vec<Value> {
        d.ok(&["events", "--agent", n, "--json"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["kind"] == "pain")
            .collect()
    };
    // Exactly one event per accepted report: a refused one leaves none.
    assert!(poll_until(
        Duration::from_secs(10),
        || events(&hostile).len() as u64 == ok
    ));
    assert_eq!(events(&hostile).len() as u64, ok);
    let v = events(&victim);
    for i in 0..3 {
        assert!(
            v.iter()
                .any(|e| e["data"]["reason"] == format!("victim-marker-{i}")),
            "{v:#?}"
        );
    }
    // The pain audit records are as many as the events; the refusals are summarised.
    let settled = poll_until(Duration::from_secs(40), || {
        accounted(&d.audit_of(&hostile), "rate_limit").0 == limited
    });
    let a = d.audit_of(&hostile);
    assert!(settled, "{:?} of {limited}", accounted(&a, "rate_limit"));
    assert_eq!(accounted(&a, "pain").1 as u64, ok);
    assert!(accounted(&a, "rate_limit").1 <= 6);
}

/// The finding: depth-8 graph queries and 32-term searches kept aitherd at 0.9 CPU. Now a
/// search of more than 8 terms is refused with a clear error, a walk over a hub with more
/// edges than a walk may read is cut (`truncated`), and a flood of queries is rate limited
/// by the agent's request budget (a query counts 10) and its aitherd CPU-time budget: the
/// flood goes on until the daemon answers `rate_limited` (a fixed count of 60 was answered
/// in full on a loaded machine, where the buckets refilled while aitherd waited for a CPU).
#[test]
fn deep_graph_and_many_term_queries_are_refused_or_cut() {
    let d = daemon("mem");
    let pol = d.policy("mem", &["agent.$self.>"], &[]);
    let name = unique("querier");
    // A hub: 600 nodes, 9 edges to each (5400 > the 5000 a walk may read).
    let mut lines = vec![json!({"type": "node", "id": "hub", "kind": "fn", "props": {}})];
    for i in 0..600 {
        lines.push(json!({"type": "node", "id": format!("n{i}"), "kind": "fn", "props": {}}));
        for k in 0..9 {
            lines.push(json!({"type": "edge", "from": "hub", "to": format!("n{i}"), "kind": format!("k{k}"), "props": {}}));
        }
    }
    let file = d.state.path().join("hub.jsonl");
    std::fs::write(
        &file,
        lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    d.ok(&["mem", "import", &name, &file.display().to_string()]);
    d.spawn_raw(
        &name,
        &pol,
        r#"
out = {}
r = call({"op": "mem.search", "query": "a b c d e f g h i j k l m n o p q r s t u v w x y z aa bb cc dd ee ff"})
out["search32"] = [code(r), r.get("error", {}).get("message")]
r = call({"op": "mem.search", "query": "a b c d e f g h"})
out["search8"] = code(r)
r = call({"op": "mem.graph.neighbors", "node": "hub", "depth": 8})
out["walk"] = [code(r), r.get("data", {}).get("truncated"), r.get("error")]
r = call({"op": "mem.graph.neighbors", "node": "hub", "depth": 9})
out["depth9"] = code(r)
out["flood"] = flood_until_limited({"op": "mem.graph.neighbors", "node": "hub", "depth": 8}, 3000, 20)
done("mem.json", out)
time.sleep(600)
"#,
    );
    let out = d.result("mem.json");
    eprintln!("memory queries: {out}");
    assert_eq!(out["search32"][0], "invalid", "{out}");
    assert_eq!(
        out["search32"][1],
        "invalid query: 32 search terms; the limit is 8 (each term is an index lookup)"
    );
    assert_eq!(out["search8"], "ok", "{out}");
    assert_eq!(out["walk"], json!(["ok", true, null]), "{out}");
    assert_eq!(out["depth9"], "invalid", "{out}");
    let flood = &out["flood"];
    let ok = flood["ok"].as_u64().unwrap_or(0);
    let limited = flood["rate_limited"].as_u64().unwrap_or(0);
    assert!(limited > 0 && ok > 0, "{out}");
    assert_eq!(
        (ok + limited) % 20,
        0,
        "every request of each batch answered: {out}"
    );
    let u = d.json(&["inspect", &name])["daemon_usage"].clone();
    assert_eq!(u["rate_limited"], limited, "{u}");
    assert!(u["cpu_ms"].as_f64().unwrap() > 0.0, "{u}");
}

/// Durable publishes are charged by their bytes (burst 2 MiB, 256 KiB/s), so that one agent
/// cannot fill the shared log and rotate the others' messages away: a flood of 30 KB durable
/// publishes gets the burst's worth logged, the rest is `rate_limited` and not logged.
#[test]
fn durable_publishes_are_charged_by_their_bytes() {
    let d = daemon("durable");
    let pol = d.policy("durable", &["agent.$self.>"], &[]);
    let name = unique("durable");
    let log_bytes = |d: &Daemon| {
        d.json(&["bus", "streams", "--json"])["streams"][0]["log"]["bytes"]
            .as_u64()
            .unwrap()
    };
    let before = log_bytes(&d);
    d.spawn_raw(
        &name,
        &pol,
        &format!(
            r#"
codes = flood({{"op": "bus.publish", "subject": "agent.{name}.x", "durable": True, "data": "y" * 30000}}, 200, batch=50)
done("durable.json", codes)
time.sleep(600)
"#
        ),
    );
    let codes = d.result("durable.json");
    eprintln!("durable publishes: {codes}");
    let ok = codes["ok"].as_u64().unwrap_or(0);
    let limited = codes["rate_limited"].as_u64().unwrap_or(0);
    assert_eq!(ok + limited, 200, "{codes}");
    // The burst: 2 MiB / 30 KB = 69 publishes, and some refill while the flood ran.
    assert!(ok >= 69 && limited > 0, "{codes}");
    // What was logged is what was accepted, no more: refused publishes left nothing (the
    // daemon's own events of the agent, a few hundred bytes, come on top).
    let size = 30_002 + format!("agent.{name}.x").len() as u64;
    let logged = log_bytes(&d) - before;
    assert!(
        logged >= ok * size && logged < (ok + 1) * size,
        "{logged} bytes logged for {ok} accepted publishes of {size} bytes; {codes}"
    );
    let a = d.audit_of(&name);
    assert!(
        a.iter()
            .any(|r| r["kind"] == "rate_limit" && r["data"]["limit"] == "durable_bytes"),
        "{a:#?}"
    );
}
