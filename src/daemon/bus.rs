//! The daemon's side of AitherFlux (docs/bus.md): agents' `bus.*` ops on their channel, with
//! server-pushed messages; the control socket's `bus_pub`, `bus_sub` and `bus_streams`; the
//! writer tasks that put replies and pushes on a connection in order.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::proto::{self, aio, ErrorCode, Reply, Request};
use super::Daemon;
use crate::audit::{Entry, Verdict};
use crate::bus::broker::{Flush, Sink};
use crate::bus::{BusError, Committed, Delivery, Outbox, SubOptions};

/// Deliveries taken from an outbox per write, and their most bytes (a writer holds at most
/// about this much of a connection's messages beyond its queues).
const DRAIN: usize = 256;
const DRAIN_BYTES: usize = 256 * 1024;

/// What the writer of a connection puts on it, in order.
pub enum Slot {
    /// A reply, ready.
    Now(Reply),
    /// A reply that comes later (a durable publish, after its commit), with the request's id.
    Later(Option<Value>, oneshot::Receiver<Reply>),
    /// A last reply; then the channel is shut.
    Close(Reply),
    /// A frame body written as is (a push).
    Raw(String),
    /// Frames already encoded (the replies to a run of pipelined requests), written as is.
    Frames(Vec<u8>),
    /// A frame encoded once for every connection (the reply to a live publish).
    Static(&'static [u8]),
    /// A durable publish's reply, `{"ok":true,"data":{"seq":N}}`, once the log has committed
    /// it (awaited by the writer itself: no task or channel per message).
    Commit(u64, Committed),
}

/// A channel op's reply, now or after the log commits.
pub enum Outcome {
    Now(Reply),
    Later(oneshot::Receiver<Reply>),
}

fn push_frame(buf: &mut Vec<u8>, body: &str) {
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body.as_bytes());
}

/// Appends one frame whose body `body` writes straight into `buf` (the length prefix is
/// filled in after): no intermediate string per frame.
fn frame_with(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf);
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The reply to every non-durable publish on a control connection, `{"ok":true,"data":
/// {"seq":null}}`, encoded once.
fn live_published_frame() -> &'static [u8] {
    static F: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    F.get_or_init(|| proto::encode(&Reply::ok(json!({"seq": null}))).unwrap_or_default())
}

fn put_reply(buf: &mut Vec<u8>, r: &Reply, limit: usize) {
    match proto::encode_limit(r, limit) {
        Ok(b) => buf.extend_from_slice(&b),
        Err(e) => {
            if let Ok(b) = proto::encode(&Reply::err(ErrorCode::Internal, e.to_string())) {
                buf.extend_from_slice(&b);
            }
        }
    }
}

async fn put_slot(buf: &mut Vec<u8>, s: Slot, limit: usize) -> bool {
    match s {
        Slot::Now(r) => put_reply(buf, &r, limit),
        Slot::Later(id, rx) => {
            let mut r = rx.await.unwrap_or_else(|_| {
                Reply::err(ErrorCode::Internal, "the daemon dropped the reply")
            });
            r.id = id;
            put_reply(buf, &r, limit);
        }
        Slot::Raw(body) => push_frame(buf, &body),
        Slot::Frames(b) => buf.extend_from_slice(&b),
        Slot::Static(b) => buf.extend_from_slice(b),
        Slot::Commit(seq, rx) => match rx.await {
            Ok(Ok(_)) => frame_with(buf, |b| {
                use std::io::Write;
                let _ = write!(b, "{{\"ok\":true,\"data\":{{\"seq\":{seq}}}}}");
            }),
            other => put_reply(buf, &commit_result(other, json!({"seq": seq})), limit),
        },
        Slot::Close(r) => {
            put_reply(buf, &r, limit);
            return false;
        }
    }
    true
}

/// Writes an agent channel: replies in request order, and the outbox's messages as push frames
/// (`{"push":"bus.msg",...}`, no `id`). Ends when the senders are gone or a write fails.
pub async fn channel_writer(
    mut w: OwnedWriteHalf,
    mut slots: mpsc::Receiver<Slot>,
    outbox: Arc<Outbox>,
    usage: Arc<super::budget::Usage>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let mut open = true;
        tokio::select! {
            biased;
            s = slots.recv() => match s {
                None => return,
                Some(s) => {
                    open = put_slot(&mut buf, s, proto::MAX_FRAME).await;
                    while open && buf.len() < 256 * 1024 {
                        match slots.try_recv() {
                            Ok(s) => open = put_slot(&mut buf, s, proto::MAX_FRAME).await,
                            Err(_) => break,
                        }
                    }
                }
            },
            _ = outbox.ready() => {}
        }
        if open {
            // Encoding the agent's bus messages is work for it: measured, counted.
            let cpu0 = super::budget::thread_cpu_ns();
            for d in outbox.drain(DRAIN, DRAIN_BYTES) {
                frame_with(&mut buf, |b| d.write_push(b));
            }
            let ns = super::budget::thread_cpu_ns().saturating_sub(cpu0);
            usage.add(&usage.cpu_ns, ns);
        }
        if !buf.is_empty() {
            usage.add(&usage.bytes_out, buf.len() as u64);
            if w.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        if !open {
            let _ = w.shutdown().await;
            return;
        }
    }
}

fn field<'a>(req: &'a Value, k: &str) -> Option<&'a Value> {
    req.get(k).filter(|v| !v.is_null())
}

fn bad(field: &'static str, reason: &str) -> BusError {
    BusError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn str_field<'a>(req: &'a Value, k: &'static str) -> Result<&'a str, BusError> {
    match field(req, k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(k, "must be a string")),
        None => Err(bad(k, "missing")),
    }
}

fn u64_field(req: &Value, k: &'static str) -> Result<Option<u64>, BusError> {
    match field(req, k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(k, "must be an unsigned integer")),
    }
}

fn bool_field(req: &Value, k: &'static str) -> Result<bool, BusError> {
    match field(req, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(k, "must be true or false")),
    }
}

fn err_reply(e: &BusError) -> Reply {
    Reply::err(e.code(), e.to_string())
}

/// One `bus.*` op on agent `name`'s channel (the outbox carries its verified bus claim).
pub fn channel_op(d: &Daemon, outbox: &Arc<Outbox>, name: &str, req: &Value) -> Outcome {
    let op = req.get("op").and_then(|o| o.as_str()).unwrap_or("");
    let res = channel_op_inner(d, outbox, op, req);
    match res {
        Ok(o) => o,
        Err(e) => {
            if let BusError::Denied(msg) = &e {
                // Summarised: a flood of denied publishes is one record and a count.
                d.audit_summarised(
                    Entry::new("bus", Verdict::Deny, msg.clone())
                        .agent(name)
                        .actor(format!("agent {name}"))
                        .data(json!({
                            "op": op,
                            "subject": req.get("subject"),
                            "pattern": req.get("pattern"),
                        })),
                    if op == "bus.publish" {
                        "bus.publish"
                    } else {
                        "bus.subscribe"
                    },
                );
            }
            Outcome::Now(err_reply(&e))
        }
    }
}

fn channel_op_inner(
    d: &Daemon,
    outbox: &Arc<Outbox>,
    op: &str,
    req: &Value,
) -> Result<Outcome, BusError> {
    match op {
        "bus.publish" => {
            let subject = str_field(req, "subject")?;
            // `null` is a payload like any other.
            let data = req.get("data").ok_or_else(|| bad("data", "missing"))?;
            let durable = bool_field(req, "durable")?;
            let p = d
                .bus
                .publish(outbox.principal(), subject, data.to_string(), durable)?;
            Ok(published(p))
        }
        "bus.subscribe" => {
            let opts = SubOptions {
                pattern: str_field(req, "pattern")?.to_string(),
                durable: match field(req, "durable") {
                    None => None,
                    Some(_) => Some(str_field(req, "durable")?.to_string()),
                },
                from_seq: u64_field(req, "from_seq")?,
                since_ms: u64_field(req, "since_ms")?,
                queue: u64_field(req, "queue")?.map(|q| q as usize),
            };
            let s = d.bus.subscribe(outbox, &opts)?;
            Ok(Outcome::Now(Reply::ok(
                serde_json::to_value(s).unwrap_or_default(),
            )))
        }
        "bus.unsubscribe" => {
            let sub = u64_field(req, "sub")?.ok_or_else(|| bad("sub", "missing"))?;
            d.bus.unsubscribe(outbox, sub)?;
            Ok(Outcome::Now(Reply::ok(json!({}))))
        }
        "bus.ack" => {
            let seq = u64_field(req, "seq")?.ok_or_else(|| bad("seq", "missing"))?;
            let sub = u64_field(req, "sub")?;
            let durable = match field(req, "durable") {
                None => None,
                Some(_) => Some(str_field(req, "durable")?),
            };
            let (name, rx) = d.bus.ack(outbox, sub, durable, seq)?;
            Ok(committed(rx, json!({"durable": name, "seq": seq})))
        }
        other => Ok(Outcome::Now(Reply::err(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?} (bus ops: bus.publish, bus.subscribe, bus.unsubscribe, bus.ack)"),
        ))),
    }
}

fn published(p: crate::bus::broker::Published) -> Outcome {
    match (p.seq, p.committed) {
        (Some(seq), Some(rx)) => committed(rx, json!({"seq": seq})),
        (seq, _) => Outcome::Now(Reply::ok(json!({"seq": seq}))),
    }
}

/// A reply sent once the log has committed.
fn committed(rx: Committed, data: Value) -> Outcome {
    let (tx, out) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(commit_reply(rx, data).await);
    });
    Outcome::Later(out)
}

async fn commit_reply(rx: Committed, data: Value) -> Reply {
    commit_result(rx.await, data)
}

fn commit_result(
    r: Result<Result<u64, crate::bus::CommitError>, oneshot::error::RecvError>,
    data: Value,
) -> Reply {
    match r {
        Ok(Ok(_)) => Reply::ok(data),
        Ok(Err(e)) => Reply::err(ErrorCode::Internal, e.to_string()),
        Err(_) => Reply::err(ErrorCode::Internal, "the bus log stopped"),
    }
}

/// `bus_streams`: the log and every live subscription.
pub fn streams(d: &Daemon) -> Reply {
    match d.bus.stats() {
        Ok((log, subs)) => Reply::ok(json!({
            "streams": [{
                "name": "default",
                "path": d.bus.log.path(),
                "log": log,
            }],
            "subscriptions": subs,
        })),
        Err(e) => err_reply(&e),
    }
}

/// A control-socket connection whose first request is `bus_pub` or `bus_sub`: an operator's
/// publisher (requests may be pipelined; replies come in order, a durable publish's after its
/// commit) or subscriber (a stream of `more: true` replies until the client closes).
/// What a control-socket caller may do on the bus (docs/security-model.md, "Who may do
/// what").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusScope {
    /// Root and admins: every subject, `bus_streams`, anyone's durable consumers.
    Operator,
    /// A member (this uid): publish on `agent.<own agent>[.…]`, subscribe live, with a replay
    /// or as a durable consumer of their own (consumer names are per user) to that and
    /// `aither.agent.<own agent>[.…]`; no `bus_streams` on a publishing connection.
    Member(u32),
}

impl BusScope {
    /// Whether `subject` (a publish) or `pattern` (`subscribe`: the system events too) names
    /// only agents this scope owns: the agent token must be a literal name, never `*` or `>`.
    pub fn allows(self, d: &Daemon, subject: &str, subscribe: bool) -> bool {
        let uid = match self {
            BusScope::Operator => return true,
            BusScope::Member(uid) => uid,
        };
        let mut t = subject.split('.');
        let name = match (t.next(), t.next()) {
            (Some("agent"), Some(name)) => name,
            (Some("aither"), Some("agent")) if subscribe => match t.next() {
                Some(name) => name,
                None => return false,
            },
            _ => return false,
        };
        !name.contains(['*', '>']) && d.name_owner(name) == Some(uid)
    }

    fn refusal(what: &str) -> Reply {
        Reply::err(
            ErrorCode::Denied,
            format!(
                "{what}: a member of aither may publish on agent.<own agent>.… and subscribe to \
                 that and aither.agent.<own agent>.… (no wildcard for the agent); the whole \
                 bus is for root and aither-admin"
            ),
        )
    }
}

/// `uid`: the caller, whose durable consumers this connection names.
pub async fn serve(
    d: Arc<Daemon>,
    (first, first_body): (Request, &[u8]),
    actor: String,
    (scope, uid): (BusScope, u32),
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
) {
    let outbox = d.bus.outbox_owned(crate::bus::Principal::Operator, uid);
    if let Request::BusSub {
        pattern,
        durable,
        from_seq,
        since_ms,
        queue,
    } = first
    {
        if !scope.allows(&d, &pattern, true) {
            let _ = aio::write_reply(&mut w, &BusScope::refusal(&pattern)).await;
            return;
        }
        let opts = SubOptions {
            pattern,
            durable,
            from_seq,
            since_ms,
            queue,
        };
        let first = match d.bus.subscribe(&outbox, &opts) {
            Ok(s) => Reply::chunk(json!({"subscribed": s})),
            Err(e) => {
                let _ = aio::write_reply(&mut w, &err_reply(&e)).await;
                return;
            }
        };
        tracing::debug!(%actor, pattern = %opts.pattern, "bus: operator subscribed");
        if aio::write_reply(&mut w, &first).await.is_ok() {
            subscriber(&outbox, &mut r, &mut w).await;
        }
        d.bus.close(&outbox);
        return;
    }
    // Publisher: a reader task turns requests into slots, a batch per read of the socket;
    // this task writes them in order, as many as are ready in one write. At most
    // PUB_BATCHES × PUB_BATCH slots wait (the 4,096 of one slot per request before).
    let (tx, rx) = mpsc::channel::<Vec<Slot>>(PUB_BATCHES);
    let d2 = d.clone();
    let ob = outbox.clone();
    // The first request again from its frame: a publish's `data` as sent.
    let first_slot = match first {
        Request::BusPub { .. } => body_slot(&d, scope, &outbox, first_body, &mut Flush::default()),
        req => request_slot(&d, scope, &outbox, req, &mut Flush::default()),
    };
    let reader = tokio::spawn(async move {
        let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
        let mut batch = Batch::default();
        // The subscribers' direct writes of this read's publishes: sent before any wait.
        let mut flush = Flush::default();
        let mut next = Some(first_slot);
        loop {
            let slot = match next.take() {
                Some(s) => s,
                None => match aio::read_frame(&mut r).await {
                    Ok(None) => {
                        flush.run();
                        let _ = tx.send(batch.take()).await;
                        return;
                    }
                    Ok(Some(body)) => body_slot(&d2, scope, &ob, &body, &mut flush),
                    Err(e) => {
                        flush.run();
                        batch.push(Slot::Close(Reply::err(e.code(), e.to_string())));
                        let _ = tx.send(batch.take()).await;
                        return;
                    }
                },
            };
            batch.push(slot);
            // Handed over when the next frame is not all read yet (the next read may wait)
            // or the batch is full; the deliveries go first.
            if batch.full() || !whole_frame(r.buffer()) {
                flush.run();
                if tx.send(batch.take()).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut rx = rx;
    'outer: while let Some(slots) = rx.recv().await {
        let mut open = true;
        for s in slots {
            if open {
                open = put_slot(&mut buf, s, proto::MAX_REPLY).await;
            }
        }
        while open && buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(slots) => {
                    for s in slots {
                        if open {
                            open = put_slot(&mut buf, s, proto::MAX_REPLY).await;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        if !buf.is_empty() && w.write_all(&buf).await.is_err() {
            break 'outer;
        }
        buf.clear();
        if !open {
            break;
        }
    }
    reader.abort();
    d.bus.close(&outbox);
}

/// Slots handed from a publisher's reader to its writer at once, at most.
const PUB_BATCH: usize = 256;
/// Batches queued for the writer, at most.
const PUB_BATCHES: usize = 16;

/// The slots of one read of a publisher's socket; replies that are ready are encoded as they
/// come, into one `Frames` slot per run.
#[derive(Default)]
struct Batch {
    slots: Vec<Slot>,
    frames: Vec<u8>,
}

impl Batch {
    fn push(&mut self, s: Slot) {
        match s {
            Slot::Now(r) => put_reply(&mut self.frames, &r, proto::MAX_REPLY),
            Slot::Frames(b) => self.frames.extend_from_slice(&b),
            Slot::Static(b) => self.frames.extend_from_slice(b),
            other => {
                self.end_frames();
                self.slots.push(other);
            }
        }
    }

    fn end_frames(&mut self) {
        if !self.frames.is_empty() {
            self.slots
                .push(Slot::Frames(std::mem::take(&mut self.frames)));
        }
    }

    fn full(&self) -> bool {
        self.slots.len() >= PUB_BATCH || self.frames.len() >= 64 * 1024
    }

    fn take(&mut self) -> Vec<Slot> {
        self.end_frames();
        std::mem::take(&mut self.slots)
    }
}

/// Whether `b` starts with a whole frame (or a header no frame can have: the next read
/// fails at once on it).
fn whole_frame(b: &[u8]) -> bool {
    match b.get(..4) {
        None => false,
        Some(h) => {
            let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            n > proto::MAX_FRAME || b.len() >= 4 + n
        }
    }
}

/// A `bus_pub` request read without building a [`Request`]: `data` stays the JSON text it
/// was sent as (the parse validates it; it is never re-encoded). A body this does not take
/// goes through `Request` as before (same replies, same errors).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPub<'a> {
    op: &'a str,
    #[serde(borrow)]
    subject: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
    #[serde(default)]
    durable: bool,
}

fn body_slot(d: &Daemon, scope: BusScope, ob: &Outbox, body: &[u8], flush: &mut Flush) -> Slot {
    if let Ok(p) = serde_json::from_slice::<RawPub>(body) {
        // A `\u` escape takes the decoding path: a raw value is not checked for lone
        // surrogates, which a subscriber's strict decoder (serde_json's) refuses.
        if p.op == "bus_pub" && !p.data.get().contains("\\u") {
            return publish_slot(d, scope, ob, (&p.subject, p.data.get(), p.durable), flush);
        }
    }
    match serde_json::from_slice::<Request>(body) {
        Ok(req) => request_slot(d, scope, ob, req, flush),
        Err(e) => Slot::Now(Reply::err(ErrorCode::BadRequest, e.to_string())),
    }
}

fn publish_slot(
    d: &Daemon,
    scope: BusScope,
    ob: &Outbox,
    (subject, data, durable): (&str, &str, bool),
    flush: &mut Flush,
) -> Slot {
    if !scope.allows(d, subject, false) {
        return Slot::Now(BusScope::refusal(subject));
    }
    match d
        .bus
        .publish_in(ob.principal(), subject, data.to_string(), durable, flush)
    {
        Ok(p) => match (p.seq, p.committed) {
            (Some(seq), Some(rx)) => Slot::Commit(seq, rx),
            (None, _) => Slot::Static(live_published_frame()),
            (seq, None) => Slot::Now(Reply::ok(json!({"seq": seq}))),
        },
        Err(e) => Slot::Now(err_reply(&e)),
    }
}

fn request_slot(d: &Daemon, scope: BusScope, ob: &Outbox, req: Request, flush: &mut Flush) -> Slot {
    match req {
        Request::BusPub {
            subject,
            data,
            durable,
        } => publish_slot(d, scope, ob, (&subject, &data.to_string(), durable), flush),
        Request::BusStreams if scope != BusScope::Operator => {
            Slot::Now(BusScope::refusal("bus_streams"))
        }
        Request::BusStreams => Slot::Now(streams(d)),
        Request::Ping => Slot::Now(Reply::ok(json!({"pong": true}))),
        _ => Slot::Now(Reply::err(
            ErrorCode::BadRequest,
            "a publishing connection takes bus_pub, bus_streams and ping only",
        )),
    }
}

async fn subscriber(outbox: &Arc<Outbox>, r: &mut OwnedReadHalf, w: &mut OwnedWriteHalf) {
    let gone = async {
        let mut b = [0u8; 64];
        loop {
            match tokio::io::AsyncReadExt::read(r, &mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::pin!(gone);
    // Publishers write this connection's deliveries themselves while this task is idle (the
    // connection carries nothing else now); without a duplicate of the socket, all go
    // through this task as before.
    {
        use std::os::fd::AsFd;
        match w.as_ref().as_fd().try_clone_to_owned() {
            Ok(fd) => outbox.attach(Sink::new(fd, subscriber_frame)),
            Err(e) => tracing::debug!(error = %e, "bus: no direct writes for a subscriber"),
        }
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            _ = &mut gone => return,
            _ = outbox.ready() => {}
        }
        for d in outbox.drain_into(DRAIN, DRAIN_BYTES, &mut buf) {
            subscriber_frame(&d, &mut buf);
        }
        if !buf.is_empty() {
            if w.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        outbox.written();
    }
}

/// A delivery on an operator's subscriber connection: `{"ok":true,"more":true,"data":{...}}`.
fn subscriber_frame(d: &Delivery, buf: &mut Vec<u8>) {
    frame_with(buf, |b| {
        b.extend_from_slice(b"{\"ok\":true,\"more\":true,\"data\":");
        d.write_json(b);
        b.push(b'}');
    });
}

/// The subject of a daemon event: `aither.agent.<name>.<kind>`, or `aither.daemon.<kind>`.
pub fn event_subject(name: Option<&str>, kind: &str) -> String {
    match name {
        Some(n) => format!("aither.agent.{n}.{kind}"),
        None => format!("aither.daemon.{kind}"),
    }
}

/// `bus_ack` from the control socket: uid `owner`'s durable consumer (agent `operator`).
pub async fn operator_ack(d: &Daemon, owner: u32, durable: &str, seq: u64) -> Reply {
    let ob = d.bus.outbox_owned(crate::bus::Principal::Operator, owner);
    match d.bus.ack(&ob, None, Some(durable), seq) {
        Ok((name, rx)) => commit_reply(rx, json!({"durable": name, "seq": seq})).await,
        Err(e) => err_reply(&e),
    }
}

/// `bus_consumer_rm`: deletes uid `owner`'s durable consumer `durable`; one that does not
/// exist is `not_found`.
pub async fn operator_forget(d: &Daemon, owner: u32, durable: &str) -> Reply {
    let ob = d.bus.outbox_owned(crate::bus::Principal::Operator, owner);
    let rx = match d.bus.forget(&ob, durable) {
        Ok(rx) => rx,
        Err(e) => return err_reply(&e),
    };
    match rx.await {
        Ok(Ok(0)) => Reply::err(
            ErrorCode::NotFound,
            format!("no durable consumer named {durable:?} (`aitherctl bus streams` lists them)"),
        ),
        Ok(Ok(_)) => Reply::ok(json!({"durable": durable, "removed": true})),
        Ok(Err(e)) => Reply::err(ErrorCode::Internal, e.to_string()),
        Err(_) => Reply::err(ErrorCode::Internal, "the bus log stopped"),
    }
}

/// The durable consumers `caller` may see, each with its owner's uid: an operator's (agent
/// `operator`) is its key's owner; an agent's belongs to the agent's owner. Admins: all.
pub fn consumers_for(d: &Daemon, caller: &super::identity::Caller, v: &Value) -> Value {
    let mut out = Vec::new();
    let cons = v["streams"][0]["log"]["consumers"].as_array().cloned();
    for mut c in cons.into_iter().flatten() {
        let agent = c["agent"].as_str().unwrap_or("");
        let owner = if agent == crate::bus::Principal::Operator.name() {
            c["owner"].as_u64().and_then(|o| u32::try_from(o).ok())
        } else {
            d.name_owner(agent)
        };
        if caller.admin || owner == Some(caller.uid) {
            c["owner"] = json!(owner);
            out.push(c);
        }
    }
    Value::Array(out)
}
