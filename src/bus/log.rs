//! The durable log: `$STATE_DIR/bus.db` (SQLite, WAL). One writer thread takes appends and
//! acks from a queue and commits them in batches; readers use their own connection.
//! Sequence numbers are assigned by the broker (under its lock, so that live delivery and the
//! log agree on order) and never reused: the last one is kept in `meta` even when retention
//! has pruned every message.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{now_ms, BusError, CommitError, Msg};

/// Most operations committed in one transaction.
const BATCH: usize = 1024;

/// Retention of the log: the oldest messages go first when either limit is passed.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_bytes: u64,
    pub max_age_ms: u64,
    /// How often the age limit is enforced.
    pub every: Duration,
}

impl Retention {
    /// The retention of `[retention]` in aitherd.toml (the environment variables are folded
    /// in there, daemon/config.rs); pruned every `AITHER_BUS_PRUNE_MS` (10 s).
    pub fn of(max_bytes: u64, max_age: Duration) -> Retention {
        Retention {
            max_bytes,
            max_age_ms: max_age.as_millis().min(u64::MAX as u128) as u64,
            every: Self::from_env().every,
        }
    }

    /// Defaults (256 MiB, 7 days, every 10 s); `AITHER_BUS_MAX_BYTES`, `AITHER_BUS_MAX_AGE_S`,
    /// `AITHER_BUS_PRUNE_MS` override them.
    pub fn from_env() -> Retention {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Retention {
            max_bytes: num("AITHER_BUS_MAX_BYTES").unwrap_or(256 << 20),
            max_age_ms: num("AITHER_BUS_MAX_AGE_S").unwrap_or(7 * 86_400) * 1000,
            every: Duration::from_millis(num("AITHER_BUS_PRUNE_MS").unwrap_or(10_000)),
        }
    }
}

/// What `aitherctl bus streams` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub max_age_s: u64,
    pub consumers: Vec<Consumer>,
}

/// A durable consumer's cursor.
#[derive(Clone, Debug, Serialize)]
pub struct Consumer {
    /// The uid whose consumer it is, for an operator's (`agent` "operator"): each user has
    /// their own names. 0 for an agent's own consumers (the agent's name is their namespace)
    /// and for every consumer stored before owners.
    pub owner: u32,
    pub agent: String,
    pub name: String,
    pub acked_seq: u64,
    pub updated_ms: u64,
}

type Done = tokio::sync::oneshot::Sender<Result<u64, CommitError>>;

enum Op {
    Append(Arc<Msg>, Option<Done>),
    Ack {
        owner: u32,
        agent: String,
        name: String,
        seq: u64,
        done: Option<Done>,
    },
    /// Deletes a cursor; `done` hears how many were deleted (0 or 1).
    Forget {
        owner: u32,
        agent: String,
        name: String,
        done: Done,
    },
    Flush(smpsc::Sender<()>),
}

/// The durable log.
pub struct Log {
    tx: Mutex<Option<smpsc::Sender<Op>>>,
    path: PathBuf,
    reader: Mutex<Connection>,
    committed: Arc<AtomicU64>,
    last_seq: u64,
    /// Shared with the writer thread, which reads it at each pass (a reload changes it).
    retention: Arc<Mutex<Retention>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn db(path: &Path) -> impl Fn(rusqlite::Error) -> BusError + '_ {
    move |source| BusError::Db {
        path: path.display().to_string(),
        source,
    }
}

fn open(path: &Path) -> Result<Connection, BusError> {
    let c = Connection::open(path).map_err(db(path))?;
    c.busy_timeout(Duration::from_secs(5)).map_err(db(path))?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS msgs (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,
             subject TEXT NOT NULL, data TEXT NOT NULL, publisher TEXT NOT NULL, size INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS msgs_ts ON msgs(ts_ms);
         CREATE TABLE IF NOT EXISTS cursors (owner INTEGER NOT NULL DEFAULT 0,
             agent TEXT NOT NULL, name TEXT NOT NULL, acked INTEGER NOT NULL,
             updated_ms INTEGER NOT NULL, PRIMARY KEY (owner, agent, name));
         CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);",
    )
    .map_err(db(path))?;
    migrate_cursor_owners(&c).map_err(db(path))?;
    Ok(c)
}

/// A log from before owners keyed cursors by (agent, name): the table is rebuilt with an
/// `owner` column (0: root's, which is what every operator's consumer was) as the first key,
/// in one transaction.
fn migrate_cursor_owners(c: &Connection) -> rusqlite::Result<()> {
    let has_owner: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('cursors') WHERE name = 'owner'")?
        .exists([])?;
    if has_owner {
        return Ok(());
    }
    c.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE cursors_owned (owner INTEGER NOT NULL DEFAULT 0, agent TEXT NOT NULL,
             name TEXT NOT NULL, acked INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
             PRIMARY KEY (owner, agent, name));
         INSERT INTO cursors_owned (owner, agent, name, acked, updated_ms)
             SELECT 0, agent, name, acked, updated_ms FROM cursors;
         DROP TABLE cursors;
         ALTER TABLE cursors_owned RENAME TO cursors;
         COMMIT;",
    )
}

impl Log {
    /// Opens (or creates) the log and starts its writer thread.
    pub fn open(path: &Path, retention: Retention) -> Result<Log, BusError> {
        let w = open(path)?;
        let reader = open(path)?;
        let max: u64 = w
            .query_row("SELECT coalesce(max(seq), 0) FROM msgs", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db(path))? as u64;
        let meta: u64 = w
            .query_row("SELECT v FROM meta WHERE k = 'last_seq'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(db(path))?
            .unwrap_or(0) as u64;
        let last_seq = max.max(meta);
        let bytes: u64 = w
            .query_row("SELECT coalesce(sum(size), 0) FROM msgs", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db(path))? as u64;
        let committed = Arc::new(AtomicU64::new(last_seq));
        let (tx, rx) = smpsc::channel();
        let c2 = committed.clone();
        let p2 = path.to_path_buf();
        let retention = Arc::new(Mutex::new(retention));
        let r2 = retention.clone();
        let thread = std::thread::Builder::new()
            .name("aither-bus-log".into())
            .spawn(move || writer(w, rx, c2, bytes, r2, p2))
            .map_err(|e| BusError::Db {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Log {
            tx: Mutex::new(Some(tx)),
            path: path.to_path_buf(),
            reader: Mutex::new(reader),
            committed,
            last_seq,
            retention,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The retention in force.
    pub fn retention(&self) -> Retention {
        *self.retention.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the retention (a reload of aitherd.toml); the writer applies it at its next
    /// pass (within `every`).
    pub fn set_retention(&self, r: Retention) {
        *self.retention.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    /// The highest sequence number in the log when it was opened.
    pub fn last_seq_at_open(&self) -> u64 {
        self.last_seq
    }

    /// The highest committed sequence number.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, op: Op) -> Result<(), BusError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref()
            .ok_or(BusError::LogGone)?
            .send(op)
            .map_err(|_| BusError::LogGone)
    }

    /// Queues a message (its `seq` set); `done` hears when it is committed.
    pub fn append(&self, msg: Arc<Msg>, done: Option<Done>) -> Result<(), BusError> {
        self.send(Op::Append(msg, done))
    }

    /// Records that consumer `name` of `agent` (of uid `owner`: see [`Consumer::owner`]) has
    /// processed everything up to `seq`; `done` hears when that is committed.
    pub fn ack(
        &self,
        owner: u32,
        agent: &str,
        name: &str,
        seq: u64,
        done: Option<Done>,
    ) -> Result<(), BusError> {
        self.send(Op::Ack {
            owner,
            agent: agent.into(),
            name: name.into(),
            seq,
            done,
        })
    }

    /// Deletes consumer `name` of `agent` of uid `owner`; `done` hears how many cursors were
    /// deleted (0: there was none) once committed.
    pub fn forget(&self, owner: u32, agent: &str, name: &str, done: Done) -> Result<(), BusError> {
        self.send(Op::Forget {
            owner,
            agent: agent.into(),
            name: name.into(),
            done,
        })
    }

    /// Waits until everything queued so far is committed.
    pub fn flush(&self) {
        let (tx, rx) = smpsc::channel();
        if self.send(Op::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Commits what is queued and stops the writer.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `limit` committed messages with `seq >= from`, in order.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<Msg>, BusError> {
        let c = self.reader();
        let mut st = c
            .prepare_cached(
                "SELECT seq, ts_ms, subject, data, publisher FROM msgs WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(db(&self.path))?;
        let rows = st
            .query_map(params![from as i64, limit as i64], |r| {
                Ok(Msg {
                    seq: Some(r.get::<_, i64>(0)? as u64),
                    ts_ms: r.get::<_, i64>(1)? as u64,
                    subject: r.get(2)?,
                    data: r.get(3)?,
                    publisher: r.get(4)?,
                })
            })
            .map_err(db(&self.path))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db(&self.path))
    }

    /// The committed messages with `from <= seq < to`, in order (one page of a replay).
    pub fn read_range(&self, from: u64, to: u64) -> Result<Vec<Msg>, BusError> {
        let c = self.reader();
        let mut st = c
            .prepare_cached(
                "SELECT seq, ts_ms, subject, data, publisher FROM msgs WHERE seq >= ?1 AND seq < ?2 ORDER BY seq",
            )
            .map_err(db(&self.path))?;
        let rows = st
            .query_map(params![from as i64, to as i64], |r| {
                Ok(Msg {
                    seq: Some(r.get::<_, i64>(0)? as u64),
                    ts_ms: r.get::<_, i64>(1)? as u64,
                    subject: r.get(2)?,
                    data: r.get(3)?,
                    publisher: r.get(4)?,
                })
            })
            .map_err(db(&self.path))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db(&self.path))
    }

    /// The first sequence number at or after time `ts_ms` (or the next one to be written).
    pub fn seq_at(&self, ts_ms: u64) -> Result<u64, BusError> {
        let c = self.reader();
        let s: Option<i64> = c
            .query_row(
                "SELECT min(seq) FROM msgs WHERE ts_ms >= ?1",
                params![ts_ms as i64],
                |r| r.get(0),
            )
            .map_err(db(&self.path))?;
        Ok(s.map(|s| s as u64).unwrap_or(self.committed() + 1))
    }

    /// The acked sequence number of a durable consumer.
    pub fn cursor(&self, owner: u32, agent: &str, name: &str) -> Result<Option<u64>, BusError> {
        let c = self.reader();
        c.query_row(
            "SELECT acked FROM cursors WHERE owner = ?1 AND agent = ?2 AND name = ?3",
            params![owner, agent, name],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|o| o.map(|v| v as u64))
        .map_err(db(&self.path))
    }

    pub fn stats(&self) -> Result<Stats, BusError> {
        let c = self.reader();
        let (first, count, bytes): (Option<i64>, i64, i64) = c
            .query_row(
                "SELECT min(seq), count(*), coalesce(sum(size), 0) FROM msgs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db(&self.path))?;
        let mut st = c
            .prepare(
                "SELECT owner, agent, name, acked, updated_ms FROM cursors ORDER BY agent, owner, name",
            )
            .map_err(db(&self.path))?;
        let consumers = st
            .query_map([], |r| {
                Ok(Consumer {
                    owner: r.get(0)?,
                    agent: r.get(1)?,
                    name: r.get(2)?,
                    acked_seq: r.get::<_, i64>(3)? as u64,
                    updated_ms: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(db(&self.path))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db(&self.path))?;
        Ok(Stats {
            first_seq: first.map(|f| f as u64),
            last_seq: self.committed(),
            messages: count as u64,
            bytes: bytes as u64,
            max_bytes: self.retention().max_bytes,
            max_age_s: self.retention().max_age_ms / 1000,
            consumers,
        })
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer(
    mut c: Connection,
    rx: smpsc::Receiver<Op>,
    committed: Arc<AtomicU64>,
    mut bytes: u64,
    shared: Arc<Mutex<Retention>>,
    path: PathBuf,
) {
    let mut last_prune = Instant::now();
    loop {
        let ret = *shared.lock().unwrap_or_else(|e| e.into_inner());
        let first = match rx.recv_timeout(ret.every) {
            Ok(op) => Some(op),
            Err(smpsc::RecvTimeoutError::Timeout) => None,
            Err(smpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut ops: Vec<Op> = first.into_iter().collect();
        while ops.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut done = Vec::new();
        let mut flushes = Vec::new();
        let mut max_seq = 0u64;
        let mut added = 0u64;
        let res = (|| -> rusqlite::Result<()> {
            let tx = c.transaction()?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT OR REPLACE INTO msgs (seq, ts_ms, subject, data, publisher, size) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                let mut ack = tx.prepare_cached(
                    "INSERT INTO cursors (owner, agent, name, acked, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(owner, agent, name) DO UPDATE SET acked = max(acked, excluded.acked), updated_ms = excluded.updated_ms",
                )?;
                // Appends are inserted after the loop, ROWS to a statement (one statement's
                // work, cursors opened once, instead of ROWS); cursor ops keep their order.
                let mut appends: Vec<Arc<Msg>> = Vec::new();
                for op in ops {
                    match op {
                        Op::Append(m, d) => {
                            let seq = m.seq.unwrap_or(0);
                            added += (m.subject.len() + m.data.len()) as u64;
                            max_seq = max_seq.max(seq);
                            if let Some(d) = d {
                                done.push((d, seq));
                            }
                            appends.push(m);
                        }
                        Op::Ack {
                            owner,
                            agent,
                            name,
                            seq,
                            done: d,
                        } => {
                            ack.execute(params![owner, agent, name, seq as i64, now_ms() as i64])?;
                            if let Some(d) = d {
                                done.push((d, seq));
                            }
                        }
                        Op::Forget {
                            owner,
                            agent,
                            name,
                            done: d,
                        } => {
                            let n = tx.execute(
                                "DELETE FROM cursors WHERE owner = ?1 AND agent = ?2 AND name = ?3",
                                params![owner, agent, name],
                            )?;
                            done.push((d, n as u64));
                        }
                        Op::Flush(f) => flushes.push(f),
                    }
                }
                let mut chunks = appends.chunks_exact(ROWS);
                if appends.len() >= ROWS {
                    let mut many = tx.prepare_cached(insert_rows_sql())?;
                    for chunk in &mut chunks {
                        for (i, m) in chunk.iter().enumerate() {
                            let at = i * 6;
                            many.raw_bind_parameter(at + 1, m.seq.unwrap_or(0) as i64)?;
                            many.raw_bind_parameter(at + 2, m.ts_ms as i64)?;
                            many.raw_bind_parameter(at + 3, m.subject.as_str())?;
                            many.raw_bind_parameter(at + 4, m.data.as_str())?;
                            many.raw_bind_parameter(at + 5, m.publisher.as_str())?;
                            many.raw_bind_parameter(at + 6, msg_size(m))?;
                        }
                        many.raw_execute()?;
                    }
                }
                for m in chunks.remainder() {
                    ins.execute(params![
                        m.seq.unwrap_or(0) as i64,
                        m.ts_ms as i64,
                        m.subject,
                        m.data,
                        m.publisher,
                        msg_size(m)
                    ])?;
                }
                if max_seq > 0 {
                    tx.execute(
                        "INSERT INTO meta (k, v) VALUES ('last_seq', ?1)
                         ON CONFLICT(k) DO UPDATE SET v = max(v, excluded.v)",
                        params![max_seq as i64],
                    )?;
                }
            }
            tx.commit()
        })();
        match res {
            Ok(()) => {
                bytes += added;
                committed.fetch_max(max_seq, Ordering::AcqRel);
                for (d, seq) in done {
                    let _ = d.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "bus log: commit failed");
                let err = CommitError {
                    source: Arc::new(e),
                };
                for (d, _) in done {
                    let _ = d.send(Err(err.clone()));
                }
            }
        }
        if bytes > ret.max_bytes || last_prune.elapsed() >= ret.every {
            last_prune = Instant::now();
            match prune(&c, ret, bytes) {
                Ok(b) => bytes = b,
                Err(e) => tracing::warn!(error = %e, "bus log: retention failed"),
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Rows per multi-row insert of a batch's appends (6 values each).
const ROWS: usize = 32;

/// `INSERT OR REPLACE ... VALUES (...), ...` of [`ROWS`] rows.
fn insert_rows_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let row = "(?, ?, ?, ?, ?, ?)";
        format!(
            "INSERT OR REPLACE INTO msgs (seq, ts_ms, subject, data, publisher, size) VALUES {}",
            vec![row; ROWS].join(", ")
        )
    })
}

/// What a message counts against the log's size limit.
fn msg_size(m: &Msg) -> i64 {
    (m.subject.len() + m.data.len()) as i64
}

/// Deletes messages past the age limit, then the oldest until under the size limit (to 90 %
/// of it, so that pruning is not done at every batch). Returns the bytes left.
fn prune(c: &Connection, ret: Retention, mut bytes: u64) -> rusqlite::Result<u64> {
    let cutoff = now_ms().saturating_sub(ret.max_age_ms);
    let freed: i64 = c.query_row(
        "SELECT coalesce(sum(size), 0) FROM msgs WHERE ts_ms < ?1",
        params![cutoff as i64],
        |r| r.get(0),
    )?;
    if freed > 0 {
        c.execute("DELETE FROM msgs WHERE ts_ms < ?1", params![cutoff as i64])?;
        bytes = bytes.saturating_sub(freed as u64);
    }
    if bytes > ret.max_bytes {
        let target = bytes - ret.max_bytes * 9 / 10;
        let mut st = c.prepare("SELECT seq, size FROM msgs ORDER BY seq")?;
        let mut rows = st.query([])?;
        let mut sum = 0u64;
        let mut upto = None;
        while let Some(r) = rows.next()? {
            sum += r.get::<_, i64>(1)? as u64;
            upto = Some(r.get::<_, i64>(0)?);
            if sum >= target {
                break;
            }
        }
        drop(rows);
        if let Some(s) = upto {
            c.execute("DELETE FROM msgs WHERE seq <= ?1", params![s])?;
            bytes = bytes.saturating_sub(sum);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, subject: &str, ts: u64) -> Arc<Msg> {
        Arc::new(Msg {
            seq: Some(seq),
            subject: subject.into(),
            data: "\"x\"".into(),
            ts_ms: ts,
            publisher: "t".into(),
        })
    }

    #[test]
    fn cursors_from_before_owners_are_roots_and_each_owner_has_their_own_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bus.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE cursors (agent TEXT NOT NULL, name TEXT NOT NULL,
                     acked INTEGER NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (agent, name));
                 INSERT INTO cursors VALUES ('operator', 'c', 7, 1), ('w1', 'c', 3, 1);",
            )
            .unwrap();
        }
        let ret = Retention {
            max_bytes: 1 << 30,
            max_age_ms: u64::MAX / 4,
            every: Duration::from_secs(60),
        };
        let log = Log::open(&p, ret).unwrap();
        assert_eq!(log.cursor(0, "operator", "c").unwrap(), Some(7));
        assert_eq!(log.cursor(0, "w1", "c").unwrap(), Some(3));
        assert_eq!(log.cursor(1001, "operator", "c").unwrap(), None);
        log.ack(1001, "operator", "c", 2, None).unwrap();
        log.flush();
        assert_eq!(log.cursor(1001, "operator", "c").unwrap(), Some(2));
        assert_eq!(log.cursor(0, "operator", "c").unwrap(), Some(7));
        let (tx, rx) = tokio::sync::oneshot::channel();
        log.forget(1001, "operator", "c", tx).unwrap();
        log.flush();
        assert_eq!(rx.blocking_recv().unwrap().ok(), Some(1));
        assert_eq!(log.cursor(1001, "operator", "c").unwrap(), None);
        assert_eq!(log.cursor(0, "operator", "c").unwrap(), Some(7));
        let owners: Vec<(u32, String)> = log
            .stats()
            .unwrap()
            .consumers
            .into_iter()
            .map(|c| (c.owner, c.agent))
            .collect();
        assert_eq!(owners, vec![(0, "operator".into()), (0, "w1".into())]);
        drop(log);
        // Opening again leaves the migrated table as it is.
        let log = Log::open(&p, ret).unwrap();
        assert_eq!(log.cursor(0, "operator", "c").unwrap(), Some(7));
    }

    /// A batch of appends goes in ROWS to a statement and the rest one by one: every message
    /// is stored as it was queued, in order, with its size, and every publisher hears its
    /// own sequence number.
    #[test]
    fn a_batch_of_appends_is_stored_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ret = Retention {
            max_bytes: 1 << 30,
            max_age_ms: u64::MAX / 4,
            every: Duration::from_secs(60),
        };
        let log = Log::open(&dir.path().join("bus.db"), ret).unwrap();
        let n = 2 * ROWS as u64 + 5;
        let mut rxs = Vec::new();
        // Queued before the writer can take any of them: one batch (the flush ends it).
        for s in 1..=n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let m = Arc::new(Msg {
                seq: Some(s),
                subject: format!("a.s{s}"),
                data: format!("{{\"n\": {s}}}"),
                ts_ms: 1_000 + s,
                publisher: "p".into(),
            });
            log.append(m, Some(tx)).unwrap();
            rxs.push(rx);
        }
        log.flush();
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(rx.blocking_recv().unwrap().unwrap(), i as u64 + 1);
        }
        let r = log.read_from(1, 1000).unwrap();
        assert_eq!(r.len() as u64, n);
        for (i, m) in r.iter().enumerate() {
            let s = i as u64 + 1;
            assert_eq!(m.seq, Some(s));
            assert_eq!(m.subject, format!("a.s{s}"));
            assert_eq!(m.data, format!("{{\"n\": {s}}}"));
            assert_eq!(m.ts_ms, 1_000 + s);
        }
        let want: u64 = r
            .iter()
            .map(|m| (m.subject.len() + m.data.len()) as u64)
            .sum();
        assert_eq!(log.stats().unwrap().bytes, want);
        assert_eq!(log.committed(), n);
    }

    #[test]
    fn append_replay_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bus.db");
        let ret = Retention {
            max_bytes: 1 << 30,
            max_age_ms: u64::MAX / 4,
            every: Duration::from_secs(60),
        };
        {
            let log = Log::open(&p, ret).unwrap();
            for s in 1..=10 {
                log.append(msg(s, "a.b", now_ms()), None).unwrap();
            }
            log.ack(0, "w1", "c", 4, None).unwrap();
            log.ack(0, "w1", "c", 3, None).unwrap(); // never goes back
            log.flush();
            assert_eq!(log.committed(), 10);
            let r = log.read_from(5, 3).unwrap();
            assert_eq!(
                r.iter().map(|m| m.seq.unwrap()).collect::<Vec<_>>(),
                vec![5, 6, 7]
            );
            log.close();
        }
        let log = Log::open(&p, ret).unwrap();
        assert_eq!(log.last_seq_at_open(), 10);
        assert_eq!(log.cursor(0, "w1", "c").unwrap(), Some(4));
        let st = log.stats().unwrap();
        assert_eq!((st.first_seq, st.last_seq, st.messages), (Some(1), 10, 10));
    }

    #[test]
    fn retention_by_size_and_age_keeps_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bus.db");
        let ret = Retention {
            max_bytes: 100 * 6,
            max_age_ms: 60_000,
            every: Duration::from_millis(1),
        };
        let log = Log::open(&p, ret).unwrap();
        log.append(msg(1, "old", 1), None).unwrap(); // ancient: pruned by age
        for s in 2..=400 {
            log.append(msg(s, "a.b", now_ms()), None).unwrap();
        }
        log.flush();
        std::thread::sleep(Duration::from_millis(20));
        log.append(msg(401, "a.b", now_ms()), None).unwrap();
        log.flush();
        let st = log.stats().unwrap();
        assert!(st.bytes <= 600, "{st:?}");
        assert!(st.first_seq.unwrap() > 300, "{st:?}");
        assert_eq!(st.last_seq, 401);
        log.close();
        drop(log);
        // Everything pruned: numbering still goes on from the last one.
        let log = Log::open(&p, ret).unwrap();
        assert_eq!(log.last_seq_at_open(), 401);
    }
}
