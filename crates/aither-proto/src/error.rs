//! The error codes of replies (`{"ok": false, "error": {"code": ..., "message": ...}}`), on the
//! control socket and the agent channel alike. On the wire each is a snake_case string; a code
//! this build does not know (a newer peer's) is kept as [`ErrorCode::Other`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! codes {
    ($($(#[$doc:meta])* $v:ident = $s:literal,)*) => {
        /// A reply's machine-readable error code.
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $v,)*
            /// A code this build does not know, as received.
            Other(String),
        }

        impl ErrorCode {
            /// Every code this build knows.
            pub const KNOWN: &'static [ErrorCode] = &[$(ErrorCode::$v,)*];

            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$v => $s,)*
                    ErrorCode::Other(s) => s,
                }
            }

            /// The code of a wire string (never fails: unknown strings are `Other`).
            pub fn parse(s: &str) -> ErrorCode {
                match s {
                    $($s => ErrorCode::$v,)*
                    other => ErrorCode::Other(other.to_owned()),
                }
            }
        }
    };
}

codes! {
    /// A frame of length 0 or cut short: the channel is closed.
    BadFrame = "bad_frame",
    /// A frame over the size limit: the channel is closed (control socket: also a reply over
    /// MAX_REPLY).
    TooLarge = "too_large",
    /// A frame whose body is not JSON.
    BadJson = "bad_json",
    /// JSON that is not a known request, or a request with a field it does not take.
    BadRequest = "bad_request",
    /// A field is missing, malformed or too long.
    Invalid = "invalid",
    /// No such agent, memory key, graph node or subscription.
    NotFound = "not_found",
    /// An agent of that name exists.
    Exists = "exists",
    /// The agent is in a state that does not allow it (rm of a running agent).
    Conflict = "conflict",
    /// The caller's token or identity does not allow it.
    Denied = "denied",
    /// A memory write would pass a quota; nothing was written.
    Quota = "quota",
    /// A memory query stopped at its work limit; nothing was returned.
    TooCostly = "too_costly",
    /// A bus payload over the bus's limit.
    MsgTooLarge = "msg_too_large",
    /// A bus limit (subscriptions, consumers) was reached.
    Limit = "limit",
    /// Over the agent's request budget (docs/daemon.md); the request was not done.
    RateLimited = "rate_limited",
    /// The receiver does not know the op (an older aitherd).
    UnknownOp = "unknown_op",
    /// The daemon has too many connections.
    Busy = "busy",
    /// The sandbox could not be launched.
    LaunchFailed = "launch_failed",
    /// The host lacks a kernel feature the request needs (pause without a cgroup freezer).
    Unsupported = "unsupported",
    /// A read or write failed.
    Io = "io",
    /// Anything else on the daemon's side.
    Internal = "internal",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

/// An error in a reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_their_wire_strings() {
        for c in ErrorCode::KNOWN {
            let s = serde_json::to_string(c).unwrap();
            assert_eq!(s, format!("\"{}\"", c.as_str()));
            assert_eq!(&serde_json::from_str::<ErrorCode>(&s).unwrap(), c);
            assert_eq!(ErrorCode::parse(c.as_str()), *c);
        }
        let future: ErrorCode = serde_json::from_str("\"newer_code\"").unwrap();
        assert_eq!(future, ErrorCode::Other("newer_code".into()));
        assert_eq!(serde_json::to_string(&future).unwrap(), "\"newer_code\"");
        assert_eq!(ErrorCode::Denied, "denied");
    }
}
