//! aitherd's state in SQLite (WAL): agents, runs and events, in the same state.db as token
//! revocations. One writer: a thread that owns the only writing connection and commits what
//! arrives in batches (one transaction per batch), so a burst of spawns costs one fsync-less
//! WAL commit, not hundreds. Readers open their own connections (WAL lets them run beside it).
//!
//! A write that fails (a full disk) is logged and dropped; the daemon keeps serving, and the
//! in-memory state stays the truth for running agents (it is rebuilt from the cgroups at the
//! next start).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rusqlite::{params, Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the state writer has stopped")]
    WriterGone,
    #[error("corrupt record for agent {name:?}: {detail}")]
    Corrupt { name: String, detail: String },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    name       TEXT PRIMARY KEY,
    record     TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    shim_pid   INTEGER,
    pid1       INTEGER,
    cgroup     TEXT,
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER,
    reason     TEXT
);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name, id);
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    name  TEXT,
    kind  TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts_ms);
-- Who owns a name (issue 18): its agent, and the memory and bus streams kept under it after
-- the agent is removed. Kept until an admin's `rm --purge-memory`. A database from before
-- owners has no rows: its agents' records read as owner 0 (root's, admins only).
CREATE TABLE IF NOT EXISTS owners (
    name TEXT PRIMARY KEY,
    uid  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu (
    name  TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS net_quota (
    name       TEXT NOT NULL,
    token      TEXT NOT NULL,
    state      TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (name, token)
);
";

/// One event: a state change, a pain signal, a health result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub ts_ms: u64,
    pub name: Option<String>,
    pub kind: String,
    pub data: serde_json::Value,
}

/// What the daemon persists about an agent to supervise it again after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRow {
    pub name: String,
    pub record: serde_json::Value,
    pub state: String,
    /// Restarts so far (kept across daemon restarts, shown by `ps`).
    pub restarts: u32,
}

enum Op {
    PutAgent {
        name: String,
        record: String,
        state: String,
        now: u64,
    },
    SetState {
        name: String,
        state: String,
        now: u64,
    },
    SetRestarts {
        name: String,
        restarts: u32,
    },
    DeleteAgent(String),
    PutOwner {
        name: String,
        uid: u32,
    },
    DeleteOwner(String),
    RunStarted {
        name: String,
        shim_pid: i32,
        pid1: Option<i32>,
        cgroup: String,
        now: u64,
    },
    RunEnded {
        name: String,
        reason: String,
        now: u64,
    },
    Event(Event),
    /// A GPU request ("queued", data: the request) or lease ("granted", data: the lease).
    PutGpu {
        name: String,
        state: &'static str,
        data: String,
    },
    DeleteGpu(String),
    /// An agent's egress quota state (per agent name and token id; docs/network.md).
    PutNetQuota {
        name: String,
        token: String,
        state: String,
        now: u64,
    },
    Flush(oneshot::Sender<()>),
}

/// The writer's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let sql = |source| StoreError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let c = Connection::open(path).map_err(sql)?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql)?;
    c.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
    // WAL with synchronous=NORMAL: a power cut may lose the last commits, never corrupt.
    c.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    c.execute_batch(SCHEMA).map_err(sql)?;
    // Added after the first release of the schema: a database from then gains the column.
    if let Err(e) = c.execute(
        "ALTER TABLE agents ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
        [],
    ) {
        if !e.to_string().contains("duplicate column") {
            return Err(sql(e));
        }
    }
    Ok(c)
}

impl Store {
    /// Opens (creating) the database and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = open(path)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let p = path.to_path_buf();
        thread::Builder::new()
            .name("aither-store".into())
            .spawn(move || writer(conn, rx, p))
            .map_err(|e| StoreError::Sql {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Store {
            tx,
            path: path.to_path_buf(),
        })
    }

    fn send(&self, op: Op) {
        let _ = self.tx.send(op);
    }

    pub fn put_agent(&self, name: &str, record: &serde_json::Value, state: &str) {
        self.send(Op::PutAgent {
            name: name.into(),
            record: record.to_string(),
            state: state.into(),
            now: now_ms(),
        });
    }

    pub fn set_state(&self, name: &str, state: &str) {
        self.send(Op::SetState {
            name: name.into(),
            state: state.into(),
            now: now_ms(),
        });
    }

    pub fn set_restarts(&self, name: &str, restarts: u32) {
        self.send(Op::SetRestarts {
            name: name.into(),
            restarts,
        });
    }

    pub fn delete_agent(&self, name: &str) {
        self.send(Op::DeleteAgent(name.into()));
    }

    /// Records who owns `name` (and what is kept under it).
    pub fn put_owner(&self, name: &str, uid: u32) {
        self.send(Op::PutOwner {
            name: name.into(),
            uid,
        });
    }

    /// Forgets the owner of `name` (its memory was purged).
    pub fn delete_owner(&self, name: &str) {
        self.send(Op::DeleteOwner(name.into()));
    }

    pub fn run_started(&self, name: &str, shim_pid: i32, pid1: Option<i32>, cgroup: &str) {
        self.send(Op::RunStarted {
            name: name.into(),
            shim_pid,
            pid1,
            cgroup: cgroup.into(),
            now: now_ms(),
        });
    }

    pub fn run_ended(&self, name: &str, reason: &str) {
        self.send(Op::RunEnded {
            name: name.into(),
            reason: reason.into(),
            now: now_ms(),
        });
    }

    /// Persists an agent's GPU request or lease (the queue and leases survive a restart).
    pub fn put_gpu(&self, name: &str, state: &'static str, data: &serde_json::Value) {
        self.send(Op::PutGpu {
            name: name.into(),
            state,
            data: data.to_string(),
        });
    }

    pub fn delete_gpu(&self, name: &str) {
        self.send(Op::DeleteGpu(name.into()));
    }

    pub fn event(&self, e: Event) {
        self.send(Op::Event(e));
    }

    /// Persists the egress quota state of agent `name` under token `token` (JSON).
    pub fn put_net_quota(&self, name: &str, token: &str, state: &serde_json::Value) {
        self.send(Op::PutNetQuota {
            name: name.into(),
            token: token.into(),
            state: state.to_string(),
            now: now_ms(),
        });
    }

    /// Waits until everything sent so far is committed (or failed).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush(tx))
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)
    }

    /// A read-only connection (for loading at start and for event history).
    pub fn reader(&self) -> Result<Connection, StoreError> {
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Sql {
            path: self.path.clone(),
            source,
        })?;
        let _ = c.busy_timeout(std::time::Duration::from_secs(5));
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every name's owner (at daemon start).
pub fn load_owners(
    c: &Connection,
    path: &Path,
) -> Result<std::collections::HashMap<String, u32>, StoreError> {
    let sql = |source| StoreError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let mut st = c.prepare("SELECT name, uid FROM owners").map_err(sql)?;
    let rows = st
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u32))
        })
        .map_err(sql)?;
    rows.collect::<Result<_, _>>().map_err(sql)
}

/// Every agent row (at daemon start).
pub fn load_agents(c: &Connection, path: &Path) -> Result<Vec<AgentRow>, StoreError> {
    let sql = |source| StoreError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let mut st = c
        .prepare("SELECT name, record, state, restarts FROM agents ORDER BY created_ms")
        .map_err(sql)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, record, state, restarts) = row.map_err(sql)?;
        let record = serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        out.push(AgentRow {
            name,
            record,
            state,
            restarts: restarts.clamp(0, u32::MAX as i64) as u32,
        });
    }
    Ok(out)
}

/// Every persisted GPU row: (agent, "queued" | "granted", data).
pub fn load_gpu(
    c: &Connection,
    path: &Path,
) -> Result<Vec<(String, String, serde_json::Value)>, StoreError> {
    let sql = |source| StoreError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let mut st = c
        .prepare("SELECT name, state, data FROM gpu")
        .map_err(sql)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, state, data) = row.map_err(sql)?;
        let data = serde_json::from_str(&data).map_err(|e| StoreError::Corrupt {
            name: name.clone(),
            detail: format!("gpu row: {e}"),
        })?;
        out.push((name, state, data));
    }
    Ok(out)
}

/// Events since `since_ms` (oldest first), optionally of one agent, at most `limit`.
pub fn load_events(
    c: &Connection,
    path: &Path,
    since_ms: u64,
    name: Option<&str>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let sql = |source| StoreError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let mut st = c
        .prepare(
            "SELECT ts_ms, name, kind, data FROM (
                 SELECT id, ts_ms, name, kind, data FROM events
                 WHERE ts_ms >= ?1 AND (?2 IS NULL OR name = ?2)
                 ORDER BY id DESC LIMIT ?3)
             ORDER BY id",
        )
        .map_err(sql)?;
    let rows = st
        .query_map(params![since_ms as i64, name, limit as i64], |r| {
            Ok(Event {
                ts_ms: r.get::<_, i64>(0)? as u64,
                name: r.get(1)?,
                kind: r.get(2)?,
                data: serde_json::from_str(&r.get::<_, String>(3)?)
                    .unwrap_or(serde_json::Value::Null),
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::PutAgent {
            name,
            record,
            state,
            now,
        } => {
            tx.execute(
                "INSERT INTO agents(name, record, state, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(name) DO UPDATE SET record = ?2, state = ?3, updated_ms = ?4",
                params![name, record, state, *now as i64],
            )?;
        }
        Op::SetState { name, state, now } => {
            tx.execute(
                "UPDATE agents SET state = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, state, *now as i64],
            )?;
        }
        Op::SetRestarts { name, restarts } => {
            tx.execute(
                "UPDATE agents SET restarts = ?2 WHERE name = ?1",
                params![name, restarts],
            )?;
        }
        Op::PutGpu { name, state, data } => {
            tx.execute(
                "INSERT INTO gpu(name, state, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET state = ?2, data = ?3",
                params![name, state, data],
            )?;
        }
        Op::DeleteGpu(name) => {
            tx.execute("DELETE FROM gpu WHERE name = ?1", params![name])?;
        }
        Op::DeleteAgent(name) => {
            tx.execute("DELETE FROM agents WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM net_quota WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM gpu WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM runs WHERE name = ?1", params![name])?;
        }
        Op::PutOwner { name, uid } => {
            tx.execute(
                "INSERT INTO owners(name, uid) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET uid = ?2",
                params![name, *uid as i64],
            )?;
        }
        Op::DeleteOwner(name) => {
            tx.execute("DELETE FROM owners WHERE name = ?1", params![name])?;
        }
        Op::RunStarted {
            name,
            shim_pid,
            pid1,
            cgroup,
            now,
        } => {
            tx.execute(
                "INSERT INTO runs(name, shim_pid, pid1, cgroup, started_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, shim_pid, pid1, cgroup, *now as i64],
            )?;
            // Keep the last 50 runs of each agent.
            tx.execute(
                "DELETE FROM runs WHERE name = ?1 AND id NOT IN
                   (SELECT id FROM runs WHERE name = ?1 ORDER BY id DESC LIMIT 50)",
                params![name],
            )?;
        }
        Op::RunEnded { name, reason, now } => {
            tx.execute(
                "UPDATE runs SET ended_ms = ?2, reason = ?3
                 WHERE id = (SELECT max(id) FROM runs WHERE name = ?1) AND ended_ms IS NULL",
                params![name, *now as i64, reason],
            )?;
        }
        Op::Event(e) => {
            tx.execute(
                "INSERT INTO events(ts_ms, name, kind, data) VALUES (?1, ?2, ?3, ?4)",
                params![e.ts_ms as i64, e.name, e.kind, e.data.to_string()],
            )?;
        }
        Op::PutNetQuota {
            name,
            token,
            state,
            now,
        } => {
            tx.execute(
                "INSERT INTO net_quota(name, token, state, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name, token) DO UPDATE SET state = ?3, updated_ms = ?4",
                params![name, token, state, *now as i64],
            )?;
        }
        Op::Flush(_) => {}
    }
    Ok(())
}

/// The stored egress quota state of agent `name` under token `token`, if any.
pub fn load_net_quota(
    c: &Connection,
    path: &Path,
    name: &str,
    token: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    use rusqlite::OptionalExtension;
    let text: Option<String> = c
        .query_row(
            "SELECT state FROM net_quota WHERE name = ?1 AND token = ?2",
            params![name, token],
            |r| r.get(0),
        )
        .optional()
        .map_err(|source| StoreError::Sql {
            path: path.to_path_buf(),
            source,
        })?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| StoreError::Corrupt {
            name: name.to_string(),
            detail: format!("net_quota: {e}"),
        })
    })
    .transpose()
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>, path: PathBuf) {
    let mut since_prune = 0u32;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
            if batch.len() >= 512 {
                break;
            }
        }
        let res = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for op in &batch {
                apply(&tx, op)?;
            }
            tx.commit()
        })();
        if let Err(e) = res {
            // A full disk or a broken file: the batch is lost, the daemon goes on.
            tracing::error!(db = %path.display(), error = %e, dropped = batch.len(), "state write failed");
        }
        since_prune += batch.len() as u32;
        if since_prune > 10_000 {
            since_prune = 0;
            // Keep the newest 100k events.
            let _ = conn.execute(
                "DELETE FROM events WHERE id < (SELECT max(id) - 100000 FROM events)",
                [],
            );
        }
        for op in batch {
            if let Op::Flush(tx) = op {
                let _ = tx.send(());
            }
        }
    }
}

pub use crate::units::now_ms;
