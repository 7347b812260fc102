//! Every fixture under fixtures/ (one per message kind) decodes as its type and re-encodes
//! byte for byte, and goes through the frame codec unchanged. The Python SDK is run against
//! the same files (tests/python.rs).

use std::path::{Path, PathBuf};

use aither_proto::frame::{encode_body, read_frame};
use aither_proto::{
    AgentFrame, AgentRequest, ErrorCode, ExitRecord, GpuLease, Push, Reply, Request, ShimEvent,
    Tier,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// Decodes `bytes` as `T` and encodes it again: the same bytes.
fn round_trip<T: Serialize + DeserializeOwned>(path: &Path, bytes: &[u8]) -> T {
    let v: T = serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{}: does not decode: {e}", path.display()));
    let again = serde_json::to_vec(&v).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(bytes),
        "{}: re-encoded differently",
        path.display()
    );
    v
}

#[test]
fn every_fixture_round_trips_byte_for_byte() {
    let all = fixtures();
    assert!(all.len() >= 40, "fixtures missing: {}", all.len());
    let mut control_ops = Vec::new();
    let mut agent_ops = Vec::new();
    for path in &all {
        let name = path.file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(path).unwrap();
        // The frame codec carries each body unchanged.
        let framed = encode_body(&bytes).unwrap();
        assert_eq!(&framed[..4], &(bytes.len() as u32).to_be_bytes());
        assert_eq!(read_frame(&mut &framed[..]).unwrap().unwrap(), bytes);
        let kind = name.rsplit_once('.').unwrap().0;
        match kind
            .split_once('.')
            .map(|(a, b)| (a, b.split('.').next().unwrap()))
        {
            Some(("control", "request")) => {
                let r: Request = round_trip(path, &bytes);
                let op = serde_json::to_value(&r).unwrap()["op"].clone();
                control_ops.push(op.as_str().unwrap().to_owned());
            }
            Some(("control", "reply")) | Some(("agent", "reply")) => {
                let r: Reply = round_trip(path, &bytes);
                assert_eq!(r.ok, r.error.is_none(), "{name}");
                if name == "agent.reply.gpu_lease.json" {
                    let data = r.data.clone().unwrap();
                    let lease: GpuLease = serde_json::from_value(data.clone()).unwrap();
                    assert_eq!(serde_json::to_value(&lease).unwrap(), data);
                    assert!(lease.granted && lease.devices.len() == 1);
                }
                if name == "control.reply.error_unknown_code.json" {
                    let code = r.error.unwrap().code;
                    assert_eq!(code, ErrorCode::Other("some_future_code".into()));
                }
            }
            Some(("agent", "request")) => {
                let f: AgentFrame = round_trip(path, &bytes);
                assert!(f.id.is_some(), "{name}");
                agent_ops.push(f.request.op());
            }
            Some(("agent", "push")) => {
                round_trip::<Push>(path, &bytes);
            }
            Some(("shim", "event")) => {
                round_trip::<ShimEvent>(path, &bytes);
            }
            Some(("shim", "exit")) => {
                round_trip::<ExitRecord>(path, &bytes);
            }
            Some(("error", "codes")) => {
                let codes: Vec<ErrorCode> = round_trip(path, &bytes);
                assert_eq!(codes, ErrorCode::KNOWN, "every known code has its fixture");
            }
            Some(("memory", "tiers")) => {
                let tiers: Vec<Tier> = round_trip(path, &bytes);
                assert_eq!(tiers, Tier::ALL);
            }
            _ => panic!("{name}: no type for this fixture"),
        }
    }
    // Every op of both enums has a fixture.
    control_ops.sort();
    let mut want: Vec<&str> = vec![
        "audit",
        "bus_ack",
        "bus_consumer_rm",
        "bus_pub",
        "bus_streams",
        "bus_sub",
        "events",
        "exec",
        "gpu_ls",
        "gpu_queue",
        "inspect",
        "kill",
        "logs",
        "mem",
        "pause",
        "ping",
        "ps",
        "restart",
        "resume",
        "rm",
        "run",
        "secret_ls",
        "secret_rm",
        "secret_set",
        "spawn",
        "stats",
        "stop",
    ];
    // exec twice: a command, and `aitherctl cp`'s (control.request.exec_cp.json).
    want.push("exec");
    want.sort();
    assert_eq!(control_ops, want);
    agent_ops.sort();
    let mut want_agent = vec![
        AgentRequest::Ready.op(),
        AgentRequest::Heartbeat.op(),
        "status",
        "pain",
        AgentRequest::GpuLease.op(),
        "bus.publish",
        "bus.subscribe",
        "bus.unsubscribe",
        "bus.ack",
    ];
    want_agent.sort();
    assert_eq!(agent_ops, want_agent);
}

#[test]
fn the_control_socket_refuses_unknown_ops_and_fields() {
    for bad in [
        r#"{"op":"reboot"}"#,
        r#"{"op":"inspect"}"#,
        r#"{"op":"spawn","name":"a","argv":[],"cwd":"/","colour":"red"}"#,
        r#"{"op":"stats","names":["a"],"uid":0}"#,
        r#"{"op":"stats","names":"a"}"#,
    ] {
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }
    // `stats` without names: every agent the caller may see.
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"op":"stats"}"#).unwrap(),
        Request::Stats { names: vec![] }
    );
    // Today's format, kept: serde's deny_unknown_fields does not reach the unit ops (ping,
    // ps, ...), which ignore extra fields.
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"op":"ping","extra":1}"#).unwrap(),
        Request::Ping
    );
    // The agent channel ignores fields it does not know (a newer SDK).
    let f: AgentFrame =
        serde_json::from_str(r#"{"id":1,"op":"status","text":"x","later":true}"#).unwrap();
    assert_eq!(f.request, AgentRequest::Status { text: "x".into() });
}
