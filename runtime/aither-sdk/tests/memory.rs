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

#[test]
fn listing_follows_pages_and_the_other_calls_send_their_fields() {
    use aither_sdk::SearchOptions;
    let (ours, theirs) = UnixStream::pair().unwrap();
    let channel = Channel::from_fd(ours.into());
    let daemon = common::spawn(theirs, |req, s| {
        let data = match req["op"].as_str().unwrap() {
            // Two pages: a, b (more, next b), then c.
            "mem.list" if req.get("after").is_none() => json!({
                "entries": [{"key": "a"}, {"key": "b"}], "more": true, "next": "b"}),
            "mem.list" => json!({"entries": [{"key": "c"}], "more": false, "next": null}),
            "mem.usage" => json!({"active": {"bytes": 3, "entries": 1}}),
            "mem.search" => json!({"hits": []}),
            "mem.graph.remove_node" => json!({"deleted": false}),
            _ => json!({}),
        };
        common::send(s, &json!({"id": req["id"], "ok": true, "data": data}));
    });
    let keys: Vec<Value> = channel
        .mem_list_of(Some("writer"), Tier::Knowledge, "", None)
        .unwrap()
        .into_iter()
        .map(|e| e["key"].clone())
        .collect();
    assert_eq!(keys, [json!("a"), json!("b"), json!("c")]);
    assert_eq!(channel.mem_usage().unwrap()["active"]["entries"], json!(1));
    let o = SearchOptions {
        limit: Some(3),
        owner: Some("writer".into()),
        any: true,
    };
    assert!(channel.mem_search_with("a b", &o).unwrap().is_empty());
    assert!(!channel.graph_remove_node("gone").unwrap());
    channel
        .graph_neighbors_of("writer", "main", 1, Some("calls"))
        .unwrap();
    drop(channel);
    let seen: Vec<Value> = daemon
        .join()
        .unwrap()
        .into_iter()
        .map(|mut v| {
            v.as_object_mut().unwrap().remove("id");
            v
        })
        .collect();
    assert_eq!(
        seen,
        [
            json!({"op": "mem.list", "tier": "knowledge", "prefix": "", "limit": 1000, "owner": "writer"}),
            json!({"op": "mem.list", "tier": "knowledge", "prefix": "", "limit": 1000, "owner": "writer", "after": "b"}),
            json!({"op": "mem.usage"}),
            json!({"op": "mem.search", "query": "a b", "limit": 3, "owner": "writer", "any": true}),
            json!({"op": "mem.graph.remove_node", "node": "gone"}),
            json!({"op": "mem.graph.neighbors", "node": "main", "depth": 1, "kind": "calls", "owner": "writer"}),
        ]
    );
}
