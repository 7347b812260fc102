//! The agent side of the aitherd channel.
//!
//! aitherd starts every agent with a connected `SOCK_STREAM` unix socket as fd 3 and
//! `AITHER_FD=3` in its environment. Over it the agent sends requests (readiness, watchdog
//! heartbeats, pain signals, status lines, and later ops) and gets exactly one reply per
//! request, in order. The wire format is in `docs/protocol.md`; the framing is in [`frame`].
//!
//! ```no_run
//! use aither_sdk::{Channel, Severity};
//!
//! let channel = Channel::from_env()?;
//! channel.ready()?;
//! channel.status("indexing 3/10")?;
//! channel.pain(Severity::Warning, "rate-limited by the upstream API")?;
//! # Ok::<(), aither_sdk::SdkError>(())
//! ```
//!
//! The whole surface, each documented where it is defined:
//!
//! - lifecycle: [`Channel::ready`], [`Channel::heartbeat`] and the [`Heartbeat`] thread,
//!   [`Channel::pain`], [`Channel::status`];
//! - memory tiers ([`Tier`]): [`Channel::mem_put`], [`Channel::mem_get`],
//!   [`Channel::mem_search`], [`Channel::mem_usage`], the `graph_*` calls, and
//!   [`Channel::mem`] for any `mem.*` op;
//! - the bus: [`Channel::publish`], [`Channel::subscribe`], [`Channel::next_message`],
//!   [`Channel::messages`] (an iterator), [`Channel::ack`], [`Channel::unsubscribe`];
//! - the GPU lease: [`Channel::gpu_lease`];
//! - errors: [`SdkError`], with [`SdkError::code`] for the daemon's refusals ([`ErrorCode`]).
//!
//! Runnable example agents are in `runtime/aither-sdk/examples/` (docs/agents.md).
//!
//! One process should own the channel. Processes that share fd 3 (a shell agent calling
//! `aither-notify`) each write whole frames, but each sees every reply: the SDK matches replies
//! to its requests by `id` and discards the others, which can make the other process wait for
//! a reply it will never see. Within a process, [`Channel`] is `Sync`: requests from several
//! threads are serialised.

pub mod frame;
mod gpu;
mod memory;

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Map, Value};

pub use aither_proto::agent::{BusMessage as Message, Severity, UnknownSeverity};
pub use aither_proto::ErrorCode as WireCode;
pub use frame::{FrameError, MAX_FRAME};
pub use gpu::{GpuDevice, GpuLease, GpuState};
pub use memory::{SearchOptions, Tier};

use aither_proto::AgentRequest;

/// The environment variable that names the channel's file descriptor.
pub const ENV_FD: &str = "AITHER_FD";

/// The longest `reason` of a pain signal and `text` of a status line, in bytes.
pub const MAX_TEXT: usize = 1024;

/// Ids are `pid << ID_PID_SHIFT | counter`: unique among the live processes of one agent that
/// share the channel, and below 2^53 so that any JSON implementation keeps them exact.
const ID_PID_SHIFT: u32 = 20;
const ID_COUNTER_MASK: u64 = (1 << ID_PID_SHIFT) - 1;

/// Error codes after which the daemon closes the channel; such a reply cannot carry an id.
const FATAL_CODES: [WireCode; 2] = [WireCode::BadFrame, WireCode::TooLarge];

/// Set once `Channel::from_env` has taken ownership of the inherited descriptor.
static ENV_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Everything the SDK can report.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("not running under aitherd ({ENV_FD} is not set)")]
    NotUnderAitherd,
    #[error("{ENV_FD}={0:?} is not a file descriptor number")]
    BadFdVar(String),
    #[error("{ENV_FD}={0} is not an open file descriptor")]
    FdNotOpen(RawFd),
    #[error("{ENV_FD}={fd} is not a socket (it is {target})")]
    NotASocket { fd: RawFd, target: String },
    #[error(
        "the aitherd channel was already taken by this process (Channel::from_env called twice)"
    )]
    AlreadyTaken,
    #[error("{field} is {len} bytes; the limit is {MAX_TEXT}")]
    TooLong { field: &'static str, len: usize },
    #[error("request field {0:?} is set by the SDK, not by the caller")]
    ReservedField(String),
    #[error("unknown severity {0:?} (expected info, warning, error or critical)")]
    BadSeverity(String),
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("aitherd sent a malformed reply: {0}")]
    BadReply(String),
    #[error("aitherd closed the channel")]
    Closed,
    #[error("the channel is unusable after an earlier failure (closed, I/O error or timeout)")]
    Broken,
    /// The daemon answered `ok: false`.
    #[error("{code}: {message}")]
    Remote { code: String, message: String },
    #[error("starting the heartbeat thread: {0}")]
    Thread(#[source] io::Error),
    /// This aitherd has no GPU service (it answered `gpu.lease` with `unknown_op`).
    #[error("GPU service not available in this aitherd ({0})")]
    GpuUnavailable(String),
    #[error("no bus subscription {0} on this channel")]
    NoSubscription(u64),
    #[error("heartbeat interval must be more than zero")]
    ZeroInterval,
}

/// What kind of refusal an error is, as [`SdkError::code`] gives it: a coarser view of the
/// daemon's error codes ([`WireCode`], docs/protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The token does not allow it.
    Denied,
    /// A memory write would pass a quota; nothing was written.
    Quota,
    /// No such memory key, graph node or subscription.
    NotFound,
    /// A field is missing, malformed or too long (also a payload that is not JSON).
    Invalid,
    /// A bus payload over [`MAX_DATA`].
    MsgTooLarge,
    /// The daemon does not know the op (an older aitherd).
    UnknownOp,
    /// A bad frame length: the daemon closed the channel.
    BadFrame,
    /// Any other code (`internal`, ...).
    Other,
}

impl ErrorCode {
    /// The kind of a wire error code string.
    pub fn parse(code: &str) -> ErrorCode {
        ErrorCode::of(&WireCode::parse(code))
    }

    /// The kind of a wire error code.
    pub fn of(code: &WireCode) -> ErrorCode {
        match code {
            WireCode::Denied => ErrorCode::Denied,
            WireCode::Quota => ErrorCode::Quota,
            WireCode::NotFound => ErrorCode::NotFound,
            WireCode::Invalid | WireCode::BadJson => ErrorCode::Invalid,
            WireCode::MsgTooLarge => ErrorCode::MsgTooLarge,
            WireCode::UnknownOp => ErrorCode::UnknownOp,
            WireCode::BadFrame | WireCode::TooLarge => ErrorCode::BadFrame,
            _ => ErrorCode::Other,
        }
    }
}

impl SdkError {
    /// The daemon's error code, for [`SdkError::Remote`].
    pub fn remote_code(&self) -> Option<&str> {
        match self {
            SdkError::Remote { code, .. } => Some(code),
            _ => None,
        }
    }

    /// What kind of refusal this is: the daemon's code for [`SdkError::Remote`], and the code
    /// the daemon would have given for requests refused here before sending (a text or payload
    /// too long, a bad severity, a missing subscription). None for channel failures.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SdkError::Remote { code, .. } => Some(ErrorCode::parse(code)),
            SdkError::TooLong { field: "data", .. } => Some(ErrorCode::MsgTooLarge),
            SdkError::TooLong { .. }
            | SdkError::ReservedField(_)
            | SdkError::BadSeverity(_)
            | SdkError::ZeroInterval => Some(ErrorCode::Invalid),
            SdkError::GpuUnavailable(_) => Some(ErrorCode::UnknownOp),
            SdkError::NoSubscription(_) => Some(ErrorCode::NotFound),
            _ => None,
        }
    }
}

impl From<UnknownSeverity> for SdkError {
    fn from(e: UnknownSeverity) -> SdkError {
        SdkError::BadSeverity(e.0)
    }
}

struct Inner {
    stream: UnixStream,
    next: u64,
    broken: bool,
    /// Server pushes (bus messages) read while waiting for a reply, in order.
    pushes: std::collections::VecDeque<Value>,
    /// Bus subscriptions: (the caller's id, options, the daemon's current id, last seq seen).
    subs: Vec<Sub>,
    /// Messages taken from `pushes` that wait for a reader of their own subscription.
    ready: std::collections::VecDeque<Message>,
    timeout: Option<Duration>,
}

struct Sub {
    id: u64,
    opts: Map<String, Value>,
    server: u64,
    last_seq: Option<u64>,
}

/// Options of [`Channel::subscribe_with`].
#[derive(Clone, Debug, Default)]
pub struct SubscribeOptions {
    /// A durable consumer's name: aitherd keeps its acked cursor and resumes after it.
    pub durable: Option<String>,
    /// Replay the log from this sequence number first.
    pub from_seq: Option<u64>,
    /// Replay the log from this time (ms since the epoch) first.
    pub since_ms: Option<u64>,
    /// Queue capacity in messages (16..=65536).
    pub queue: Option<usize>,
}

/// The largest bus payload (`data` as JSON), in bytes.
pub const MAX_DATA: usize = 32 * 1024;

impl Inner {
    fn next_id(&mut self) -> u64 {
        self.next = self.next.wrapping_add(1);
        (u64::from(std::process::id()) << ID_PID_SHIFT) | (self.next & ID_COUNTER_MASK)
    }

    fn fail(&mut self, err: impl Into<SdkError>) -> SdkError {
        self.broken = true;
        err.into()
    }
}

/// The agent's end of the aitherd channel. Requests block until their reply arrives; `Channel`
/// is `Send + Sync`, and requests from several threads are serialised.
pub struct Channel {
    inner: Mutex<Inner>,
    /// Threads waiting for `inner` to send a request: a reader waiting for bus messages
    /// steps aside for them between short reads, so a heartbeat thread is never starved.
    waiters: AtomicUsize,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Channel")
            .field("stream", &inner.stream)
            .field("broken", &inner.broken)
            .finish()
    }
}

impl Channel {
    /// The channel aitherd passed to this process: the descriptor named by `AITHER_FD`.
    ///
    /// Takes ownership of that descriptor (it is closed when the `Channel` drops), so it
    /// succeeds once per process; nothing else in the process may use the descriptor.
    pub fn from_env() -> Result<Channel, SdkError> {
        let value = std::env::var_os(ENV_FD).ok_or(SdkError::NotUnderAitherd)?;
        let text = value.to_string_lossy();
        let fd: RawFd = text
            .trim()
            .parse()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| SdkError::BadFdVar(text.clone().into_owned()))?;
        // Where /proc is readable, refuse a descriptor that is closed or not a socket rather
        // than take ownership of something else's number. Without /proc, trust the variable.
        match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            Ok(target) if !target.to_string_lossy().starts_with("socket:") => {
                return Err(SdkError::NotASocket {
                    fd,
                    target: target.to_string_lossy().into_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SdkError::FdNotOpen(fd)),
            _ => {}
        }
        if ENV_FD_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(SdkError::AlreadyTaken);
        }
        // SAFETY: `fd` is the descriptor aitherd handed this process for the channel (the
        // AITHER_FD contract), checked above to be open; ENV_FD_TAKEN makes this the only
        // OwnedFd created from it by the SDK in this process, and the documented contract is
        // that nothing else in the process uses that descriptor.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Channel::from_fd(owned))
    }

    /// A channel over an already-open connected stream socket (tests, or a process that got
    /// the descriptor some other way).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            inner: Mutex::new(Inner {
                stream: UnixStream::from(fd),
                next: 0,
                broken: false,
                pushes: Default::default(),
                subs: Vec::new(),
                ready: Default::default(),
                timeout: None,
            }),
            waiters: AtomicUsize::new(0),
        }
    }

    /// The channel's state, for a request: counted in `waiters` while waiting.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Bounds how long one read or write may block (`None`: forever, the default). A request
    /// that times out leaves the channel unusable ([`SdkError::Broken`] afterwards): the
    /// stream may be in the middle of a frame.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), SdkError> {
        let mut inner = self.lock();
        inner.timeout = timeout;
        inner
            .stream
            .set_read_timeout(timeout)
            .map_err(FrameError::Io)?;
        inner
            .stream
            .set_write_timeout(timeout)
            .map_err(FrameError::Io)?;
        Ok(())
    }

    /// Tells aitherd the agent is ready (like `sd_notify("READY=1")`).
    pub fn ready(&self) -> Result<(), SdkError> {
        self.typed(&AgentRequest::Ready).map(drop)
    }

    /// Keeps the watchdog from restarting the agent (like `sd_notify("WATCHDOG=1")`).
    pub fn heartbeat(&self) -> Result<(), SdkError> {
        self.typed(&AgentRequest::Heartbeat).map(drop)
    }

    /// Reports a pain signal; `reason` is at most [`MAX_TEXT`] bytes. Returns the action the
    /// policy chose (`log`, `throttle`, `restart`, `stop`) when the daemon names it.
    pub fn pain(&self, severity: Severity, reason: &str) -> Result<Option<String>, SdkError> {
        check_text("reason", reason)?;
        let reply = self.typed(&AgentRequest::Pain {
            severity,
            reason: Some(reason.to_owned()),
        })?;
        Ok(reply
            .pointer("/data/action")
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    /// Sets the agent's free-form status line; `text` is at most [`MAX_TEXT`] bytes.
    pub fn status(&self, text: &str) -> Result<(), SdkError> {
        check_text("text", text)?;
        self.typed(&AgentRequest::Status {
            text: text.to_owned(),
        })
        .map(drop)
    }

    /// Sends one typed request (aither-proto's [`AgentRequest`]) and returns the whole reply.
    fn typed(&self, req: &AgentRequest) -> Result<Value, SdkError> {
        let fields = request_fields(req)?;
        let mut inner = self.lock();
        let r = call(&mut inner, req.op(), fields)?;
        after_reset(&mut inner)?;
        Ok(r)
    }

    /// Sends `{"id": <fresh>, "op": op, ...fields}` and returns the whole reply object (with
    /// `"ok": true`) for ops that carry data back. An `"ok": false` reply is
    /// [`SdkError::Remote`]. A request that would exceed [`MAX_FRAME`] is refused here, before
    /// anything is written; the channel stays usable.
    pub fn request(&self, op: &str, fields: Map<String, Value>) -> Result<Value, SdkError> {
        if let Some(key) = ["id", "op"].into_iter().find(|k| fields.contains_key(*k)) {
            return Err(SdkError::ReservedField(key.to_owned()));
        }
        let mut inner = self.lock();
        let r = call(&mut inner, op, fields)?;
        after_reset(&mut inner)?;
        Ok(r)
    }

    /// Publishes `data` on `subject` (live only). Refused: `denied` (the token's
    /// `bus.publish`), `invalid` (a malformed subject), `msg_too_large` (over [`MAX_DATA`]).
    pub fn publish(&self, subject: &str, data: &Value) -> Result<(), SdkError> {
        self.publish_inner(subject, data, false).map(drop)
    }

    /// Publishes to the durable log; returns the message's sequence number once committed.
    pub fn publish_durable(&self, subject: &str, data: &Value) -> Result<u64, SdkError> {
        self.publish_inner(subject, data, true)?
            .ok_or_else(|| SdkError::BadReply("no \"seq\" in a durable publish's reply".into()))
    }

    fn publish_inner(
        &self,
        subject: &str,
        data: &Value,
        durable: bool,
    ) -> Result<Option<u64>, SdkError> {
        let len = serde_json::to_vec(data).map_err(SdkError::Encode)?.len();
        if len > MAX_DATA {
            return Err(SdkError::TooLong { field: "data", len });
        }
        let r = self.typed(&AgentRequest::BusPublish {
            subject: subject.to_owned(),
            data: data.clone(),
            durable,
        })?;
        Ok(r.pointer("/data/seq").and_then(Value::as_u64))
    }

    /// Subscribes to a pattern (`*`: one token, `>`: the rest); messages come from
    /// [`Channel::next_message`]. Returns the subscription's id.
    pub fn subscribe(&self, pattern: &str) -> Result<u64, SdkError> {
        self.subscribe_with(pattern, &SubscribeOptions::default())
    }

    /// Subscribes with replay or as a durable consumer.
    pub fn subscribe_with(&self, pattern: &str, o: &SubscribeOptions) -> Result<u64, SdkError> {
        let opts = request_fields(&AgentRequest::BusSubscribe {
            pattern: pattern.to_owned(),
            durable: o.durable.clone(),
            from_seq: o.from_seq,
            since_ms: o.since_ms,
            queue: o.queue.map(|q| q as u64),
        })?;
        let mut inner = self.lock();
        let r = call(&mut inner, "bus.subscribe", opts.clone())?;
        let id = r
            .pointer("/data/sub")
            .and_then(Value::as_u64)
            .ok_or_else(|| SdkError::BadReply("no \"sub\" in a subscribe reply".into()))?;
        inner.subs.push(Sub {
            id,
            opts,
            server: id,
            last_seq: None,
        });
        after_reset(&mut inner)?;
        Ok(id)
    }

    /// Acks everything up to `seq` for the durable consumer `durable`: aitherd resumes that
    /// consumer after it (at-least-once delivery).
    pub fn ack(&self, durable: &str, seq: u64) -> Result<(), SdkError> {
        self.typed(&AgentRequest::BusAck {
            durable: Some(durable.to_owned()),
            sub: None,
            seq,
        })
        .map(drop)
    }

    /// Ends a subscription (the id [`Channel::subscribe`] returned); its queued messages are
    /// dropped. An id this channel does not know is [`SdkError::NoSubscription`].
    pub fn unsubscribe(&self, sub: u64) -> Result<(), SdkError> {
        let mut inner = self.lock();
        let Some(pos) = inner.subs.iter().position(|s| s.id == sub) else {
            return Err(SdkError::NoSubscription(sub));
        };
        let s = inner.subs.remove(pos);
        inner.ready.retain(|m| m.sub != sub);
        let f = request_fields(&AgentRequest::BusUnsubscribe { sub: s.server })?;
        call(&mut inner, "bus.unsubscribe", f)?;
        after_reset(&mut inner)
    }

    /// The next bus message, or None after `timeout` (None: wait for ever).
    ///
    /// Other threads' requests (a [`Heartbeat`]) go through while this waits.
    pub fn next_message(&self, timeout: Option<Duration>) -> Result<Option<Message>, SdkError> {
        self.next_message_inner(None, timeout)
    }

    /// The next message of subscription `sub`, or None after `timeout`; messages of other
    /// subscriptions stay queued for their readers.
    pub fn next_message_for(
        &self,
        sub: u64,
        timeout: Option<Duration>,
    ) -> Result<Option<Message>, SdkError> {
        self.next_message_inner(Some(sub), timeout)
    }

    /// An iterator over bus messages as they come (of `sub` only, when given); it ends after
    /// `idle` without a message (None: never) or at the first error, which it yields.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), aither_sdk::SdkError> {
    /// use std::time::Duration;
    /// let ch = aither_sdk::Channel::from_env()?;
    /// let jobs = ch.subscribe("agent.me.jobs")?;
    /// for msg in ch.messages(Some(jobs), Some(Duration::from_secs(30))) {
    ///     println!("{}", msg?.data);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn messages(&self, sub: Option<u64>, idle: Option<Duration>) -> Messages<'_> {
        Messages {
            channel: self,
            sub,
            idle,
            done: false,
        }
    }

    fn next_message_inner(
        &self,
        want: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<Option<Message>, SdkError> {
        // How long one read may hold the channel before it lets a waiting request through.
        const SLICE: Duration = Duration::from_millis(20);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(m) = pop_ready(&mut inner, want)? {
                return Ok(Some(m));
            }
            if inner.broken {
                return Err(SdkError::Broken);
            }
            if self.waiters.load(Ordering::SeqCst) > 0 {
                // A request (a heartbeat) is waiting: let it go first. Its reply may carry
                // pushes, which the next round finds queued.
                drop(inner);
                while self.waiters.load(Ordering::SeqCst) > 0 {
                    std::thread::yield_now();
                }
                inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let left = match deadline {
                None => SLICE,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(l) if !l.is_zero() => l.min(SLICE),
                    _ => return Ok(None),
                },
            };
            // Wait for the first byte of a frame for at most a slice; the rest is read under
            // the channel's own timeout, so a timeout never splits a frame.
            inner
                .stream
                .set_read_timeout(Some(left))
                .map_err(FrameError::Io)?;
            let mut header = [0u8; 4];
            let first = io::Read::read(&mut inner.stream, &mut header[..1]);
            let t = inner.timeout;
            inner.stream.set_read_timeout(t).map_err(FrameError::Io)?;
            match first {
                Ok(0) => return Err(inner.fail(SdkError::Closed)),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(inner.fail(FrameError::Io(e))),
            }
            let rest = (|| -> Result<Vec<u8>, FrameError> {
                io::Read::read_exact(&mut inner.stream, &mut header[1..])?;
                let n = frame::parse_header(header)?;
                let mut body = vec![0u8; n];
                io::Read::read_exact(&mut inner.stream, &mut body)?;
                Ok(body)
            })();
            let raw = match rest {
                Ok(b) => b,
                Err(e) => return Err(inner.fail(e)),
            };
            let v: Value = serde_json::from_slice(&raw)
                .map_err(|e| SdkError::BadReply(format!("invalid JSON: {e}")))?;
            if v.get("push").is_some() {
                inner.pushes.push_back(v);
            }
        }
    }

    /// The agent's GPU lease (`gpu.lease`): [`GpuState::None`] without a GPU claim in the
    /// token, `Queued` while the scheduler holds it back, `Granted` with the devices.
    /// [`SdkError::GpuUnavailable`] when this aitherd has no GPU service.
    pub fn gpu_lease(&self) -> Result<GpuLease, SdkError> {
        match self.typed(&AgentRequest::GpuLease) {
            Ok(reply) => gpu::lease_from_reply(reply),
            Err(SdkError::Remote { code, message })
                if WireCode::parse(&code) == WireCode::UnknownOp =>
            {
                Err(SdkError::GpuUnavailable(message))
            }
            Err(e) => Err(e),
        }
    }
}

/// Bus messages as they come: see [`Channel::messages`].
#[derive(Debug)]
pub struct Messages<'a> {
    channel: &'a Channel,
    sub: Option<u64>,
    idle: Option<Duration>,
    done: bool,
}

impl Iterator for Messages<'_> {
    type Item = Result<Message, SdkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.channel.next_message_inner(self.sub, self.idle);
        match r {
            Ok(Some(m)) => Some(Ok(m)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The first message for `want` (None: any): from those set aside, then from the pushes in
/// order, setting aside the others'.
fn pop_ready(inner: &mut Inner, want: Option<u64>) -> Result<Option<Message>, SdkError> {
    if let Some(i) = inner
        .ready
        .iter()
        .position(|m| want.is_none_or(|w| m.sub == w))
    {
        return Ok(inner.ready.remove(i));
    }
    while let Some(p) = inner.pushes.pop_front() {
        if let Some(m) = take(inner, p)? {
            if want.is_none_or(|w| m.sub == w) {
                return Ok(Some(m));
            }
            inner.ready.push_back(m);
        }
    }
    Ok(None)
}

/// A queued push as the caller's message; resubscribes after a `bus.reset`.
fn take(inner: &mut Inner, p: Value) -> Result<Option<Message>, SdkError> {
    match p.get("push").and_then(Value::as_str) {
        Some("bus.reset") => {
            resubscribe(inner)?;
            Ok(None)
        }
        Some("bus.msg") => {
            let Ok(aither_proto::agent::Push::BusMsg(mut m)) = serde_json::from_value(p) else {
                return Ok(None);
            };
            let Some(s) = inner.subs.iter_mut().find(|s| s.server == m.sub) else {
                return Ok(None);
            };
            m.sub = s.id;
            if m.seq.is_some() {
                s.last_seq = m.seq;
            }
            Ok(Some(m))
        }
        _ => Ok(None),
    }
}

fn after_reset(inner: &mut Inner) -> Result<(), SdkError> {
    let is_reset = |p: &Value| p.get("push").and_then(Value::as_str) == Some("bus.reset");
    if !inner.pushes.iter().any(is_reset) {
        return Ok(());
    }
    // Messages before the reset belong to the old subscriptions' ids: take them first.
    while inner.pushes.front().is_some_and(|p| !is_reset(p)) {
        if let Some(p) = inner.pushes.pop_front() {
            if let Some(m) = take(inner, p)? {
                inner.ready.push_back(m);
            }
        }
    }
    let before = inner.pushes.len();
    inner
        .pushes
        .retain(|p| p.get("push").and_then(Value::as_str) != Some("bus.reset"));
    if inner.pushes.len() != before {
        resubscribe(inner)?;
    }
    Ok(())
}

/// aitherd restarted and forgot the subscriptions: durable consumers resume after their last
/// ack, replays after the last message seen.
fn resubscribe(inner: &mut Inner) -> Result<(), SdkError> {
    let subs = std::mem::take(&mut inner.subs);
    for mut s in subs {
        let mut opts = s.opts.clone();
        if opts.contains_key("durable") {
            opts.remove("from_seq");
            opts.remove("since_ms");
        } else if let Some(l) = s.last_seq {
            if opts.remove("since_ms").is_some() | opts.remove("from_seq").is_some() {
                opts.insert("from_seq".into(), (l + 1).into());
            }
        }
        let r = call(inner, "bus.subscribe", opts)?;
        s.server = r.pointer("/data/sub").and_then(Value::as_u64).unwrap_or(0);
        inner.subs.push(s);
    }
    Ok(())
}

/// One request and its reply, the lock held; pushes read meanwhile are queued.
fn call(inner: &mut Inner, op: &str, fields: Map<String, Value>) -> Result<Value, SdkError> {
    {
        if inner.broken {
            return Err(SdkError::Broken);
        }
        let id = inner.next_id();
        let mut body = Map::with_capacity(fields.len() + 2);
        body.insert("id".into(), id.into());
        body.insert("op".into(), op.into());
        body.extend(fields);
        let payload = serde_json::to_vec(&Value::Object(body)).map_err(SdkError::Encode)?;
        let wire = frame::encode(&payload)?;
        // One write per request: processes sharing the socket never interleave frames.
        if let Err(e) = inner.stream.write_all(&wire) {
            return Err(inner.fail(FrameError::Io(e)));
        }
        loop {
            let raw = match frame::read_frame_sync(&mut inner.stream) {
                Ok(Some(raw)) => raw,
                Ok(None) => return Err(inner.fail(SdkError::Closed)),
                Err(e) => return Err(inner.fail(e)),
            };
            let reply: Value = serde_json::from_slice(&raw)
                .map_err(|e| SdkError::BadReply(format!("invalid JSON: {e}")))?;
            match reply.get("id") {
                Some(v) if v.as_u64() == Some(id) => return interpret(reply),
                None | Some(Value::Null) if reply.get("push").is_some() => {
                    inner.pushes.push_back(reply);
                    continue;
                }
                // An id-less reply that ends the channel ends it for every user.
                None | Some(Value::Null) => match interpret(reply) {
                    Err(e)
                        if e.remote_code()
                            .is_some_and(|c| FATAL_CODES.contains(&WireCode::parse(c))) =>
                    {
                        return Err(inner.fail(e));
                    }
                    _ => continue,
                },
                // Another process's reply on a shared descriptor.
                Some(_) => continue,
            }
        }
    }
}

/// A typed request's fields without its `op` (the caller's `call` adds `id` and `op`).
fn request_fields(req: &AgentRequest) -> Result<Map<String, Value>, SdkError> {
    match serde_json::to_value(req).map_err(SdkError::Encode)? {
        Value::Object(mut m) => {
            m.remove("op");
            Ok(m)
        }
        _ => Ok(Map::new()),
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), SdkError> {
    if text.len() > MAX_TEXT {
        return Err(SdkError::TooLong {
            field,
            len: text.len(),
        });
    }
    Ok(())
}

fn interpret(reply: Value) -> Result<Value, SdkError> {
    match reply.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(reply),
        Some(false) => {
            let body = reply
                .get("error")
                .cloned()
                .ok_or_else(|| SdkError::BadReply("\"ok\": false without \"error\"".into()))?;
            let aither_proto::ErrorBody { code, message } = serde_json::from_value(body)
                .map_err(|e| SdkError::BadReply(format!("bad \"error\" object: {e}")))?;
            Err(SdkError::Remote {
                code: code.as_str().to_owned(),
                message,
            })
        }
        None => Err(SdkError::BadReply("no boolean \"ok\"".into())),
    }
}

/// A thread that sends a heartbeat at once and then every `interval`, until stopped (or
/// dropped) or a heartbeat fails.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Result<(), SdkError>>>,
}

impl Heartbeat {
    /// Starts the thread; `interval` must be more than zero ([`SdkError::ZeroInterval`]).
    /// Send heartbeats more often than the agent's watchdog (a third of it is a good choice).
    pub fn spawn(channel: Arc<Channel>, interval: Duration) -> Result<Heartbeat, SdkError> {
        if interval.is_zero() {
            return Err(SdkError::ZeroInterval);
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("aither-heartbeat".into())
            .spawn(move || -> Result<(), SdkError> {
                loop {
                    channel.heartbeat()?;
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
            })
            .map_err(SdkError::Thread)?;
        Ok(Heartbeat {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// False once the thread has ended (a heartbeat failed); [`Heartbeat::stop`] says why.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and returns the error that ended it early, if any.
    pub fn stop(mut self) -> Result<(), SdkError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), SdkError> {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = self.shut_down();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_names_round_trip() {
        for sev in Severity::ALL {
            assert_eq!(sev.as_str().parse::<Severity>().unwrap(), sev);
            assert_eq!(serde_json::to_value(sev).unwrap(), sev.as_str());
        }
        let e = SdkError::from("fatal".parse::<Severity>().unwrap_err());
        assert!(matches!(e, SdkError::BadSeverity(s) if s == "fatal"));
    }

    #[test]
    fn ids_stay_exact_in_json_doubles() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut inner = Inner {
            stream: a,
            next: u64::MAX - 1,
            broken: false,
            pushes: Default::default(),
            subs: Vec::new(),
            ready: Default::default(),
            timeout: None,
        };
        for _ in 0..4 {
            let id = inner.next_id();
            assert!(id < 1 << 53);
            assert_eq!(id >> ID_PID_SHIFT, u64::from(std::process::id()));
        }
    }

    #[test]
    fn interpret_maps_replies() {
        let ok = interpret(serde_json::json!({"id": 1, "ok": true, "value": 5})).unwrap();
        assert_eq!(ok["value"], 5);
        let err = interpret(
            serde_json::json!({"ok": false, "error": {"code": "denied", "message": "no"}}),
        );
        assert!(
            matches!(err, Err(SdkError::Remote { code, message }) if code == "denied" && message == "no")
        );
        assert!(matches!(
            interpret(serde_json::json!({"id": 1})),
            Err(SdkError::BadReply(_))
        ));
        assert!(matches!(
            interpret(serde_json::json!({"ok": false})),
            Err(SdkError::BadReply(_))
        ));
    }
}
