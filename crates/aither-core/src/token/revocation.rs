//! Revoked token and block ids: what verification asks ([`RevocationCheck`]). The list itself
//! lives in the daemon's state database (SQLite): `aither::revocations::RevocationStore`.
//!
//! Revoking a token's id (block 0's) refuses the token and every attenuation of it; revoking
//! a later block's id refuses that block and every block appended after it.

use serde::Serialize;

use super::TokenError;

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Revoked {
    pub id: String,
    /// Unix seconds.
    pub at: u64,
    pub reason: String,
}

/// Answers whether an id is revoked.
pub trait RevocationCheck {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError>;
}

/// Nothing is revoked: for tokens minted a moment ago in this process (`run --policy`), whose
/// random ids cannot be on any list, and for tools that verify signatures offline.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRevocations;

impl RevocationCheck for NoRevocations {
    fn revoked(&self, _id: &str) -> Result<Option<Revoked>, TokenError> {
        Ok(None)
    }
}

/// No list (`None`: no state database, so nothing was ever revoked) or a list.
impl<T: RevocationCheck> RevocationCheck for Option<T> {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError> {
        match self {
            Some(s) => s.revoked(id),
            None => Ok(None),
        }
    }
}
