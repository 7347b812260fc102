//! The audit stream: one append-only JSONL log of every decision Aither makes, with the rule or
//! claim that decided it, hash-chained so that an edited, removed or reordered record is
//! detected (`aitherctl audit verify`).
//!
//! - File: `/var/log/aither/audit.jsonl` (`AITHER_AUDIT_LOG` overrides), mode 0640. Rotated at
//!   16 MiB to `audit.jsonl.1` … `.5`; the chain runs on across files.
//! - Record (`ChainedRecord`): one JSON object per line: `seq`, `ts_ms`, `prev` (hex SHA-256 of the previous
//!   line's bytes, 64 zeros for the first), `kind`, `decision` (`allow`, `deny`, `info`),
//!   `rule` (what decided), `agent`, `actor`, `data`.
//! - Writers: aitherd and aitherctl append under an exclusive `flock` of the file, so records of
//!   several processes interleave whole and the chain stays linear.
//! - Durability: every append is followed by `fdatasync` before the writer goes on (aitherd
//!   batches, one sync per batch). A crash can leave a torn last line; the next writer finds it,
//!   ends it with a newline and appends a `torn_tail` record naming its offset and length, and
//!   `verify` reports it: never silently dropped.

pub mod kernel;
pub mod summary;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Default location of the audit log.
pub const DEFAULT_LOG: &str = "/var/log/aither/audit.jsonl";
/// Rotation size and number of older files kept.
pub const ROTATE_BYTES: u64 = 16 << 20;
pub const KEEP: u32 = 5;
/// The most rotated files ever looked for (`[retention] audit_keep` is at most 100).
const MAX_KEEP: u32 = 100;

/// Rotation in force in this process: aitherd sets it from `[retention]` of aitherd.toml
/// (and again at a reload); other processes use the defaults.
static ROTATE_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(ROTATE_BYTES);
static KEEP_NOW: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(KEEP);

/// Sets the rotation size and the number of rotated files kept (1..=100), from then on.
pub fn set_rotation(bytes: u64, keep: u32) {
    use std::sync::atomic::Ordering;
    ROTATE_AT.store(bytes, Ordering::Relaxed);
    KEEP_NOW.store(keep.clamp(1, MAX_KEEP), Ordering::Relaxed);
}
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {path}: the last record cannot be read ({detail})")]
    Unreadable { path: PathBuf, detail: String },
}

/// The log's path: `AITHER_AUDIT_LOG`, else /var/log/aither/audit.jsonl.
pub fn log_path() -> PathBuf {
    std::env::var_os("AITHER_AUDIT_LOG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOG))
}

/// What a record says was decided.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    Info,
}

/// One decision, before it is chained.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub kind: String,
    pub decision: Verdict,
    /// The rule, claim or policy field that decided.
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Who asked: "uid 0", "aitherd", "agent NAME".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The uid that asked (SO_PEERCRED on the control socket), issue 18.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_uid: Option<u32>,
    /// The uid that owns what was acted on (the agent's owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// The front end the caller acted through (`mcp`: `aitherctl mcp`, docs/mcp.md); absent
    /// for aitherctl's own commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Entry {
    pub fn new(kind: &str, decision: Verdict, rule: impl Into<String>) -> Entry {
        Entry {
            kind: kind.into(),
            decision,
            rule: rule.into(),
            agent: None,
            actor: None,
            caller_uid: None,
            owner_uid: None,
            via: None,
            data: serde_json::Value::Null,
        }
    }

    pub fn agent(mut self, a: &str) -> Entry {
        self.agent = Some(a.into());
        self
    }

    pub fn actor(mut self, a: impl Into<String>) -> Entry {
        self.actor = Some(a.into());
        self
    }

    /// The uid that asked.
    pub fn caller(mut self, uid: u32) -> Entry {
        self.caller_uid = Some(uid);
        self
    }

    /// The uid that owns what was acted on.
    pub fn owner(mut self, uid: u32) -> Entry {
        self.owner_uid = Some(uid);
        self
    }

    /// The front end the caller acted through, if any.
    pub fn via(mut self, via: Option<&str>) -> Entry {
        self.via = via.map(str::to_string);
        self
    }

    pub fn data(mut self, d: serde_json::Value) -> Entry {
        self.data = d;
        self
    }
}

/// A chained record as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChainedRecord {
    pub seq: u64,
    pub ts_ms: u64,
    pub prev: String,
    #[serde(flatten)]
    pub entry: Entry,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The files of the log, oldest first (`.N` … `.1`, then the live file): every rotated file
/// present, whatever the rotation in force, so that a reader (another process) finds those
/// a daemon with a larger `audit_keep` kept.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=MAX_KEEP)
        .rev()
        .map(|i| rotated(path, i))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        v.push(path.to_path_buf());
    }
    v
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// The tail of a file: (its last complete line, bytes after the last newline).
fn tail(f: &mut File) -> io::Result<(Option<Vec<u8>>, Vec<u8>)> {
    let len = f.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((None, Vec::new()));
    }
    let mut back = 4096u64.min(len);
    loop {
        f.seek(SeekFrom::Start(len - back))?;
        let mut buf = vec![0u8; back as usize];
        f.read_exact(&mut buf)?;
        let last_nl = buf.iter().rposition(|b| *b == b'\n');
        let torn = match last_nl {
            Some(i) => buf[i + 1..].to_vec(),
            None if back == len => buf.clone(),
            None => {
                back = (back * 2).min(len);
                continue;
            }
        };
        let Some(i) = last_nl else {
            return Ok((None, torn));
        };
        let before = &buf[..i];
        match before.iter().rposition(|b| *b == b'\n') {
            Some(j) => return Ok((Some(before[j + 1..].to_vec()), torn)),
            None if back == len => return Ok((Some(before.to_vec()), torn)),
            None => back = (back * 2).min(len),
        }
    }
}

/// The hash and seq of the last record before `path` (in the newest rotated file), for a
/// fresh live file.
fn last_of_previous(path: &Path) -> Option<(String, u64)> {
    let mut f = File::open(rotated(path, 1)).ok()?;
    let (line, _) = tail(&mut f).ok()?;
    let line = line?;
    let r: ChainedRecord = serde_json::from_slice(&line).ok()?;
    Some((line_hash(&line), r.seq))
}

/// Appends entries to the log (one lock, one sync). Returns the records written.
pub fn append(path: &Path, entries: &[Entry]) -> Result<Vec<ChainedRecord>, AuditError> {
    append_with(path, entries, true)
}

/// Appends entries; `sync`: fdatasync before returning (a power cut cannot lose them; a
/// process crash never can, synced or not).
pub fn append_with(
    path: &Path,
    entries: &[Entry],
    sync: bool,
) -> Result<Vec<ChainedRecord>, AuditError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let e = io_err(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(&e)?;
    }
    let mut f = open_locked(path)?;
    // Rotate under the lock: the next writer re-opens the new live file.
    let (rotate_at, keep) = (
        ROTATE_AT.load(std::sync::atomic::Ordering::Relaxed),
        KEEP_NOW.load(std::sync::atomic::Ordering::Relaxed),
    );
    if f.metadata().map_err(&e)?.len() >= rotate_at {
        // A smaller keep than before: the files past it go now (oldest first).
        for i in (keep + 1..=MAX_KEEP).rev() {
            let _ = std::fs::remove_file(rotated(path, i));
        }
        for i in (1..keep).rev() {
            let _ = std::fs::rename(rotated(path, i), rotated(path, i + 1));
        }
        std::fs::rename(path, rotated(path, 1)).map_err(&e)?;
        drop(f);
        f = open_locked(path)?;
    }
    let (last, torn) = tail(&mut f).map_err(&e)?;
    let (mut prev, mut seq) = match &last {
        Some(l) => {
            let r: ChainedRecord =
                serde_json::from_slice(l).map_err(|x| AuditError::Unreadable {
                    path: path.to_path_buf(),
                    detail: x.to_string(),
                })?;
            (line_hash(l), r.seq)
        }
        None => last_of_previous(path).unwrap_or((GENESIS.to_string(), 0)),
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut pending: Vec<Entry> = Vec::new();
    if !torn.is_empty() {
        // A writer died mid-record: end that line, and say so in the chain.
        buf.push(b'\n');
        let offset = f.metadata().map_err(&e)?.len() - torn.len() as u64;
        pending.push(
            Entry::new("torn_tail", Verdict::Info, "audit: a writer died mid-record").data(
                serde_json::json!({"offset": offset, "length": torn.len(), "sha256": line_hash(&torn)}),
            ),
        );
    }
    pending.extend(entries.iter().cloned());
    let ts = now_ms();
    for entry in pending {
        seq += 1;
        let r = ChainedRecord {
            seq,
            ts_ms: ts,
            prev: prev.clone(),
            entry,
        };
        let line = serde_json::to_vec(&r).map_err(|x| AuditError::Unreadable {
            path: path.to_path_buf(),
            detail: x.to_string(),
        })?;
        prev = line_hash(&line);
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        out.push(r);
    }
    f.seek(SeekFrom::End(0)).map_err(&e)?;
    f.write_all(&buf).map_err(&e)?;
    if sync {
        f.sync_data().map_err(&e)?;
    }
    Ok(out)
}

fn open_locked(path: &Path) -> Result<File, AuditError> {
    let e = io_err(path);
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(&e)?;
    // Released when it closes. rustix: nix 0.30 has only the consuming `Flock` guard.
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|err| e(io::Error::from(err)))?;
    Ok(f)
}

/// Appends one entry; a failure is reported on stderr and not fatal (for one-shot writers,
/// aitherctl): the decision itself stands, and `verify` shows the gap in seq if any.
pub fn record(entry: Entry) {
    if let Err(e) = append(&log_path(), &[entry]) {
        eprintln!("aither: warning: {e}");
    }
}

/// As `record`, without fdatasync: for `aitherctl run`, whose every launch would otherwise
/// wait for the disk (a power cut may lose the newest run records; a crash cannot).
pub fn record_unsynced(entry: Entry) {
    if let Err(e) = append_with(&log_path(), &[entry], false) {
        eprintln!("aither: warning: {e}");
    }
}

/// One line of the log as read back.
#[derive(Debug)]
pub struct Line {
    pub file: PathBuf,
    pub line_no: usize,
    pub bytes: Vec<u8>,
    pub record: Option<ChainedRecord>,
    /// Ended by a newline (a torn write by a crash never is, until the next writer ends it).
    pub complete: bool,
}

/// Every line of the log, oldest first.
pub fn read_lines(path: &Path) -> Result<Vec<Line>, AuditError> {
    let mut out = Vec::new();
    for p in files(path) {
        let f = File::open(&p).map_err(io_err(&p))?;
        let mut r = BufReader::new(f);
        let mut n = 0;
        loop {
            let mut buf = Vec::new();
            let got = r.read_until(b'\n', &mut buf).map_err(io_err(&p))?;
            if got == 0 {
                break;
            }
            n += 1;
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            }
            let record = if complete {
                serde_json::from_slice(&buf).ok()
            } else {
                None
            };
            out.push(Line {
                file: p.clone(),
                line_no: n,
                bytes: buf,
                record,
                complete,
            });
        }
    }
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    pub records: u64,
    pub ok: bool,
    /// The first break in the chain, if any.
    pub error: Option<String>,
    /// Torn records that a later writer acknowledged (crashes), by file:line.
    pub torn: Vec<String>,
    /// The first record's seq when older files were pruned.
    pub starts_at: Option<u64>,
}

/// Checks the whole chain.
pub fn verify(path: &Path) -> Result<Verification, AuditError> {
    let lines = read_lines(path)?;
    let mut v = Verification {
        ok: true,
        ..Verification::default()
    };
    let mut prev: Option<String> = None;
    let mut seq: Option<u64> = None;
    let mut torn_pending: Option<(String, Vec<u8>)> = None;
    let last = lines.len();
    for (i, l) in lines.iter().enumerate() {
        let at = format!("{}:{}", l.file.display(), l.line_no);
        let Some(r) = &l.record else {
            // Not a record: a torn write, acceptable only if the next record acknowledges it
            // (or, still unacknowledged, as the very end of the log without its newline).
            if i + 1 == last && l.complete {
                v.ok = false;
                v.error = Some(format!("{at}: not a valid record (edited or corrupt)"));
                return Ok(v);
            }
            torn_pending = Some((at, l.bytes.clone()));
            continue;
        };
        if let Some((where_, bytes)) = torn_pending.take() {
            let acked = r.entry.kind == "torn_tail"
                && r.entry.data["sha256"].as_str() == Some(&line_hash(&bytes));
            if !acked {
                v.ok = false;
                v.error = Some(format!("{where_}: not a valid record (edited or corrupt)"));
                return Ok(v);
            }
            v.torn.push(where_);
        }
        match (&prev, seq) {
            (None, None) => {
                if r.prev != GENESIS || r.seq != 1 {
                    v.starts_at = Some(r.seq);
                }
            }
            (Some(p), Some(s)) => {
                if &r.prev != p {
                    v.ok = false;
                    v.error = Some(format!(
                        "{at}: seq {} does not follow the record before it (prev hash mismatch: a record was edited, removed or reordered)",
                        r.seq
                    ));
                    return Ok(v);
                }
                if r.seq != s + 1 {
                    v.ok = false;
                    v.error = Some(format!("{at}: seq {} after seq {s}", r.seq));
                    return Ok(v);
                }
            }
            _ => unreachable!("prev and seq are set together"),
        }
        prev = Some(line_hash(&l.bytes));
        seq = Some(r.seq);
        v.records += 1;
    }
    if let Some((where_, _)) = torn_pending {
        // A torn last line no writer has seen yet: a crash mid-write, reported.
        v.torn
            .push(format!("{where_} (at the end, not yet acknowledged)"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: &str) -> Entry {
        Entry::new(kind, Verdict::Allow, "test").agent("a")
    }

    #[test]
    fn the_chain_detects_edits_removals_and_reordering() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        append(&p, &[e("one"), e("two")]).unwrap();
        append(&p, &[e("three")]).unwrap();
        append(&p, &[e("four")]).unwrap();
        let v = verify(&p).unwrap();
        assert!(v.ok && v.records == 4, "{v:?}");
        let good = std::fs::read(&p).unwrap();

        // One byte edited.
        let mut bad = good.clone();
        let i = bad.windows(5).position(|w| w == b"three").unwrap();
        bad[i] = b'T';
        std::fs::write(&p, &bad).unwrap();
        let v = verify(&p).unwrap();
        assert!(!v.ok, "edited record passed");

        // One record removed.
        let lines: Vec<&[u8]> = good
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let removed: Vec<u8> = [lines[0], lines[1], lines[3]]
            .join(&b'\n')
            .into_iter()
            .chain([b'\n'])
            .collect();
        std::fs::write(&p, &removed).unwrap();
        assert!(!verify(&p).unwrap().ok, "removed record passed");

        // Two records swapped.
        let swapped: Vec<u8> = [lines[0], lines[2], lines[1], lines[3]]
            .join(&b'\n')
            .into_iter()
            .chain([b'\n'])
            .collect();
        std::fs::write(&p, &swapped).unwrap();
        assert!(!verify(&p).unwrap().ok, "reordered records passed");
    }

    #[test]
    fn a_torn_tail_is_reported_then_acknowledged_never_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        append(&p, &[e("one")]).unwrap();
        // A writer killed mid-record.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"seq\":2,\"ts_ms\":1,\"pr").unwrap();
        drop(f);
        let v = verify(&p).unwrap();
        assert!(v.ok);
        assert_eq!(v.torn.len(), 1, "{v:?}");
        assert!(v.torn[0].contains("not yet acknowledged"));
        let written = append(&p, &[e("two")]).unwrap();
        assert_eq!(written[0].entry.kind, "torn_tail");
        assert_eq!(written[1].entry.kind, "two");
        let v = verify(&p).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.records, 3);
        assert_eq!(v.torn.len(), 1);
        // Forging a torn line in the middle (without the acknowledgement) fails.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text = text.replacen("\"kind\":\"two\"", "\"kind\":\"tw", 1);
        std::fs::write(&p, text).unwrap();
        assert!(!verify(&p).unwrap().ok);
    }

    #[test]
    fn rotation_keeps_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        append(&p, &[e("one"), e("two")]).unwrap();
        // Rotate by hand as append does at the size limit.
        std::fs::rename(&p, rotated(&p, 1)).unwrap();
        append(&p, &[e("three")]).unwrap();
        let v = verify(&p).unwrap();
        assert!(v.ok && v.records == 3, "{v:?}");
        let lines = read_lines(&p).unwrap();
        assert_eq!(lines.last().unwrap().record.as_ref().unwrap().seq, 3);
    }
}

/// A background writer for a long-lived process (aitherd): entries are queued without
/// blocking and appended in batches (one lock and one fdatasync per batch).
#[derive(Clone)]
pub struct Sink {
    tx: std::sync::mpsc::Sender<Entry>,
    /// Fills `owner_uid` of a record about an agent that does not name one (aitherd: the
    /// agent's owner, issue 18).
    owners: Option<std::sync::Arc<OwnerLookup>>,
}

/// An agent name's owner uid.
pub type OwnerLookup = dyn Fn(&str) -> Option<u32> + Send + Sync;

impl Sink {
    pub fn start(path: PathBuf) -> Sink {
        Self::spawn(path, "aither-audit").0
    }

    /// The writer thread, named `name`, and its handle: it drains the queue and ends once every
    /// clone of the returned `Sink` is dropped (join it to know every entry was written).
    pub fn spawn(path: PathBuf, name: &str) -> (Sink, Option<std::thread::JoinHandle<()>>) {
        let (tx, rx) = std::sync::mpsc::channel::<Entry>();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(e) = rx.try_recv() {
                        batch.push(e);
                        if batch.len() >= 1024 {
                            break;
                        }
                    }
                    if let Err(e) = append(&path, &batch) {
                        // A full disk must not stop the daemon; the gap shows in `verify` as
                        // missing decisions, and the daemon's log says why.
                        tracing::error!(error = %e, dropped = batch.len(), "audit write failed");
                        eprintln!("aither: {} audit records not written: {e}", batch.len());
                    }
                }
            });
        if let Err(e) = &spawned {
            tracing::error!(error = %e, "cannot start the audit writer");
        }
        (Sink { tx, owners: None }, spawned.ok())
    }

    /// Every record about an agent carries its owner's uid, looked up here when not given.
    /// The lookup must not take a lock that a caller of `record` may hold.
    pub fn with_owners(mut self, f: std::sync::Arc<OwnerLookup>) -> Sink {
        self.owners = Some(f);
        self
    }

    pub fn record(&self, mut e: Entry) {
        if let (None, Some(agent), Some(f)) = (e.owner_uid, &e.agent, &self.owners) {
            e.owner_uid = f(agent);
        }
        let _ = self.tx.send(e);
    }
}
