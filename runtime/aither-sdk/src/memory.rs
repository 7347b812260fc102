//! Memory tiers through the channel (docs/memory.md): typed wrappers over the `mem.*` ops.
//!
//! ```no_run
//! # fn main() -> Result<(), aither_sdk::SdkError> {
//! use aither_sdk::{Channel, Tier};
//! use serde_json::json;
//! let ch = Channel::from_env()?;
//! ch.mem_put(Tier::Active, "step", &json!(3), None)?;
//! let step = ch.mem_get(Tier::Active, "step")?;      // Some(3)
//! let hits = ch.mem_search("ownership borrowing", 5)?;
//! # Ok(()) }
//! ```

use serde_json::{json, Map, Value};

use crate::{Channel, SdkError};

/// Options of [`Channel::mem_search_with`].
#[derive(Clone, Debug, Default)]
pub struct SearchOptions {
    /// At most this many hits (default 10, at most 100).
    pub limit: Option<u64>,
    /// Search another agent's knowledge tier (needs a `memory_grants` entry in the token).
    pub owner: Option<String>,
    /// Any word may match (default: every word must).
    pub any: bool,
}

pub use aither_proto::Tier;

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn data(reply: Value) -> Value {
    match reply {
        Value::Object(mut m) => m.remove("data").unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

impl Channel {
    /// Runs a `mem.*` op; returns the reply's `data`.
    pub fn mem(&self, op: &str, args: Value) -> Result<Value, SdkError> {
        self.request(op, fields(args)).map(data)
    }

    /// Writes `key` in a tier (`ttl_s` only for [`Tier::Active`]; default 24 h). A value over
    /// the tier's quota is refused (`quota`) and nothing is written.
    pub fn mem_put(
        &self,
        tier: Tier,
        key: &str,
        value: &Value,
        ttl_s: Option<u64>,
    ) -> Result<(), SdkError> {
        let mut a = json!({"tier": tier.as_str(), "key": key, "value": value});
        if let Some(t) = ttl_s {
            a["ttl_s"] = t.into();
        }
        self.mem("mem.put", a).map(drop)
    }

    /// Writes many entries at once, all or nothing.
    pub fn mem_put_many(&self, tier: Tier, items: &[(&str, Value)]) -> Result<u64, SdkError> {
        let items: Vec<Value> = items
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let d = self.mem(
            "mem.put_many",
            json!({"tier": tier.as_str(), "items": items}),
        )?;
        Ok(d["written"].as_u64().unwrap_or(0))
    }

    /// The value of `key`, None when absent (or expired).
    pub fn mem_get(&self, tier: Tier, key: &str) -> Result<Option<Value>, SdkError> {
        self.mem_get_of(None, tier, key)
    }

    /// The value of `key` in another agent's tier (needs a grant in the token).
    pub fn mem_get_of(
        &self,
        owner: Option<&str>,
        tier: Tier,
        key: &str,
    ) -> Result<Option<Value>, SdkError> {
        match self.mem(
            "mem.get",
            json!({"tier": tier.as_str(), "key": key, "owner": owner}),
        ) {
            Ok(mut d) => Ok(Some(d["value"].take())),
            Err(e)
                if e.remote_code().map(crate::WireCode::parse)
                    == Some(crate::WireCode::NotFound) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes `key`; whether it was there.
    pub fn mem_delete(&self, tier: Tier, key: &str) -> Result<bool, SdkError> {
        let d = self.mem("mem.delete", json!({"tier": tier.as_str(), "key": key}))?;
        Ok(d["deleted"] == true)
    }

    /// Keys of a tier with `prefix`, in order, at most `limit` (entries without values).
    pub fn mem_list(&self, tier: Tier, prefix: &str, limit: u64) -> Result<Vec<Value>, SdkError> {
        let d = self.mem(
            "mem.list",
            json!({"tier": tier.as_str(), "prefix": prefix, "limit": limit}),
        )?;
        Ok(d["entries"].as_array().cloned().unwrap_or_default())
    }

    /// Every entry of a tier (of `owner`'s memory with a grant, or the agent's own) with
    /// `prefix`, in key order, following the pages up to `limit` entries (None: all).
    pub fn mem_list_of(
        &self,
        owner: Option<&str>,
        tier: Tier,
        prefix: &str,
        limit: Option<u64>,
    ) -> Result<Vec<Value>, SdkError> {
        let mut out: Vec<Value> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let left = limit.map_or(1000, |l| l.saturating_sub(out.len() as u64).min(1000));
            if left == 0 {
                break;
            }
            let mut a = json!({"tier": tier.as_str(), "prefix": prefix, "limit": left});
            if let Some(o) = owner {
                a["owner"] = o.into();
            }
            if let Some(k) = &after {
                a["after"] = k.as_str().into();
            }
            let mut d = self.mem("mem.list", a)?;
            if let Some(entries) = d["entries"].as_array_mut() {
                out.append(entries);
            }
            match d["next"].as_str() {
                Some(next) if d["more"] == true => after = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Full-text search of the knowledge tier, best first (`key`, `score`, `snippet`, `value`).
    pub fn mem_search(&self, query: &str, limit: u64) -> Result<Vec<Value>, SdkError> {
        let d = self.mem("mem.search", json!({"query": query, "limit": limit}))?;
        Ok(d["hits"].as_array().cloned().unwrap_or_default())
    }

    /// Full-text search with options: another agent's knowledge (`owner`, needs a grant),
    /// any word instead of every word (`any`).
    pub fn mem_search_with(&self, query: &str, o: &SearchOptions) -> Result<Vec<Value>, SdkError> {
        let mut a = json!({"query": query, "limit": o.limit.unwrap_or(10)});
        if let Some(owner) = &o.owner {
            a["owner"] = owner.as_str().into();
        }
        if o.any {
            a["any"] = true.into();
        }
        let d = self.mem("mem.search", a)?;
        Ok(d["hits"].as_array().cloned().unwrap_or_default())
    }

    /// Usage and quotas per tier: `{tier: {bytes, entries, read, write, quota_bytes,
    /// quota_entries}}`.
    pub fn mem_usage(&self) -> Result<Value, SdkError> {
        self.mem("mem.usage", json!({}))
    }

    /// Adds (or replaces) a code-graph node.
    pub fn graph_add_node(&self, id: &str, kind: &str, props: Value) -> Result<(), SdkError> {
        self.mem(
            "mem.graph.add_node",
            json!({"node": id, "kind": kind, "props": props}),
        )
        .map(drop)
    }

    /// Adds (or replaces) a typed edge; both nodes must exist.
    pub fn graph_add_edge(
        &self,
        from: &str,
        to: &str,
        kind: &str,
        props: Value,
    ) -> Result<(), SdkError> {
        self.mem(
            "mem.graph.add_edge",
            json!({"from": from, "to": to, "kind": kind, "props": props}),
        )
        .map(drop)
    }

    /// [`Channel::graph_neighbors`] in another agent's codegraph (needs a grant).
    pub fn graph_neighbors_of(
        &self,
        owner: &str,
        id: &str,
        depth: u32,
        kind: Option<&str>,
    ) -> Result<Value, SdkError> {
        self.mem(
            "mem.graph.neighbors",
            json!({"node": id, "depth": depth, "kind": kind, "owner": owner}),
        )
    }

    /// Removes a node and its edges; whether it was there.
    pub fn graph_remove_node(&self, id: &str) -> Result<bool, SdkError> {
        let d = self.mem("mem.graph.remove_node", json!({"node": id}))?;
        Ok(d["deleted"] == true)
    }

    /// The nodes within `depth` hops of `id` and the edges between them
    /// (`{"nodes": [...], "edges": [...], "truncated": bool}`).
    pub fn graph_neighbors(
        &self,
        id: &str,
        depth: u32,
        kind: Option<&str>,
    ) -> Result<Value, SdkError> {
        self.mem(
            "mem.graph.neighbors",
            json!({"node": id, "depth": depth, "kind": kind}),
        )
    }
}
