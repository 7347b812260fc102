//! `aitherctl logs`: an agent's log read back (docs/daemon.md "Logs"). The shim writes records
//! of the CRI log format (aither_core::logfmt) into agent.log and its rotations; this reads
//! the kept files oldest first, keeps track of the run each record belongs to, filters and
//! tails them, and follows agent.log across rotations.
//!
//! Every file is opened beneath the agent's log directory without following a link, and read
//! bounded: a file is read up to [`MAX_FILE`], a line that is not a record is cut at
//! [`MAX_CARRY`], and replies are frames of at most [`MAX_CHUNK`] bytes of records.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::logfmt::{self, Record, RunEvent, Stream};

/// The most of one log file read (the shim rotates at 1 MiB; one record may pass it).
pub const MAX_FILE: u64 = 4 << 20;
/// The most kept of a line without its newline before it is passed on as it is.
pub const MAX_CARRY: usize = 64 * 1024;
/// Records per reply frame, serialised (frames stay under 64 KiB).
pub const MAX_CHUNK: usize = 48 * 1024;
/// What a plain-text reply holds at most (its newest part), as before records.
const MAX_TEXT_REPLY: usize = 60 * 1024;
/// Bytes of agent.log read per frame while following.
pub const FOLLOW_READ: usize = 48 * 1024;

/// What the caller asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    /// Lines from the end (default 100).
    pub tail: Option<usize>,
    pub since_ns: Option<u64>,
    pub stream: Option<Stream>,
}

/// One record as read, with the run it belongs to (None: the old raw format, or before the
/// first run boundary the files still hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ts_ns: Option<u64>,
    pub run: Option<u64>,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Output {
        stream: Stream,
        /// The line goes on in the next record of this stream.
        partial: bool,
        text: Vec<u8>,
    },
    Run(RunEvent),
}

impl Entry {
    fn is_line_end(&self) -> bool {
        matches!(self.kind, Kind::Output { partial: false, .. })
    }

    pub fn passes(&self, q: &Query) -> bool {
        if let Some(since) = q.since_ns {
            // A line of the old format has no time: it cannot be shown to be recent.
            if self.ts_ns.is_none_or(|t| t < since) {
                return false;
            }
        }
        match (&self.kind, q.stream) {
            (Kind::Output { stream, .. }, Some(want)) => *stream == want,
            _ => true,
        }
    }

    /// The object `--json` prints and the wire carries.
    pub fn to_json(&self) -> Value {
        let ts = self.ts_ns.map(logfmt::format_ts);
        match &self.kind {
            Kind::Output {
                stream,
                partial,
                text,
            } => {
                let mut v = json!({
                    "ts": ts,
                    "stream": stream,
                    "run": self.run,
                    "text": String::from_utf8_lossy(text),
                });
                if *partial {
                    v["partial"] = json!(true);
                }
                v
            }
            Kind::Run(ev) => {
                let mut v = json!({"ts": ts, "run": self.run});
                match ev {
                    RunEvent::Started | RunEvent::Continued => v["event"] = json!("started"),
                    RunEvent::Exited {
                        code,
                        signal,
                        oom_killed,
                    } => {
                        v["event"] = json!("exited");
                        if let Some(c) = code {
                            v["code"] = json!(c);
                        }
                        if let Some(s) = signal {
                            v["signal"] = json!(s);
                        }
                        if *oom_killed {
                            v["oom_killed"] = json!(true);
                        }
                    }
                    RunEvent::Failed { code } => {
                        v["event"] = json!("failed");
                        v["code"] = json!(code);
                    }
                }
                v
            }
        }
    }
}

/// Turns lines into entries, keeping the run current; holds a line until its newline.
#[derive(Debug, Default)]
pub struct Reader {
    run: Option<u64>,
    carry: Vec<u8>,
    /// A record was read: the files are the shim's records, not an old raw log.
    records: bool,
}

impl Reader {
    /// One line (without its newline; `ended`: it had one). A `continued` boundary only says
    /// which run the file holds: it gives no entry.
    fn line(&mut self, line: &[u8], ended: bool, out: &mut Vec<Entry>) {
        let rec = logfmt::parse_line(line);
        self.records |= !matches!(rec, Record::Output { ts_ns: None, .. });
        match rec {
            Record::Output {
                ts_ns: None, text, ..
            } => out.push(Entry {
                ts_ns: None,
                run: None,
                kind: Kind::Output {
                    stream: Stream::Stdout,
                    partial: !ended,
                    text: text.to_vec(),
                },
            }),
            Record::Output {
                ts_ns,
                stream,
                partial,
                text,
            } => out.push(Entry {
                ts_ns,
                run: self.run,
                kind: Kind::Output {
                    stream,
                    partial,
                    text: text.to_vec(),
                },
            }),
            Record::Run { ts_ns, run, event } => {
                self.run = Some(run);
                if event != RunEvent::Continued {
                    out.push(Entry {
                        ts_ns: Some(ts_ns),
                        run: Some(run),
                        kind: Kind::Run(event),
                    });
                }
            }
        }
    }

    /// Bytes of a file, in order: each complete line becomes an entry; the rest waits for its
    /// newline (at most MAX_CARRY bytes of it, then it is passed on as it is).
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Entry>) {
        while let Some(i) = bytes.iter().position(|&c| c == b'\n') {
            if self.carry.is_empty() {
                self.line(&bytes[..i], true, out);
            } else {
                let mut l = std::mem::take(&mut self.carry);
                l.extend_from_slice(&bytes[..i]);
                self.line(&l, true, out);
            }
            bytes = &bytes[i + 1..];
        }
        self.carry.extend_from_slice(bytes);
        if self.carry.len() > MAX_CARRY {
            let l = std::mem::take(&mut self.carry);
            self.old_piece(&l, out);
        }
    }

    /// The end of a file: a last line without its newline. In a log of records it is one the
    /// shim is still writing (`keep_record`: wait for the rest); in an old raw log, the agent's
    /// unfinished line.
    pub fn end_of_file(&mut self, keep_record: bool, out: &mut Vec<Entry>) {
        if self.carry.is_empty() {
            return;
        }
        let is_record = !matches!(
            logfmt::parse_line(&self.carry),
            Record::Output { ts_ns: None, .. }
        );
        if keep_record && (is_record || self.records) {
            return;
        }
        let l = std::mem::take(&mut self.carry);
        if is_record {
            self.line(&l, true, out);
        } else {
            self.old_piece(&l, out);
        }
    }

    /// Text that is not a record, without its newline.
    fn old_piece(&mut self, text: &[u8], out: &mut Vec<Entry>) {
        out.push(Entry {
            ts_ns: None,
            run: None,
            kind: Kind::Output {
                stream: Stream::Stdout,
                partial: true,
                text: text.to_vec(),
            },
        });
    }
}

/// `name` beneath the log directory, opened read-only without following a link; a regular
/// file only.
fn open_log(dir: &Path, name: &str) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let d = crate::hostpath::open_dir_nofollow(dir).map_err(io::Error::other)?;
    let fd = crate::hostpath::open_at_nofollow(
        d.as_fd(),
        Path::new(name),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::other)?;
    if crate::hostpath::check_fd(fd.as_fd())?.kind != crate::hostpath::Kind::File {
        return Err(io::Error::other(format!("{name} is not a regular file")));
    }
    Ok(File::from(fd))
}

/// Where following goes on after the first read.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    /// agent.log as last seen: its inode, and how far it was read.
    ino: Option<u64>,
    pos: u64,
    /// Files rotated away before they were read to their end, oldest first, each held open
    /// (a later rotation cannot take it away) with where to go on reading.
    backlog: VecDeque<(File, u64)>,
    reader: Reader,
}

/// Keeps the entries that pass a query, and of them no more than the last `tail` lines and
/// what follows them, while the files are read: memory is bounded by what is shown.
struct Collector<'q> {
    q: &'q Query,
    n: usize,
    kept: VecDeque<Entry>,
    lines: usize,
}

impl<'q> Collector<'q> {
    fn new(q: &'q Query) -> Self {
        Collector {
            q,
            n: q.tail.unwrap_or(100),
            kept: VecDeque::new(),
            lines: 0,
        }
    }

    fn take(&mut self, entries: &mut Vec<Entry>) {
        for e in entries.drain(..).filter(|e| e.passes(self.q)) {
            self.lines += usize::from(e.is_line_end());
            self.kept.push_back(e);
            // One line more than asked is kept: a last unfinished line counts as one.
            while self.lines > self.n.saturating_add(1) {
                if self.kept.pop_front().is_some_and(|e| e.is_line_end()) {
                    self.lines -= 1;
                }
            }
        }
    }

    fn finish(self) -> Vec<Entry> {
        select(self.kept.into(), self.q)
    }
}

/// Reads `f` from `pos` to its end (at most `limit` bytes) in blocks, each block's entries
/// handed to `each`; returns where it stopped.
fn read_blocks(
    f: &mut File,
    pos: u64,
    limit: u64,
    reader: &mut Reader,
    mut each: impl FnMut(&mut Vec<Entry>),
) -> u64 {
    let mut at = pos;
    if f.seek(SeekFrom::Start(pos)).is_err() {
        return at;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    while at - pos < limit {
        let want = buf.len().min((limit - (at - pos)) as usize);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        at += n as u64;
        reader.feed(&buf[..n], &mut out);
        each(&mut out);
    }
    at
}

/// The kept files, oldest first, as the entries `q` selects (the run of each known); and
/// where to follow agent.log from.
pub fn read_all(dir: &Path, keep: u32, q: &Query) -> (Vec<Entry>, Follower) {
    let mut reader = Reader::default();
    let mut c = Collector::new(q);
    let mut out = Vec::new();
    for n in (1..keep.max(1)).rev() {
        if let Ok(mut f) = open_log(dir, &format!("agent.log.{n}")) {
            read_blocks(&mut f, 0, MAX_FILE, &mut reader, |e| c.take(e));
            reader.end_of_file(false, &mut out);
            c.take(&mut out);
        }
    }
    let (mut ino, mut pos) = (None, 0);
    if let Ok(mut f) = open_log(dir, "agent.log") {
        if let Ok(m) = f.metadata() {
            ino = Some(m.ino());
            // A larger file (not the shim's) is read from its newest MAX_FILE bytes.
            let start = m.len().saturating_sub(MAX_FILE);
            pos = read_blocks(&mut f, start, MAX_FILE, &mut reader, |e| c.take(e));
            reader.end_of_file(true, &mut out);
            c.take(&mut out);
        }
    }
    let follower = Follower {
        dir: dir.to_path_buf(),
        ino,
        pos,
        backlog: VecDeque::new(),
        reader,
    };
    (c.finish(), follower)
}

impl Follower {
    /// What was appended since the last call, at most `budget` bytes read: first the rest of
    /// files rotated away meanwhile, then agent.log's new records.
    pub fn step(&mut self, budget: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        if let Some((f, pos)) = self.backlog.front_mut() {
            let at = read_blocks(f, *pos, budget as u64, &mut self.reader, |e| out.append(e));
            let done = at - *pos < budget as u64;
            *pos = at;
            if done {
                self.reader.end_of_file(false, &mut out);
                self.backlog.pop_front();
            }
            return out;
        }
        let Ok(mut f) = open_log(&self.dir, "agent.log") else {
            return out;
        };
        let Ok(m) = f.metadata() else { return out };
        if self.ino != Some(m.ino()) {
            if let Some(old) = self.ino {
                self.rotated_away(old);
            }
            self.ino = Some(m.ino());
            self.pos = 0;
            if !self.backlog.is_empty() {
                return out;
            }
        } else if m.len() < self.pos {
            // Truncated: from its start.
            self.pos = 0;
            self.reader.carry.clear();
        }
        if m.len() > self.pos {
            self.pos = read_blocks(&mut f, self.pos, budget as u64, &mut self.reader, |e| {
                out.append(e)
            });
        }
        out
    }

    /// agent.log was rotated (once or more) since it was last read: the file read last (now
    /// agent.log.N) from where reading stopped, then the files rotated after it, whole, go to
    /// the backlog.
    fn rotated_away(&mut self, old: u64) {
        let kept = super::shim::LOG_KEEP_MAX;
        let found = (1..kept).find_map(|n| {
            let f = open_log(&self.dir, &format!("agent.log.{n}")).ok()?;
            f.metadata().ok().filter(|m| m.ino() == old).map(|_| (n, f))
        });
        let Some((n, f)) = found else {
            // Gone (rotated out of the kept files): its unread end is lost.
            self.reader.carry.clear();
            return;
        };
        self.backlog.push_back((f, self.pos));
        for m in (1..n).rev() {
            if let Ok(f) = open_log(&self.dir, &format!("agent.log.{m}")) {
                self.backlog.push_back((f, 0));
            }
        }
    }

    /// Whether there is more to read now: a backlog, or agent.log grew or was replaced.
    pub fn behind(&self) -> bool {
        if !self.backlog.is_empty() {
            return true;
        }
        let Ok(f) = open_log(&self.dir, "agent.log") else {
            return false;
        };
        f.metadata()
            .is_ok_and(|m| Some(m.ino()) != self.ino || m.len() != self.pos)
    }
}

/// The entries that pass the query's time and stream, then its last `tail` lines (default
/// 100): a line ends with a full record; a last line still open counts as one.
pub fn select(entries: Vec<Entry>, q: &Query) -> Vec<Entry> {
    let mut v: Vec<Entry> = entries.into_iter().filter(|e| e.passes(q)).collect();
    let n = q.tail.unwrap_or(100);
    if n == 0 {
        return Vec::new();
    }
    let open = v
        .iter()
        .rev()
        .find(|e| matches!(e.kind, Kind::Output { .. }))
        .is_some_and(|e| !e.is_line_end());
    let mut lines = usize::from(open);
    let mut cut = 0;
    for (i, e) in v.iter().enumerate().rev() {
        if e.is_line_end() {
            if lines == n {
                cut = i + 1;
                break;
            }
            lines += 1;
        }
    }
    v.drain(..cut);
    v
}

/// The agent's text of `entries`, as it wrote it (run boundaries left out).
pub fn text_of(entries: &[Entry]) -> String {
    let mut b = Vec::new();
    for e in entries {
        if let Kind::Output { partial, text, .. } = &e.kind {
            b.extend_from_slice(text);
            if !partial {
                b.push(b'\n');
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// `text_of`, keeping only the newest MAX_TEXT_REPLY bytes (one frame).
pub fn text_reply(entries: &[Entry]) -> String {
    let mut out = text_of(entries);
    if out.len() > MAX_TEXT_REPLY {
        let mut cut = out.len() - MAX_TEXT_REPLY;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_string();
    }
    out
}

/// `text_of`, in pieces of at most MAX_TEXT_REPLY bytes (cut at character boundaries).
pub fn text_frames(entries: &[Entry]) -> Vec<String> {
    let text = text_of(entries);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let mut cut = rest.len().min(MAX_TEXT_REPLY);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    out
}

/// The entries as JSON objects in frames of at most MAX_CHUNK bytes each. A record whose
/// object would not fit (text that escapes to many times its size) is sent in parts.
pub fn record_chunks(entries: &[Entry]) -> Vec<Vec<Value>> {
    let mut chunks: Vec<Vec<Value>> = Vec::new();
    let mut cur: Vec<Value> = Vec::new();
    let mut size = 0;
    let mut push = |v: Value, chunks: &mut Vec<Vec<Value>>| {
        let n = v.to_string().len() + 1;
        if size + n > MAX_CHUNK && !cur.is_empty() {
            chunks.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(v);
    };
    for e in entries {
        let v = e.to_json();
        if v.to_string().len() < MAX_CHUNK / 2 {
            push(v, &mut chunks);
            continue;
        }
        // 2 KiB of text escapes to at most 12 KiB of JSON.
        let Kind::Output {
            stream,
            partial,
            text,
        } = &e.kind
        else {
            push(v, &mut chunks);
            continue;
        };
        let pieces: Vec<&[u8]> = text.chunks(2048).collect();
        for (i, p) in pieces.iter().enumerate() {
            let part = Entry {
                kind: Kind::Output {
                    stream: *stream,
                    partial: *partial || i + 1 < pieces.len(),
                    text: p.to_vec(),
                },
                ..e.clone()
            };
            push(part.to_json(), &mut chunks);
        }
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(ts: u64, s: Stream, partial: bool, t: &str) -> Vec<u8> {
        let mut b = Vec::new();
        logfmt::encode_output(ts, s, partial, t.as_bytes(), &mut b);
        b
    }

    fn run(ts: u64, n: u64, e: RunEvent) -> Vec<u8> {
        let mut b = Vec::new();
        logfmt::encode_run(ts, n, &e, &mut b);
        b
    }

    fn entries(bytes: &[u8]) -> Vec<Entry> {
        let mut r = Reader::default();
        let mut v = Vec::new();
        r.feed(bytes, &mut v);
        r.end_of_file(false, &mut v);
        v
    }

    #[test]
    fn runs_are_tracked_and_tail_since_and_stream_select() {
        let log = [
            run(10, 1, RunEvent::Started),
            out(11, Stream::Stdout, false, "a"),
            out(12, Stream::Stderr, true, "b1"),
            out(13, Stream::Stderr, false, "b2"),
            run(
                14,
                1,
                RunEvent::Exited {
                    code: Some(0),
                    signal: None,
                    oom_killed: false,
                },
            ),
            run(20, 2, RunEvent::Started),
            out(21, Stream::Stdout, true, "open"),
        ]
        .concat();
        let e = entries(&log);
        assert_eq!(e.len(), 7);
        assert_eq!(e[6].run, Some(2));
        assert_eq!(text_of(&e), "a\nb1b2\nopen");
        let q = |tail, since_ns, stream| Query {
            tail,
            since_ns,
            stream,
        };
        assert_eq!(text_of(&select(e.clone(), &q(Some(1), None, None))), "open");
        assert_eq!(
            text_of(&select(e.clone(), &q(Some(2), None, None))),
            "b1b2\nopen"
        );
        assert_eq!(
            text_of(&select(e.clone(), &q(None, Some(13), None))),
            "b2\nopen"
        );
        assert_eq!(
            text_of(&select(e.clone(), &q(None, None, Some(Stream::Stderr)))),
            "b1b2\n"
        );
        let j = e[4].to_json();
        assert_eq!(j["event"], "exited");
        assert_eq!(j["code"], 0);
        assert_eq!(j["run"], 1);
        let j = e[2].to_json();
        assert_eq!(j["stream"], "stderr");
        assert_eq!(j["partial"], true);
        assert_eq!(j["ts"], "1970-01-01T00:00:00.000000012Z");
    }

    #[test]
    fn old_lines_have_no_time_and_a_record_being_written_waits() {
        let e = entries(b"old one\nold two");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].ts_ns, None);
        assert_eq!(text_of(&e), "old one\nold two");
        assert!(select(
            e,
            &Query {
                since_ns: Some(0),
                ..Query::default()
            }
        )
        .is_empty());
        // A torn record at the end of agent.log waits for the rest (even one cut inside its
        // time, once the file is known to hold records).
        let full = [
            run(1, 1, RunEvent::Started),
            out(5, Stream::Stdout, false, "whole"),
        ]
        .concat();
        let cut = full.len() - 40;
        let mut r = Reader::default();
        let mut v = Vec::new();
        r.feed(&full[..cut], &mut v);
        r.end_of_file(true, &mut v);
        assert_eq!(v.len(), 1);
        v.clear();
        r.feed(&full[cut..cut + 2], &mut v);
        r.end_of_file(true, &mut v);
        assert!(v.is_empty());
        r.feed(&full[cut + 2..], &mut v);
        assert_eq!(text_of(&v), "whole\n");
        // An endless line that is not a record is passed on in bounded pieces.
        let mut v = Vec::new();
        let mut r = Reader::default();
        r.feed(&vec![b'z'; MAX_CARRY + 1], &mut v);
        assert_eq!(v.len(), 1);
        assert!(r.carry.is_empty());
    }

    #[test]
    fn the_files_are_read_oldest_first_and_following_goes_on_through_rotations() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let app = |n: &str, b: &[u8]| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p(n))
                .unwrap()
                .write_all(b)
                .unwrap()
        };
        let rotate = || {
            let _ = std::fs::remove_file(p("agent.log.2"));
            let _ = std::fs::rename(p("agent.log.1"), p("agent.log.2"));
            std::fs::rename(p("agent.log"), p("agent.log.1")).unwrap();
        };
        let cont = |ts| run(ts, 1, RunEvent::Continued);
        app(
            "agent.log",
            &[
                run(1, 1, RunEvent::Started),
                out(2, Stream::Stdout, false, "a"),
                out(3, Stream::Stdout, false, "b"),
            ]
            .concat(),
        );
        rotate();
        app(
            "agent.log",
            &[cont(4), out(5, Stream::Stderr, false, "c")].concat(),
        );
        let q = Query {
            tail: Some(2),
            ..Query::default()
        };
        let (e, mut f) = read_all(d.path(), 3, &q);
        assert_eq!(text_of(&e), "b\nc\n");
        assert_eq!((e[0].run, e[1].run), (Some(1), Some(1)));
        assert!(!f.behind());
        app("agent.log", &out(6, Stream::Stdout, false, "d"));
        assert!(f.behind());
        assert_eq!(text_of(&f.step(1 << 20)), "d\n");
        // Two rotations between two reads, read in steps of 16 bytes: nothing lost.
        app("agent.log", &out(7, Stream::Stdout, false, "e"));
        rotate();
        app(
            "agent.log",
            &[cont(8), out(9, Stream::Stdout, false, "f")].concat(),
        );
        rotate();
        app(
            "agent.log",
            &[cont(10), out(11, Stream::Stdout, false, "g")].concat(),
        );
        let mut got = Vec::new();
        for _ in 0..10_000 {
            if !f.behind() {
                break;
            }
            got.extend(f.step(16));
        }
        assert_eq!(text_of(&got), "e\nf\ng\n");
        assert!(got.iter().all(|e| e.run == Some(1)));
    }

    #[test]
    fn frames_stay_bounded_whatever_the_text() {
        let nasty = "\u{1}".repeat(logfmt::MAX_TEXT);
        let log = [
            out(1, Stream::Stdout, false, &nasty),
            out(2, Stream::Stdout, false, "x"),
        ]
        .concat();
        let e = entries(&log);
        let chunks = record_chunks(&e);
        let mut text = String::new();
        for c in &chunks {
            assert!(json!({ "records": c }).to_string().len() < 60 * 1024);
            for r in c {
                text.push_str(r["text"].as_str().unwrap());
                if r.get("partial").is_none() {
                    text.push('\n');
                }
            }
        }
        assert_eq!(text, format!("{nasty}\nx\n"));
    }
}
