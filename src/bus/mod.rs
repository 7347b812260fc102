//! AitherFlux: the capability-gated event bus (docs/bus.md; NATS subjects are the model).
//!
//! - `subject`: subjects and NATS-style patterns (`*`, `>`), matching and containment;
//! - `log`: the durable log in `$STATE_DIR/bus.db` (SQLite, one writer thread, batched
//!   commits): sequence numbers, replay by sequence or time, acked cursors, retention;
//! - `broker`: live subscriptions with bounded per-subscriber queues (drop-oldest for live
//!   subscribers, flow control through the log for replaying/durable ones).
//!
//! The ACL is the token's `bus` claim: a publish needs a `publish` pattern matching the
//! subject; a subscribe needs the requested pattern to lie inside one `subscribe` pattern, and
//! every delivery re-checks the subject against the subscriber's `subscribe` patterns.

pub mod broker;
pub mod log;
pub use crate::policy::bus_subject as subject;

pub use broker::{Bus, Delivery, Outbox, SubOptions};
pub use subject::{check_subject, Pattern};

/// Largest message payload (`data`, as JSON text), in bytes.
pub const MAX_DATA: usize = 32 * 1024;
/// Default capacity of one subscriber's queue, in messages.
pub const DEFAULT_QUEUE: usize = 1024;
/// Most subscriptions one connection (an agent's channel) holds at once.
pub const MAX_SUBS: usize = 64;
/// Most bytes queued for one subscription (messages counted by subject, publisher and data).
pub const SUB_QUEUE_BYTES: usize = 1 << 20;
/// Most bytes queued for one connection, all its subscriptions together.
pub const OUTBOX_QUEUE_BYTES: usize = 8 << 20;
/// Bytes a connection's replays may read from the log per second, sustained, and in a burst
/// (aitherd's work for a replay is charged to the connection that asked).
pub const REPLAY_RATE: f64 = 8.0 * 1024.0 * 1024.0;
pub const REPLAY_BURST: f64 = 32.0 * 1024.0 * 1024.0;
/// Bytes of log pages kept for replays, shared by every replaying subscription.
pub const PAGE_CACHE_BYTES: usize = 16 << 20;
/// Subjects under this prefix are the daemon's own (system events); agents cannot publish them.
pub const SYSTEM_PREFIX: &str = "aither.";

/// A batch of the durable log that could not be committed; every publish or ack waiting on
/// that batch hears it (hence shared, not owned, source).
#[derive(Clone, Debug, thiserror::Error)]
#[error("the bus log could not commit: {source}")]
pub struct CommitError {
    #[source]
    pub source: std::sync::Arc<rusqlite::Error>,
}

/// Hears when a durable publish or an ack is committed to the log: its sequence number.
pub type Committed = tokio::sync::oneshot::Receiver<Result<u64, CommitError>>;

/// Errors of the bus; `code()` is the wire error code.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("field `data`: message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Denied(String),
    #[error("no subscription {0} on this channel")]
    NoSuchSub(u64),
    #[error("{what}: {have} of {limit} in use (docs/bus.md, \"Bounds\")")]
    Limit {
        what: &'static str,
        have: usize,
        limit: usize,
    },
    #[error("bus log {path}: {source}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the bus log is not running")]
    LogGone,
}

impl From<subject::SubjectError> for BusError {
    fn from(e: subject::SubjectError) -> BusError {
        match e {
            subject::SubjectError::Invalid { field, reason } => BusError::Invalid { field, reason },
        }
    }
}

impl BusError {
    /// The error code of a reply.
    pub fn code(&self) -> aither_proto::ErrorCode {
        use aither_proto::ErrorCode;
        match self {
            BusError::Invalid { .. } => ErrorCode::Invalid,
            BusError::TooLarge { .. } => ErrorCode::MsgTooLarge,
            BusError::Denied(_) => ErrorCode::Denied,
            BusError::NoSuchSub(_) => ErrorCode::NotFound,
            BusError::Limit { .. } => ErrorCode::Limit,
            BusError::Db { .. } | BusError::LogGone => ErrorCode::Internal,
        }
    }
}

/// One message.
#[derive(Clone, Debug, PartialEq)]
pub struct Msg {
    /// Sequence number in the durable log; None for a live-only message.
    pub seq: Option<u64>,
    pub subject: String,
    /// The payload as JSON text.
    pub data: String,
    pub ts_ms: u64,
    /// Who published it: an agent's name, "operator" or "aitherd".
    pub publisher: String,
}

impl Msg {
    /// What the message costs a queue, in bytes (its strings and a fixed overhead).
    pub fn cost(&self) -> usize {
        self.subject.len() + self.data.len() + self.publisher.len() + 96
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who is asking: an agent with its token's bus claim, or an operator (anything allowed).
#[derive(Clone, Debug)]
pub enum Principal {
    Operator,
    Agent {
        name: String,
        publish: Vec<Pattern>,
        subscribe: Vec<Pattern>,
    },
}

impl Principal {
    /// An agent's principal from its claim; patterns that do not parse grant nothing.
    pub fn agent(name: &str, claim: &crate::token::BusClaim) -> Principal {
        let parse = |v: &[String], f| v.iter().filter_map(|s| Pattern::parse(f, s).ok()).collect();
        Principal::Agent {
            name: name.to_string(),
            publish: parse(&claim.publish, "bus.publish"),
            subscribe: parse(&claim.subscribe, "bus.subscribe"),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Operator => "operator",
            Principal::Agent { name, .. } => name,
        }
    }

    /// May this principal publish on `subject` (valid)?
    pub fn check_publish(&self, subject: &str) -> Result<(), BusError> {
        match self {
            Principal::Operator => Ok(()),
            Principal::Agent { name, publish, .. } => {
                if subject.starts_with(SYSTEM_PREFIX) {
                    return Err(BusError::Denied(format!(
                        "subjects under \"aither.>\" are the daemon's system events; agent {name:?} cannot publish {subject:?}"
                    )));
                }
                if publish.iter().any(|p| p.matches(subject)) {
                    Ok(())
                } else {
                    Err(BusError::Denied(format!(
                        "the token of {name:?} does not grant publish on {subject:?} (bus.publish: {})",
                        list(publish)
                    )))
                }
            }
        }
    }

    /// May this principal subscribe to `pattern`?
    pub fn check_subscribe(&self, pattern: &Pattern) -> Result<(), BusError> {
        match self {
            Principal::Operator => Ok(()),
            Principal::Agent {
                name, subscribe, ..
            } => {
                if subscribe.iter().any(|p| p.contains(pattern)) {
                    Ok(())
                } else {
                    Err(BusError::Denied(format!(
                        "the token of {name:?} does not grant subscribe on {:?} (bus.subscribe: {}; the pattern must lie inside one of them)",
                        pattern.as_str(),
                        list(subscribe)
                    )))
                }
            }
        }
    }

    /// May this principal read a message on `subject`? (Checked at every delivery.)
    pub fn may_read(&self, subject: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Agent { subscribe, .. } => subscribe.iter().any(|p| p.matches(subject)),
        }
    }
}

fn list(v: &[Pattern]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Checks a payload's size.
pub fn check_data(data: &str) -> Result<(), BusError> {
    if data.len() > MAX_DATA {
        Err(BusError::TooLarge {
            size: data.len(),
            limit: MAX_DATA,
        })
    } else {
        Ok(())
    }
}
