//! The memory database (`$STATE_DIR/memory.db`): SQLite in WAL mode, one writer thread, read
//! connections beside it.
//!
//! Writes go to the writer thread as commands. It takes every command waiting (up to
//! [`MAX_BATCH`]), runs each in its own SAVEPOINT inside one transaction (a command that fails,
//! a quota refusal included, is rolled back alone: nothing half-written), commits, and only
//! then answers each caller. An acknowledged write is therefore committed to the WAL: it
//! survives the daemon being killed (`kill -9`) at any point. With `synchronous=NORMAL` (the
//! default) a power cut may lose the last commits before the next checkpoint, never corrupt
//! the database; `AITHER_MEMORY_SYNC=full` makes every acknowledged batch durable against
//! power loss too, at one fsync per batch (docs/memory.md has the measured cost).
//!
//! Quotas are kept exact by triggers: every insert, update and delete of an entry, node or
//! edge adjusts the `usage` row of its (owner, tier) in the same transaction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    now_ms, MemoryError, Quota, Tier, MAX_NODES, MAX_QUERY_TIME, MAX_STEPS, MAX_WALK_EDGES,
    STEP_UNIT,
};

// Queries whose best index SQLite cannot tell without statistics (no ANALYZE) name it with
// INDEXED BY: the in-edges of a node and an owner's expired entries.

/// Most commands committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// Read connections kept open between requests.
const KEEP_READERS: usize = 8;
/// How often the writer purges expired `active` entries of every agent.
const PURGE_EVERY: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    id         INTEGER PRIMARY KEY,
    owner      TEXT NOT NULL,
    tier       TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    UNIQUE (owner, tier, key)
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv(expires_ms) WHERE expires_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS kv_owner_expiry ON kv(owner, expires_ms) WHERE expires_ms IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS kv_fts USING fts5(
    owner, key, value, content='kv', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS nodes (
    owner      TEXT NOT NULL,
    id         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    props      TEXT NOT NULL,
    size       INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edges (
    owner      TEXT NOT NULL,
    src        TEXT NOT NULL,
    dst        TEXT NOT NULL,
    kind       TEXT NOT NULL,
    props      TEXT NOT NULL,
    size       INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, src, kind, dst)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_by_dst ON edges(owner, dst, kind, src);
CREATE TABLE IF NOT EXISTS usage (
    owner   TEXT NOT NULL,
    tier    TEXT NOT NULL,
    bytes   INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    PRIMARY KEY (owner, tier)
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS kv_usage_ins AFTER INSERT ON kv BEGIN
    INSERT INTO usage(owner, tier, bytes, entries) VALUES (new.owner, new.tier, new.size, 1)
    ON CONFLICT(owner, tier) DO UPDATE SET bytes = bytes + excluded.bytes, entries = entries + 1;
END;
CREATE TRIGGER IF NOT EXISTS kv_usage_del AFTER DELETE ON kv BEGIN
    UPDATE usage SET bytes = bytes - old.size, entries = entries - 1
    WHERE owner = old.owner AND tier = old.tier;
END;
CREATE TRIGGER IF NOT EXISTS kv_usage_upd AFTER UPDATE OF size ON kv BEGIN
    UPDATE usage SET bytes = bytes - old.size + new.size
    WHERE owner = new.owner AND tier = new.tier;
END;
CREATE TRIGGER IF NOT EXISTS kv_fts_ins AFTER INSERT ON kv WHEN new.tier = 'knowledge' BEGIN
    INSERT INTO kv_fts(rowid, owner, key, value) VALUES (new.id, new.owner, new.key, new.value);
END;
CREATE TRIGGER IF NOT EXISTS kv_fts_del AFTER DELETE ON kv WHEN old.tier = 'knowledge' BEGIN
    INSERT INTO kv_fts(kv_fts, rowid, owner, key, value)
    VALUES ('delete', old.id, old.owner, old.key, old.value);
END;
CREATE TRIGGER IF NOT EXISTS kv_fts_upd AFTER UPDATE ON kv WHEN new.tier = 'knowledge' BEGIN
    INSERT INTO kv_fts(kv_fts, rowid, owner, key, value)
    VALUES ('delete', old.id, old.owner, old.key, old.value);
    INSERT INTO kv_fts(rowid, owner, key, value) VALUES (new.id, new.owner, new.key, new.value);
END;
CREATE TRIGGER IF NOT EXISTS nodes_usage_ins AFTER INSERT ON nodes BEGIN
    INSERT INTO usage(owner, tier, bytes, entries) VALUES (new.owner, 'codegraph', new.size, 1)
    ON CONFLICT(owner, tier) DO UPDATE SET bytes = bytes + excluded.bytes, entries = entries + 1;
END;
CREATE TRIGGER IF NOT EXISTS nodes_usage_del AFTER DELETE ON nodes BEGIN
    UPDATE usage SET bytes = bytes - old.size, entries = entries - 1
    WHERE owner = old.owner AND tier = 'codegraph';
END;
CREATE TRIGGER IF NOT EXISTS nodes_usage_upd AFTER UPDATE OF size ON nodes BEGIN
    UPDATE usage SET bytes = bytes - old.size + new.size
    WHERE owner = new.owner AND tier = 'codegraph';
END;
CREATE TRIGGER IF NOT EXISTS edges_usage_ins AFTER INSERT ON edges BEGIN
    INSERT INTO usage(owner, tier, bytes, entries) VALUES (new.owner, 'codegraph', new.size, 1)
    ON CONFLICT(owner, tier) DO UPDATE SET bytes = bytes + excluded.bytes, entries = entries + 1;
END;
CREATE TRIGGER IF NOT EXISTS edges_usage_del AFTER DELETE ON edges BEGIN
    UPDATE usage SET bytes = bytes - old.size, entries = entries - 1
    WHERE owner = old.owner AND tier = 'codegraph';
END;
CREATE TRIGGER IF NOT EXISTS edges_usage_upd AFTER UPDATE OF size ON edges BEGIN
    UPDATE usage SET bytes = bytes - old.size + new.size
    WHERE owner = new.owner AND tier = 'codegraph';
END;
";

/// How the writer syncs a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// WAL + synchronous=NORMAL: durable against a killed process; a power cut may lose the
    /// last commits.
    Normal,
    /// synchronous=FULL: every acknowledged batch is fsynced.
    Full,
}

impl SyncMode {
    /// `AITHER_MEMORY_SYNC=full`, else normal.
    pub fn from_env() -> SyncMode {
        match std::env::var("AITHER_MEMORY_SYNC").as_deref() {
            Ok("full") | Ok("FULL") => SyncMode::Full,
            _ => SyncMode::Normal,
        }
    }
}

/// One key/value entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub size: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

/// One search hit, best first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hit {
    pub key: String,
    /// bm25: lower is better (SQLite's sign).
    pub score: f64,
    pub snippet: String,
    pub value: Value,
}

/// A node of the code graph.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    pub kind: String,
    pub props: Value,
    /// Hops from the queried node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
}

/// A typed, directed edge of the code graph.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub kind: String,
    pub props: Value,
}

/// A neighbourhood: the nodes within `depth` hops (edges followed both ways) and the edges
/// walked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Neighbourhood {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Whether the walk stopped at [`MAX_NODES`] or [`MAX_WALK_EDGES`].
    pub truncated: bool,
}

/// One line of `mem export` / `mem import`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExportLine {
    Kv {
        tier: String,
        key: String,
        value: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_ms: Option<i64>,
    },
    Node {
        id: String,
        kind: String,
        props: Value,
    },
    Edge {
        from: String,
        to: String,
        kind: String,
        props: Value,
    },
}

/// Bytes and entries an agent holds in a tier.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
}

/// A write command for the writer thread.
#[derive(Debug)]
enum Write {
    Put {
        owner: String,
        tier: Tier,
        items: Vec<(String, String)>,
        expires_ms: Option<i64>,
        quota: Option<Quota>,
    },
    Delete {
        owner: String,
        tier: Tier,
        key: String,
    },
    AddNode {
        owner: String,
        id: String,
        kind: String,
        props: String,
        quota: Option<Quota>,
    },
    AddEdge {
        owner: String,
        from: String,
        to: String,
        kind: String,
        props: String,
        quota: Option<Quota>,
    },
    RemoveNode {
        owner: String,
        id: String,
    },
    Clear {
        owner: String,
        tier: Option<Tier>,
    },
    Import {
        owner: String,
        records: Vec<ExportLine>,
    },
    PurgeExpired,
}

type Job = (Write, mpsc::SyncSender<Result<u64, MemoryError>>);

/// The memory store: a handle to the writer thread and a pool of read connections.
pub struct MemoryStore {
    tx: Mutex<mpsc::Sender<Job>>,
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    /// The step budget of one read ([`MAX_STEPS`]; lowered by tests to reach it cheaply).
    max_steps: std::sync::atomic::AtomicU64,
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> MemoryError + '_ {
    move |source| MemoryError::Sql {
        path: path.to_path_buf(),
        source,
    }
}

fn open_writer(path: &Path, sync: SyncMode) -> Result<Connection, MemoryError> {
    let c = Connection::open(path).map_err(sql(path))?;
    c.busy_timeout(Duration::from_secs(5)).map_err(sql(path))?;
    c.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql(path))?;
    c.pragma_update(
        None,
        "synchronous",
        match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        },
    )
    .map_err(sql(path))?;
    // A 64 MiB page cache: FTS5 segment merges and index updates stay in memory between
    // commits (the default 2 MiB spills at a few thousand entries per batch).
    c.pragma_update(None, "cache_size", -65536)
        .map_err(sql(path))?;
    c.execute_batch(SCHEMA).map_err(sql(path))?;
    Ok(c)
}

fn open_reader(path: &Path) -> Result<Connection, MemoryError> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(path))?;
    c.busy_timeout(Duration::from_secs(5)).map_err(sql(path))?;
    c.pragma_update(None, "cache_size", -16384)
        .map_err(sql(path))?;
    Ok(c)
}

/// The SQL tier column of a key/value tier.
fn kv_tier(tier: Tier) -> &'static str {
    tier.as_str()
}

fn to_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

impl MemoryStore {
    /// Opens (creating) the database and starts the writer thread.
    pub fn open(path: &Path) -> Result<MemoryStore, MemoryError> {
        Self::open_with(path, SyncMode::from_env())
    }

    pub fn open_with(path: &Path, sync: SyncMode) -> Result<MemoryStore, MemoryError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = open_writer(path, sync)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let p = path.to_path_buf();
        thread::Builder::new()
            .name("aither-memory".into())
            .spawn(move || writer(conn, rx, p))
            .map_err(|e| MemoryError::Sql {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(MemoryStore {
            tx: Mutex::new(tx),
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
            max_steps: std::sync::atomic::AtomicU64::new(MAX_STEPS),
        })
    }

    /// Sets the step budget of a read (tests reach it with a small database).
    #[cfg(test)]
    pub(crate) fn set_max_steps(&self, steps: u64) {
        self.max_steps
            .store(steps, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a write and waits until it is committed (or refused).
    fn write(&self, w: Write) -> Result<u64, MemoryError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((w, reply))
            .map_err(|_| MemoryError::WriterGone)?;
        wait(move || rx.recv()).map_err(|_| MemoryError::WriterGone)?
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, MemoryError> {
        let conn = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_reader(&self.path)?,
        };
        // The cost bound of every read: a step and a time budget, through SQLite's progress
        // handler (called every STEP_UNIT virtual-machine steps; true interrupts the query).
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopped.clone();
        let start = std::time::Instant::now();
        let mut units = 0u64;
        let max_steps = self.max_steps.load(std::sync::atomic::Ordering::Relaxed);
        conn.progress_handler(
            STEP_UNIT,
            Some(move || {
                units += 1;
                let over = units * STEP_UNIT as u64 > max_steps || start.elapsed() > MAX_QUERY_TIME;
                if over {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                over
            }),
        );
        let out = f(&conn);
        conn.progress_handler(STEP_UNIT, None::<fn() -> bool>);
        let out = match out {
            Err(_) if stopped.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(MemoryError::TooCostly {
                    what: "the query's cost budget".into(),
                    limit: format!(
                        "{max_steps} SQLite steps or {} ms",
                        MAX_QUERY_TIME.as_millis()
                    ),
                })
            }
            o => o.map_err(sql(&self.path)),
        };
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEEP_READERS {
            pool.push(conn);
        }
        out
    }

    /// Puts one entry (value: JSON text). Returns 1.
    pub fn put(
        &self,
        owner: &str,
        tier: Tier,
        key: &str,
        value_json: String,
        expires_ms: Option<i64>,
        quota: Option<Quota>,
    ) -> Result<u64, MemoryError> {
        self.put_many(
            owner,
            tier,
            vec![(key.to_string(), value_json)],
            expires_ms,
            quota,
        )
    }

    /// Puts entries in one all-or-nothing step (one quota check for the lot).
    pub fn put_many(
        &self,
        owner: &str,
        tier: Tier,
        items: Vec<(String, String)>,
        expires_ms: Option<i64>,
        quota: Option<Quota>,
    ) -> Result<u64, MemoryError> {
        self.write(Write::Put {
            owner: owner.to_string(),
            tier,
            items,
            expires_ms,
            quota,
        })
    }

    /// Deletes an entry; whether it existed.
    pub fn delete(&self, owner: &str, tier: Tier, key: &str) -> Result<bool, MemoryError> {
        self.write(Write::Delete {
            owner: owner.to_string(),
            tier,
            key: key.to_string(),
        })
        .map(|n| n > 0)
    }

    /// Removes every entry of a tier (None: every tier) of `owner`; how many rows went.
    pub fn clear(&self, owner: &str, tier: Option<Tier>) -> Result<u64, MemoryError> {
        self.write(Write::Clear {
            owner: owner.to_string(),
            tier,
        })
    }

    pub fn add_node(
        &self,
        owner: &str,
        id: &str,
        kind: &str,
        props_json: String,
        quota: Option<Quota>,
    ) -> Result<u64, MemoryError> {
        self.write(Write::AddNode {
            owner: owner.to_string(),
            id: id.to_string(),
            kind: kind.to_string(),
            props: props_json,
            quota,
        })
    }

    pub fn add_edge(
        &self,
        owner: &str,
        from: &str,
        to: &str,
        kind: &str,
        props_json: String,
        quota: Option<Quota>,
    ) -> Result<u64, MemoryError> {
        self.write(Write::AddEdge {
            owner: owner.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            kind: kind.to_string(),
            props: props_json,
            quota,
        })
    }

    /// Removes a node and its edges; whether it existed.
    pub fn remove_node(&self, owner: &str, id: &str) -> Result<bool, MemoryError> {
        self.write(Write::RemoveNode {
            owner: owner.to_string(),
            id: id.to_string(),
        })
        .map(|n| n > 0)
    }

    /// Imports records for `owner` in one all-or-nothing step; how many were written.
    pub fn import(&self, owner: &str, records: Vec<ExportLine>) -> Result<u64, MemoryError> {
        self.write(Write::Import {
            owner: owner.to_string(),
            records,
        })
    }

    /// Deletes every expired `active` entry now; how many.
    pub fn purge_expired(&self) -> Result<u64, MemoryError> {
        self.write(Write::PurgeExpired)
    }

    /// One entry, with its value; None when absent or expired.
    pub fn get(&self, owner: &str, tier: Tier, key: &str) -> Result<Option<Entry>, MemoryError> {
        let now = now_ms();
        self.read(|c| {
            c.prepare_cached(
                "SELECT value, size, created_ms, updated_ms, expires_ms FROM kv
                 WHERE owner = ?1 AND tier = ?2 AND key = ?3
                   AND (expires_ms IS NULL OR expires_ms > ?4)",
            )?
            .query_row(params![owner, kv_tier(tier), key, now], |r| {
                let v: String = r.get(0)?;
                Ok(Entry {
                    key: key.to_string(),
                    value: Some(to_json(&v)),
                    size: r.get::<_, i64>(1)? as u64,
                    created_ms: r.get(2)?,
                    updated_ms: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            })
            .optional()
        })
    }

    /// Keys of a tier in key order, starting after `after`, with `prefix`; values left out.
    pub fn list(
        &self,
        owner: &str,
        tier: Tier,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, MemoryError> {
        let now = now_ms();
        // Keys from `prefix` up to (not including) the first key that no longer has it.
        let lo = after.unwrap_or(prefix).to_string();
        let strict = after.is_some();
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT key, size, created_ms, updated_ms, expires_ms FROM kv
                 WHERE owner = ?1 AND tier = ?2 AND key >= ?3
                   AND (expires_ms IS NULL OR expires_ms > ?4)
                 ORDER BY key LIMIT ?5",
            )?;
            let rows = st.query_map(
                params![owner, kv_tier(tier), lo, now, (limit + 1) as i64],
                |r| {
                    Ok(Entry {
                        key: r.get(0)?,
                        value: None,
                        size: r.get::<_, i64>(1)? as u64,
                        created_ms: r.get(2)?,
                        updated_ms: r.get(3)?,
                        expires_ms: r.get(4)?,
                    })
                },
            )?;
            let mut out = Vec::new();
            for e in rows {
                let e = e?;
                if strict && e.key == lo {
                    continue;
                }
                if !e.key.starts_with(prefix) || out.len() == limit {
                    break;
                }
                out.push(e);
            }
            Ok(out)
        })
    }

    /// Full-text search of `owner`'s knowledge tier (bm25, best first). `query` is plain
    /// words: every word must match (`any`: at least one).
    pub fn search(
        &self,
        owner: &str,
        query: &str,
        any: bool,
        limit: usize,
    ) -> Result<Vec<Hit>, MemoryError> {
        let Some(expr) = fts_query(owner, query, any) else {
            return Ok(Vec::new());
        };
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT kv.key, kv.value, bm25(kv_fts, 0.0, 2.0, 1.0),
                        snippet(kv_fts, 2, '[', ']', '…', 12)
                 FROM kv_fts JOIN kv ON kv.id = kv_fts.rowid
                 WHERE kv_fts MATCH ?1 AND kv.owner = ?2 AND kv.tier = 'knowledge'
                 ORDER BY bm25(kv_fts, 0.0, 2.0, 1.0) LIMIT ?3",
            )?;
            let rows = st.query_map(params![expr, owner, limit as i64], |r| {
                let v: String = r.get(1)?;
                Ok(Hit {
                    key: r.get(0)?,
                    value: to_json(&v),
                    score: r.get(2)?,
                    snippet: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// The nodes within `depth` hops of `id` (edges followed in both directions, only edges
    /// of `kind` when given) and the edges walked. NotFound when `id` is not a node.
    pub fn neighbours(
        &self,
        owner: &str,
        id: &str,
        depth: u32,
        kind: Option<&str>,
    ) -> Result<Neighbourhood, MemoryError> {
        let found = self.read(|c| {
            let mut node =
                c.prepare_cached("SELECT kind, props FROM nodes WHERE owner = ?1 AND id = ?2")?;
            let get_node = |node: &mut rusqlite::CachedStatement<'_>, id: &str, d: u32| {
                node.query_row(params![owner, id], |r| {
                    let p: String = r.get(1)?;
                    Ok(Node {
                        id: id.to_string(),
                        kind: r.get(0)?,
                        props: to_json(&p),
                        depth: Some(d),
                    })
                })
                .optional()
            };
            let Some(root) = get_node(&mut node, id, 0)? else {
                return Ok(None);
            };
            let mut out_st = c.prepare_cached(
                "SELECT dst, kind, props FROM edges
                 WHERE owner = ?1 AND src = ?2 AND (?3 IS NULL OR kind = ?3) LIMIT ?4",
            )?;
            let mut in_st = c.prepare_cached(
                "SELECT src, kind, props FROM edges INDEXED BY edges_by_dst
                 WHERE owner = ?1 AND dst = ?2 AND (?3 IS NULL OR kind = ?3) LIMIT ?4",
            )?;
            let mut seen: HashSet<String> = HashSet::from([id.to_string()]);
            let mut edge_seen: HashSet<(String, String, String)> = HashSet::new();
            let mut nodes = vec![root];
            let mut edges = Vec::new();
            let mut queue = VecDeque::from([(id.to_string(), 0u32)]);
            let mut truncated = false;
            let mut walked = 0usize;
            'walk: while let Some((at, d)) = queue.pop_front() {
                if d >= depth {
                    continue;
                }
                for outgoing in [true, false] {
                    let st = if outgoing { &mut out_st } else { &mut in_st };
                    // At most the edges left in the walk's budget, and one more to know.
                    let left = MAX_WALK_EDGES - walked;
                    let mut found: Vec<(String, String, String)> = st
                        .query_map(params![owner, at, kind, left as i64 + 1], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?
                        .collect::<rusqlite::Result<_>>()?;
                    let cut = found.len() > left;
                    found.truncate(left);
                    walked += found.len();
                    for (other, k, props) in found {
                        let (from, to) = if outgoing {
                            (at.clone(), other.clone())
                        } else {
                            (other.clone(), at.clone())
                        };
                        if edge_seen.insert((from.clone(), to.clone(), k.clone())) {
                            edges.push(Edge {
                                from,
                                to,
                                kind: k,
                                props: to_json(&props),
                            });
                        }
                        if seen.contains(&other) {
                            continue;
                        }
                        if nodes.len() >= MAX_NODES {
                            truncated = true;
                            break 'walk;
                        }
                        seen.insert(other.clone());
                        if let Some(n) = get_node(&mut node, &other, d + 1)? {
                            nodes.push(n);
                        }
                        queue.push_back((other, d + 1));
                    }
                    if cut {
                        // The walk's cost bound: what was found so far, marked truncated.
                        truncated = true;
                        break 'walk;
                    }
                }
            }
            Ok(Some(Neighbourhood {
                nodes,
                edges,
                truncated,
            }))
        })?;
        found.ok_or_else(|| {
            MemoryError::NotFound(format!("no node {id:?} in the codegraph of {owner:?}"))
        })
    }

    /// One node.
    pub fn node(&self, owner: &str, id: &str) -> Result<Option<Node>, MemoryError> {
        self.read(|c| {
            c.prepare_cached("SELECT kind, props FROM nodes WHERE owner = ?1 AND id = ?2")?
                .query_row(params![owner, id], |r| {
                    let p: String = r.get(1)?;
                    Ok(Node {
                        id: id.to_string(),
                        kind: r.get(0)?,
                        props: to_json(&p),
                        depth: None,
                    })
                })
                .optional()
        })
    }

    /// What `owner` holds, per tier.
    pub fn usage(&self, owner: &str) -> Result<HashMap<Tier, Usage>, MemoryError> {
        let rows: Vec<(String, i64, i64)> = self.read(|c| {
            c.prepare_cached("SELECT tier, bytes, entries FROM usage WHERE owner = ?1")?
                .query_map(params![owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(t, b, e)| {
                Some((
                    t.parse().ok()?,
                    Usage {
                        bytes: b.max(0) as u64,
                        entries: e.max(0) as u64,
                    },
                ))
            })
            .collect())
    }

    /// A page of `owner`'s memory as export records, after the cursor `after` (opaque; None:
    /// from the start). Returns the records and the next cursor (None: done).
    pub fn export_page(
        &self,
        owner: &str,
        after: Option<&str>,
        max_bytes: usize,
    ) -> Result<(Vec<ExportLine>, Option<String>), MemoryError> {
        // The cursor is "<section>:<position>": kv:<rowid>, node:<id>, edge:<src>\0<kind>\0<dst>.
        let (section, pos) = match after {
            None => ("kv", ""),
            Some(c) => c.split_once(':').ok_or_else(|| {
                MemoryError::invalid("after", format!("{c:?} is not an export cursor"))
            })?,
        };
        let pos = pos.to_string();
        let now = now_ms();
        self.read(|c| {
            let mut out = Vec::new();
            let mut used = 0usize;
            let full = |used: usize| used >= max_bytes;
            let mut section = section;
            let mut pos = pos;
            if section == "kv" {
                let start: i64 = pos.parse().unwrap_or(0);
                let mut st = c.prepare_cached(
                    "SELECT id, tier, key, value, expires_ms FROM kv
                     WHERE owner = ?1 AND id > ?2 AND (expires_ms IS NULL OR expires_ms > ?3)
                     ORDER BY id LIMIT 1000",
                )?;
                let rows: Vec<(i64, String, String, String, Option<i64>)> = st
                    .query_map(params![owner, start, now], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let more = rows.len() == 1000;
                let mut last = start;
                for (id, tier, key, value, expires_ms) in rows {
                    used += key.len() + value.len() + 64;
                    last = id;
                    out.push(ExportLine::Kv {
                        tier,
                        key,
                        value: to_json(&value),
                        expires_ms,
                    });
                    if full(used) {
                        return Ok((out, Some(format!("kv:{id}"))));
                    }
                }
                if more {
                    return Ok((out, Some(format!("kv:{last}"))));
                }
                section = "node";
                pos = String::new();
            }
            if section == "node" {
                let mut st = c.prepare_cached(
                    "SELECT id, kind, props FROM nodes WHERE owner = ?1 AND id > ?2
                     ORDER BY id LIMIT 1000",
                )?;
                let rows: Vec<(String, String, String)> = st
                    .query_map(params![owner, pos], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let more = rows.len() == 1000;
                let mut last = String::new();
                for (id, kind, props) in rows {
                    used += id.len() + kind.len() + props.len() + 64;
                    last = id.clone();
                    out.push(ExportLine::Node {
                        id,
                        kind,
                        props: to_json(&props),
                    });
                    if full(used) {
                        return Ok((out, Some(format!("node:{last}"))));
                    }
                }
                if more {
                    return Ok((out, Some(format!("node:{last}"))));
                }
                section = "edge";
                pos = String::new();
            }
            if section == "edge" {
                let mut parts = pos.splitn(3, '\0');
                let (s, k, d) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                let mut st = c.prepare_cached(
                    "SELECT src, kind, dst, props FROM edges WHERE owner = ?1
                     AND (src, kind, dst) > (?2, ?3, ?4) ORDER BY src, kind, dst LIMIT 1000",
                )?;
                let rows: Vec<(String, String, String, String)> = st
                    .query_map(params![owner, s, k, d], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let more = rows.len() == 1000;
                let mut last = String::new();
                for (src, kind, dst, props) in rows {
                    used += src.len() + kind.len() + dst.len() + props.len() + 64;
                    last = format!("{src}\0{kind}\0{dst}");
                    out.push(ExportLine::Edge {
                        from: src,
                        to: dst,
                        kind,
                        props: to_json(&props),
                    });
                    if full(used) {
                        return Ok((out, Some(format!("edge:{last}"))));
                    }
                }
                if more {
                    return Ok((out, Some(format!("edge:{last}"))));
                }
                return Ok((out, None));
            }
            Ok((out, None))
        })
    }
}

/// Runs a blocking wait: inside a multi-threaded tokio runtime, with `block_in_place` so that
/// the worker's other tasks move elsewhere meanwhile.
pub fn wait<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The words of a search (what `mem.search` counts against [`super::MAX_TERMS`]).
pub fn search_words(query: &str) -> impl Iterator<Item = &str> {
    query
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
}

/// The FTS5 expression: the owner's rows (a phrase of the owner's name in the `owner` column,
/// an index lookup; the exact owner is checked again in SQL), and the user's words, each
/// quoted so that no FTS5 syntax gets through.
fn fts_query(owner: &str, query: &str, any: bool) -> Option<String> {
    let words: Vec<String> = search_words(query)
        .take(super::MAX_TERMS)
        .map(|w| format!("\"{w}\""))
        .collect();
    if words.is_empty() {
        return None;
    }
    let owner_words: Vec<&str> = owner
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let user = words.join(if any { " OR " } else { " AND " });
    Some(if owner_words.is_empty() {
        format!("{{key value}} : ({user})")
    } else {
        format!(
            "owner : \"{}\" AND {{key value}} : ({user})",
            owner_words.join(" ")
        )
    })
}

/// The writer: takes every command waiting, runs each in its own savepoint in one
/// transaction, commits, then answers.
fn writer(conn: Connection, rx: mpsc::Receiver<Job>, path: PathBuf) {
    let mut next_purge = std::time::Instant::now() + PURGE_EVERY;
    loop {
        let timeout = next_purge.saturating_duration_since(std::time::Instant::now());
        let first = match rx.recv_timeout(timeout) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                next_purge = std::time::Instant::now() + PURGE_EVERY;
                let (tx, _rx) = mpsc::sync_channel(1);
                (Write::PurgeExpired, tx)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let results = run_batch(&conn, &path, &batch);
        for ((_, reply), r) in batch.into_iter().zip(results) {
            let _ = reply.send(r);
        }
    }
}

fn run_batch(conn: &Connection, path: &Path, batch: &[Job]) -> Vec<Result<u64, MemoryError>> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let msg = e.to_string();
        tracing::error!(error = %msg, "memory: cannot begin a transaction");
        return batch
            .iter()
            .map(|_| Err(sql(path)(rusqlite::Error::InvalidQuery)))
            .collect();
    }
    let now = now_ms();
    let mut results = Vec::with_capacity(batch.len());
    for (w, _) in batch {
        let r = conn
            .execute_batch("SAVEPOINT w")
            .map_err(sql(path))
            .and_then(|()| apply(conn, path, w, now));
        match r {
            Ok(n) => {
                let _ = conn.execute_batch("RELEASE w");
                results.push(Ok(n));
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK TO w; RELEASE w");
                results.push(Err(e));
            }
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        tracing::error!(error = %e, "memory: commit failed; the batch is refused");
        let _ = conn.execute_batch("ROLLBACK");
        let msg = e.to_string();
        return results
            .into_iter()
            .map(|_| {
                Err(MemoryError::Sql {
                    path: path.to_path_buf(),
                    source: rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                        Some(msg.clone()),
                    ),
                })
            })
            .collect();
    }
    results
}

fn usage_of(conn: &Connection, owner: &str, tier: Tier) -> rusqlite::Result<Usage> {
    conn.prepare_cached("SELECT bytes, entries FROM usage WHERE owner = ?1 AND tier = ?2")?
        .query_row(params![owner, tier.as_str()], |r| {
            Ok(Usage {
                bytes: r.get::<_, i64>(0)?.max(0) as u64,
                entries: r.get::<_, i64>(1)?.max(0) as u64,
            })
        })
        .optional()
        .map(|u| u.unwrap_or_default())
}

/// Refuses a write that leaves the tier over its quota and larger than it was (a write that
/// shrinks an agent already over a lowered quota is allowed).
fn check_quota(
    conn: &Connection,
    path: &Path,
    owner: &str,
    tier: Tier,
    before: Usage,
    quota: &Option<Quota>,
) -> Result<(), MemoryError> {
    let Some(q) = quota else { return Ok(()) };
    let after = usage_of(conn, owner, tier).map_err(sql(path))?;
    let over = |which: &'static str, would: u64, was: u64, limit: u64, claim: &str| {
        if would > limit && would > was {
            Err(MemoryError::Quota {
                owner: owner.to_string(),
                tier,
                which,
                would,
                limit,
                claim: format!("memory_tiers.{tier}.{claim}"),
            })
        } else {
            Ok(())
        }
    };
    over("bytes", after.bytes, before.bytes, q.bytes, "quota_bytes")?;
    over(
        "entries",
        after.entries,
        before.entries,
        q.entries,
        "quota_entries",
    )
}

fn purge_owner_expired(conn: &Connection, owner: &str, now: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM kv INDEXED BY kv_owner_expiry
         WHERE owner = ?2 AND expires_ms IS NOT NULL AND expires_ms <= ?1",
    )?
    .execute(params![now, owner])
}

fn upsert_kv(
    conn: &Connection,
    owner: &str,
    tier: &str,
    key: &str,
    value: &str,
    expires_ms: Option<i64>,
    now: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO kv(owner, tier, key, value, size, created_ms, updated_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)
         ON CONFLICT(owner, tier, key) DO UPDATE SET value = excluded.value,
             size = excluded.size, updated_ms = excluded.updated_ms,
             expires_ms = excluded.expires_ms",
    )?
    .execute(params![
        owner,
        tier,
        key,
        value,
        (key.len() + value.len()) as i64,
        now,
        expires_ms
    ])
}

/// Upserts `items` in one statement, in their order (a key given twice keeps its last value).
///
/// One statement, not one per entry: SQLite opens a statement savepoint on the FTS5 table for
/// each statement that writes through the triggers, and FTS5 writes its pending terms to disk
/// as a new index segment at every savepoint. One statement per entry therefore wrote one
/// segment per entry, and automerge then merged them again (two thirds of a batched put's
/// time); one statement writes one segment for the lot. The triggers still run per row, so
/// the usage totals (and the quota check after this) stay exact.
fn upsert_kv_many(
    conn: &Connection,
    owner: &str,
    tier: &str,
    items: &[(String, String)],
    expires_ms: Option<i64>,
    now: i64,
) -> rusqlite::Result<usize> {
    if let [(key, value)] = items {
        return upsert_kv(conn, owner, tier, key, value, expires_ms, now);
    }
    // [[key, value, size], ...]: the size in bytes, as upsert_kv counts it.
    let rows: Vec<(&str, &str, usize)> = items
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str(), k.len() + v.len()))
        .collect();
    let rows = serde_json::to_string(&rows)
        .map_err(|x| rusqlite::Error::ToSqlConversionFailure(Box::new(x)))?;
    conn.prepare_cached(
        "INSERT INTO kv(owner, tier, key, value, size, created_ms, updated_ms, expires_ms)
         SELECT ?1, ?2, r.value ->> 0, r.value ->> 1, r.value ->> 2, ?4, ?4, ?5
         FROM json_each(?3) AS r WHERE true ORDER BY r.key
         ON CONFLICT(owner, tier, key) DO UPDATE SET value = excluded.value,
             size = excluded.size, updated_ms = excluded.updated_ms,
             expires_ms = excluded.expires_ms",
    )?
    .execute(params![owner, tier, rows, now, expires_ms])
}

fn upsert_node(
    conn: &Connection,
    owner: &str,
    id: &str,
    kind: &str,
    props: &str,
    now: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO nodes(owner, id, kind, props, size, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(owner, id) DO UPDATE SET kind = excluded.kind, props = excluded.props,
             size = excluded.size, updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        owner,
        id,
        kind,
        props,
        (id.len() + kind.len() + props.len()) as i64,
        now
    ])
}

fn node_exists(conn: &Connection, owner: &str, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM nodes WHERE owner = ?1 AND id = ?2")?
        .exists(params![owner, id])
}

fn upsert_edge(
    conn: &Connection,
    owner: &str,
    from: &str,
    to: &str,
    kind: &str,
    props: &str,
    now: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO edges(owner, src, dst, kind, props, size, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(owner, src, kind, dst) DO UPDATE SET props = excluded.props,
             size = excluded.size, updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        owner,
        from,
        to,
        kind,
        props,
        (from.len() + to.len() + kind.len() + props.len()) as i64,
        now
    ])
}

fn apply(conn: &Connection, path: &Path, w: &Write, now: i64) -> Result<u64, MemoryError> {
    let e = sql(path);
    match w {
        Write::Put {
            owner,
            tier,
            items,
            expires_ms,
            quota,
        } => {
            if *tier == Tier::Active {
                purge_owner_expired(conn, owner, now).map_err(&e)?;
            }
            let before = usage_of(conn, owner, *tier).map_err(&e)?;
            upsert_kv_many(conn, owner, kv_tier(*tier), items, *expires_ms, now).map_err(&e)?;
            check_quota(conn, path, owner, *tier, before, quota)?;
            Ok(items.len() as u64)
        }
        Write::Delete { owner, tier, key } => conn
            .prepare_cached("DELETE FROM kv WHERE owner = ?1 AND tier = ?2 AND key = ?3")
            .and_then(|mut s| s.execute(params![owner, kv_tier(*tier), key]))
            .map(|n| n as u64)
            .map_err(e),
        Write::AddNode {
            owner,
            id,
            kind,
            props,
            quota,
        } => {
            let before = usage_of(conn, owner, Tier::Codegraph).map_err(&e)?;
            upsert_node(conn, owner, id, kind, props, now).map_err(&e)?;
            check_quota(conn, path, owner, Tier::Codegraph, before, quota)?;
            Ok(1)
        }
        Write::AddEdge {
            owner,
            from,
            to,
            kind,
            props,
            quota,
        } => {
            for end in [from, to] {
                if !node_exists(conn, owner, end).map_err(&e)? {
                    return Err(MemoryError::NotFound(format!(
                        "no node {end:?} in the codegraph of {owner:?} (add the node first)"
                    )));
                }
            }
            let before = usage_of(conn, owner, Tier::Codegraph).map_err(&e)?;
            upsert_edge(conn, owner, from, to, kind, props, now).map_err(&e)?;
            check_quota(conn, path, owner, Tier::Codegraph, before, quota)?;
            Ok(1)
        }
        Write::RemoveNode { owner, id } => {
            let n = conn
                .execute(
                    "DELETE FROM nodes WHERE owner = ?1 AND id = ?2",
                    params![owner, id],
                )
                .map_err(&e)?;
            conn.execute(
                "DELETE FROM edges WHERE owner = ?1 AND (src = ?2 OR dst = ?2)",
                params![owner, id],
            )
            .map_err(&e)?;
            Ok(n as u64)
        }
        Write::Clear { owner, tier } => clear(conn, path, owner, *tier),
        Write::Import { owner, records } => import(conn, path, owner, records, now),
        Write::PurgeExpired => conn
            .execute(
                "DELETE FROM kv WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
                params![now],
            )
            .map(|n| n as u64)
            .map_err(e),
    }
}

/// `apply`'s `Write::Clear`: one tier of `owner`'s memory, or all of it with its usage.
fn clear(
    conn: &Connection,
    path: &Path,
    owner: &str,
    tier: Option<Tier>,
) -> Result<u64, MemoryError> {
    let e = sql(path);
    let mut n = 0;
    let tiers: Vec<Tier> = match tier {
        Some(t) => vec![t],
        None => Tier::ALL.to_vec(),
    };
    for t in tiers {
        if t == Tier::Codegraph {
            n += conn
                .execute("DELETE FROM edges WHERE owner = ?1", params![owner])
                .map_err(&e)?;
            n += conn
                .execute("DELETE FROM nodes WHERE owner = ?1", params![owner])
                .map_err(&e)?;
        } else {
            n += conn
                .execute(
                    "DELETE FROM kv WHERE owner = ?1 AND tier = ?2",
                    params![owner, kv_tier(t)],
                )
                .map_err(&e)?;
        }
    }
    if tier.is_none() {
        conn.execute("DELETE FROM usage WHERE owner = ?1", params![owner])
            .map_err(&e)?;
    }
    Ok(n as u64)
}

/// `apply`'s `Write::Import`: `records` into `owner`'s memory.
fn import(
    conn: &Connection,
    path: &Path,
    owner: &str,
    records: &[ExportLine],
    now: i64,
) -> Result<u64, MemoryError> {
    let e = sql(path);
    let mut n = 0u64;
    // Nodes first, so that edges find their ends whatever the file's order.
    for r in records {
        if let ExportLine::Node { id, kind, props } = r {
            upsert_node(conn, owner, id, kind, &props.to_string(), now).map_err(&e)?;
            n += 1;
        }
    }
    for r in records {
        match r {
            ExportLine::Kv {
                tier,
                key,
                value,
                expires_ms,
            } => {
                if expires_ms.is_some_and(|x| x <= now) {
                    continue;
                }
                upsert_kv(conn, owner, tier, key, &value.to_string(), *expires_ms, now)
                    .map_err(&e)?;
                n += 1;
            }
            ExportLine::Edge {
                from,
                to,
                kind,
                props,
            } => {
                for end in [from, to] {
                    if !node_exists(conn, owner, end).map_err(&e)? {
                        return Err(MemoryError::invalid(
                            "edge",
                            format!("{from:?} -> {to:?}: no node {end:?} in the import or the codegraph"),
                        ));
                    }
                }
                upsert_edge(conn, owner, from, to, kind, &props.to_string(), now).map_err(&e)?;
                n += 1;
            }
            ExportLine::Node { .. } => {}
        }
    }
    Ok(n)
}
