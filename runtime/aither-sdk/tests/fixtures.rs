//! The Rust SDK against the protocol fixtures (crates/aither-proto/fixtures): every agent
//! request it sends is the fixture's JSON (its id aside), and it reads each fixture reply and
//! push. The fake daemon answers with the fixtures' bytes, only the id replaced.

mod common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use aither_sdk::{Channel, ErrorCode, GpuState, Message, Severity, SubscribeOptions};
use serde_json::{json, Value};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/aither-proto/fixtures")
        .join(format!("{name}.json"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The fixture reply's bytes with `id` in place of the fixture's own.
fn with_id(name: &str, id: &Value) -> Vec<u8> {
    let bytes = fixture(name);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let old = format!("\"id\":{}", v["id"]);
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.matches(&old).count(), 1, "{name}");
    text.replacen(&old, &format!("\"id\":{id}"), 1).into_bytes()
}

#[test]
fn requests_are_the_fixtures_and_fixture_replies_are_understood() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let channel = Channel::from_fd(ours.into());
    let daemon = common::spawn(theirs, |req, s| {
        let reply = match req["op"].as_str().unwrap() {
            "heartbeat" => "agent.reply.rate_limited",
            "pain" => "agent.reply.pain",
            "gpu.lease" => "agent.reply.gpu_lease",
            "bus.publish" => "agent.reply.error",
            "bus.subscribe" => "agent.reply.bus_subscribe",
            _ => "agent.reply.ok",
        };
        common::send_raw(s, &with_id(reply, &req["id"]));
        if req["op"] == "bus.subscribe" {
            common::send_raw(s, &fixture("agent.push.bus_msg"));
        }
    });
    channel.ready().unwrap();
    let e = channel.heartbeat().unwrap_err();
    assert_eq!(e.remote_code(), Some("rate_limited"));
    channel.status("indexing 3/10").unwrap();
    assert_eq!(
        channel
            .pain(Severity::Warning, "rate-limited upstream")
            .unwrap()
            .as_deref(),
        Some("log")
    );
    let lease = channel.gpu_lease().unwrap();
    assert_eq!(lease.state, GpuState::Granted);
    assert_eq!(
        (lease.priority, lease.exclusive, lease.devices[0].vram_mb),
        (Some(1), Some(false), 4096)
    );
    let e = channel
        .publish_durable("agent.indexer.done", &json!({"files": 3}))
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Denied));
    let opts = SubscribeOptions {
        durable: Some("worker".into()),
        queue: Some(64),
        ..Default::default()
    };
    let sub = channel.subscribe_with("agent.indexer.jobs", &opts).unwrap();
    assert_eq!(sub, 7);
    let msg = channel
        .next_message(Some(std::time::Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    let mut push: Value = serde_json::from_slice(&fixture("agent.push.bus_msg")).unwrap();
    push.as_object_mut().unwrap().remove("push");
    assert_eq!(msg, serde_json::from_value::<Message>(push).unwrap());
    channel.ack("worker", 42).unwrap();
    channel.unsubscribe(sub).unwrap();
    drop(channel);

    let seen = daemon.join().unwrap();
    let ops: Vec<&str> = seen.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "ready",
            "heartbeat",
            "status",
            "pain",
            "gpu.lease",
            "bus.publish",
            "bus.subscribe",
            "bus.ack",
            "bus.unsubscribe"
        ]
    );
    for req in seen {
        let op = req["op"].as_str().unwrap().replace('.', "_");
        let mut want: Value =
            serde_json::from_slice(&fixture(&format!("agent.request.{op}"))).unwrap();
        let mut got = req.clone();
        assert!(got.as_object_mut().unwrap().remove("id").unwrap().is_u64());
        want.as_object_mut().unwrap().remove("id");
        assert_eq!(got, want, "{op}");
    }
}
