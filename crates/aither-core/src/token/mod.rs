//! Capability tokens: signed claims from which a sandbox is derived, and nothing else.
//!
//! A token is a chain of signed blocks in the style of biscuit: block 0 holds the claims the
//! host granted and is signed by the host (root) key; every later block holds narrower claims
//! and is signed by a key the previous block named (`next_key`). The token carries the secret
//! half of the last `next_key` (the *proof*), so whoever holds a token can append a narrower
//! block offline, without the host key, and nobody can remove a block (the proof would no
//! longer match). Verification needs only the host's public key.
//!
//! Stages, each in its own file:
//! - [`claims`]: what a block grants, built from a [`Policy`](crate::policy::Policy), and the
//!   field-by-field check that a child block only narrows its parent ([`narrows`]);
//! - [`format`]: the binary layout and the `aither1.` text form;
//! - [`chain`]: mint, attenuate (append a block) and verify;
//! - [`attenuate`]: a holder's request ("64M of memory, 16 pids") turned into child claims;
//! - [`keys`]: the host key under `$AITHER_STATE_DIR/keys` and public-key parsing;
//! - [`revocation`]: the question "is this id revoked?" (the list is `aither::revocations`).
//!
//! The format and every rule are documented in docs/tokens.md.

pub mod attenuate;
pub mod cache;
pub mod chain;
pub mod claims;
pub mod format;
pub mod keys;
pub mod revocation;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use attenuate::Attenuation;
pub use cache::VerifiedCache;
pub use chain::{fresh_key, mint, verified_here, verify, Verified};
pub use claims::{narrows, BusClaim, Claims, GpuClaim, MemoryGrant, TierClaim};
pub use format::{SignedBlock, Token, TEXT_PREFIX, VERSION};
pub use keys::{parse_public_key, HostKey};
pub use revocation::{NoRevocations, RevocationCheck, Revoked};

/// Clock skew tolerated on `iat`: a block issued up to this many seconds in the future is
/// accepted (hosts and holders need not have exactly synchronised clocks).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Lifetime of the token `aitherctl run --policy` mints for itself.
pub const RUN_TOKEN_TTL_SECS: u64 = 60;

/// Errors of minting, encoding, verifying and attenuating tokens, of the host key and of the
/// revocation list. Every reason a token can be refused has its own variant and message.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unknown token version {0}: this aither reads version {VERSION}")]
    UnknownVersion(u32),
    #[error("bad signature on block {block}: the token was altered or forged")]
    BadSignature { block: usize },
    #[error(
        "the token's proof key does not match its last block: the token was altered or truncated"
    )]
    BadProof,
    #[error("wrong key: the token was issued by key {token_key} but is checked against key {expected} (see `aitherctl token pubkey` on the issuing host)")]
    WrongKey { token_key: String, expected: String },
    #[error("block {block} carries invalid claims: {reason}")]
    InvalidClaims { block: usize, reason: String },
    #[error("token expired at {} ({}s ago)", format_time(*exp), now.saturating_sub(*exp))]
    Expired { block: usize, exp: u64, now: u64 },
    #[error("token not yet valid: issued at {} ({}s in the future; {CLOCK_SKEW_SECS}s of clock skew are tolerated)", format_time(*iat), iat.saturating_sub(*now))]
    NotYetValid { block: usize, iat: u64, now: u64 },
    #[error("token {id} was revoked at {}{}", format_time(*at), reason_suffix(reason))]
    Revoked { id: String, at: u64, reason: String },
    #[error("attenuation (block {block}) widens {field}: {detail}")]
    Widening {
        block: usize,
        field: String,
        detail: String,
    },
    #[error("bad attenuation of {field}: {reason}")]
    BadRequest { field: &'static str, reason: String },
    #[error("the workspace {workspace} lies outside the token's workspace_root {root}")]
    WorkspaceOutsideRoot { workspace: PathBuf, root: String },
    #[error("invalid public key {input:?}: {reason}")]
    BadPublicKey { input: String, reason: String },
    #[error("host key {path}: {reason}")]
    HostKey { path: PathBuf, reason: String },
    #[error(
        "host key {path}: {source} (`aitherctl token pubkey` creates it as root; or pass --pubkey)"
    )]
    HostKeyMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The revocation list's database (SQLite, in crate `aither`: the core links none).
    #[error("state database {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot get random bytes from the kernel: {0}")]
    Random(String),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl TokenError {
    /// Whether this error refuses a token (as opposed to failing to check one: I/O, database,
    /// key file). `aitherctl run` prints refusals as one line.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            TokenError::HostKey { .. }
                | TokenError::HostKeyMissing { .. }
                | TokenError::Io { .. }
                | TokenError::Database { .. }
                | TokenError::Random(_)
                | TokenError::BadPublicKey { .. }
        )
    }

    pub fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TokenError {
        let path = path.to_path_buf();
        move |source| TokenError::Io { op, path, source }
    }
}

/// Aither's state directory: `$AITHER_STATE_DIR`, else /var/lib/aither.
pub fn state_dir() -> PathBuf {
    std::env::var_os("AITHER_STATE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::STATE_DIR))
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fills `buf` from the kernel's random source (getrandom(2), blocking only until the pool is
/// first initialised at boot). The system call directly: a library would fall back to opening
/// /dev/urandom, and keep it open, in a statically linked aitherctl.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), TokenError> {
    let mut filled = 0;
    while filled < buf.len() {
        // rustix's getrandom is the system call itself (nix 0.30 has none).
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(TokenError::Random(std::io::Error::from(e).to_string())),
        }
    }
    Ok(())
}

/// A fresh 128-bit id in lower-case hex.
pub fn new_id() -> Result<String, TokenError> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    Ok(hex(&b))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Whether `s` is a token or block id: 32 lower-case hex digits.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Formats Unix seconds as an RFC 3339 UTC time ("2026-01-31T12:00:00Z").
pub fn format_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = crate::units::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
