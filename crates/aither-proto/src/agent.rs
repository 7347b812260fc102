//! The agent channel (fd 3, `AITHER_FD`): the requests an agent sends, tagged on `op` and
//! carrying the agent's `id` (echoed in the reply, a [`crate::Reply`]), and the pushes aitherd
//! sends without an `id`. Unknown fields are ignored (an older aitherd, a newer SDK).
//!
//! The `mem.*` ops are JSON objects passed whole to the memory service, which checks their
//! fields itself (docs/memory.md); they are not variants here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How bad an agent-reported pain signal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

/// A severity name that is none of the four.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown severity {0:?} (expected info, warning, error or critical)")]
pub struct UnknownSeverity(pub String);

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    /// The wire name: `info`, `warning`, `error` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = UnknownSeverity;

    fn from_str(s: &str) -> Result<Self, UnknownSeverity> {
        Severity::ALL
            .into_iter()
            .find(|sev| sev.as_str() == s)
            .ok_or_else(|| UnknownSeverity(s.to_owned()))
    }
}

/// One request frame on the agent channel: the caller's `id` and the op.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AgentFrame {
    /// Chosen by the agent, echoed in the reply (the SDKs use integers below 2^53).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    #[serde(flatten)]
    pub request: AgentRequest,
}

/// An agent-channel request other than `mem.*`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op")]
pub enum AgentRequest {
    /// The agent is ready (like `sd_notify("READY=1")`).
    #[serde(rename = "ready")]
    Ready,
    /// A watchdog heartbeat.
    #[serde(rename = "heartbeat")]
    Heartbeat,
    /// The free-form status line (at most 1024 bytes).
    #[serde(rename = "status")]
    Status { text: String },
    /// A pain signal; the reply's `data.action` is what the policy chose.
    #[serde(rename = "pain")]
    Pain {
        severity: Severity,
        /// At most 1024 bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The agent's GPU lease: the reply's `data` is a [`crate::GpuLease`].
    #[serde(rename = "gpu.lease")]
    GpuLease,
    /// Publish on the bus; a durable publish's reply carries `data.seq` once committed.
    #[serde(rename = "bus.publish")]
    BusPublish {
        subject: String,
        data: serde_json::Value,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        durable: bool,
    },
    /// Subscribe; the reply's `data.sub` names the subscription of later `bus.msg` pushes.
    #[serde(rename = "bus.subscribe")]
    BusSubscribe {
        pattern: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        durable: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<u64>,
    },
    /// Ends a subscription.
    #[serde(rename = "bus.unsubscribe")]
    BusUnsubscribe { sub: u64 },
    /// Moves a durable consumer's cursor to `seq`.
    #[serde(rename = "bus.ack")]
    BusAck {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        durable: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sub: Option<u64>,
        seq: u64,
    },
}

impl AgentRequest {
    /// The wire name of the op.
    pub fn op(&self) -> &'static str {
        match self {
            AgentRequest::Ready => "ready",
            AgentRequest::Heartbeat => "heartbeat",
            AgentRequest::Status { .. } => "status",
            AgentRequest::Pain { .. } => "pain",
            AgentRequest::GpuLease => "gpu.lease",
            AgentRequest::BusPublish { .. } => "bus.publish",
            AgentRequest::BusSubscribe { .. } => "bus.subscribe",
            AgentRequest::BusUnsubscribe { .. } => "bus.unsubscribe",
            AgentRequest::BusAck { .. } => "bus.ack",
        }
    }
}

/// A bus message pushed on the agent channel: `{"push": "bus.msg", ...}`, no `id`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BusMessage {
    /// The subscription (the `sub` of the subscribe reply).
    pub sub: u64,
    /// Its sequence number in the durable log; None for a live-only message.
    pub seq: Option<u64>,
    pub subject: String,
    pub ts_ms: u64,
    /// The publishing agent, "operator" or "aitherd".
    #[serde(default)]
    pub publisher: String,
    /// Messages of this subscription dropped (queue overflow) just before this one.
    #[serde(default)]
    pub dropped: u64,
    pub data: serde_json::Value,
}

/// A frame aitherd sends on the agent channel without being asked, tagged on `push`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "push")]
pub enum Push {
    #[serde(rename = "bus.msg")]
    BusMsg(BusMessage),
    /// aitherd restarted and forgot the subscriptions: subscribe again.
    #[serde(rename = "bus.reset")]
    BusReset { reason: String },
}
