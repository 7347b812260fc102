//! Capability tokens: [`aither_core::token`] (claims, format, chain, keys), re-exported here,
//! and the revocation list in the state database ([`crate::revocations`]).

pub use aither_core::token::*;

pub use crate::revocations::RevocationStore;
