//! runtime/python/aither.py, driven by runtime/python/test_aither.py under python3 with a
//! socketpair as fd 3 and this fake daemon on the other end.

mod common;

use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

#[test]
fn python_module_against_fake_daemon() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/test_aither.py");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut gpu_calls = 0;
    let mut refuse_heartbeats = false;
    let daemon = common::spawn(ours, move |req, s| {
        let msg = |sub: u64, seq: Value, data: &str| {
            json!({"push": "bus.msg", "sub": sub, "seq": seq, "subject": "x.y", "ts_ms": 1,
                   "publisher": "op", "dropped": 0, "data": data})
        };
        let reply = match req["op"].as_str().unwrap_or_default() {
            "memory.get" => json!({"id": req["id"], "ok": true, "value": "v"}),
            "pain" => json!({"id": req["id"], "ok": true, "data": {"action": "log"}}),
            "bus.publish" => common::err(req, "denied", "token does not grant bus.publish"),
            "no.such.op" => common::err(req, "unknown_op", "unknown op \"no.such.op\""),
            "mem.put" => common::err(req, "quota", "quota_bytes would be 17M, limit 16M"),
            "mem.get" => common::err(req, "not_found", "no key"),
            "noisy" => {
                common::send(s, &json!({"id": 12345, "ok": true}));
                common::ok(req)
            }
            "gpu.lease" => {
                gpu_calls += 1;
                match gpu_calls {
                    1 => common::err(req, "unknown_op", "unknown op \"gpu.lease\""),
                    2 => json!({"id": req["id"], "ok": true, "data": {
                        "granted": true, "state": "granted", "visible_devices": "0",
                        "devices": [{"index": 0, "uuid": "GPU-sim-0", "name": "Simulated GPU",
                                     "vram_mb": 1024, "total_mb": 16384, "node": "/dev/nvidia0",
                                     "future_field": 1}]}}),
                    _ => json!({"id": req["id"], "ok": true, "data": {
                        "granted": false, "state": "none", "devices": []}}),
                }
            }
            "bus.subscribe" if req["pattern"] == "a.>" => {
                json!({"id": req["id"], "ok": true, "data": {"sub": 7}})
            }
            "bus.subscribe" => {
                // Pushes before the reply: the client must queue them, not lose them.
                common::send(s, &msg(7, json!(40), "a1"));
                common::send(s, &msg(8, Value::Null, "b1"));
                common::send(s, &json!({"id": req["id"], "ok": true, "data": {"sub": 8}}));
                common::send(s, &msg(7, json!(41), "a2"));
                msg(8, Value::Null, "b2")
            }
            "refuse-heartbeats" => {
                refuse_heartbeats = true;
                common::ok(req)
            }
            "heartbeat" if refuse_heartbeats => common::err(req, "denied", "no more"),
            _ => common::ok(req),
        };
        common::send(s, &reply);
    });
    let out = {
        // The Command holds a copy of the descriptor until dropped, at the end of this block.
        let mut python = common::with_fd3("python3", &[script], theirs.into());
        // No __pycache__ in the source tree.
        python.env("PYTHONDONTWRITEBYTECODE", "1");
        match python.output() {
            Ok(out) => out,
            Err(e) => panic!("this test needs python3 on PATH: {e}"),
        }
    };
    let seen = daemon.join().unwrap();
    assert!(
        out.status.success(),
        "test_aither.py failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for req in &seen {
        let id = req["id"].as_u64().expect("every request has a u64 id");
        assert!(id < 1 << 53);
    }
    let strip = |req: &Value| {
        let mut req = req.clone();
        req.as_object_mut().unwrap().remove("id");
        req
    };
    let seen: Vec<Value> = seen.iter().map(strip).collect();
    // Heartbeats between the two marks: the thread kept beating while the main thread waited
    // 0.6 s for a bus message (every 20 ms: about 30; a channel held by the waiting reader
    // would let through one or two).
    let marks: Vec<usize> = (0..seen.len())
        .filter(|&i| seen[i] == json!({"op": "mark"}))
        .collect();
    assert_eq!(marks.len(), 2, "{seen:?}");
    let beats_while_waiting = seen[marks[0]..marks[1]]
        .iter()
        .filter(|r| **r == json!({"op": "heartbeat"}))
        .count();
    assert!(
        beats_while_waiting >= 10,
        "{beats_while_waiting} heartbeats while next_message waited"
    );
    let rest: Vec<Value> = seen
        .into_iter()
        .filter(|r| *r != json!({"op": "heartbeat"}) && *r != json!({"op": "mark"}))
        .collect();
    assert_eq!(
        rest,
        [
            json!({"op": "ready"}),
            json!({"op": "pain", "severity": "error", "reason": "oom soon"}),
            json!({"op": "status", "text": "step 3/10"}),
            json!({"op": "memory.get", "key": "k"}),
            json!({"op": "bus.publish", "topic": "t"}),
            json!({"op": "no.such.op"}),
            json!({"op": "mem.put", "tier": "active", "key": "big", "value": "x"}),
            json!({"op": "mem.get", "tier": "active", "key": "absent"}),
            json!({"op": "noisy"}),
            json!({"op": "gpu.lease"}),
            json!({"op": "gpu.lease"}),
            json!({"op": "gpu.lease"}),
            json!({"op": "bus.subscribe", "pattern": "a.>", "durable": "worker"}),
            json!({"op": "bus.subscribe", "pattern": "b.>"}),
            json!({"op": "bus.ack", "durable": "worker", "seq": 41}),
            json!({"op": "bus.unsubscribe", "sub": 8}),
            json!({"op": "refuse-heartbeats"}),
            json!({"op": "status", "text": "python done"}),
        ]
    );
}
