//! Live delivery. Every connection that subscribes (an agent's channel, an operator's control
//! connection) owns an [`Outbox`]: one bounded queue per subscription, drained by the
//! connection's writer. Publishing assigns the sequence number (durable messages), queues the
//! message for the log and offers it to every matching subscription, all under one lock, so
//! that every subscriber sees one order.
//!
//! Bounds (docs/bus.md "Bounds"): a connection holds at most [`MAX_SUBS`] subscriptions; a
//! queue is full at its capacity in messages or at [`SUB_QUEUE_BYTES`], and a connection's
//! queues together at [`OUTBOX_QUEUE_BYTES`].
//!
//! Overflow: a live subscription's queue drops its oldest message and counts it (the next
//! delivery carries `dropped`); a replaying or durable subscription never drops: when its
//! queue is full it stops taking live messages and a pump task reads them back from the log
//! as the queue drains (flow control), then switches to live again once caught up.
//!
//! Direct writes (docs/bus.md "Direct writes"): a connection that only carries deliveries (an
//! operator's `bus_sub`) attaches its socket as a [`Sink`]. While its writer is idle and its
//! queues are empty, a publish encodes the delivery into the outbox's direct buffer instead of
//! queueing it, and the publisher sends that buffer on the socket itself (non-blocking) when
//! its batch of publishes ends ([`Flush`]): no wake of the subscriber's task, one `send` for
//! many messages and subscribers' worth of work done on one task, as redis does. A send that
//! would block hands the rest to the connection's writer, and the queues take over (with
//! their bounds and overflow policy) until the writer has written everything.
//!
//! Replays read the log in pages of [`PAGE`] sequence numbers through one cache shared by
//! every subscription ([`PAGE_CACHE_BYTES`]): ninety subscriptions replaying the same range
//! read it once and queue the same messages (`Arc`s), not ninety copies. A connection's
//! replays read at most [`REPLAY_RATE`] bytes a second (burst [`REPLAY_BURST`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use super::log::{Log, Retention, Stats};
use super::subject::{check_subject, Pattern};
use super::{
    check_data, now_ms, BusError, Committed, Msg, Principal, DEFAULT_QUEUE, MAX_SUBS,
    OUTBOX_QUEUE_BYTES, PAGE_CACHE_BYTES, REPLAY_BURST, REPLAY_RATE, SUB_QUEUE_BYTES,
};

/// Most bytes a direct buffer takes before the publisher sends it (then it starts again).
pub const DIRECT_BYTES: usize = 64 * 1024;

/// Messages read from the log per step of a replay.
const REPLAY_BATCH: usize = 256;
/// Sequence numbers per page of the shared replay cache.
pub const PAGE: u64 = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a subscribe asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubOptions {
    pub pattern: String,
    /// A durable consumer's name: its acked cursor is kept in the log (per agent and name),
    /// and a subscribe without `from_seq`/`since_ms` resumes after it.
    #[serde(default)]
    pub durable: Option<String>,
    /// Replay the log from this sequence number, then go on live.
    #[serde(default)]
    pub from_seq: Option<u64>,
    /// Replay the log from this time (ms since the epoch), then go on live.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Queue capacity in messages (16..=65536; default 1024).
    #[serde(default)]
    pub queue: Option<usize>,
}

/// One message handed to a connection's writer.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub sub: u64,
    pub msg: Arc<Msg>,
    /// Messages of this subscription dropped (queue overflow) since the previous delivery.
    pub dropped: u64,
}

impl Delivery {
    /// The message as a JSON object: `{"sub","seq","subject","ts_ms","publisher","dropped","data"}`
    /// (`data` is copied as it was published, without re-encoding).
    pub fn to_json(&self) -> String {
        let mut b = Vec::with_capacity(self.msg.cost() + 32);
        self.write_json(&mut b);
        String::from_utf8(b).unwrap_or_default()
    }

    /// [`Delivery::to_json`] appended to `out`, with no allocation of its own: a fan-out
    /// writes each subscriber's copy straight into that connection's write buffer.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.write_with(out, b"{")
    }

    /// The object after `open` (`{` or `{` and the push's tag).
    fn write_with(&self, out: &mut Vec<u8>, open: &[u8]) {
        use std::io::Write;
        let m = &self.msg;
        out.extend_from_slice(open);
        // Writes to a Vec cannot fail.
        let _ = write!(out, "\"sub\":{},\"seq\":", self.sub);
        match m.seq {
            Some(s) => {
                let _ = write!(out, "{s}");
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"subject\":");
        let _ = serde_json::to_writer(&mut *out, m.subject.as_str());
        let _ = write!(out, ",\"ts_ms\":{},\"publisher\":", m.ts_ms);
        let _ = serde_json::to_writer(&mut *out, m.publisher.as_str());
        let _ = write!(out, ",\"dropped\":{},\"data\":", self.dropped);
        out.extend_from_slice(m.data.as_bytes());
        out.push(b'}');
    }

    /// The push frame's body on an agent channel: `{"push":"bus.msg", ...to_json()}`.
    pub fn push_json(&self) -> String {
        let mut b = Vec::with_capacity(self.msg.cost() + 48);
        self.write_push(&mut b);
        String::from_utf8(b).unwrap_or_default()
    }

    /// [`Delivery::push_json`] appended to `out`.
    pub fn write_push(&self, out: &mut Vec<u8>) {
        self.write_with(out, b"{\"push\":\"bus.msg\",")
    }
}

struct Replay {
    durable: Option<String>,
    next_seq: u64,
    catching_up: bool,
    wake: Arc<Notify>,
}

struct SubQ {
    pattern: Pattern,
    queue: VecDeque<Arc<Msg>>,
    /// Bytes queued (`Msg::cost`).
    bytes: usize,
    cap: usize,
    dropped_pending: u64,
    dropped: u64,
    delivered: u64,
    replay: Option<Replay>,
}

/// A connection's socket, written by publishers directly while its writer is idle, and how a
/// delivery is framed on it.
pub struct Sink {
    /// A duplicate of the connection's socket (the same open file: its writes go in the same
    /// stream); dropped when the connection's subscriptions end.
    fd: std::os::fd::OwnedFd,
    frame: fn(&Delivery, &mut Vec<u8>),
}

impl Sink {
    pub fn new(fd: std::os::fd::OwnedFd, frame: fn(&Delivery, &mut Vec<u8>)) -> Sink {
        Sink { fd, frame }
    }
}

/// Outboxes whose direct buffer a publisher has started: each is sent when [`Flush::run`] is
/// called or the `Flush` is dropped (the end of a publisher's batch, before it waits).
#[derive(Default)]
pub struct Flush(Vec<Arc<Outbox>>);

impl Flush {
    /// Sends every started direct buffer.
    pub fn run(&mut self) {
        for o in self.0.drain(..) {
            let mut st = lock(&o.state);
            o.send_direct(&mut st);
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.run()
    }
}

struct OutState {
    subs: BTreeMap<u64, SubQ>,
    next_sub: u64,
    closed: bool,
    /// Bytes queued in all its subscriptions.
    queued_bytes: usize,
    /// The replay budget: bytes that may be read now, and when it was last refilled.
    replay_tokens: f64,
    replay_at: std::time::Instant,
    /// The socket publishers may write directly (an operator's subscriber connection).
    sink: Option<Sink>,
    /// The connection's writer holds bytes it is writing (or is about to take the direct
    /// buffer's rest): nothing else writes the socket, new messages are queued.
    busy: bool,
    /// Frames encoded by publishers, to be sent before anything queued.
    direct: Vec<u8>,
}

/// A connection's subscriptions and their queues.
pub struct Outbox {
    id: u64,
    principal: Arc<Principal>,
    /// Whose durable consumers it names (log::Consumer::owner): the caller's uid on an
    /// operator's connection, 0 for an agent's.
    owner: u32,
    state: Mutex<OutState>,
    notify: Notify,
    /// Bytes its replays have taken from the log, and aitherd's CPU time reading them (ns).
    replay_bytes: AtomicU64,
    replay_cpu_ns: AtomicU64,
}

/// What a connection costs aitherd now (`aitherctl inspect`, metrics).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct OutboxUsage {
    pub subscriptions: usize,
    pub queued_bytes: u64,
    pub replay_bytes: u64,
    pub replay_cpu_ns: u64,
}

/// A subscription's state, for `bus streams`.
#[derive(Clone, Debug, Serialize)]
pub struct SubStat {
    pub owner: String,
    pub sub: u64,
    pub pattern: String,
    pub durable: Option<String>,
    pub queued: usize,
    pub capacity: usize,
    pub delivered: u64,
    pub dropped: u64,
    /// Replaying from the log (flow control) rather than live.
    pub catching_up: bool,
    pub next_seq: Option<u64>,
}

impl Outbox {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Whose durable consumers this connection names.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Waits until there may be something to drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// What this connection costs now.
    pub fn usage(&self) -> OutboxUsage {
        let st = lock(&self.state);
        OutboxUsage {
            subscriptions: st.subs.len(),
            queued_bytes: st.queued_bytes as u64,
            replay_bytes: self.replay_bytes.load(Ordering::Relaxed),
            replay_cpu_ns: self.replay_cpu_ns.load(Ordering::Relaxed),
        }
    }

    /// Takes up to `max` queued deliveries and about `max_bytes` (at least one), oldest
    /// first per subscription.
    pub fn drain(&self, max: usize, max_bytes: usize) -> Vec<Delivery> {
        let mut st = lock(&self.state);
        let (out, more) = Self::take(&mut st, max, max_bytes);
        drop(st);
        if more {
            self.notify.notify_one();
        }
        out
    }

    /// [`Outbox::drain`] under the lock: the deliveries, and whether more are queued.
    fn take(st: &mut OutState, max: usize, max_bytes: usize) -> (Vec<Delivery>, bool) {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        let OutState {
            subs, queued_bytes, ..
        } = &mut *st;
        for (id, q) in subs.iter_mut() {
            while out.len() < max && (out.is_empty() || bytes < max_bytes) {
                let Some(m) = q.queue.pop_front() else { break };
                let c = m.cost();
                q.bytes -= c;
                *queued_bytes -= c;
                bytes += c;
                out.push(Delivery {
                    sub: *id,
                    msg: m,
                    dropped: std::mem::take(&mut q.dropped_pending),
                });
                q.delivered += 1;
            }
            more |= !q.queue.is_empty();
        }
        // Pumps are woken after all the taking, against the connection's final total.
        let total = *queued_bytes;
        for q in subs.values() {
            if let Some(r) = &q.replay {
                if r.catching_up && has_room(q, total) {
                    r.wake.notify_one();
                }
            }
        }
        (out, more)
    }

    /// Lets publishers write this connection's deliveries on `sink` while its writer is idle
    /// (the writer then uses [`Outbox::drain_into`] and [`Outbox::written`]).
    pub fn attach(&self, sink: Sink) {
        let mut st = lock(&self.state);
        if !st.closed {
            st.sink = Some(sink);
        }
    }

    /// The writer's [`Outbox::drain`]: the direct buffer's unsent rest first (into `head`),
    /// then queued deliveries. If it takes anything, the writer is busy until
    /// [`Outbox::written`].
    pub fn drain_into(&self, max: usize, max_bytes: usize, head: &mut Vec<u8>) -> Vec<Delivery> {
        // One lock: a publisher sees the writer busy as soon as anything is taken (it must
        // not write after what the writer holds).
        let mut st = lock(&self.state);
        if !st.direct.is_empty() {
            head.extend_from_slice(&st.direct);
            st.direct.clear();
            st.busy = true;
        }
        let (out, more) = Self::take(&mut st, max, max_bytes);
        if !out.is_empty() {
            st.busy = true;
        }
        drop(st);
        if more {
            self.notify.notify_one();
        }
        out
    }

    /// The writer has written what it took: publishers may write directly again once nothing
    /// is waiting (otherwise the writer is woken for the rest).
    pub fn written(&self) {
        let mut st = lock(&self.state);
        if st.direct.is_empty() && st.queued_bytes == 0 {
            st.busy = false;
        } else {
            drop(st);
            self.notify.notify_one();
        }
    }

    /// Sends the direct buffer on the sink without blocking; what the socket does not take
    /// goes to the writer (busy: publishers queue until it has written it). Whether all of
    /// it went.
    fn send_direct(&self, st: &mut OutState) -> bool {
        if st.direct.is_empty() {
            return true;
        }
        if st.busy {
            return false;
        }
        let Some(sink) = &st.sink else { return false };
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = sink.fd.as_raw_fd();
        let mut off = 0;
        while off < st.direct.len() {
            match send(
                fd,
                &st.direct[off..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(nix::errno::Errno::EINTR) => {}
                // EAGAIN (the subscriber reads slower) or a broken connection: the writer
                // takes over (and ends on the error).
                Err(_) => break,
            }
        }
        if off == st.direct.len() {
            st.direct.clear();
            return true;
        }
        st.direct.drain(..off);
        st.busy = true;
        self.notify.notify_one();
        false
    }

    /// Queues `msg` for subscription `sub`, or encodes it into the direct buffer; true when
    /// this started the direct buffer (the caller's [`Flush`] sends it).
    fn offer(&self, sub: u64, msg: &Arc<Msg>) -> bool {
        let mut st = lock(&self.state);
        let OutState {
            subs, queued_bytes, ..
        } = &mut *st;
        let Some(q) = subs.get_mut(&sub) else {
            return false;
        };
        let c = msg.cost();
        let full = |q: &SubQ, total: usize| {
            q.queue.len() >= q.cap
                || q.bytes + c > SUB_QUEUE_BYTES
                || total + c > OUTBOX_QUEUE_BYTES
        };
        match &mut q.replay {
            Some(r) => {
                let Some(seq) = msg.seq else { return false };
                if r.catching_up || seq < r.next_seq {
                    return false;
                }
                if q.queue.len() >= q.cap
                    || q.bytes + c > SUB_QUEUE_BYTES
                    || *queued_bytes + c > OUTBOX_QUEUE_BYTES
                {
                    // Flow control: stop taking live messages; the pump reads this one and
                    // the rest back from the log as the subscriber drains its queue.
                    r.catching_up = true;
                    return false;
                }
                r.next_seq = seq + 1;
            }
            None => {
                // Drop-oldest until it fits; when the connection's other queues hold the
                // bytes, the new message is the one dropped.
                while full(q, *queued_bytes) {
                    let Some(old) = q.queue.pop_front() else {
                        q.dropped_pending += 1;
                        q.dropped += 1;
                        return false;
                    };
                    q.bytes -= old.cost();
                    *queued_bytes -= old.cost();
                    q.dropped_pending += 1;
                    q.dropped += 1;
                }
            }
        }
        // Direct: the writer idle and nothing queued on the connection (so nothing can be
        // overtaken). A full direct buffer is sent first.
        if st.sink.is_some() && !st.busy && st.queued_bytes == 0 {
            if st.direct.len() + c > DIRECT_BYTES {
                self.send_direct(&mut st);
            }
            if !st.busy {
                let started = st.direct.is_empty();
                let OutState {
                    subs, sink, direct, ..
                } = &mut *st;
                if let (Some(q), Some(sink)) = (subs.get_mut(&sub), sink) {
                    let d = Delivery {
                        sub,
                        msg: msg.clone(),
                        dropped: std::mem::take(&mut q.dropped_pending),
                    };
                    (sink.frame)(&d, direct);
                    q.delivered += 1;
                    return started;
                }
            }
        }
        let OutState {
            subs, queued_bytes, ..
        } = &mut *st;
        let Some(q) = subs.get_mut(&sub) else {
            return false;
        };
        q.bytes += c;
        *queued_bytes += c;
        q.queue.push_back(msg.clone());
        drop(st);
        self.notify.notify_one();
        false
    }

    fn stats(&self, out: &mut Vec<SubStat>) {
        let st = lock(&self.state);
        for (id, q) in &st.subs {
            out.push(SubStat {
                owner: self.principal.name().to_string(),
                sub: *id,
                pattern: q.pattern.as_str().to_string(),
                durable: q.replay.as_ref().and_then(|r| r.durable.clone()),
                queued: q.queue.len(),
                capacity: q.cap,
                delivered: q.delivered,
                dropped: q.dropped,
                catching_up: q.replay.as_ref().is_some_and(|r| r.catching_up),
                next_seq: q.replay.as_ref().map(|r| r.next_seq),
            });
        }
    }
}

struct SubRef {
    outbox: Arc<Outbox>,
    id: u64,
    pattern: Pattern,
}

struct Inner {
    subs: Vec<SubRef>,
    last_seq: u64,
}

/// Whether a catching-up subscription's pump may read more: its queue at most half full (in
/// messages and bytes) and its connection's queues at most half full.
fn has_room(q: &SubQ, total: usize) -> bool {
    q.queue.len() <= q.cap / 2 && q.bytes <= SUB_QUEUE_BYTES / 2 && total <= OUTBOX_QUEUE_BYTES / 2
}

/// Pages of the log read for replays, newest use last; shared by every subscription.
#[derive(Default)]
struct PageCache {
    pages: std::collections::HashMap<u64, Arc<Vec<Arc<Msg>>>>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl PageCache {
    fn get(&mut self, no: u64) -> Option<Arc<Vec<Arc<Msg>>>> {
        let p = self.pages.get(&no)?.clone();
        if let Some(i) = self.order.iter().position(|n| *n == no) {
            self.order.remove(i);
        }
        self.order.push_back(no);
        Some(p)
    }

    fn put(&mut self, no: u64, page: Arc<Vec<Arc<Msg>>>) {
        self.bytes += page.iter().map(|m| m.cost()).sum::<usize>();
        self.pages.insert(no, page);
        self.order.push_back(no);
        while self.bytes > PAGE_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(p) = self.pages.remove(&old) {
                self.bytes -= p.iter().map(|m| m.cost()).sum::<usize>();
            }
        }
    }
}

/// What a publish returns.
pub struct Published {
    pub seq: Option<u64>,
    /// For a durable publish: hears when the message is committed to the log.
    pub committed: Option<Committed>,
}

/// What a subscribe returns.
#[derive(Clone, Debug, Serialize)]
pub struct Subscribed {
    pub sub: u64,
    /// Where a replay starts (replaying and durable subscriptions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_seq: Option<u64>,
}

/// The broker and its log.
pub struct Bus {
    inner: Mutex<Inner>,
    pub log: Log,
    next_outbox: AtomicU64,
    /// Log pages read for replays (held while a page is read, so that concurrent replays
    /// of the same range wait for one read instead of making their own).
    pages: Mutex<PageCache>,
    /// Pages read from the log for replays (for tests and metrics: shared reads stay few).
    pub page_reads: AtomicU64,
    /// The replay reader: one thread for every replay's reads (started on the first). Reads
    /// are serialised by the page cache anyway, and one thread, not one blocking-pool thread
    /// per replaying subscription each with its own malloc arena, keeps aitherd's RSS near
    /// what it holds.
    replayer: std::sync::OnceLock<std::sync::mpsc::Sender<ReplayJob>>,
}

/// A replay read for the replay thread: from, how many, where the rows (and the thread's CPU
/// time reading them, ns) go.
type ReplayJob = (
    u64,
    usize,
    oneshot::Sender<(Result<Vec<Arc<Msg>>, BusError>, u64)>,
);

impl Bus {
    /// Opens the log at `path` and starts an empty broker.
    pub fn open(path: &std::path::Path, retention: Retention) -> Result<Bus, BusError> {
        let log = Log::open(path, retention)?;
        Ok(Bus {
            inner: Mutex::new(Inner {
                subs: Vec::new(),
                last_seq: log.last_seq_at_open(),
            }),
            log,
            next_outbox: AtomicU64::new(1),
            pages: Mutex::new(PageCache::default()),
            page_reads: AtomicU64::new(0),
            replayer: std::sync::OnceLock::new(),
        })
    }

    /// A new connection's outbox.
    pub fn outbox(&self, principal: Principal) -> Arc<Outbox> {
        self.outbox_owned(principal, 0)
    }

    /// An outbox whose durable consumers are uid `owner`'s (an operator's connection: each
    /// user has their own consumer names).
    pub fn outbox_owned(&self, principal: Principal, owner: u32) -> Arc<Outbox> {
        Arc::new(Outbox {
            id: self.next_outbox.fetch_add(1, Ordering::Relaxed),
            principal: Arc::new(principal),
            owner,
            state: Mutex::new(OutState {
                subs: BTreeMap::new(),
                next_sub: 1,
                closed: false,
                queued_bytes: 0,
                replay_tokens: REPLAY_BURST,
                replay_at: std::time::Instant::now(),
                sink: None,
                busy: false,
                direct: Vec::new(),
            }),
            notify: Notify::new(),
            replay_bytes: AtomicU64::new(0),
            replay_cpu_ns: AtomicU64::new(0),
        })
    }

    /// Publishes `data` (JSON text) on `subject` as `who`, after the checks: a valid subject,
    /// the size limit, the publisher's ACL.
    pub fn publish(
        &self,
        who: &Principal,
        subject: &str,
        data: String,
        durable: bool,
    ) -> Result<Published, BusError> {
        self.publish_in(who, subject, data, durable, &mut Flush::default())
    }

    /// [`Bus::publish`] whose direct writes wait for `flush` (a publisher's batch: one send
    /// per subscriber for all of its messages).
    pub fn publish_in(
        &self,
        who: &Principal,
        subject: &str,
        data: String,
        durable: bool,
        flush: &mut Flush,
    ) -> Result<Published, BusError> {
        check_subject("subject", subject)?;
        check_data(&data)?;
        who.check_publish(subject)?;
        Ok(self.deliver(who.name(), subject, data, durable, true, flush))
    }

    /// A system event from the daemon (durable; subject built by the daemon).
    pub fn publish_system(&self, subject: &str, data: &serde_json::Value) {
        if check_subject("subject", subject).is_err() {
            return;
        }
        let text = data.to_string();
        if check_data(&text).is_err() {
            return;
        }
        self.deliver("aitherd", subject, text, true, false, &mut Flush::default());
    }

    fn deliver(
        &self,
        publisher: &str,
        subject: &str,
        data: String,
        durable: bool,
        want_commit: bool,
        flush: &mut Flush,
    ) -> Published {
        let mut inner = lock(&self.inner);
        let seq = if durable {
            inner.last_seq += 1;
            Some(inner.last_seq)
        } else {
            None
        };
        let msg = Arc::new(Msg {
            seq,
            subject: subject.to_string(),
            data,
            ts_ms: now_ms(),
            publisher: publisher.to_string(),
        });
        let mut committed = None;
        if durable {
            let (tx, rx) = oneshot::channel();
            let done = if want_commit {
                committed = Some(rx);
                Some(tx)
            } else {
                None
            };
            if let Err(e) = self.log.append(msg.clone(), done) {
                tracing::warn!(error = %e, "bus: durable message not logged");
            }
        }
        for s in &inner.subs {
            // The ACL is checked again at delivery: a subscription never carries a message its
            // owner may not read.
            if s.pattern.matches(subject)
                && s.outbox.principal.may_read(subject)
                && s.outbox.offer(s.id, &msg)
            {
                flush.0.push(s.outbox.clone());
            }
        }
        Published { seq, committed }
    }

    /// Subscribes `outbox` to a pattern (ACL-checked). Replaying and durable subscriptions get
    /// a pump task that reads the log; call from within the tokio runtime.
    pub fn subscribe(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        opts: &SubOptions,
    ) -> Result<Subscribed, BusError> {
        let pattern = Pattern::parse("pattern", &opts.pattern)?;
        outbox.principal.check_subscribe(&pattern)?;
        if let Some(n) = &opts.durable {
            check_consumer(n)?;
        }
        if opts.from_seq.is_some() && opts.since_ms.is_some() {
            return Err(BusError::Invalid {
                field: "from_seq",
                reason: "give from_seq or since_ms, not both".into(),
            });
        }
        let cap = match opts.queue {
            None => DEFAULT_QUEUE,
            Some(n) if (16..=65536).contains(&n) => n,
            Some(n) => {
                return Err(BusError::Invalid {
                    field: "queue",
                    reason: format!("{n}: must be between 16 and 65536"),
                })
            }
        };
        let rt = tokio::runtime::Handle::try_current().map_err(|_| BusError::LogGone)?;
        // Where a replay starts, read before the lock (SQLite).
        let mut start = match (opts.from_seq, opts.since_ms, &opts.durable) {
            (Some(s), _, _) => Some(s.max(1)),
            (None, Some(t), _) => Some(self.log.seq_at(t)?),
            (None, None, Some(n)) => self
                .log
                .cursor(outbox.owner, outbox.principal.name(), n)?
                .map(|a| a + 1)
                .or(Some(0)),
            (None, None, None) => None,
        };
        let mut inner = lock(&self.inner);
        if start == Some(0) {
            // A new durable consumer starts with the next message.
            start = Some(inner.last_seq + 1);
        }
        let mut st = lock(&outbox.state);
        if st.closed {
            return Err(BusError::LogGone);
        }
        if st.subs.len() >= MAX_SUBS {
            return Err(BusError::Limit {
                what: "subscriptions on this connection",
                have: st.subs.len(),
                limit: MAX_SUBS,
            });
        }
        let id = st.next_sub;
        st.next_sub += 1;
        let wake = Arc::new(Notify::new());
        st.subs.insert(
            id,
            SubQ {
                pattern: pattern.clone(),
                queue: VecDeque::new(),
                bytes: 0,
                cap,
                dropped_pending: 0,
                dropped: 0,
                delivered: 0,
                replay: start.map(|s| Replay {
                    durable: opts.durable.clone(),
                    next_seq: s,
                    catching_up: true,
                    wake: wake.clone(),
                }),
            },
        );
        drop(st);
        inner.subs.push(SubRef {
            outbox: outbox.clone(),
            id,
            pattern,
        });
        drop(inner);
        if start.is_some() {
            rt.spawn(pump(self.clone(), outbox.clone(), id, wake));
        }
        Ok(Subscribed {
            sub: id,
            start_seq: start,
        })
    }

    /// Ends one subscription.
    pub fn unsubscribe(&self, outbox: &Outbox, sub: u64) -> Result<(), BusError> {
        let mut inner = lock(&self.inner);
        let removed = {
            let mut st = lock(&outbox.state);
            let q = st.subs.remove(&sub);
            if let Some(q) = &q {
                st.queued_bytes -= q.bytes;
            }
            q
        };
        let Some(q) = removed else {
            return Err(BusError::NoSuchSub(sub));
        };
        inner
            .subs
            .retain(|s| !(s.outbox.id == outbox.id && s.id == sub));
        if let Some(r) = q.replay {
            r.wake.notify_one();
        }
        Ok(())
    }

    /// Ends every subscription of a connection (it closed, or the agent's run ended).
    pub fn close(&self, outbox: &Outbox) {
        let mut inner = lock(&self.inner);
        inner.subs.retain(|s| s.outbox.id != outbox.id);
        let mut st = lock(&outbox.state);
        st.closed = true;
        st.queued_bytes = 0;
        st.sink = None;
        st.direct = Vec::new();
        for q in std::mem::take(&mut st.subs).into_values() {
            if let Some(r) = q.replay {
                r.wake.notify_one();
            }
        }
    }

    /// Acks `seq` for a durable consumer, named directly or by one of the connection's
    /// subscriptions. Cursors only move forward. Returns the consumer's name and a receiver
    /// that hears when the ack is committed.
    pub fn ack(
        &self,
        outbox: &Outbox,
        sub: Option<u64>,
        durable: Option<&str>,
        seq: u64,
    ) -> Result<(String, Committed), BusError> {
        let name = match (sub, durable) {
            (_, Some(n)) => {
                check_consumer(n)?;
                n.to_string()
            }
            (Some(id), None) => {
                let st = lock(&outbox.state);
                let q = st.subs.get(&id).ok_or(BusError::NoSuchSub(id))?;
                q.replay
                    .as_ref()
                    .and_then(|r| r.durable.clone())
                    .ok_or_else(|| BusError::Invalid {
                        field: "sub",
                        reason: format!("subscription {id} is not a durable consumer"),
                    })?
            }
            (None, None) => {
                return Err(BusError::Invalid {
                    field: "durable",
                    reason: "name the consumer (`durable`) or its subscription (`sub`)".into(),
                })
            }
        };
        let last = lock(&self.inner).last_seq;
        if seq == 0 || seq > last {
            return Err(BusError::Invalid {
                field: "seq",
                reason: format!("{seq}: not a sequence number of the log (1..={last})"),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.log
            .ack(outbox.owner, outbox.principal.name(), &name, seq, Some(tx))?;
        Ok((name, rx))
    }

    /// Deletes the durable consumer `name` of the connection's owner (its cursor; a live
    /// subscription under that name goes on from where it is). The receiver hears how many
    /// cursors were deleted (0: none of that name).
    pub fn forget(&self, outbox: &Outbox, name: &str) -> Result<super::Committed, BusError> {
        check_consumer(name)?;
        let (tx, rx) = oneshot::channel();
        self.log
            .forget(outbox.owner, outbox.principal.name(), name, tx)?;
        Ok(rx)
    }

    /// The log's statistics and every live subscription.
    pub fn stats(&self) -> Result<(Stats, Vec<SubStat>), BusError> {
        let stats = self.log.stats()?;
        let outboxes: Vec<Arc<Outbox>> = {
            let inner = lock(&self.inner);
            let mut v: Vec<Arc<Outbox>> = Vec::new();
            for s in &inner.subs {
                if !v.iter().any(|o| o.id == s.outbox.id) {
                    v.push(s.outbox.clone());
                }
            }
            v
        };
        let mut subs = Vec::new();
        for o in outboxes {
            o.stats(&mut subs);
        }
        Ok((stats, subs))
    }

    /// The last sequence number assigned.
    pub fn last_seq(&self) -> u64 {
        lock(&self.inner).last_seq
    }

    /// `replay_read` on the replay thread (started on first use; it ends with the bus).
    async fn read_on_replayer(
        self: &Arc<Self>,
        from: u64,
        n: usize,
    ) -> Result<(Result<Vec<Arc<Msg>>, BusError>, u64), oneshot::error::RecvError> {
        let tx = self.replayer.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<ReplayJob>();
            let bus = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("aither-bus-replay".into())
                .spawn(move || {
                    while let Ok((from, n, done)) = rx.recv() {
                        let Some(b) = bus.upgrade() else { return };
                        let cpu0 = crate::sys::thread_cpu_ns();
                        let r = b.replay_read(from, n);
                        let ns = crate::sys::thread_cpu_ns().saturating_sub(cpu0);
                        drop(b);
                        let _ = done.send((r, ns));
                    }
                });
            if let Err(e) = spawned {
                // Every replay then fails its reads (logged by the pump) instead of the daemon.
                tracing::error!(error = %e, "bus: cannot start the replay thread");
            }
            tx
        });
        let (done, rx) = oneshot::channel();
        if tx.send((from, n, done)).is_err() {
            let (fail, rx) = oneshot::channel();
            let _ = fail.send((Err(BusError::LogGone), 0));
            return rx.await;
        }
        rx.await
    }

    /// Up to `n` committed messages from `from` on, through the shared page cache. Fewer
    /// than `n`: the replay has reached the last committed message.
    fn replay_read(&self, from: u64, n: usize) -> Result<Vec<Arc<Msg>>, BusError> {
        let committed = self.log.committed();
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < n && at <= committed {
            let no = at / PAGE;
            let end = (no + 1) * PAGE;
            if end - 1 > committed {
                // The newest page is still being written: read it, not cached.
                let left = n - out.len();
                out.extend(self.log.read_from(at, left)?.into_iter().map(Arc::new));
                break;
            }
            let page = {
                let mut cache = lock(&self.pages);
                match cache.get(no) {
                    Some(p) => p,
                    None => {
                        let rows = self.log.read_range(no * PAGE, end)?;
                        self.page_reads.fetch_add(1, Ordering::Relaxed);
                        let p = Arc::new(rows.into_iter().map(Arc::new).collect::<Vec<_>>());
                        cache.put(no, p.clone());
                        p
                    }
                }
            };
            for m in page.iter() {
                if out.len() >= n {
                    break;
                }
                if m.seq.unwrap_or(0) >= at {
                    out.push(m.clone());
                }
            }
            at = end;
        }
        Ok(out)
    }
}

/// Durable consumer names: 1-64 letters, digits, '-', '_'.
fn check_consumer(n: &str) -> Result<(), BusError> {
    if !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(())
    } else {
        Err(BusError::Invalid {
            field: "durable",
            reason: format!("{n:?}: use 1-64 letters, digits, '-' or '_'"),
        })
    }
}

/// Feeds a replaying subscription from the log while it is behind, with at most about its
/// queue's capacity in memory; switches it to live once it has read every assigned sequence.
async fn pump(bus: Arc<Bus>, outbox: Arc<Outbox>, sub: u64, wake: Arc<Notify>) {
    loop {
        let next = {
            let st = lock(&outbox.state);
            if st.closed {
                return;
            }
            let Some(q) = st.subs.get(&sub) else { return };
            let Some(r) = &q.replay else { return };
            let room = q.cap.saturating_sub(q.queue.len());
            if !r.catching_up || !has_room(q, st.queued_bytes) {
                None
            } else {
                Some((r.next_seq, room.clamp(1, REPLAY_BATCH)))
            }
        };
        let Some((from, n)) = next else {
            wake.notified().await;
            continue;
        };
        // The connection's replay budget: wait until it is positive again.
        let wait = {
            let mut st = lock(&outbox.state);
            let now = std::time::Instant::now();
            let dt = now.saturating_duration_since(st.replay_at).as_secs_f64();
            st.replay_tokens = (st.replay_tokens + dt * REPLAY_RATE).min(REPLAY_BURST);
            st.replay_at = now;
            (st.replay_tokens < 0.0)
                .then(|| Duration::from_secs_f64(-st.replay_tokens / REPLAY_RATE))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
            continue;
        }
        let rows = match bus.read_on_replayer(from, n).await {
            Ok((Ok(r), ns)) => {
                outbox.replay_cpu_ns.fetch_add(ns, Ordering::Relaxed);
                r
            }
            Ok((Err(e), _)) => {
                tracing::warn!(error = %e, "bus: replay read failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => return,
        };
        let mut full = rows.len() == n;
        let still_behind = {
            let inner = lock(&bus.inner);
            let mut st = lock(&outbox.state);
            let OutState {
                subs,
                queued_bytes,
                replay_tokens,
                ..
            } = &mut *st;
            let Some(q) = subs.get_mut(&sub) else {
                return;
            };
            let pattern = q.pattern.clone();
            let Some(r) = q.replay.as_mut() else { return };
            if r.next_seq != from {
                continue;
            }
            // Charged: every message read past, matching or not (reading is the work).
            let mut taken = 0usize;
            for m in rows {
                let seq = m.seq.unwrap_or(0);
                let c = m.cost();
                if pattern.matches(&m.subject) && outbox.principal.may_read(&m.subject) {
                    if q.bytes + c > SUB_QUEUE_BYTES || *queued_bytes + c > OUTBOX_QUEUE_BYTES {
                        // Full in bytes: the rest is read again once the queue drains.
                        full = true;
                        break;
                    }
                    q.bytes += c;
                    *queued_bytes += c;
                    q.queue.push_back(m);
                }
                taken += c;
                r.next_seq = seq + 1;
            }
            *replay_tokens -= taken as f64;
            outbox
                .replay_bytes
                .fetch_add(taken as u64, Ordering::Relaxed);
            if !full && r.next_seq > inner.last_seq {
                r.catching_up = false;
            }
            r.catching_up
        };
        outbox.notify.notify_one();
        if still_behind && !full {
            // Assigned but not yet committed: the writer commits within a few ms.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::BusClaim;

    /// The push is framed by hand (no re-encoding of `data`): it is the protocol fixture, byte
    /// for byte, and decodes as aither-proto's `Push`.
    #[test]
    fn push_json_is_the_protocol_fixture() {
        let fixture = include_str!("../../crates/aither-proto/fixtures/agent.push.bus_msg.json");
        let d = Delivery {
            sub: 7,
            msg: Arc::new(Msg {
                seq: Some(42),
                subject: "agent.indexer.jobs".into(),
                data: r#"{"job":"a"}"#.into(),
                ts_ms: 1_700_000_000_000,
                publisher: "operator".into(),
            }),
            dropped: 0,
        };
        assert_eq!(d.push_json(), fixture);
        assert!(matches!(
            serde_json::from_str::<aither_proto::agent::Push>(&d.push_json()).unwrap(),
            aither_proto::agent::Push::BusMsg(m) if m.seq == Some(42) && m.sub == 7
        ));
    }

    fn bus() -> (tempfile::TempDir, Arc<Bus>) {
        let dir = tempfile::tempdir().unwrap();
        let ret = Retention {
            max_bytes: 1 << 30,
            max_age_ms: 1 << 40,
            every: Duration::from_secs(60),
        };
        let b = Arc::new(Bus::open(&dir.path().join("bus.db"), ret).unwrap());
        (dir, b)
    }

    fn agent(name: &str, publish: &[&str], subscribe: &[&str]) -> Principal {
        Principal::agent(
            name,
            &BusClaim {
                publish: publish.iter().map(|s| s.to_string()).collect(),
                subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn sub(pattern: &str) -> SubOptions {
        SubOptions {
            pattern: pattern.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn acl_on_publish_subscribe_and_delivery() {
        let (_d, b) = bus();
        let a = agent("a", &["agent.a.>"], &["agent.*.out", "agent.a.>"]);
        let oa = b.outbox(a.clone());
        assert!(b.publish(&a, "agent.b.out", "1".into(), false).is_err());
        assert!(b
            .publish(&a, "aither.agent.a.x", "1".into(), false)
            .is_err());
        assert_eq!(
            b.publish(&a, "agent.a.out", "1".into(), false)
                .err()
                .map(|e| e.code()),
            None
        );
        let e = b.subscribe(&oa, &sub(">")).unwrap_err();
        assert_eq!(e.code(), "denied");
        let e = b.subscribe(&oa, &sub("agent.b.>")).unwrap_err();
        assert_eq!(e.code(), "denied");
        b.subscribe(&oa, &sub("agent.*.out")).unwrap();
        let op = Principal::Operator;
        b.publish(&op, "agent.b.out", "2".into(), false).unwrap();
        b.publish(&op, "agent.b.secret", "3".into(), false).unwrap();
        let got = oa.drain(10, usize::MAX);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].msg.data, "2");
        assert!(matches!(
            b.publish(&op, "a", "x".repeat(40_000), false),
            Err(BusError::TooLarge { .. })
        ));
        assert_eq!(
            b.publish(&op, "a..b", "1".into(), false)
                .err()
                .unwrap()
                .code(),
            "invalid"
        );
    }

    /// A publisher writes an idle connection's socket itself, once per batch; when the
    /// socket is full the rest goes to the writer and the queue, and the connection returns to
    /// direct writes once the writer has caught up: one stream, in order, nothing twice.
    #[tokio::test]
    async fn direct_writes_hand_over_to_the_writer_and_back_in_order() {
        use std::io::{Read, Write};
        let (_d, b) = bus();
        let op = Principal::Operator;
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut writer = ours.try_clone().unwrap();
        let o = b.outbox(op.clone());
        b.subscribe(
            &o,
            &SubOptions {
                queue: Some(65536),
                ..sub("d.>")
            },
        )
        .unwrap();
        fn line(d: &Delivery, out: &mut Vec<u8>) {
            out.extend_from_slice(d.msg.data.as_bytes());
            out.push(b'\n');
        }
        o.attach(Sink::new(std::os::fd::OwnedFd::from(ours), line));
        let pad = "p".repeat(1000);
        let msg = |i: usize| format!("\"{i:05}{pad}\"");
        // One batch: nothing is sent until it ends, then all of it at once.
        let mut f = Flush::default();
        for i in 0..10 {
            b.publish_in(&op, "d.x", msg(i), false, &mut f).unwrap();
        }
        peer.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        assert_eq!(
            peer.read(&mut one).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        drop(f);
        assert_eq!(o.usage().queued_bytes, 0);
        // Unread, the socket fills: the rest is queued.
        let mut n = 10;
        while o.usage().queued_bytes == 0 {
            b.publish(&op, "d.x", msg(n), false).unwrap();
            n += 1;
            assert!(n < 5000, "the socket never filled");
        }
        for _ in 0..100 {
            b.publish(&op, "d.x", msg(n), false).unwrap();
            n += 1;
        }
        peer.set_nonblocking(false).unwrap();
        let lines = Arc::new(AtomicU64::new(0));
        let counted = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut b = [0u8; 65536];
            loop {
                let k = peer.read(&mut b).unwrap();
                if k == 0 {
                    return String::from_utf8(all).unwrap();
                }
                all.extend_from_slice(&b[..k]);
                let nl = b[..k].iter().filter(|c| **c == b'\n').count();
                counted.fetch_add(nl as u64, Ordering::SeqCst);
            }
        });
        // The writer: the direct buffer's rest, then the queue, until nothing is left.
        loop {
            let mut head = Vec::new();
            for d in o.drain_into(256, 256 * 1024, &mut head) {
                line(&d, &mut head);
            }
            if head.is_empty() {
                break;
            }
            writer.write_all(&head).unwrap();
            o.written();
        }
        // Idle again, and the subscriber has read everything: direct, nothing queued.
        while lines.load(Ordering::SeqCst) < n as u64 {
            std::thread::yield_now();
        }
        // (Few: each send is a buffer of its own in the socket, bigger than its message.)
        for _ in 0..20 {
            b.publish(&op, "d.x", msg(n), false).unwrap();
            n += 1;
            assert_eq!(o.usage().queued_bytes, 0);
        }
        b.close(&o);
        drop(writer);
        let got: Vec<String> = reader.join().unwrap().lines().map(String::from).collect();
        let want: Vec<String> = (0..n).map(msg).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "out of order or duplicated");
        let mut subs = Vec::new();
        o.stats(&mut subs);
        assert!(subs.is_empty());
    }

    #[tokio::test]
    async fn a_live_queue_drops_oldest_and_counts() {
        let (_d, b) = bus();
        let o = b.outbox(Principal::Operator);
        let s = b
            .subscribe(
                &o,
                &SubOptions {
                    queue: Some(16),
                    ..sub("x")
                },
            )
            .unwrap();
        for i in 0..100 {
            b.publish(&Principal::Operator, "x", i.to_string(), false)
                .unwrap();
        }
        let got = o.drain(1000, usize::MAX);
        assert_eq!(got.len(), 16);
        assert_eq!(got[0].msg.data, "84");
        assert_eq!(got[0].dropped, 84);
        assert_eq!(got[0].sub, s.sub);
        assert_eq!(got[1].dropped, 0);
    }

    #[tokio::test]
    async fn durable_consumers_never_drop_and_resume_after_their_ack() {
        let (_d, b) = bus();
        let op = Principal::Operator;
        let o = b.outbox(op.clone());
        let opts = SubOptions {
            durable: Some("c".into()),
            queue: Some(16),
            ..sub("d.>")
        };
        b.subscribe(&o, &opts).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 1..=500u64 {
            b.publish(&op, "d.x", i.to_string(), true).unwrap();
            b.publish(&op, "other", "0".into(), true).unwrap();
        }
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 500 && tokio::time::Instant::now() < deadline {
            let d = o.drain(7, usize::MAX);
            if d.is_empty() {
                tokio::time::timeout(Duration::from_millis(50), o.ready())
                    .await
                    .ok();
            }
            got.extend(d);
        }
        let data: Vec<u64> = got.iter().map(|d| d.msg.data.parse().unwrap()).collect();
        assert_eq!(data, (1..=500).collect::<Vec<_>>());
        let seq250 = got[249].msg.seq.unwrap();
        b.ack(&o, Some(1), None, seq250).unwrap();
        b.close(&o);
        b.log.flush();
        // A new connection resumes after the ack.
        let o2 = b.outbox(op.clone());
        let s = b.subscribe(&o2, &opts).unwrap();
        assert_eq!(s.start_seq, Some(seq250 + 1));
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 250 && tokio::time::Instant::now() < deadline {
            tokio::time::timeout(Duration::from_millis(50), o2.ready())
                .await
                .ok();
            got.extend(o2.drain(100, usize::MAX));
        }
        assert_eq!(got.len(), 250);
        assert_eq!(got[0].msg.data, "251");
    }

    #[tokio::test]
    async fn a_connection_holds_at_most_max_subs_and_its_queues_are_bounded_in_bytes() {
        let (_d, b) = bus();
        let op = Principal::Operator;
        let o = b.outbox(op.clone());
        for i in 0..MAX_SUBS {
            b.subscribe(
                &o,
                &SubOptions {
                    queue: Some(65536),
                    ..sub(&format!("s.{i}"))
                },
            )
            .unwrap();
        }
        let e = b.subscribe(&o, &sub("s.x")).unwrap_err();
        assert_eq!(e.code(), "limit");
        assert_eq!(
            e.to_string(),
            format!("subscriptions on this connection: {MAX_SUBS} of {MAX_SUBS} in use (docs/bus.md, \"Bounds\")")
        );
        // 30 KiB messages to a live queue of 65536 messages: its bytes stay bounded, the
        // oldest go and are counted.
        let big = format!("\"{}\"", "x".repeat(30_000));
        for _ in 0..200 {
            b.publish(&op, "s.0", big.clone(), false).unwrap();
        }
        let u = o.usage();
        assert!(u.queued_bytes as usize <= SUB_QUEUE_BYTES, "{u:?}");
        let per = SUB_QUEUE_BYTES / (big.len() + 3 + 8 + 96);
        let got = o.drain(100_000, usize::MAX);
        assert_eq!(got.len(), per);
        assert_eq!(got[0].dropped, 200 - per as u64);
        // The connection's total: every subscription near full stays under the outbox cap.
        for i in 0..MAX_SUBS {
            for _ in 0..40 {
                b.publish(&op, &format!("s.{i}"), big.clone(), false)
                    .unwrap();
            }
        }
        assert!(o.usage().queued_bytes as usize <= OUTBOX_QUEUE_BYTES);
        b.close(&o);
        assert_eq!(o.usage().queued_bytes, 0);
    }

    #[tokio::test]
    async fn ninety_replays_share_page_reads_and_stay_within_their_bytes() {
        let (_d, b) = bus();
        let op = Principal::Operator;
        let big = format!("\"{}\"", "y".repeat(8_000));
        let n = 4 * PAGE as usize;
        for _ in 0..n {
            b.publish(&op, "log.x", big.clone(), true).unwrap();
        }
        b.log.flush();
        let outs: Vec<Arc<Outbox>> = (0..90).map(|_| b.outbox(op.clone())).collect();
        for o in &outs {
            b.subscribe(
                o,
                &SubOptions {
                    from_seq: Some(1),
                    queue: Some(65536),
                    ..sub("log.>")
                },
            )
            .unwrap();
        }
        // Every replay reads until its queue is full in bytes (none drains).
        let full = |o: &Outbox| o.usage().queued_bytes as usize + 8_200 > SUB_QUEUE_BYTES;
        let mut waited = 0;
        while !outs.iter().all(|o| full(o)) && waited < 1000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        for o in &outs {
            assert!(full(o) && o.usage().queued_bytes as usize <= SUB_QUEUE_BYTES);
        }
        // One read per page for all 90 (the first pages), not one per subscription.
        let reads = b.page_reads.load(Ordering::Relaxed);
        assert!(reads <= 4, "{reads} page reads");
        // Drained, they go on to the end, in order, each message once.
        let mut seen = 0u64;
        let o = &outs[0];
        let mut waited = 0;
        while seen < n as u64 && waited < 2000 {
            let d = o.drain(1000, usize::MAX);
            if d.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                waited += 1;
            }
            for m in d {
                seen += 1;
                assert_eq!(m.msg.seq, Some(seen));
            }
        }
        assert_eq!(seen, n as u64);
        for o in &outs {
            b.close(o);
        }
    }
}
