//! runtime/python/aither.py, driven by runtime/python/test_aither.py under python3 with a
//! socketpair as fd 3 and this fake daemon on the other end.

mod common;

use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

#[test]
fn python_module_against_fake_daemon() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/test_aither.py");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let daemon = common::spawn(ours, |req, s| {
        let reply = match req["op"].as_str().unwrap_or_default() {
            "memory.get" => json!({"id": req["id"], "ok": true, "value": "v"}),
            "bus.publish" => common::err(req, "denied", "token does not grant bus.publish"),
            "no.such.op" => common::err(req, "unknown_op", "unknown op \"no.such.op\""),
            "noisy" => {
                common::send(s, &json!({"id": 12345, "ok": true}));
                common::ok(req)
            }
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
    let (beats, rest): (Vec<Value>, Vec<Value>) = seen
        .iter()
        .map(strip)
        .partition(|r| *r == json!({"op": "heartbeat"}));
    assert!(
        beats.len() >= 4,
        "one heartbeat, then the thread's: {}",
        beats.len()
    );
    assert_eq!(
        rest,
        [
            json!({"op": "ready"}),
            json!({"op": "pain", "severity": "error", "reason": "oom soon"}),
            json!({"op": "status", "text": "step 3/10"}),
            json!({"op": "memory.get", "key": "k"}),
            json!({"op": "bus.publish", "topic": "t"}),
            json!({"op": "no.such.op"}),
            json!({"op": "noisy"}),
            json!({"op": "status", "text": "python done"}),
        ]
    );
}
