//! AitherFlux end to end, as root: a private aitherd, sandboxed Python agents using
//! runtime/python/aither.py, and `aitherctl bus` as the operator.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{poll_until, unique};
use serde_json::Value;

use common::daemon::TestDaemon as Daemon;

fn daemon() -> Daemon {
    Daemon::start("aitherd-bus-", &[]).with_python_sdk()
}

/// What this suite asks of its daemon beyond the shared fixture (tests/common/daemon.rs).
trait BusExt {
    fn policy(&self, tag: &str, publish: &[&str], subscribe: &[&str]) -> String;
    fn spawn_py(&self, name: &str, policy: &str, script: &str);
    fn file(&self, name: &str) -> String;
    fn logs(&self, name: &str) -> String;
    fn streams(&self) -> Value;
    fn audit(&self) -> String;
}

impl BusExt for Daemon {
    /// A policy file: strict, with this `[bus]` section.
    fn policy(&self, tag: &str, publish: &[&str], subscribe: &[&str]) -> String {
        let strict = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/strict.toml"),
        )
        .unwrap();
        let body = strict.split("\n[bus]").next().unwrap();
        let q = |v: &[&str]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "{}\n[bus]\npublish = [{}]\nsubscribe = [{}]\n",
            body.replace("name = \"strict\"", &format!("name = \"bus-{tag}\"")),
            q(publish),
            q(subscribe)
        );
        let p = self.state.path().join(format!("policy-{tag}.toml"));
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn spawn_py(&self, name: &str, policy: &str, script: &str) {
        let file = format!("{name}.py");
        std::fs::write(self.ws.path().join(&file), script).unwrap();
        self.ok(&[
            "spawn", "--json", "--policy", policy, name, "--", "python3", "-u", &file,
        ]);
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.ws.path().join(name)).unwrap_or_default()
    }

    fn logs(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.ctl(&["logs", name]).stdout).into_owned()
    }

    fn streams(&self) -> Value {
        serde_json::from_str(&self.ok(&["bus", "streams", "--json"])).unwrap()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.state.path().join("audit.jsonl")).unwrap_or_default()
    }
}

#[test]
fn two_sandboxed_agents_exchange_messages_only_on_subjects_their_tokens_allow() {
    let d = daemon();
    let alice = unique("alice");
    let bob = unique("bob");
    // alice: her own subjects and shared.>; reads bob's replies.
    let pa = d.policy(
        "a",
        &["agent.$self.>", "shared.>"],
        &["agent.*.reply", "shared.>"],
    );
    // bob: reads alice's public subjects and shared.>, never her private ones.
    let pb = d.policy(
        "b",
        &["agent.$self.>"],
        &[&format!("agent.{alice}.public.>"), "shared.>"],
    );
    let bob_py = format!(
        r#"
import aither, json
c = aither.Channel.from_env()
out = open("bob.out", "w")
def note(*a):
    out.write(" ".join(str(x) for x in a) + "\n"); out.flush()
for pat in [">", "agent.{alice}.>", "agent.*.public.>", "aither.>"]:
    try:
        c.subscribe(pat); note("SUBSCRIBED", pat)
    except aither.AitherError as e:
        note("deny-sub", pat, e.code)
c.subscribe("agent.{alice}.public.>")
c.subscribe("shared.>")
note("ready")
got = []
while True:
    m = c.next_message(timeout=30)
    if m is None: break
    note("got", m["subject"], json.dumps(m["data"]), m["publisher"])
    if m["subject"] == "shared.end":
        c.publish("agent.{bob}.reply", {{"count": len(got)}})
        break
    got.append(m)
note("done")
import time; time.sleep(60)
"#
    );
    d.spawn_py(&bob, &pb, &bob_py);
    assert!(
        poll_until(Duration::from_secs(15), || d
            .file("bob.out")
            .contains("ready")),
        "bob: {}\n{}",
        d.file("bob.out"),
        d.logs(&bob)
    );
    let alice_py = format!(
        r#"
import aither
c = aither.Channel.from_env()
out = open("alice.out", "w")
def note(*a):
    out.write(" ".join(str(x) for x in a) + "\n"); out.flush()
c.subscribe("agent.*.reply")
for subj in ["agent.{bob}.reply", "aither.agent.{alice}.started", "agent.{alice}", "other.x"]:
    try:
        c.publish(subj, "forged"); note("PUBLISHED", subj)
    except aither.AitherError as e:
        note("deny-pub", subj, e.code)
c.publish("agent.{alice}.public.hello", {{"n": 1}})
c.publish("agent.{alice}.private.secret", "do not read")
c.publish("shared.news", [1, 2, 3])
c.publish("shared.end", None)
m = c.next_message(timeout=20)
note("REPLY", m and m["subject"], m and m["data"])
import time; time.sleep(60)
"#
    );
    d.spawn_py(&alice, &pa, &alice_py);
    assert!(
        poll_until(Duration::from_secs(20), || d
            .file("alice.out")
            .contains("REPLY")),
        "alice: {}\n{}\nbob: {}",
        d.file("alice.out"),
        d.logs(&alice),
        d.file("bob.out")
    );
    // An operator's publish on alice's private subject does not reach bob either.
    d.ok(&["bus", "pub", &format!("agent.{alice}.private.op"), "x"]);
    let a = d.file("alice.out");
    let b = d.file("bob.out");
    for pat in [
        ">",
        &format!("agent.{alice}.>"),
        "agent.*.public.>",
        "aither.>",
    ] {
        assert!(b.contains(&format!("deny-sub {pat} denied")), "{pat}: {b}");
    }
    assert!(!b.contains("SUBSCRIBED"), "{b}");
    for s in [
        format!("agent.{bob}.reply"),
        format!("aither.agent.{alice}.started"),
        format!("agent.{alice}"),
        "other.x".to_string(),
    ] {
        assert!(a.contains(&format!("deny-pub {s} denied")), "{s}: {a}");
    }
    assert!(!a.contains("PUBLISHED"), "{a}");
    assert!(
        b.contains(&format!(
            "got agent.{alice}.public.hello {{\"n\": 1}} {alice}"
        )),
        "{b}"
    );
    assert!(b.contains("got shared.news [1, 2, 3]"), "{b}");
    assert!(!b.contains("secret") && !b.contains("private"), "{b}");
    assert!(
        a.contains(&format!("REPLY agent.{bob}.reply {{'count': 2}}")),
        "{a}"
    );
    // The denials are in the audit stream (written by the audit sink's own thread: waited
    // for, bounded; the agents' files above can be complete before their records are).
    poll_until(Duration::from_secs(20), || {
        let a = d.audit();
        a.contains("does not grant subscribe") && a.contains("does not grant publish")
    });
    let audit = d.audit();
    assert!(
        audit.contains("\"bus\"") && audit.contains("does not grant subscribe"),
        "{audit}"
    );
    assert!(audit.contains("does not grant publish"), "{audit}");
    // Issue 20: no denial is recorded twice (a flood of them is one record and a count).
    let mut seen = std::collections::HashSet::new();
    for r in audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "bus" && r["decision"] == "deny")
    {
        let key = (r["agent"].to_string(), r["data"].to_string());
        assert!(seen.insert(key), "recorded twice: {r}\n{audit}");
    }
    assert!(!seen.is_empty(), "{audit}");
}

#[test]
fn a_durable_consumer_replays_what_it_missed_across_daemon_restarts() {
    let mut d = daemon();
    let name = unique("consumer");
    let pol = d.policy("c", &[], &["jobs.>"]);
    let py = r#"
import aither
c = aither.Channel.from_env()
c.subscribe("jobs.>", durable="worker")
c.ready()
while True:
    m = c.next_message(timeout=120)
    if m is None: continue
    with open("consumer.out", "a") as f:
        f.write(f'{m["seq"]} {m["data"]}\n')
    c.ack(m)
"#;
    d.spawn_py(&name, &pol, py);
    let publish = |d: &Daemon, from: u32, to: u32| {
        for i in from..=to {
            d.ok(&["bus", "pub", "--durable", "jobs.work", &format!("job-{i}")]);
        }
    };
    let jobs = |d: &Daemon| -> Vec<String> {
        d.file("consumer.out")
            .lines()
            .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
            .collect()
    };
    let want = |n: u32| (1..=n).map(|i| format!("job-{i}")).collect::<Vec<_>>();
    // Give the subscription a moment (the agent reports ready after subscribing).
    assert!(poll_until(Duration::from_secs(10), || d
        .logs(&name)
        .is_empty()
        && d.streams()["subscriptions"]
            .as_array()
            .is_some_and(|s| !s.is_empty())));
    publish(&d, 1, 3);
    assert!(
        poll_until(Duration::from_secs(10), || jobs(&d) == want(3)),
        "{:?}\n{}",
        jobs(&d),
        d.logs(&name)
    );

    // kill -9 the daemon with the consumer running: adopted, told to resubscribe, it goes on.
    d.kill9();
    d.launch();
    publish(&d, 4, 5);
    assert!(
        poll_until(Duration::from_secs(15), || jobs(&d) == want(5)),
        "{:?}\n{}\n{}",
        jobs(&d),
        d.logs(&name),
        d.log()
    );

    // The consumer stops; messages arrive meanwhile; the daemon is killed and restarted.
    d.ok(&["stop", &name]);
    publish(&d, 6, 8);
    d.kill9();
    d.launch();
    publish(&d, 9, 9);
    d.ok(&["restart", &name]);
    assert!(
        poll_until(Duration::from_secs(15), || jobs(&d) == want(9)),
        "missed messages not replayed exactly once after the ack: {:?}\n{}",
        jobs(&d),
        d.logs(&name)
    );

    // A clean stop (SIGTERM) and start: the same.
    d.ok(&["stop", &name]);
    publish(&d, 10, 11);
    d.sigterm();
    d.launch();
    d.ok(&["restart", &name]);
    assert!(
        poll_until(Duration::from_secs(15), || jobs(&d) == want(11)),
        "{:?}",
        jobs(&d)
    );
    // The operator's replay from the log.
    let out = d.ok(&["bus", "sub", "jobs.>", "--from", "1", "-n", "11", "--json"]);
    let data: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["data"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(data, want(11));
    // The consumer's cursor is at job-11's sequence number.
    let last = serde_json::from_str::<Value>(out.lines().last().unwrap()).unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert!(
        poll_until(Duration::from_secs(5), || {
            d.streams()["streams"][0]["log"]["consumers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| {
                    c["agent"] == name.as_str()
                        && c["name"] == "worker"
                        && c["acked_seq"].as_u64() == Some(last)
                })
        }),
        "{}",
        d.streams()
    );
}

#[test]
fn a_slow_consumer_stays_bounded_and_does_not_slow_the_others() {
    let d = daemon();
    let slow = unique("slow");
    let pol = d.policy("s", &[], &["load.>"]);
    // Subscribes with a small queue, then never reads its channel again.
    d.spawn_py(
        &slow,
        &pol,
        r#"
import aither, time
c = aither.Channel.from_env()
c.subscribe("load.>", queue=64)
open("slow.ready", "w").close()
time.sleep(600)
"#,
    );
    assert!(poll_until(Duration::from_secs(10), || d
        .ws
        .path()
        .join("slow.ready")
        .exists()));
    let n = 3000;
    let mut fast = d
        .cmd(&[
            "bus",
            "sub",
            "load.>",
            "--json",
            "--queue",
            "65536",
            "-n",
            &n.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read as it comes, counted as it comes.
    let fast_out = fast.stdout.take().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for _ in std::io::BufReader::new(fast_out).lines() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    assert!(poll_until(Duration::from_secs(10), || d.streams()
        ["subscriptions"]
        .as_array()
        .is_some_and(|s| s.len() == 2)));
    let pid = d.child.as_ref().unwrap().id();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    // Published in chunks of 100 × 8 KB (under the fast subscriber's 1 MiB queue), each once
    // the fast subscriber has the one before: it must get every message however slowly this
    // machine runs it, while the slow one, which never reads, is flooded all along.
    let chunk = 100;
    let payload = format!("\"{}\"", "x".repeat(8000));
    let lines: String = (0..chunk).map(|_| format!("{payload}\n")).collect();
    let mut rss0 = 0;
    for i in 1..=n / chunk {
        let mut p = d
            .cmd(&["bus", "pub", "load.data", "-", "--lines"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        p.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        assert!(p.wait().unwrap().success());
        let arrived = poll_until(Duration::from_secs(60), || {
            count.load(std::sync::atomic::Ordering::SeqCst) >= i * chunk
        });
        if !arrived {
            let _ = fast.kill();
            panic!(
                "the fast subscriber has {} of {} messages: {}",
                count.load(std::sync::atomic::Ordering::SeqCst),
                i * chunk,
                d.streams()
            );
        }
        // The first half warms the allocator up; the second must not grow the daemon.
        if i == n / chunk / 2 {
            rss0 = rss();
        }
    }
    let _ = fast.wait();
    reader.join().unwrap();
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        n,
        "the fast subscriber lost messages"
    );
    let st = d.streams();
    let s = st["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["owner"] == slow.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{st}"));
    assert!(s["queued"].as_u64().unwrap() <= 64, "{s}");
    assert!(s["dropped"].as_u64().unwrap() > 0, "{s}");
    // 1500 × 8 KB more went through; the daemon kept at most the slow queue's worth.
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 16 * 1024, "aitherd grew by {grown} KiB");
}

#[test]
fn oversized_and_malformed_messages_are_refused_with_clear_codes() {
    let d = daemon();
    let name = unique("bad");
    let pol = d.policy("m", &["t.>"], &["t.>"]);
    d.spawn_py(
        &name,
        &pol,
        r#"
import aither
c = aither.Channel.from_env()
out = open("bad.out", "w")
def try_(label, op, **f):
    try:
        c.request(op, **f); out.write(f"{label} ACCEPTED\n")
    except aither.AitherError as e:
        out.write(f"{label} {e.code} {e.message}\n")
    out.flush()
try_("big", "bus.publish", subject="t.x", data="x" * 40000)
try_("subject", "bus.publish", subject="t..x", data=1)
try_("wild", "bus.publish", subject="t.*", data=1)
try_("nodata", "bus.publish", subject="t.x")
try_("nosubject", "bus.publish", data=1)
try_("typed", "bus.publish", subject=7, data=1)
try_("pattern", "bus.subscribe", pattern="t.>.x")
try_("from", "bus.subscribe", pattern="t.>", from_seq="x")
try_("queue", "bus.subscribe", pattern="t.>", queue=1)
try_("ack", "bus.ack", seq=1)
try_("unsub", "bus.unsubscribe", sub=99)
try_("op", "bus.frobnicate")
try:
    c.publish("t.x", "y" * 40000)
except aither.AitherError as e:
    out.write(f"sdk {e.code}\n")
c.publish("t.x", "still fine")
out.write("end\n"); out.flush()
import time; time.sleep(60)
"#,
    );
    assert!(
        poll_until(Duration::from_secs(15), || d
            .file("bad.out")
            .contains("end")),
        "{}\n{}",
        d.file("bad.out"),
        d.logs(&name)
    );
    let out = d.file("bad.out");
    for (label, code, field) in [
        ("big", "msg_too_large", "data"),
        ("subject", "invalid", "subject"),
        ("wild", "invalid", "subject"),
        ("nodata", "invalid", "data"),
        ("nosubject", "invalid", "subject"),
        ("typed", "invalid", "subject"),
        ("pattern", "invalid", "pattern"),
        ("from", "invalid", "from_seq"),
        ("queue", "invalid", "queue"),
        ("ack", "invalid", "durable"),
        ("unsub", "not_found", ""),
        ("op", "unknown_op", ""),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap_or_else(|| panic!("{label}: {out}"));
        assert!(line.starts_with(&format!("{label} {code}")), "{line}");
        assert!(
            line.contains(&format!("`{field}`")) || field.is_empty(),
            "{line}"
        );
    }
    assert!(out.contains("sdk msg_too_large"), "{out}");
    // The CLI refuses the same.
    let o = d.ctl(&["bus", "pub", "a b", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("(invalid)"));
    let o = d.ctl(&["bus", "sub", "a.>.b"]);
    assert_eq!(o.status.code(), Some(1));
    let big = "x".repeat(40_000);
    let o = d.ctl(&["bus", "pub", "--text", "a.b", &big]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("msg_too_large"));
}

#[test]
fn system_events_are_published_under_aither() {
    let d = daemon();
    let name = unique("sys");
    let sub = d
        .cmd(&[
            "bus",
            "sub",
            &format!("aither.agent.{name}.>"),
            "--json",
            "-n",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.ok(&["spawn", "--policy", "strict", &name, "--", "sleep", "60"]);
    let out = sub.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let subjects: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["subject"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        subjects[0],
        format!("aither.agent.{name}.created"),
        "{text}"
    );
}

fn frame(body: &str) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body.as_bytes());
    f
}

fn read_json(s: &mut std::os::unix::net::UnixStream) -> Value {
    use std::io::Read;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// Pipelined publishes in one write, live, durable, malformed and denied mixed: a reply to
/// each, in order; the payload reaches the subscriber as the publisher wrote it (no
/// re-encoding: its whitespace and number spelling stay), and a lone-surrogate escape, which
/// a strict decoder refuses, is refused at the publish as before.
#[test]
fn an_operators_pipelined_publishes_pass_data_through_and_are_answered_in_order() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let d = daemon();
    let mut sub = UnixStream::connect(d.socket()).unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sub.write_all(&frame(r#"{"op":"bus_sub","pattern":"raw.>"}"#))
        .unwrap();
    let first = read_json(&mut sub);
    assert_eq!(first["ok"], true, "{first}");
    let mut p = UnixStream::connect(d.socket()).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let data = r#"{"a": 1.50,  "b" :[1 ,2e3], "s":"\"q\" é"}"#;
    let bodies = [
        format!(r#"{{"op":"bus_pub","subject":"raw.a","data":{data}}}"#),
        format!(r#"{{"op":"bus_pub","subject":"raw.b","data":{data},"durable":true}}"#),
        r#"{"op":"bus_pub","subject":"raw.c"}"#.to_string(),
        r#"{"op":"bus_pub","subject":"raw..c","data":1}"#.to_string(),
        r#"{"op":"bus_pub","subject":"raw.d","data":"\ud800"}"#.to_string(),
        r#"{"op":"ping"}"#.to_string(),
        r#"{"op":"bus_pub","subject":"raw.e","data":[ 7 ]}"#.to_string(),
    ];
    let all: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
    p.write_all(&all).unwrap();
    let replies: Vec<Value> = (0..bodies.len()).map(|_| read_json(&mut p)).collect();
    assert_eq!(
        replies[0],
        serde_json::json!({"ok": true, "data": {"seq": null}})
    );
    assert_eq!(replies[1]["ok"], true, "{}", replies[1]);
    assert!(
        replies[1]["data"]["seq"].as_u64().unwrap() >= 1,
        "{}",
        replies[1]
    );
    assert_eq!(replies[2]["error"]["code"], "bad_request", "{}", replies[2]);
    assert!(
        replies[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data"),
        "{}",
        replies[2]
    );
    assert_eq!(replies[3]["error"]["code"], "invalid", "{}", replies[3]);
    assert_eq!(replies[4]["ok"], false, "{}", replies[4]);
    assert_eq!(replies[5]["data"]["pong"], true, "{}", replies[5]);
    assert_eq!(replies[6]["ok"], true, "{}", replies[6]);
    // The subscriber: raw.a, raw.b, raw.e, data byte for byte as published.
    let mut raw = Vec::new();
    for _ in 0..3 {
        use std::io::Read;
        let mut len = [0u8; 4];
        sub.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        sub.read_exact(&mut body).unwrap();
        raw.push(String::from_utf8(body).unwrap());
    }
    for (r, subject) in raw.iter().zip(["raw.a", "raw.b", "raw.e"]) {
        let v: Value = serde_json::from_str(r).unwrap();
        assert_eq!(v["data"]["subject"], subject, "{r}");
    }
    assert!(
        raw[0].ends_with(&format!(",\"data\":{data}}}}}")),
        "{}",
        raw[0]
    );
    assert!(
        raw[1].ends_with(&format!(",\"data\":{data}}}}}")),
        "{}",
        raw[1]
    );
    assert!(raw[2].ends_with(",\"data\":[ 7 ]}}"), "{}", raw[2]);
}

/// Operator subscribers are written by the publisher itself while their connection is idle
/// (docs/bus.md "Direct writes"). One that stops reading fills its socket: the rest goes to
/// its queue (bounded, drop-oldest, counted) and its writer, and once it reads again it gets
/// every message in order, none twice, each loss counted. One that never reads stays within
/// its queue, and neither holds up the publisher or grows the daemon.
#[test]
fn operator_subscribers_that_stall_keep_order_and_bounds_and_do_not_hold_up_the_publisher() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let d = daemon();
    let subscribe = |pattern: &str, queue: u32| {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&frame(&format!(
            r#"{{"op":"bus_sub","pattern":"{pattern}","queue":{queue}}}"#
        )))
        .unwrap();
        let first = read_json(&mut s);
        assert_eq!(first["ok"], true, "{first}");
        s
    };
    // Paused while the first messages go, then read to the end.
    let mut paused = subscribe("flood.>", 65536);
    // Never read.
    let _stalled = subscribe("flood.*", 16);
    let mut p = UnixStream::connect(d.socket()).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let pad = "y".repeat(1000);
    let mut next = 0u64;
    // Pipelined 500 at a time (their replies fit the socket), then every reply read: a
    // publisher waiting on a subscriber would time out.
    let mut publish = |n: u64| {
        let end = next + n;
        while next < end {
            let k = (end - next).min(500);
            let mut all = Vec::new();
            for _ in 0..k {
                all.extend(frame(&format!(
                    r#"{{"op":"bus_pub","subject":"flood.x","data":[{next},"{pad}"]}}"#
                )));
                next += 1;
            }
            p.write_all(&all).unwrap();
            for _ in 0..k {
                let r = read_json(&mut p);
                assert_eq!(r["ok"], true, "{r}");
            }
        }
    };
    let sub_of = |st: &Value, pattern: &str| -> Value {
        st["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["pattern"] == pattern)
            .cloned()
            .unwrap_or_else(|| panic!("no subscription {pattern}: {st}"))
    };
    // 1,000 × 1 KB: more than the paused subscriber's socket takes (its queue holds the rest:
    // the direct path handed over), less than its socket and 1 MiB queue (nothing lost).
    let first = 1000;
    publish(first);
    let st = d.streams();
    let s = sub_of(&st, "flood.>");
    assert!(s["queued"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["dropped"], 0, "{s}");
    let pid = d.child.as_ref().unwrap().id();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let rss0 = rss();
    // It reads again: first what was kept for it while it paused (all of it, in order: the
    // queue held what its socket did not take, nothing was dropped) ...
    let mut kept = Vec::new();
    for _ in 0..first {
        let v = read_json(&mut paused);
        assert_eq!(v["more"], true, "{v}");
        assert_eq!(v["data"]["dropped"], 0, "{v}");
        kept.push(v["data"]["data"][0].as_u64().unwrap());
    }
    assert_eq!(kept, (0..first).collect::<Vec<_>>(), "lost while paused");
    // ... then on, while 9,000 more go out as fast as the publisher can send them (a slow
    // reader may now lose the oldest, each one counted).
    let total = 10_000u64;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut dropped = 0;
        loop {
            let v = read_json(&mut paused);
            assert_eq!(v["more"], true, "{v}");
            dropped += v["data"]["dropped"].as_u64().unwrap();
            let n = v["data"]["data"][0].as_u64().unwrap();
            got.push(n);
            if n == total - 1 {
                return (got, dropped);
            }
        }
    });
    publish(total - first);
    let (got, dropped) = reader.join().unwrap();
    // In order, none twice, and everything missing counted as dropped.
    assert!(got[0] >= first, "{} delivered twice", got[0]);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order");
    assert_eq!(
        got.len() as u64 + dropped,
        total - first,
        "{dropped} dropped"
    );
    let st = d.streams();
    let s = sub_of(&st, "flood.*");
    assert!(s["queued"].as_u64().unwrap() <= 16, "{s}");
    assert!(s["dropped"].as_u64().unwrap() > 0, "{s}");
    // 9 MB went through; the daemon kept at most the queues' worth.
    let grown = rss().saturating_sub(rss0);
    assert!(grown < 16 * 1024, "aitherd grew by {grown} KiB");
}
