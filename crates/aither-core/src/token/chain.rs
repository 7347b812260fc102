//! Minting, appending a block and verifying: the cryptographic chain.
//!
//! Verification, in this order (the first failure is the error):
//! 1. the root key id names the key we verify with (else `WrongKey`);
//! 2. block 0's signature checks with the root public key, block i's with block i-1's
//!    `next_key` (`verify_strict`: no malleable or small-order signatures);
//! 3. the proof's public key is the last block's `next_key` (no block was cut off);
//! 4. every payload parses as claims, and every block narrows its parent, field by field, and
//!    its new read-only paths resolve on this host within the parent's;
//! 5. time: for every block iat ≤ now + skew and now < exp;
//! 6. revocation of every block's id (block 0's id is the token id).

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::claims::{self, narrows, Claims};
use super::format::{SignedBlock, Token};
use super::revocation::RevocationCheck;
use super::{random_bytes, TokenError, CLOCK_SKEW_SECS};

/// The 8-byte id of a root public key: the first bytes of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> [u8; 8] {
    let d = Sha256::digest(key.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// A fresh ed25519 key pair for the next block.
/// A new random signing key (also the one-launch root key of `run --policy`).
pub fn fresh_key() -> Result<SigningKey, TokenError> {
    let mut seed = [0u8; 32];
    random_bytes(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs `payload` as block `index`, naming `next`'s public key.
fn sign_block(
    signer: &SigningKey,
    index: usize,
    payload: Vec<u8>,
    next: &SigningKey,
    previous_signature: Option<&[u8; 64]>,
) -> SignedBlock {
    let next_key = next.verifying_key().to_bytes();
    let msg = SignedBlock::signed_message(index, &payload, &next_key, previous_signature);
    let signature = signer.sign(&msg).to_bytes();
    SignedBlock {
        payload,
        next_key,
        signature,
    }
}

/// Mints a token holding `claims`, signed with the host (root) key.
pub fn mint(root: &SigningKey, claims: &Claims) -> Result<Token, TokenError> {
    let payload = claims.to_payload();
    check_payload_size(&payload)?;
    let next = fresh_key()?;
    let block = sign_block(root, 0, payload, &next, None);
    Ok(Token {
        root_key_id: key_id(&root.verifying_key()),
        blocks: vec![block],
        proof: next.to_bytes(),
    })
}

fn check_payload_size(payload: &[u8]) -> Result<(), TokenError> {
    if payload.len() > super::format::MAX_PAYLOAD {
        return Err(TokenError::BadRequest {
            field: "claims",
            reason: format!(
                "{} bytes of claims exceed the {}-byte limit of a block",
                payload.len(),
                super::format::MAX_PAYLOAD
            ),
        });
    }
    Ok(())
}

impl Token {
    /// The claims of every block, parsed without any check (for display of tokens that fail
    /// verification; never for decisions).
    pub fn unverified_claims(&self) -> Vec<Result<Claims, serde_json::Error>> {
        self.blocks
            .iter()
            .map(|b| Claims::from_payload(&b.payload))
            .collect()
    }

    /// Appends a block holding `child`, signed with the proof key. Refused unless `child`
    /// narrows the current last block (the same check verification makes), so a holder cannot
    /// even produce a widening token by mistake.
    pub fn append(&self, child: &Claims) -> Result<Token, TokenError> {
        let index = self.blocks.len();
        if index >= super::format::MAX_BLOCKS {
            return Err(TokenError::BadRequest {
                field: "blocks",
                reason: format!("a token has at most {} blocks", super::format::MAX_BLOCKS),
            });
        }
        let last = self
            .blocks
            .last()
            .ok_or_else(|| TokenError::Malformed("a token without blocks".into()))?;
        let parent =
            Claims::from_payload(&last.payload).map_err(|e| TokenError::InvalidClaims {
                block: index - 1,
                reason: e.to_string(),
            })?;
        narrows(child, &parent).map_err(|e| at_block(e, index))?;
        claims::read_paths_resolve_within(&child.rules, &parent.rules)
            .map_err(|e| at_block(e, index))?;
        self.append_unchecked(child.to_payload())
    }

    /// Signs and appends a payload as the next block, without looking at it.
    pub(crate) fn append_unchecked(&self, payload: Vec<u8>) -> Result<Token, TokenError> {
        check_payload_size(&payload)?;
        let index = self.blocks.len();
        let last = self
            .blocks
            .last()
            .ok_or_else(|| TokenError::Malformed("a token without blocks".into()))?;
        let signer = SigningKey::from_bytes(&self.proof);
        if signer.verifying_key().to_bytes() != last.next_key {
            return Err(TokenError::BadProof);
        }
        let next = fresh_key()?;
        let block = sign_block(&signer, index, payload, &next, Some(&last.signature));
        let mut blocks = self.blocks.clone();
        blocks.push(block);
        Ok(Token {
            root_key_id: self.root_key_id,
            blocks,
            proof: next.to_bytes(),
        })
    }
}

/// Sets the block index of a widening error.
fn at_block(e: TokenError, index: usize) -> TokenError {
    match e {
        TokenError::Widening { field, detail, .. } => TokenError::Widening {
            block: index,
            field,
            detail,
        },
        other => other,
    }
}

/// A token that passed every check: the claims of each block, root first.
#[derive(Clone, Debug)]
pub struct Verified {
    pub blocks: Vec<Claims>,
}

impl Verified {
    /// The claims the host granted (block 0).
    pub fn root(&self) -> &Claims {
        &self.blocks[0]
    }

    /// The claims in force: the last block's.
    pub fn effective(&self) -> &Claims {
        &self.blocks[self.blocks.len() - 1]
    }

    /// The token id (block 0's id).
    pub fn id(&self) -> &str {
        &self.root().id
    }

    /// Refuses a workspace (canonical path) outside the `workspace_root` of any block.
    /// Each block's root is resolved on this host, so a symlink below a parent's root cannot
    /// point the workspace elsewhere.
    pub fn check_workspace(&self, workspace: &Path) -> Result<(), TokenError> {
        for c in &self.blocks {
            let Some(root) = &c.workspace_root else {
                continue;
            };
            let resolved = std::fs::canonicalize(root).ok();
            if !resolved.is_some_and(|r| workspace.starts_with(r)) {
                return Err(TokenError::WorkspaceOutsideRoot {
                    workspace: workspace.to_path_buf(),
                    root: root.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Verifies `token` against the host's public key at time `now` (Unix seconds), consulting
/// `revocations`. See the module documentation for the order of the checks.
pub fn verify(
    token: &Token,
    root: &VerifyingKey,
    now: u64,
    revocations: &dyn RevocationCheck,
) -> Result<Verified, TokenError> {
    let expected = key_id(root);
    if token.root_key_id != expected {
        return Err(TokenError::WrongKey {
            token_key: super::hex(&token.root_key_id),
            expected: super::hex(&expected),
        });
    }
    if token.blocks.is_empty() {
        return Err(TokenError::Malformed("a token without blocks".into()));
    }

    // 2. The signature chain.
    let mut key = *root;
    let mut previous: Option<&[u8; 64]> = None;
    for (i, b) in token.blocks.iter().enumerate() {
        let msg = SignedBlock::signed_message(i, &b.payload, &b.next_key, previous);
        let sig = Signature::from_bytes(&b.signature);
        key.verify_strict(&msg, &sig)
            .map_err(|_| TokenError::BadSignature { block: i })?;
        key = VerifyingKey::from_bytes(&b.next_key)
            .map_err(|_| TokenError::BadSignature { block: i })?;
        previous = Some(&b.signature);
    }

    // 3. The proof: the holder has the last next_key's secret, so no block was removed.
    if SigningKey::from_bytes(&token.proof).verifying_key() != key {
        return Err(TokenError::BadProof);
    }

    // 4 and 5. Claims, each narrowing its parent, and time.
    let blocks = checked_claims(token.blocks.iter().map(|b| b.payload.as_slice()), now)?;

    // 6. Revocation.
    check_revocations(&blocks, revocations)?;
    Ok(Verified { blocks })
}

/// Steps 4 and 5 of `verify`: every payload parses as claims, each narrows its parent, and
/// every block is in its time.
fn checked_claims<'a>(
    payloads: impl Iterator<Item = &'a [u8]>,
    now: u64,
) -> Result<Vec<Claims>, TokenError> {
    let mut blocks: Vec<Claims> = Vec::new();
    for (i, payload) in payloads.enumerate() {
        let c = Claims::from_payload(payload).map_err(|e| TokenError::InvalidClaims {
            block: i,
            reason: e.to_string(),
        })?;
        if let Some(parent) = blocks.last() {
            narrows(&c, parent).map_err(|e| at_block(e, i))?;
            claims::read_paths_resolve_within(&c.rules, &parent.rules)
                .map_err(|e| at_block(e, i))?;
        }
        blocks.push(c);
    }
    check_time(&blocks, now)?;
    Ok(blocks)
}

/// Step 5 of `verify`: for every block iat ≤ now + skew and now < exp.
pub fn check_time(blocks: &[Claims], now: u64) -> Result<(), TokenError> {
    for (i, c) in blocks.iter().enumerate() {
        if c.iat > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid {
                block: i,
                iat: c.iat,
                now,
            });
        }
        if now >= c.exp {
            return Err(TokenError::Expired {
                block: i,
                exp: c.exp,
                now,
            });
        }
    }
    Ok(())
}

/// Step 6 of `verify`: no block's id is revoked.
pub fn check_revocations(
    blocks: &[Claims],
    revocations: &dyn RevocationCheck,
) -> Result<(), TokenError> {
    for c in blocks {
        if let Some(r) = revocations.revoked(&c.id)? {
            return Err(TokenError::Revoked {
                id: c.id.clone(),
                at: r.at,
                reason: r.reason,
            });
        }
    }
    Ok(())
}

/// Claims made in this process into verified claims, for a launch whose token would never
/// leave it (`aitherctl run --policy`, `export --policy`): everything `verify` checks but the
/// signatures and the revocation list. A signature by a key made for this one launch, checked
/// by the same process a moment later, proves only that this process made the claims, which
/// it knows; no revocation can name an id drawn a moment ago. What the check stands for is
/// kept: the claims go through the token's encoding and back (its size limit, the payload's
/// parser and validation, the time window), and the sandbox is derived from what came back,
/// exactly as from a verified token (docs/tokens.md, "One-launch tokens").
pub fn verified_here(claims: &Claims, now: u64) -> Result<Verified, TokenError> {
    let payload = claims.to_payload();
    check_payload_size(&payload)?;
    Ok(Verified {
        blocks: checked_claims(std::iter::once(payload.as_slice()), now)?,
    })
}
