//! Tier semantics, quotas, grants, FTS and the graph, on a real database in a temp dir.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::store::SyncMode;
use super::*;
use crate::token::{Claims, MemoryGrant, TierClaim};

fn store() -> (tempfile::TempDir, MemoryStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = MemoryStore::open_with(&dir.path().join("memory.db"), SyncMode::Normal).unwrap();
    (dir, s)
}

fn claims(name: &str, tiers: &[(&str, bool, bool, u64, u64)]) -> Claims {
    let policy =
        crate::policy::Policy::parse(crate::policy::BUILTIN_POLICIES[0].1, "strict").unwrap();
    let mut c = Claims::from_policy_at(&policy, name, "t", 1, Duration::from_secs(60)).unwrap();
    c.memory_tiers = tiers
        .iter()
        .map(|(t, r, w, b, e)| {
            (
                t.to_string(),
                TierClaim {
                    read: *r,
                    write: *w,
                    quota_bytes: *b,
                    quota_entries: *e,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    c
}

fn all_rw(name: &str) -> Claims {
    claims(
        name,
        &Tier::ALL.map(|t| (t.as_str(), true, true, 1 << 20, 1000)),
    )
}

fn call(s: &MemoryStore, c: &Claims, req: Value) -> Result<Value, MemoryError> {
    service::handle(
        s,
        Actor::Agent {
            name: &c.subject,
            claims: c,
        },
        &c.subject,
        &req,
    )
}

fn op(s: &MemoryStore, req: Value) -> Result<Value, MemoryError> {
    service::handle(s, Actor::Operator, "a", &req)
}

#[test]
fn the_policy_defaults_reach_the_claims() {
    let policy =
        crate::policy::Policy::parse(crate::policy::BUILTIN_POLICIES[0].1, "strict").unwrap();
    let c = Claims::from_policy_at(&policy, "a", "t", 1, Duration::from_secs(60)).unwrap();
    let spirit = &c.memory_tiers["spirit"];
    assert!(spirit.read && !spirit.write);
    let working = &c.memory_tiers["working"];
    assert!(working.read && working.write);
    assert_eq!(working.quota_bytes, 16 << 20);
    assert_eq!(working.quota_entries, 10_000);
    assert_eq!(c.memory_tiers.len(), 5);
}

#[test]
fn put_get_list_delete_round_trip_on_every_kv_tier() {
    let (_d, s) = store();
    let c = all_rw("a");
    for t in ["working", "active", "spirit", "knowledge"] {
        call(
            &s,
            &c,
            json!({"op": "mem.put", "tier": t, "key": "k1", "value": {"n": 1}}),
        )
        .unwrap();
        call(
            &s,
            &c,
            json!({"op": "mem.put", "tier": t, "key": "k2", "value": "text"}),
        )
        .unwrap();
        let g = call(&s, &c, json!({"op": "mem.get", "tier": t, "key": "k1"})).unwrap();
        assert_eq!(g["value"], json!({"n": 1}), "{t}");
        let l = call(&s, &c, json!({"op": "mem.list", "tier": t})).unwrap();
        let keys: Vec<&str> = l["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        let del = call(&s, &c, json!({"op": "mem.delete", "tier": t, "key": "k1"})).unwrap();
        assert_eq!(del["deleted"], true);
        let e = call(&s, &c, json!({"op": "mem.get", "tier": t, "key": "k1"})).unwrap_err();
        assert_eq!(e.code(), "not_found");
    }
    let e = call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "codegraph", "key": "k", "value": 1}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "invalid");
}

#[test]
fn list_pages_with_prefix_and_after() {
    let (_d, s) = store();
    let c = all_rw("a");
    for k in ["a/1", "a/2", "a/3", "b/1"] {
        call(
            &s,
            &c,
            json!({"op": "mem.put", "tier": "working", "key": k, "value": 0}),
        )
        .unwrap();
    }
    let l = call(
        &s,
        &c,
        json!({"op": "mem.list", "tier": "working", "prefix": "a/", "limit": 2}),
    )
    .unwrap();
    assert_eq!(l["entries"].as_array().unwrap().len(), 2);
    assert_eq!(l["more"], true);
    let l2 = call(
        &s,
        &c,
        json!({"op": "mem.list", "tier": "working", "prefix": "a/", "after": l["next"]}),
    )
    .unwrap();
    assert_eq!(l2["entries"][0]["key"], "a/3");
    assert_eq!(l2["entries"].as_array().unwrap().len(), 1);
    assert_eq!(l2["more"], false);
}

#[test]
fn active_entries_expire_and_are_purged() {
    let (_d, s) = store();
    let c = all_rw("a");
    call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "active", "key": "short", "value": 1, "ttl_s": 1}),
    )
    .unwrap();
    let long = call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "active", "key": "long", "value": 2}),
    )
    .unwrap();
    let exp = long["expires_ms"].as_i64().unwrap();
    assert!(
        (exp - now_ms() - 86_400_000).abs() < 5_000,
        "default TTL 24h"
    );
    assert!(call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "active", "key": "short"})
    )
    .is_ok());
    std::thread::sleep(Duration::from_millis(1100));
    let e = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "active", "key": "short"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "not_found");
    // Still counted until purged; purged by the next put of the owner.
    assert_eq!(s.usage("a").unwrap()[&Tier::Active].entries, 2);
    call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "active", "key": "x", "value": 3}),
    )
    .unwrap();
    assert_eq!(s.usage("a").unwrap()[&Tier::Active].entries, 2);
    // TTL only on active.
    let e = call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "knowledge", "key": "k", "value": 1, "ttl_s": 5}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("only the active tier"), "{e}");
}

#[test]
fn quotas_refuse_cleanly_and_write_nothing() {
    let (_d, s) = store();
    let c = claims("a", &[("working", true, true, 100, 3)]);
    let put = |k: &str, v: &str| {
        call(
            &s,
            &c,
            json!({"op": "mem.put", "tier": "working", "key": k, "value": v}),
        )
    };
    put("a", "x").unwrap();
    put("b", "x").unwrap();
    put("c", "x").unwrap();
    let e = put("d", "x").unwrap_err();
    assert_eq!(e.code(), "quota");
    let msg = e.to_string();
    assert!(
        msg.contains("entries")
            && msg.contains("would be 4")
            && msg.contains("limit 3")
            && msg.contains("memory_tiers.working.quota_entries"),
        "{msg}"
    );
    // Overwriting within the limit is fine; growing past the byte limit is not.
    put("a", "y").unwrap();
    let big = "z".repeat(200);
    let e = put("a", &big).unwrap_err();
    assert!(e.to_string().contains("quota_bytes"), "{e}");
    // Nothing half-written: the old value and the usage are intact.
    let g = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "working", "key": "a"}),
    )
    .unwrap();
    assert_eq!(g["value"], "y");
    let u = s.usage("a").unwrap()[&Tier::Working];
    assert_eq!(u.entries, 3);
    assert_eq!(u.bytes, 3 * (1 + 3));
    // A batch over the quota is refused as a whole.
    let c2 = claims("b", &[("knowledge", true, true, 1 << 20, 2)]);
    let e = call(
        &s,
        &c2,
        json!({"op": "mem.put_many", "tier": "knowledge", "items": [
            {"key": "1", "value": "alpha"}, {"key": "2", "value": "beta"}, {"key": "3", "value": "gamma"}]}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "quota");
    assert!(s
        .usage("b")
        .unwrap()
        .get(&Tier::Knowledge)
        .is_none_or(|u| u.entries == 0));
    let hits = call(&s, &c2, json!({"op": "mem.search", "query": "alpha"})).unwrap();
    assert_eq!(
        hits["hits"].as_array().unwrap().len(),
        0,
        "no FTS rows left behind"
    );
}

#[test]
fn claims_gate_reads_and_writes() {
    let (_d, s) = store();
    let c = claims(
        "a",
        &[
            ("spirit", true, false, 1000, 10),
            ("active", false, true, 1000, 10),
        ],
    );
    let e = call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "spirit", "key": "p", "value": "x"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "denied");
    assert!(e.to_string().contains("memory_tiers.spirit.write"), "{e}");
    // The operator writes spirit; the agent reads it.
    op(
        &s,
        json!({"op": "mem.put", "tier": "spirit", "key": "p", "value": "be kind"}),
    )
    .unwrap();
    let g = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "spirit", "key": "p"}),
    )
    .unwrap();
    assert_eq!(g["value"], "be kind");
    let e = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "active", "key": "p"}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("memory_tiers.active.read"), "{e}");
    let e = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "knowledge", "key": "p"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "denied");
    assert!(e.to_string().contains("memory_tiers.knowledge"), "{e}");
    let e = call(&s, &c, json!({"op": "mem.export"})).unwrap_err();
    assert_eq!(e.code(), "denied");
}

#[test]
fn another_agents_memory_needs_a_grant_and_is_never_writable() {
    let (_d, s) = store();
    let b = all_rw("b");
    call(&s, &b, json!({"op": "mem.put", "tier": "knowledge", "key": "secret", "value": "the launch code is 42"}))
        .unwrap();
    let mut a = all_rw("a");
    let get = json!({"op": "mem.get", "tier": "knowledge", "key": "secret", "owner": "b"});
    let search = json!({"op": "mem.search", "query": "launch", "owner": "b"});
    let e = call(&s, &a, get.clone()).unwrap_err();
    assert_eq!(e.code(), "denied");
    assert!(e.to_string().contains("memory_grants"), "{e}");
    assert_eq!(call(&s, &a, search.clone()).unwrap_err().code(), "denied");
    // Their own search never sees b's rows.
    let own = call(&s, &a, json!({"op": "mem.search", "query": "launch"})).unwrap();
    assert_eq!(own["hits"].as_array().unwrap().len(), 0);

    a.memory_grants.push(MemoryGrant {
        owner: "b".into(),
        tier: "knowledge".into(),
    });
    assert_eq!(call(&s, &a, get).unwrap()["value"], "the launch code is 42");
    let hits = call(&s, &a, search).unwrap();
    assert_eq!(hits["hits"][0]["key"], "secret");
    // The grant is for knowledge only, and never for writing.
    let e = call(
        &s,
        &a,
        json!({"op": "mem.get", "tier": "active", "key": "x", "owner": "b"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "denied");
    let e = call(&s, &a, json!({"op": "mem.put", "tier": "knowledge", "key": "secret", "value": "mine", "owner": "b"}))
        .unwrap_err();
    assert_eq!(e.code(), "denied");
    assert!(e.to_string().contains("may not write the memory"), "{e}");
    let g = call(
        &s,
        &b,
        json!({"op": "mem.get", "tier": "knowledge", "key": "secret"}),
    )
    .unwrap();
    assert_eq!(g["value"], "the launch code is 42");
}

#[test]
fn fts_search_ranks_by_bm25_and_follows_updates_and_deletes() {
    let (_d, s) = store();
    let c = all_rw("a");
    let docs = [
        (
            "rust",
            "Rust is a systems programming language with ownership and borrowing",
        ),
        (
            "python",
            "Python is a dynamic language; the GIL limits threads",
        ),
        (
            "sqlite",
            "SQLite FTS5 ranks with bm25; WAL mode lets readers run beside the writer",
        ),
        ("owner", "ownership ownership ownership of memory in Rust"),
    ];
    for (k, v) in docs {
        call(
            &s,
            &c,
            json!({"op": "mem.put", "tier": "knowledge", "key": k, "value": v}),
        )
        .unwrap();
    }
    let r = call(
        &s,
        &c,
        json!({"op": "mem.search", "query": "ownership rust"}),
    )
    .unwrap();
    let keys: Vec<&str> = r["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["owner", "rust"]);
    assert!(r["hits"][0]["snippet"]
        .as_str()
        .unwrap()
        .contains("[ownership]"));
    let any = call(
        &s,
        &c,
        json!({"op": "mem.search", "query": "python sqlite", "any": true}),
    )
    .unwrap();
    assert_eq!(any["hits"].as_array().unwrap().len(), 2);
    // FTS syntax in the query is taken as words.
    let odd = call(
        &s,
        &c,
        json!({"op": "mem.search", "query": "bm25* \"WAL^ mode:("}),
    )
    .unwrap();
    assert_eq!(odd["hits"][0]["key"], "sqlite");
    call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "knowledge", "key": "python", "value": "snakes"}),
    )
    .unwrap();
    let r = call(&s, &c, json!({"op": "mem.search", "query": "GIL"})).unwrap();
    assert_eq!(r["hits"].as_array().unwrap().len(), 0);
    call(
        &s,
        &c,
        json!({"op": "mem.delete", "tier": "knowledge", "key": "sqlite"}),
    )
    .unwrap();
    let r = call(&s, &c, json!({"op": "mem.search", "query": "bm25"})).unwrap();
    assert_eq!(r["hits"].as_array().unwrap().len(), 0);
    // Other tiers are not indexed.
    call(
        &s,
        &c,
        json!({"op": "mem.put", "tier": "working", "key": "w", "value": "zebra"}),
    )
    .unwrap();
    let r = call(&s, &c, json!({"op": "mem.search", "query": "zebra"})).unwrap();
    assert_eq!(r["hits"].as_array().unwrap().len(), 0);
}

/// A batch is written in one statement (store.rs `upsert_kv_many`): a key given twice keeps
/// its last value, overwritten entries leave nothing in the index, and the usage totals and
/// the quota count what is stored, in bytes, not the items sent.
#[test]
fn a_batch_keeps_order_usage_quota_and_the_index_exact() {
    let (_d, s) = store();
    let c = claims("a", &[("knowledge", true, true, 1 << 20, 3)]);
    let put_many = |items: Value| {
        call(
            &s,
            &c,
            json!({"op": "mem.put_many", "tier": "knowledge", "items": items}),
        )
    };
    let hits = |q: &str| -> Vec<String> {
        call(&s, &c, json!({"op": "mem.search", "query": q})).unwrap()["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["key"].as_str().unwrap().to_string())
            .collect()
    };
    put_many(json!([{"key": "old", "value": "gamma gamma"}])).unwrap();
    // Four items, three distinct keys (one of them existing): within a quota of 3 entries.
    put_many(json!([
        {"key": "k1", "value": "alpha"},
        {"key": "clé", "value": "ünïcödé delta"},
        {"key": "old", "value": "epsilon"},
        {"key": "k1", "value": "omega"},
    ]))
    .unwrap();
    let g = call(
        &s,
        &c,
        json!({"op": "mem.get", "tier": "knowledge", "key": "k1"}),
    )
    .unwrap();
    assert_eq!(
        g["value"], "omega",
        "the last value of a key given twice wins"
    );
    assert!(
        hits("alpha").is_empty(),
        "the overwritten value is not indexed"
    );
    assert!(
        hits("gamma").is_empty(),
        "the replaced value is not indexed"
    );
    assert_eq!(hits("omega"), ["k1"]);
    assert_eq!(hits("epsilon"), ["old"]);
    assert_eq!(hits("delta"), ["clé"]);
    // The usage totals are what the table holds (sizes in bytes: key + value JSON text).
    let db = rusqlite::Connection::open(s.path()).unwrap();
    let (bytes, entries): (i64, i64) = db
        .query_row(
            "SELECT sum(size), count(*) FROM kv WHERE owner = 'a' AND tier = 'knowledge'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let want = ("k1".len() + "\"omega\"".len())
        + ("clé".len() + "\"ünïcödé delta\"".len())
        + ("old".len() + "\"epsilon\"".len());
    assert_eq!((bytes, entries), (want as i64, 3));
    let u = s.usage("a").unwrap()[&Tier::Knowledge];
    assert_eq!((u.bytes, u.entries), (want as u64, 3));
    // The full-text index matches its content table row for row.
    db.execute_batch("INSERT INTO kv_fts(kv_fts) VALUES ('integrity-check')")
        .unwrap();
    drop(db);
    // A fourth distinct key is over the quota: refused whole, nothing of it indexed.
    let e = put_many(json!([
        {"key": "k1", "value": "zeta"},
        {"key": "k4", "value": "theta"},
    ]))
    .unwrap_err();
    assert_eq!(e.code(), "quota");
    assert!(e.to_string().contains("would be 4"), "{e}");
    assert!(hits("zeta").is_empty() && hits("theta").is_empty());
    assert_eq!(hits("omega"), ["k1"]);
    assert_eq!(s.usage("a").unwrap()[&Tier::Knowledge].entries, 3);
}

#[test]
fn codegraph_neighbourhoods_by_depth_and_kind() {
    let (_d, s) = store();
    let c = all_rw("a");
    for (id, kind) in [
        ("main", "fn"),
        ("parse", "fn"),
        ("lex", "fn"),
        ("util.rs", "file"),
        ("x", "fn"),
    ] {
        call(
            &s,
            &c,
            json!({"op": "mem.graph.add_node", "node": id, "kind": kind, "props": {"line": 1}}),
        )
        .unwrap();
    }
    for (f, t, k) in [
        ("main", "parse", "calls"),
        ("parse", "lex", "calls"),
        ("util.rs", "lex", "defines"),
        ("lex", "x", "calls"),
    ] {
        call(
            &s,
            &c,
            json!({"op": "mem.graph.add_edge", "from": f, "to": t, "kind": k}),
        )
        .unwrap();
    }
    let ids = |v: &Value| {
        let mut ids: Vec<String> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let n1 = call(
        &s,
        &c,
        json!({"op": "mem.graph.neighbors", "node": "parse", "depth": 1}),
    )
    .unwrap();
    assert_eq!(ids(&n1), ["lex", "main", "parse"]);
    let n2 = call(
        &s,
        &c,
        json!({"op": "mem.graph.neighbors", "node": "main", "depth": 2}),
    )
    .unwrap();
    assert_eq!(ids(&n2), ["lex", "main", "parse"]);
    let n3 = call(
        &s,
        &c,
        json!({"op": "mem.graph.neighbors", "node": "main", "depth": 3}),
    )
    .unwrap();
    assert_eq!(ids(&n3), ["lex", "main", "parse", "util.rs", "x"]);
    let calls = call(
        &s,
        &c,
        json!({"op": "mem.graph.neighbors", "node": "main", "depth": 5, "kind": "calls"}),
    )
    .unwrap();
    assert_eq!(ids(&calls), ["lex", "main", "parse", "x"]);
    let lex = n3["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "lex")
        .unwrap();
    assert_eq!(lex["depth"], 2);
    // Edges need both ends.
    let e = call(
        &s,
        &c,
        json!({"op": "mem.graph.add_edge", "from": "main", "to": "nope", "kind": "calls"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "not_found");
    assert_eq!(
        call(&s, &c, json!({"op": "mem.graph.neighbors", "node": "nope"}))
            .unwrap_err()
            .code(),
        "not_found"
    );
    // Removing a node removes its edges; usage follows.
    assert_eq!(s.usage("a").unwrap()[&Tier::Codegraph].entries, 9);
    call(
        &s,
        &c,
        json!({"op": "mem.graph.remove_node", "node": "lex"}),
    )
    .unwrap();
    assert_eq!(s.usage("a").unwrap()[&Tier::Codegraph].entries, 5);
    // Codegraph quota counts nodes and edges.
    let q = claims("q", &[("codegraph", true, true, 1 << 20, 2)]);
    call(
        &s,
        &q,
        json!({"op": "mem.graph.add_node", "node": "1", "kind": "fn"}),
    )
    .unwrap();
    call(
        &s,
        &q,
        json!({"op": "mem.graph.add_node", "node": "2", "kind": "fn"}),
    )
    .unwrap();
    let e = call(
        &s,
        &q,
        json!({"op": "mem.graph.add_edge", "from": "1", "to": "2", "kind": "calls"}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "quota");
}

#[test]
fn clear_export_import_round_trip() {
    let (_d, s) = store();
    let c = all_rw("a");
    for t in ["working", "active", "spirit", "knowledge"] {
        for i in 0..50 {
            call(&s, &c, json!({"op": "mem.put", "tier": t, "key": format!("k{i}"), "value": "v".repeat(2000)}))
                .unwrap();
        }
    }
    call(
        &s,
        &c,
        json!({"op": "mem.graph.add_node", "node": "n1", "kind": "fn"}),
    )
    .unwrap();
    call(
        &s,
        &c,
        json!({"op": "mem.graph.add_node", "node": "n2", "kind": "fn"}),
    )
    .unwrap();
    call(
        &s,
        &c,
        json!({"op": "mem.graph.add_edge", "from": "n1", "to": "n2", "kind": "calls"}),
    )
    .unwrap();
    let mut records = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let r = op(&s, json!({"op": "mem.export", "after": after})).unwrap();
        records.extend(r["records"].as_array().unwrap().iter().cloned());
        pages += 1;
        match r["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert!(pages > 1, "a large export comes in pages");
    assert_eq!(records.len(), 4 * 50 + 3);

    let removed = op(&s, json!({"op": "mem.clear", "tier": "working"})).unwrap();
    assert_eq!(removed["removed"], 50);
    op(&s, json!({"op": "mem.clear"})).unwrap();
    assert!(s.usage("a").unwrap().is_empty());
    // Import into another agent, in chunks.
    let imported: u64 = records
        .chunks(30)
        .map(|ch| {
            service::handle(
                &s,
                Actor::Operator,
                "copy",
                &json!({"op": "mem.import", "records": ch}),
            )
            .unwrap()["imported"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(imported, 203);
    let u = s.usage("copy").unwrap();
    assert_eq!(u[&Tier::Knowledge].entries, 50);
    assert_eq!(u[&Tier::Codegraph].entries, 3);
    let bad = service::handle(
        &s,
        Actor::Operator,
        "copy",
        &json!({"op": "mem.import", "records": [{"type": "kv", "tier": "nope", "key": "k", "value": 1}]}),
    )
    .unwrap_err();
    assert_eq!(bad.code(), "invalid");
}

#[test]
fn acknowledged_writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.db");
    {
        let s = MemoryStore::open_with(&path, SyncMode::Normal).unwrap();
        let c = all_rw("a");
        for i in 0..100 {
            call(
                &s,
                &c,
                json!({"op": "mem.put", "tier": "knowledge", "key": format!("k{i}"), "value": i}),
            )
            .unwrap();
        }
    }
    let s = MemoryStore::open_with(&path, SyncMode::Normal).unwrap();
    assert_eq!(s.usage("a").unwrap()[&Tier::Knowledge].entries, 100);
    assert_eq!(
        s.get("a", Tier::Knowledge, "k99").unwrap().unwrap().value,
        Some(json!(99))
    );
}

#[test]
fn concurrent_writers_are_group_committed_and_all_acknowledged() {
    let (_d, s) = store();
    let s = std::sync::Arc::new(s);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    s.put(
                        "a",
                        Tier::Working,
                        &format!("{t}-{i}"),
                        "1".into(),
                        None,
                        None,
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.usage("a").unwrap()[&Tier::Working].entries, 1600);
}

#[test]
fn bad_requests_name_the_field() {
    let (_d, s) = store();
    let c = all_rw("a");
    let cases = [
        (
            json!({"op": "mem.put", "tier": "working", "value": 1}),
            "key",
        ),
        (
            json!({"op": "mem.put", "tier": "nowhere", "key": "k", "value": 1}),
            "tier",
        ),
        (
            json!({"op": "mem.put", "tier": "working", "key": "k"}),
            "value",
        ),
        (
            json!({"op": "mem.put", "tier": "working", "key": "k".repeat(600), "value": 1}),
            "key",
        ),
        (
            json!({"op": "mem.put", "tier": "working", "key": "k", "value": "v".repeat(60_000)}),
            "value",
        ),
        (
            json!({"op": "mem.list", "tier": "working", "limit": -1}),
            "limit",
        ),
        (
            json!({"op": "mem.graph.add_node", "node": "n", "kind": "has space"}),
            "kind",
        ),
        (
            json!({"op": "mem.graph.neighbors", "node": "n", "depth": 99}),
            "depth",
        ),
        (json!({"op": "mem.frobnicate"}), "op"),
    ];
    for (req, fieldname) in cases {
        let e = call(&s, &c, req.clone()).unwrap_err();
        assert_eq!(e.code(), "invalid", "{req}");
        assert!(
            e.to_string().starts_with(&format!("invalid {fieldname}")),
            "{req}: {e}"
        );
    }
}

/// The cost bounds of queries (docs/memory.md "Bounds"): too many words are refused, a wide
/// walk is cut and says so, a query past its step budget is stopped with `too_costly`.
#[test]
fn costly_queries_are_refused_or_cut() {
    let (_d, s) = store();
    let c = all_rw("a");
    let words: Vec<String> = (0..9).map(|i| format!("w{i}")).collect();
    let e = call(
        &s,
        &c,
        json!({"op": "mem.search", "query": words.join(" ")}),
    )
    .unwrap_err();
    assert_eq!(e.code(), "invalid");
    assert_eq!(
        e.to_string(),
        "invalid query: 9 search terms; the limit is 8 (each term is an index lookup)"
    );
    assert!(call(
        &s,
        &c,
        json!({"op": "mem.search", "query": words[..8].join(" ")})
    )
    .is_ok());
    // A hub with more edges than a walk may read (but fewer nodes than a reply may hold):
    // cut, marked truncated.
    call(
        &s,
        &c,
        json!({"op": "mem.graph.add_node", "node": "hub", "kind": "fn"}),
    )
    .unwrap();
    let n = 600;
    let kinds = MAX_WALK_EDGES / n + 2;
    let nodes =
        (0..n).map(|i| json!({"type": "node", "id": format!("n{i}"), "kind": "fn", "props": {}}));
    let edges = (0..n).flat_map(|i| {
        (0..kinds).map(move |k| {
            json!({"type": "edge", "from": "hub", "to": format!("n{i}"), "kind": format!("k{k}"), "props": {}})
        })
    });
    let recs: Vec<super::store::ExportLine> = nodes
        .chain(edges)
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    s.import("a", recs).unwrap();
    let walk = s.neighbours("a", "hub", 8, None).unwrap();
    assert!(walk.truncated);
    assert_eq!(walk.edges.len(), MAX_WALK_EDGES);
    assert!(walk.nodes.len() < MAX_NODES);
    let r = call(
        &s,
        &c,
        json!({"op": "mem.graph.neighbors", "node": "hub", "depth": 8}),
    )
    .unwrap();
    assert_eq!(r["truncated"], true, "{r}");
    // A statement past the step budget (a search over many matching entries): stopped,
    // refused with its own code, nothing returned.
    let items: Vec<Value> = (0..900)
        .map(
            |i| json!({"key": format!("doc{i}"), "value": format!("common words in document {i}")}),
        )
        .collect();
    call(
        &s,
        &c,
        json!({"op": "mem.put_many", "tier": "knowledge", "items": items}),
    )
    .unwrap();
    assert!(call(&s, &c, json!({"op": "mem.search", "query": "common"})).is_ok());
    s.set_max_steps(5_000);
    let e = call(&s, &c, json!({"op": "mem.search", "query": "common"})).unwrap_err();
    assert_eq!(e.code(), "too_costly", "{e}");
    assert!(e.to_string().contains("5000 SQLite steps"), "{e}");
    // The connection is usable again after the interrupt.
    s.set_max_steps(MAX_STEPS);
    assert!(call(&s, &c, json!({"op": "mem.search", "query": "common"})).is_ok());
}
