//! The memory calls against a fake daemon: what goes on the wire, what comes back.

mod common;

use std::os::unix::net::UnixStream;

use aither_sdk::{Channel, SdkError, Tier};
use serde_json::{json, Value};

#[test]
fn memory_calls_send_the_documented_fields_and_map_not_found_to_none() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let channel = Channel::from_fd(ours.into());
    let daemon = common::spawn(theirs, |req, s| {
        let reply = match (req["op"].as_str().unwrap(), req["key"].as_str()) {
            ("mem.get", Some("absent")) => common::err(req, "not_found", "no key"),
            ("mem.get", _) => {
                json!({"id": req["id"], "ok": true, "data": {"key": req["key"], "value": {"n": 1}}})
            }
            ("mem.put", _) if req["tier"] == "spirit" => {
                common::err(req, "denied", "memory_tiers.spirit.write is false")
            }
            ("mem.search", _) => {
                json!({"id": req["id"], "ok": true, "data": {"hits": [{"key": "fact"}]}})
            }
            ("mem.delete", _) => json!({"id": req["id"], "ok": true, "data": {"deleted": true}}),
            _ => json!({"id": req["id"], "ok": true, "data": {}}),
        };
        common::send(s, &reply);
    });
    channel
        .mem_put(Tier::Active, "step", &json!(3), Some(60))
        .unwrap();
    assert_eq!(
        channel.mem_get(Tier::Active, "step").unwrap(),
        Some(json!({"n": 1}))
    );
    assert_eq!(channel.mem_get(Tier::Active, "absent").unwrap(), None);
    let e = channel
        .mem_put(Tier::Spirit, "persona", &json!("x"), None)
        .unwrap_err();
    assert!(matches!(&e, SdkError::Remote { code, .. } if code == "denied"));
    assert_eq!(
        channel.mem_search("ownership", 5).unwrap()[0]["key"],
        "fact"
    );
    assert!(channel.mem_delete(Tier::Knowledge, "k").unwrap());
    channel
        .graph_add_node("main", "fn", json!({"line": 1}))
        .unwrap();
    channel
        .graph_add_edge("main", "parse", "calls", json!({}))
        .unwrap();
    channel.graph_neighbors("main", 2, None).unwrap();
    drop(channel);
    let seen: Vec<Value> = daemon.join().unwrap();
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("id");
        v
    };
    let seen: Vec<Value> = seen.into_iter().map(strip).collect();
    assert_eq!(
        seen[0],
        json!({"op": "mem.put", "tier": "active", "key": "step", "value": 3, "ttl_s": 60})
    );
    assert_eq!(
        seen[1],
        json!({"op": "mem.get", "tier": "active", "key": "step", "owner": null})
    );
    assert_eq!(
        seen[6],
        json!({"op": "mem.graph.add_node", "node": "main", "kind": "fn", "props": {"line": 1}})
    );
    assert_eq!(
        seen[7],
        json!({"op": "mem.graph.add_edge", "from": "main", "to": "parse", "kind": "calls", "props": {}})
    );
    assert_eq!(
        seen[8],
        json!({"op": "mem.graph.neighbors", "node": "main", "depth": 2, "kind": null})
    );
}
