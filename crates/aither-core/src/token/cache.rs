//! Verified root tokens kept by the SHA-256 of the key and the token's text, so that a token
//! presented again (aitherd checks a record's token at every spawn, restart and exec) costs a
//! digest and a map lookup instead of a signature check (docs/tokens.md, "Cost").
//!
//! What can change after a token was verified is checked again at every use: each block's time
//! window and the revocation list. Only root tokens (one block) are kept: an attenuated
//! block's read-only paths are resolved on this host when it is verified
//! (`claims::read_paths_resolve_within`), and a cache would freeze that resolution. The map is
//! bounded: when full, expired entries go, then everything.

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

use super::chain::{check_revocations, check_time, verify, Verified};
use super::format::Token;
use super::revocation::RevocationCheck;
use super::TokenError;

/// How many verified tokens a cache keeps by default (each a few KiB of claims).
pub const DEFAULT_CAPACITY: usize = 1024;

pub struct VerifiedCache {
    map: Mutex<HashMap<[u8; 32], Verified>>,
    capacity: usize,
}

impl Default for VerifiedCache {
    fn default() -> VerifiedCache {
        VerifiedCache::new(DEFAULT_CAPACITY)
    }
}

impl VerifiedCache {
    pub fn new(capacity: usize) -> VerifiedCache {
        VerifiedCache {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// `chain::verify` of `text` with `key` at `now`: the same result, from the cache when the
    /// same text was verified with the same key before (then only its time and revocations
    /// are checked again).
    pub fn verify(
        &self,
        text: &str,
        key: &VerifyingKey,
        now: u64,
        revocations: &dyn RevocationCheck,
    ) -> Result<Verified, TokenError> {
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        h.update(text.as_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let hit = self.lock().get(&digest).cloned();
        if let Some(v) = hit {
            check_time(&v.blocks, now)?;
            check_revocations(&v.blocks, revocations)?;
            return Ok(v);
        }
        let v = verify(&Token::decode(text)?, key, now, revocations)?;
        if v.blocks.len() == 1 {
            let mut map = self.lock();
            if map.len() >= self.capacity {
                map.retain(|_, v| v.blocks.iter().all(|c| now < c.exp));
            }
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(digest, v.clone());
        }
        Ok(v)
    }

    /// How many tokens are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verified>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
