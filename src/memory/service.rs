//! The `mem.*` operations as JSON requests (docs/protocol.md, docs/memory.md): the same code
//! serves an agent's channel (with its claims) and an operator's control socket.

use serde_json::{json, Value};

use super::store::{Entry, ExportLine};
use super::{
    now_ms, Actor, MemoryError, MemoryStore, Tier, DEFAULT_ACTIVE_TTL_S, MAX_ACTIVE_TTL_S,
    MAX_DEPTH, MAX_KEY, MAX_VALUE,
};

/// Most bytes of entries, hits or nodes in one reply (a reply must fit in a 64 KiB frame);
/// a reply cut short says `"truncated": true`.
pub const REPLY_BUDGET: usize = 40 * 1024;
/// Most items `mem.put_many` and `mem.import` take in one request.
pub const MAX_ITEMS: usize = 4096;
/// Longest node or edge kind.
const MAX_KIND: usize = 64;

fn field<'a>(req: &'a Value, name: &str) -> Option<&'a Value> {
    req.get(name).filter(|v| !v.is_null())
}

fn text<'a>(req: &'a Value, name: &str, max: usize) -> Result<Option<&'a str>, MemoryError> {
    match field(req, name) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
        Some(Value::String(s)) => Err(MemoryError::invalid(
            name,
            format!("{} bytes; the limit is {max}", s.len()),
        )),
        Some(_) => Err(MemoryError::invalid(name, "must be a string")),
    }
}

fn need<'a>(req: &'a Value, name: &str, max: usize) -> Result<&'a str, MemoryError> {
    match text(req, name, max)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(MemoryError::invalid(name, "missing (a non-empty string)")),
    }
}

fn number(req: &Value, name: &str, default: u64, max: u64) -> Result<u64, MemoryError> {
    match field(req, name) {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ => Err(MemoryError::invalid(
                name,
                format!("must be a whole number from 0 to {max}"),
            )),
        },
    }
}

fn flag(req: &Value, name: &str) -> Result<bool, MemoryError> {
    match field(req, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(MemoryError::invalid(name, "must be true or false")),
    }
}

fn tier(req: &Value) -> Result<Tier, MemoryError> {
    Ok(need(req, "tier", 16)?.parse()?)
}

fn kv_tier(req: &Value) -> Result<Tier, MemoryError> {
    let t = tier(req)?;
    if t.is_kv() {
        Ok(t)
    } else {
        Err(MemoryError::invalid(
            "tier",
            "codegraph holds nodes and edges: use mem.graph.add_node, add_edge, neighbors",
        ))
    }
}

fn key(req: &Value) -> Result<&str, MemoryError> {
    need(req, "key", MAX_KEY)
}

/// A value as stored: its JSON text, within [`MAX_VALUE`].
fn value_json(name: &str, v: Option<&Value>) -> Result<String, MemoryError> {
    let v = v.ok_or_else(|| MemoryError::invalid(name, "missing (any JSON value)"))?;
    let s = v.to_string();
    if s.len() > MAX_VALUE {
        return Err(MemoryError::invalid(
            name,
            format!("{} bytes of JSON; the limit is {MAX_VALUE}", s.len()),
        ));
    }
    Ok(s)
}

fn props_json(req: &Value) -> Result<String, MemoryError> {
    match field(req, "props") {
        None => Ok("{}".into()),
        Some(v @ Value::Object(_)) => value_json("props", Some(v)),
        Some(_) => Err(MemoryError::invalid("props", "must be a JSON object")),
    }
}

fn kind(req: &Value, name: &str) -> Result<String, MemoryError> {
    let k = need(req, name, MAX_KIND)?;
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        Ok(k.to_string())
    } else {
        Err(MemoryError::invalid(
            name,
            format!("{k:?}: use letters, digits, '_', '-', '.', ':'"),
        ))
    }
}

/// When an `active` entry put now expires.
fn expiry(t: Tier, req: &Value) -> Result<Option<i64>, MemoryError> {
    match (t, field(req, "ttl_s")) {
        (Tier::Active, ttl) => {
            let s = match ttl {
                None => DEFAULT_ACTIVE_TTL_S,
                Some(_) => number(req, "ttl_s", 0, MAX_ACTIVE_TTL_S)?,
            };
            if s == 0 {
                return Err(MemoryError::invalid("ttl_s", "must be at least 1"));
            }
            Ok(Some(now_ms() + (s as i64) * 1000))
        }
        (_, None) => Ok(None),
        (t, Some(_)) => Err(MemoryError::invalid(
            "ttl_s",
            format!("only the active tier has a TTL, not {t}"),
        )),
    }
}

/// The memory a request is about: `owner` when given, else the agent's own. An agent reads
/// another's only with a grant and never writes it; an operator names the agent anyway.
fn owner<'a>(req: &'a Value, agent: &'a str) -> Result<&'a str, MemoryError> {
    Ok(text(req, "owner", 64)?.unwrap_or(agent))
}

/// Serialised items up to the reply budget; whether some were left out.
fn within_budget<T: serde::Serialize>(items: Vec<T>) -> (Vec<Value>, bool) {
    let (out, cut, _) = within(items, REPLY_BUDGET);
    (out, cut)
}

/// Serialised items up to `budget` bytes; whether some were left out; the bytes used.
fn within<T: serde::Serialize>(items: Vec<T>, budget: usize) -> (Vec<Value>, bool, usize) {
    let mut used = 0;
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        let v = serde_json::to_value(i).unwrap_or(Value::Null);
        let len = v.to_string().len();
        if used + len > budget {
            return (out, true, used);
        }
        used += len;
        out.push(v);
    }
    (out, false, used)
}

/// Handles one `mem.*` request of `actor` about `agent`'s memory (the agent itself on its
/// channel; the target on the control socket). Returns the reply's `data`.
pub fn handle(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let op = req.get("op").and_then(Value::as_str).unwrap_or("");
    match op {
        "mem.put" => mem_put(store, actor, agent, req),
        "mem.put_many" => mem_put_many(store, actor, agent, req),
        "mem.get" => mem_get(store, actor, agent, req),
        "mem.delete" => mem_delete(store, actor, agent, req),
        "mem.list" => mem_list(store, actor, agent, req),
        "mem.search" => mem_search(store, actor, agent, req),
        "mem.graph.add_node" => mem_graph_add_node(store, actor, agent, req),
        "mem.graph.add_edge" => mem_graph_add_edge(store, actor, agent, req),
        "mem.graph.remove_node" => mem_graph_remove_node(store, actor, agent, req),
        "mem.graph.neighbors" | "mem.graph.neighbours" => mem_graph_neighbors(store, actor, agent, req),
        "mem.usage" => mem_usage(store, actor, agent, req),
        "mem.export" => mem_export(store, actor, agent, req),
        "mem.import" => mem_import(store, actor, agent, req),
        "mem.clear" => mem_clear(store, actor, agent, req),
        other => Err(MemoryError::invalid(
            "op",
            format!(
                "unknown memory op {other:?} (mem.put, mem.put_many, mem.get, mem.delete, mem.list, mem.search, mem.usage, mem.graph.add_node, mem.graph.add_edge, mem.graph.remove_node, mem.graph.neighbors)"
            ),
        )),
    }
}

/// `handle`: `mem.put`.
fn mem_put(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let t = kv_tier(req)?;
    let k = key(req)?;
    let o = owner(req, agent)?;
    let quota = actor.may_write(o, t)?;
    let v = value_json("value", req.get("value"))?;
    let exp = expiry(t, req)?;
    let size = (k.len() + v.len()) as u64;
    store.put(o, t, k, v, exp, quota)?;
    let mut out = json!({"tier": t.as_str(), "key": k, "size": size});
    if let Some(e) = exp {
        out["expires_ms"] = json!(e);
    }
    Ok(out)
}

/// `handle`: `mem.put_many`.
fn mem_put_many(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let t = kv_tier(req)?;
    let o = owner(req, agent)?;
    let quota = actor.may_write(o, t)?;
    let Some(Value::Array(items)) = field(req, "items") else {
        return Err(MemoryError::invalid(
            "items",
            "missing (an array of {key, value})",
        ));
    };
    if items.len() > MAX_ITEMS {
        return Err(MemoryError::invalid(
            "items",
            format!("{} items; the limit is {MAX_ITEMS}", items.len()),
        ));
    }
    let mut batch = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let k = key(it).map_err(|e| at_item(i, e))?;
        let v = value_json("value", it.get("value")).map_err(|e| at_item(i, e))?;
        batch.push((k.to_string(), v));
    }
    let exp = expiry(t, req)?;
    let n = store.put_many(o, t, batch, exp, quota)?;
    Ok(json!({"tier": t.as_str(), "written": n}))
}

/// `handle`: `mem.get`.
fn mem_get(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let t = kv_tier(req)?;
    let k = key(req)?;
    let o = owner(req, agent)?;
    actor.may_read(o, t)?;
    match store.get(o, t, k)? {
        Some(e) => Ok(entry_json(t, e)),
        None => Err(MemoryError::NotFound(format!(
            "no key {k:?} in tier {t} of {o:?}"
        ))),
    }
}

/// `handle`: `mem.delete`.
fn mem_delete(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let t = kv_tier(req)?;
    let k = key(req)?;
    let o = owner(req, agent)?;
    actor.may_delete(o, t)?;
    let deleted = store.delete(o, t, k)?;
    Ok(json!({"deleted": deleted}))
}

/// `handle`: `mem.list`.
fn mem_list(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let t = kv_tier(req)?;
    let o = owner(req, agent)?;
    actor.may_read(o, t)?;
    let prefix = text(req, "prefix", MAX_KEY)?.unwrap_or("");
    let after = text(req, "after", MAX_KEY)?;
    let limit = number(req, "limit", 100, 1000)? as usize;
    let entries = store.list(o, t, prefix, after, limit.max(1))?;
    let full = entries.len() == limit.max(1);
    let (entries, truncated) = within_budget(entries);
    let next = entries
        .last()
        .and_then(|e| e["key"].as_str())
        .map(str::to_string);
    Ok(json!({
        "tier": t.as_str(),
        "entries": entries,
        "more": full || truncated,
        "next": if full || truncated { next } else { None },
    }))
}

/// `handle`: `mem.search`.
fn mem_search(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    if let Some(t) = text(req, "tier", 16)? {
        if t != "knowledge" {
            return Err(MemoryError::invalid(
                "tier",
                format!("only the knowledge tier is searchable, not {t:?}"),
            ));
        }
    }
    let q = need(req, "query", 1024)?;
    let n = super::store::search_words(q).count();
    if n > super::MAX_TERMS {
        return Err(MemoryError::invalid(
            "query",
            format!(
                "{n} search terms; the limit is {} (each term is an index lookup)",
                super::MAX_TERMS
            ),
        ));
    }
    let o = owner(req, agent)?;
    actor.may_read(o, Tier::Knowledge)?;
    let limit = number(req, "limit", 10, 100)? as usize;
    let hits = store.search(o, q, flag(req, "any")?, limit.max(1))?;
    let (hits, truncated) = within_budget(hits);
    Ok(json!({"hits": hits, "truncated": truncated}))
}

/// `handle`: `mem.graph.add_node`.
fn mem_graph_add_node(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let o = owner(req, agent)?;
    let quota = actor.may_write(o, Tier::Codegraph)?;
    let id = need(req, "node", MAX_KEY)?;
    let k = kind(req, "kind")?;
    let p = props_json(req)?;
    store.add_node(o, id, &k, p, quota)?;
    Ok(json!({"node": id, "kind": k}))
}

/// `handle`: `mem.graph.add_edge`.
fn mem_graph_add_edge(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let o = owner(req, agent)?;
    let quota = actor.may_write(o, Tier::Codegraph)?;
    let from = need(req, "from", MAX_KEY)?;
    let to = need(req, "to", MAX_KEY)?;
    let k = kind(req, "kind")?;
    let p = props_json(req)?;
    store.add_edge(o, from, to, &k, p, quota)?;
    Ok(json!({"from": from, "to": to, "kind": k}))
}

/// `handle`: `mem.graph.remove_node`.
fn mem_graph_remove_node(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let o = owner(req, agent)?;
    actor.may_delete(o, Tier::Codegraph)?;
    let id = need(req, "node", MAX_KEY)?;
    Ok(json!({"deleted": store.remove_node(o, id)?}))
}

/// `handle`: `mem.graph.neighbors` | `mem.graph.neighbours`.
fn mem_graph_neighbors(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let o = owner(req, agent)?;
    actor.may_read(o, Tier::Codegraph)?;
    let id = need(req, "node", MAX_KEY)?;
    let depth = number(req, "depth", 1, MAX_DEPTH as u64)? as u32;
    let k = match field(req, "kind") {
        None => None,
        Some(_) => Some(kind(req, "kind")?),
    };
    let n = store.neighbours(o, id, depth, k.as_deref())?;
    // Nodes and edges share one reply budget (each alone could fill it: two full
    // halves made a reply larger than a frame).
    let (nodes, t1, used) = within(n.nodes, REPLY_BUDGET / 2);
    let (edges, t2, _) = within(n.edges, REPLY_BUDGET - used);
    Ok(json!({
        "node": id,
        "depth": depth,
        "nodes": nodes,
        "edges": edges,
        "truncated": n.truncated || t1 || t2,
    }))
}

/// `handle`: `mem.usage`.
fn mem_usage(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    let o = owner(req, agent)?;
    let usage = store.usage(o)?;
    let mut out = serde_json::Map::new();
    for t in Tier::ALL {
        if actor.may_read(o, t).is_err() && actor.may_write(o, t).is_err() {
            continue;
        }
        let u = usage.get(&t).copied().unwrap_or_default();
        let mut row = json!({"bytes": u.bytes, "entries": u.entries});
        if let Actor::Agent { claims, name } = actor {
            if let (true, Some(c)) = (o == name, claims.memory_tiers.get(t.as_str())) {
                row["read"] = json!(c.read);
                row["write"] = json!(c.write);
                row["quota_bytes"] = json!(c.quota_bytes);
                row["quota_entries"] = json!(c.quota_entries);
            }
        }
        out.insert(t.as_str().into(), row);
    }
    Ok(Value::Object(out))
}

/// `handle`: `mem.export`.
fn mem_export(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    actor.operator_only("mem.export")?;
    let after = text(req, "after", 4096)?;
    let (records, next) = store.export_page(agent, after, REPLY_BUDGET)?;
    Ok(json!({"records": records, "next": next}))
}

/// `handle`: `mem.import`.
fn mem_import(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    actor.operator_only("mem.import")?;
    let Some(Value::Array(items)) = field(req, "records") else {
        return Err(MemoryError::invalid("records", "missing (an array)"));
    };
    if items.len() > MAX_ITEMS {
        return Err(MemoryError::invalid(
            "records",
            format!("{} records; the limit is {MAX_ITEMS}", items.len()),
        ));
    }
    let mut records = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let r: ExportLine = serde_json::from_value(it.clone())
            .map_err(|e| MemoryError::invalid(&format!("records[{i}]"), e.to_string()))?;
        check_record(&r).map_err(|e| at_item(i, e))?;
        records.push(r);
    }
    Ok(json!({"imported": store.import(agent, records)?}))
}

/// `handle`: `mem.clear`.
fn mem_clear(
    store: &MemoryStore,
    actor: Actor<'_>,
    agent: &str,
    req: &Value,
) -> Result<Value, MemoryError> {
    actor.operator_only("mem.clear")?;
    let t = match field(req, "tier") {
        None => None,
        Some(_) => Some(tier(req)?),
    };
    Ok(json!({"removed": store.clear(agent, t)?}))
}

fn at_item(i: usize, e: MemoryError) -> MemoryError {
    match e {
        MemoryError::Invalid { field, reason } => MemoryError::Invalid {
            field: format!("items[{i}].{field}"),
            reason,
        },
        other => other,
    }
}

fn check_record(r: &ExportLine) -> Result<(), MemoryError> {
    match r {
        ExportLine::Kv {
            tier, key, value, ..
        } => {
            let t: Tier = tier.parse()?;
            if !t.is_kv() {
                return Err(MemoryError::invalid(
                    "tier",
                    "codegraph records are node and edge lines",
                ));
            }
            if key.is_empty() || key.len() > MAX_KEY {
                return Err(MemoryError::invalid("key", format!("1 to {MAX_KEY} bytes")));
            }
            value_json("value", Some(value)).map(|_| ())
        }
        ExportLine::Node { id, kind: k, props } => {
            kind(&json!({"kind": k}), "kind")?;
            if id.is_empty() || id.len() > MAX_KEY {
                return Err(MemoryError::invalid("id", format!("1 to {MAX_KEY} bytes")));
            }
            value_json("props", Some(props)).map(|_| ())
        }
        ExportLine::Edge {
            from,
            to,
            kind: k,
            props,
        } => {
            kind(&json!({"kind": k}), "kind")?;
            for (f, v) in [("from", from), ("to", to)] {
                if v.is_empty() || v.len() > MAX_KEY {
                    return Err(MemoryError::invalid(f, format!("1 to {MAX_KEY} bytes")));
                }
            }
            value_json("props", Some(props)).map(|_| ())
        }
    }
}

fn entry_json(t: Tier, e: Entry) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    v["tier"] = json!(t.as_str());
    v
}
