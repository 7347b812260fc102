//! Agent memory in five tiers (docs/memory.md).
//!
//! - `working`: scratch of the current run; aitherd clears it when a run ends.
//! - `active`: session state with a TTL; survives restarts, expired entries are invisible and
//!   purged.
//! - `spirit`: identity and instructions; durable; writing needs `write` in the spirit claim.
//! - `codegraph`: nodes and typed edges, queried by neighbourhood (depth N).
//! - `knowledge`: long-term facts, FTS5 (bm25) search; readable by other agents whose token
//!   holds a grant.
//!
//! `store` owns SQLite (one writer thread, group commit, read connections beside it);
//! `access` turns a token's claims into what a request may do; `service` parses the JSON ops
//! that arrive on an agent's channel or the control socket and runs them.

pub mod access;
pub mod service;
pub mod store;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use access::{Actor, Quota};
pub use store::MemoryStore;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 512;
/// Largest value (its JSON text), in bytes: a put must fit in one 64 KiB frame.
pub const MAX_VALUE: usize = 48 * 1024;
/// Default lifetime of an `active` entry when the put names none (24 h).
pub const DEFAULT_ACTIVE_TTL_S: u64 = 86_400;
/// Longest lifetime of an `active` entry (30 days).
pub const MAX_ACTIVE_TTL_S: u64 = 30 * 86_400;
/// Deepest neighbourhood query.
pub const MAX_DEPTH: u32 = 8;
/// Most nodes one neighbourhood query returns.
pub const MAX_NODES: usize = 1000;
/// Most edges one neighbourhood query reads (a walk past it stops and says `truncated`):
/// the cost of a walk grows with the fan-out to the power of the depth, this bounds it.
pub const MAX_WALK_EDGES: usize = 5000;
/// Most words in one search (more are refused, not cut: the caller learns why).
pub const MAX_TERMS: usize = 8;
/// Most SQLite virtual-machine steps one read may take (the progress handler counts them
/// in units of [`STEP_UNIT`]); past it the query is stopped and refused `too_costly`.
pub const MAX_STEPS: u64 = 20_000_000;
pub const STEP_UNIT: i32 = 1000;
/// Longest one read may run, whatever its steps (a backstop on a slow disk).
pub const MAX_QUERY_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// Errors of the memory service. `code()` is what goes back to the caller.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0}")]
    Denied(String),
    #[error("quota exceeded: {which} of tier {tier} of {owner:?} would be {would} (limit {limit}, {claim}); nothing was written")]
    Quota {
        owner: String,
        tier: Tier,
        /// "bytes" or "entries".
        which: &'static str,
        would: u64,
        limit: u64,
        /// The claim that sets the limit.
        claim: String,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("memory database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the memory writer has stopped")]
    WriterGone,
    #[error("{what}: stopped after {limit}; nothing was returned (narrow the query: fewer words, less depth, one edge kind)")]
    TooCostly { what: String, limit: String },
}

impl MemoryError {
    /// The error code sent back (docs/protocol.md).
    pub fn code(&self) -> aither_proto::ErrorCode {
        use aither_proto::ErrorCode;
        match self {
            MemoryError::Denied(_) => ErrorCode::Denied,
            MemoryError::Quota { .. } => ErrorCode::Quota,
            MemoryError::Invalid { .. } => ErrorCode::Invalid,
            MemoryError::NotFound(_) => ErrorCode::NotFound,
            MemoryError::TooCostly { .. } => ErrorCode::TooCostly,
            MemoryError::Sql { .. } | MemoryError::WriterGone => ErrorCode::Internal,
        }
    }

    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> MemoryError {
        MemoryError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// A memory tier: a wire type, defined in the protocol crate.
pub use aither_proto::Tier;

impl From<aither_proto::UnknownTier> for MemoryError {
    fn from(e: aither_proto::UnknownTier) -> MemoryError {
        MemoryError::invalid("tier", e.to_string())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
