//! The SDK against a fake daemon on a socketpair.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use aither_sdk::{Channel, FrameError, Heartbeat, SdkError, Severity, MAX_FRAME, MAX_TEXT};
use serde_json::{json, Map, Value};

fn pair() -> (Channel, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (Channel::from_fd(ours.into()), theirs)
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[test]
fn every_op_round_trips() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| {
        let mut reply = common::ok(req);
        if req["op"] == "memory.get" {
            reply["value"] = json!("remembered");
        }
        common::send(s, &reply);
    });
    channel.ready().unwrap();
    channel.heartbeat().unwrap();
    channel.pain(Severity::Warning, "disk almost full").unwrap();
    channel.status("indexing 3/10").unwrap();
    let reply = channel
        .request("memory.get", fields(json!({"key": "k"})))
        .unwrap();
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["value"], "remembered");
    drop(channel);

    let seen = daemon.join().unwrap();
    let strip_id = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("id");
        v
    };
    let stripped: Vec<Value> = seen.iter().map(strip_id).collect();
    assert_eq!(
        stripped,
        vec![
            json!({"op": "ready"}),
            json!({"op": "heartbeat"}),
            json!({"op": "pain", "severity": "warning", "reason": "disk almost full"}),
            json!({"op": "status", "text": "indexing 3/10"}),
            json!({"op": "memory.get", "key": "k"}),
        ]
    );
    let ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids are fresh: {ids:?}"
    );
    assert!(ids.iter().all(|id| *id < 1 << 53));
}

#[test]
fn frames_are_big_endian_length_then_json() {
    let (channel, mut daemon_end) = pair();
    let t = std::thread::spawn(move || channel.ready());
    let mut header = [0u8; 4];
    std::io::Read::read_exact(&mut daemon_end, &mut header).unwrap();
    let len = u32::from_be_bytes(header) as usize;
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(&mut daemon_end, &mut body).unwrap();
    let req: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(req["op"], "ready");
    // The reply written by hand, byte for byte.
    let reply = format!(r#"{{"id":{},"ok":true}}"#, req["id"]);
    let mut wire = (reply.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(reply.as_bytes());
    daemon_end.write_all(&wire).unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn replies_for_other_ids_are_skipped() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| {
        // Another process sharing the descriptor, then a reply with no id that does not end
        // the channel, then ours.
        common::send(
            s,
            &json!({"id": 1, "ok": false, "error": {"code": "denied", "message": "not yours"}}),
        );
        common::send(
            s,
            &json!({"ok": false, "error": {"code": "bad_json", "message": "someone else's"}}),
        );
        common::send(s, &common::ok(req));
    });
    channel.heartbeat().unwrap();
    channel.status("still fine").unwrap();
    drop(channel);
    assert_eq!(daemon.join().unwrap().len(), 2);
}

#[test]
fn error_replies_map_to_remote() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| {
        let reply = match req["op"].as_str().unwrap() {
            "pain" => common::err(req, "denied", "the token does not grant pain"),
            "bus.publish" => common::err(req, "unknown_op", "unknown op \"bus.publish\""),
            _ => common::ok(req),
        };
        common::send(s, &reply);
    });
    let e = channel
        .pain(Severity::Critical, "out of memory")
        .unwrap_err();
    assert!(
        matches!(&e, SdkError::Remote { code, message } if code == "denied" && message == "the token does not grant pain"),
        "{e:?}"
    );
    assert_eq!(e.remote_code(), Some("denied"));
    assert_eq!(e.to_string(), "denied: the token does not grant pain");
    let e = channel.request("bus.publish", Map::new()).unwrap_err();
    assert_eq!(e.remote_code(), Some("unknown_op"));
    // An error reply leaves the channel usable.
    channel.ready().unwrap();
    drop(channel);
    daemon.join().unwrap();
}

#[test]
fn oversize_requests_are_refused_before_writing() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn_ok(daemon_end);
    let blob = "x".repeat(MAX_FRAME);
    let e = channel
        .request("memory.put", fields(json!({"key": "k", "value": blob})))
        .unwrap_err();
    assert!(
        matches!(e, SdkError::Frame(FrameError::TooLarge { len: n, .. }) if n > MAX_FRAME as u64),
        "{e:?}"
    );

    let long = "é".repeat(MAX_TEXT / 2 + 1);
    let e = channel.pain(Severity::Info, &long).unwrap_err();
    assert!(
        matches!(e, SdkError::TooLong { field: "reason", len } if len == MAX_TEXT + 2),
        "{e:?}"
    );
    let e = channel.status(&"s".repeat(MAX_TEXT + 1)).unwrap_err();
    assert!(
        matches!(e, SdkError::TooLong { field: "text", .. }),
        "{e:?}"
    );
    channel.status(&"s".repeat(MAX_TEXT)).unwrap();

    // Nothing reached the daemon but the one valid request; the channel still works.
    channel.ready().unwrap();
    drop(channel);
    let seen = daemon.join().unwrap();
    let ops: Vec<&str> = seen.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["status", "ready"]);
}

#[test]
fn reserved_fields_are_refused() {
    let (channel, _daemon_end) = pair();
    for key in ["id", "op"] {
        let e = channel.request("x", fields(json!({key: 1}))).unwrap_err();
        assert!(matches!(e, SdkError::ReservedField(k) if k == key));
    }
}

#[test]
fn eof_before_the_reply_is_closed_then_broken() {
    let (channel, mut daemon_end) = pair();
    let daemon = std::thread::spawn(move || {
        let req = common::read_raw(&mut daemon_end).unwrap();
        drop(daemon_end);
        req
    });
    assert!(matches!(channel.ready(), Err(SdkError::Closed)));
    assert!(matches!(channel.heartbeat(), Err(SdkError::Broken)));
    daemon.join().unwrap();
}

#[test]
fn eof_inside_a_reply_is_truncated() {
    let (channel, mut daemon_end) = pair();
    let daemon = std::thread::spawn(move || {
        common::read_raw(&mut daemon_end).unwrap();
        daemon_end.write_all(b"\0\0\0\x20{\"id\"").unwrap();
    });
    let e = channel.ready().unwrap_err();
    assert!(matches!(e, SdkError::Frame(FrameError::Truncated)), "{e:?}");
    assert!(matches!(channel.ready(), Err(SdkError::Broken)));
    daemon.join().unwrap();
}

#[test]
fn fatal_id_less_error_ends_the_channel() {
    let (channel, mut daemon_end) = pair();
    let daemon = std::thread::spawn(move || {
        common::read_raw(&mut daemon_end).unwrap();
        common::send(
            &mut daemon_end,
            &json!({"ok": false, "error": {"code": "too_large", "message": "frame of 70000 bytes"}}),
        );
    });
    let e = channel.ready().unwrap_err();
    assert_eq!(e.remote_code(), Some("too_large"));
    assert!(matches!(channel.ready(), Err(SdkError::Broken)));
    daemon.join().unwrap();
}

#[test]
fn malformed_replies_are_reported() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| match req["op"].as_str().unwrap() {
        "a" => common::send_raw(s, b"not json"),
        "b" => common::send(s, &json!({"id": req["id"]})),
        "c" => common::send(s, &json!({"id": req["id"], "ok": false, "error": "denied"})),
        _ => common::send(s, &common::ok(req)),
    });
    for op in ["a", "b", "c"] {
        let e = channel.request(op, Map::new()).unwrap_err();
        assert!(matches!(e, SdkError::BadReply(_)), "{op}: {e:?}");
    }
    // The framing held, so the channel is still usable.
    channel.ready().unwrap();
    drop(channel);
    daemon.join().unwrap();
}

#[test]
fn a_read_timeout_breaks_the_channel() {
    let (channel, daemon_end) = pair();
    channel
        .set_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let e = channel.ready().unwrap_err();
    assert!(matches!(e, SdkError::Frame(FrameError::Io(_))), "{e:?}");
    assert!(matches!(channel.ready(), Err(SdkError::Broken)));
    drop(daemon_end);
}

#[test]
fn threads_share_one_channel() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn_ok(daemon_end);
    let channel = Arc::new(channel);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let channel = Arc::clone(&channel);
            std::thread::spawn(move || {
                for j in 0..50 {
                    channel.status(&format!("thread {i} step {j}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(channel);
    let seen = daemon.join().unwrap();
    assert_eq!(seen.len(), 200);
    let mut ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every request had its own id");
}

#[test]
fn heartbeat_thread_beats_until_stopped() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn_ok(daemon_end);
    let channel = Arc::new(channel);
    let beat = Heartbeat::spawn(Arc::clone(&channel), Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(beat.is_running());
    beat.stop().unwrap();
    channel.status("done").unwrap();
    drop(channel);
    let seen = daemon.join().unwrap();
    let beats = seen.iter().filter(|r| r["op"] == "heartbeat").count();
    assert!(beats >= 3, "{beats} heartbeats in 150 ms at 10 ms");
    assert_eq!(
        seen.last().unwrap()["op"],
        "status",
        "no heartbeat after stop"
    );
}

#[test]
fn heartbeat_thread_reports_what_stopped_it() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| {
        common::send(s, &common::err(req, "denied", "no watchdog in this token"))
    });
    let channel = Arc::new(channel);
    let beat = Heartbeat::spawn(Arc::clone(&channel), Duration::from_millis(10)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while beat.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(beat.stop().unwrap_err().remote_code(), Some("denied"));
    drop(channel);
    assert_eq!(daemon.join().unwrap().len(), 1);
}

#[test]
fn bus_pushes_are_queued_apart_from_replies_and_resets_resubscribe() {
    let (channel, daemon_end) = pair();
    let mut subs = 0u64;
    let daemon = common::spawn(daemon_end, move |req, s| {
        match req["op"].as_str().unwrap() {
            "bus.subscribe" => {
                subs += 1;
                // A push may come before the reply of the request in flight.
                if subs == 1 {
                    common::send(
                        s,
                        &json!({"push": "bus.msg", "sub": 1, "seq": 7, "subject": "a.b", "data": {"n": 1}, "ts_ms": 5}),
                    );
                }
                common::send(
                    s,
                    &json!({"id": req["id"], "ok": true, "data": {"sub": subs}}),
                );
            }
            "heartbeat" => {
                // The daemon restarted: the SDK subscribes again (as sub 2 now).
                common::send(s, &json!({"push": "bus.reset"}));
                common::send(s, &common::ok(req));
            }
            "status" => {
                common::send(
                    s,
                    &json!({"push": "bus.msg", "sub": 2, "seq": 8, "subject": "a.c", "data": null, "ts_ms": 6, "dropped": 3}),
                );
                common::send(s, &common::ok(req));
            }
            _ => common::send(s, &common::ok(req)),
        }
    });
    let id = channel.subscribe("a.>").unwrap();
    let m = channel
        .next_message(Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    assert_eq!((m.sub, m.seq, m.subject.as_str()), (id, Some(7), "a.b"));
    assert_eq!(m.data, json!({"n": 1}));
    assert!(channel
        .next_message(Some(Duration::from_millis(50)))
        .unwrap()
        .is_none());
    channel.heartbeat().unwrap();
    channel.status("x").unwrap();
    let m = channel
        .next_message(Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    // Reported under the id the caller knows, with the overflow count.
    assert_eq!((m.sub, m.seq, m.dropped), (id, Some(8), 3));
    drop(channel);
    let reqs = daemon.join().unwrap();
    assert_eq!(
        reqs.iter().filter(|r| r["op"] == "bus.subscribe").count(),
        2
    );
}

#[test]
fn gpu_lease_parses_each_state_and_an_old_daemon_is_gpu_unavailable() {
    use aither_sdk::{ErrorCode, GpuDevice, GpuState};
    let (channel, daemon_end) = pair();
    let mut n = 0;
    let daemon = common::spawn(daemon_end, move |req, s| {
        n += 1;
        let data = match n {
            1 => {
                return common::send(
                    s,
                    &common::err(req, "unknown_op", "unknown op \"gpu.lease\""),
                )
            }
            2 => json!({"granted": false, "state": "none", "devices": []}),
            3 => json!({"granted": false, "state": "queued", "devices": []}),
            _ => json!({"granted": true, "state": "granted", "visible_devices": "1",
                        "devices": [{"index": 1, "uuid": "GPU-sim-1", "name": "Simulated",
                                     "vram_mb": 2048, "total_mb": 8192, "node": "/dev/nvidia1",
                                     "later": "ignored"}]}),
        };
        common::send(s, &json!({"id": req["id"], "ok": true, "data": data}));
    });
    let e = channel.gpu_lease().unwrap_err();
    assert!(matches!(e, SdkError::GpuUnavailable(_)), "{e}");
    assert_eq!(e.code(), Some(ErrorCode::UnknownOp));
    assert!(
        e.to_string().starts_with("GPU service not available"),
        "{e}"
    );
    let none = channel.gpu_lease().unwrap();
    assert_eq!(
        (none.granted, none.state, none.devices.len()),
        (false, GpuState::None, 0)
    );
    assert_eq!(channel.gpu_lease().unwrap().state, GpuState::Queued);
    let lease = channel.gpu_lease().unwrap();
    assert!(lease.granted);
    assert_eq!(lease.state, GpuState::Granted);
    assert_eq!(lease.visible_devices, "1");
    assert_eq!(
        lease.devices,
        [GpuDevice {
            index: 1,
            uuid: "GPU-sim-1".into(),
            name: "Simulated".into(),
            vram_mb: 2048,
            total_mb: 8192,
            node: "/dev/nvidia1".into(),
        }]
    );
    drop(channel);
    let seen = daemon.join().unwrap();
    assert!(seen.iter().all(|r| r["op"] == "gpu.lease"));
}

#[test]
fn refusals_have_typed_codes() {
    use aither_sdk::{ErrorCode, Tier};
    let (channel, daemon_end) = pair();
    let daemon = common::spawn(daemon_end, |req, s| {
        let (code, msg) = match req["op"].as_str().unwrap() {
            "mem.put" => ("quota", "quota_bytes"),
            "bus.publish" => ("denied", "no"),
            "mem.get" => ("not_found", "absent"),
            "bus.subscribe" => ("invalid", "invalid pattern"),
            _ => ("internal", "boom"),
        };
        common::send(s, &common::err(req, code, msg));
    });
    let code = |r: Result<(), SdkError>| r.unwrap_err().code();
    assert_eq!(
        code(channel.mem_put(Tier::Active, "k", &json!(1), None)),
        Some(ErrorCode::Quota)
    );
    assert_eq!(
        code(channel.publish("a.b", &json!(1))),
        Some(ErrorCode::Denied)
    );
    assert_eq!(channel.mem_get(Tier::Active, "k").unwrap(), None);
    assert_eq!(
        code(channel.subscribe("a..b").map(drop)),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(code(channel.ready()), Some(ErrorCode::Other));
    // Refused before sending, with the code the daemon would have given.
    let big = json!("x".repeat(aither_sdk::MAX_DATA));
    assert_eq!(
        code(channel.publish("a.b", &big)),
        Some(ErrorCode::MsgTooLarge)
    );
    assert_eq!(
        code(channel.status(&"x".repeat(MAX_TEXT + 1))),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(code(channel.unsubscribe(42)), Some(ErrorCode::NotFound));
    let e = Heartbeat::spawn(Arc::new(pair().0), Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Invalid));
    drop(channel);
    assert_eq!(daemon.join().unwrap().len(), 5);
}

#[test]
fn messages_are_read_per_subscription_iterated_and_unsubscribed() {
    let (channel, daemon_end) = pair();
    let msg = |sub: u64, data: &str| json!({"push": "bus.msg", "sub": sub, "seq": null, "subject": "x.y", "ts_ms": 1, "data": data});
    let daemon = common::spawn(daemon_end, move |req, s| {
        match (req["op"].as_str().unwrap(), req["pattern"].as_str()) {
            ("bus.subscribe", Some("a.>")) => {
                common::send(s, &json!({"id": req["id"], "ok": true, "data": {"sub": 7}}))
            }
            ("bus.subscribe", _) => {
                // Pushes before the reply are queued, not lost.
                common::send(s, &msg(7, "a1"));
                common::send(s, &msg(8, "b1"));
                common::send(s, &json!({"id": req["id"], "ok": true, "data": {"sub": 8}}));
                common::send(s, &msg(7, "a2"));
                common::send(s, &msg(8, "b2"));
            }
            _ => common::send(s, &common::ok(req)),
        }
    });
    let a = channel.subscribe("a.>").unwrap();
    let b = channel.subscribe("b.>").unwrap();
    let t = Some(Duration::from_secs(5));
    let first_b = channel.next_message_for(b, t).unwrap().unwrap();
    assert_eq!((first_b.sub, first_b.data.clone()), (8, json!("b1")));
    let of_a: Vec<Value> = channel
        .messages(Some(a), Some(Duration::from_millis(200)))
        .map(|m| m.unwrap().data)
        .collect();
    assert_eq!(of_a, [json!("a1"), json!("a2")]);
    channel.unsubscribe(b).unwrap();
    // b2 went with its subscription.
    assert!(channel
        .next_message(Some(Duration::from_millis(100)))
        .unwrap()
        .is_none());
    assert!(matches!(
        channel.unsubscribe(b),
        Err(SdkError::NoSubscription(8))
    ));
    drop(channel);
    let seen = daemon.join().unwrap();
    assert_eq!(seen.last().unwrap()["op"], "bus.unsubscribe");
    assert_eq!(seen.last().unwrap()["sub"], 8);
}

#[test]
fn a_heartbeat_thread_beats_while_another_thread_waits_for_messages() {
    let (channel, daemon_end) = pair();
    let daemon = common::spawn_ok(daemon_end);
    let channel = Arc::new(channel);
    channel.status("start").unwrap();
    let beat = Heartbeat::spawn(Arc::clone(&channel), Duration::from_millis(20)).unwrap();
    // 600 ms of waiting for a message that never comes, holding the channel only in slices.
    assert!(channel
        .next_message(Some(Duration::from_millis(600)))
        .unwrap()
        .is_none());
    beat.stop().unwrap();
    channel.status("end").unwrap();
    drop(channel);
    let seen = daemon.join().unwrap();
    let beats = seen.iter().filter(|r| r["op"] == "heartbeat").count();
    // Every 20 ms for 600 ms is about 30; a reader holding the channel throughout lets one in.
    assert!(beats >= 10, "{beats} heartbeats while next_message waited");
}
