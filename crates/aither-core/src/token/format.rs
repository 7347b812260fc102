//! The token's bytes and its text form. Decoding checks structure only; [`super::verify`]
//! checks signatures, claims, time and revocation.
//!
//! Binary layout, version 1 (integers big-endian; see docs/tokens.md):
//!
//! ```text
//! u8        version (1)
//! [u8; 8]   root key id: the first 8 bytes of SHA-256(root public key)
//! u8        n, the number of blocks (1..=MAX_BLOCKS)
//! n times:  u32 payload length (1..=MAX_PAYLOAD), payload (claims as JSON),
//!           [u8; 32] next_key (ed25519 public key), [u8; 64] signature
//! [u8; 32]  proof: the ed25519 secret key (seed) of the last block's next_key
//! ```
//!
//! Nothing may follow the proof. Text form: `aither1.` + base64url without padding.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::TokenError;

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The text form's prefix.
pub const TEXT_PREFIX: &str = "aither1.";
/// Most blocks a token may have (bounds the cost of verifying one).
pub const MAX_BLOCKS: usize = 32;
/// Largest payload of one block.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Longest text form accepted.
pub const MAX_TEXT: usize = TEXT_PREFIX.len() + (MAX_BLOCKS * (MAX_PAYLOAD + 100) + 42) * 4 / 3 + 4;

/// One block: claims, the key that signs the next block, and this block's signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedBlock {
    /// The claims as canonical JSON (exactly the bytes that were signed).
    pub payload: Vec<u8>,
    /// Public key of the block that may follow.
    pub next_key: [u8; 32],
    /// ed25519 signature over [`SignedBlock::signed_message`].
    pub signature: [u8; 64],
}

/// The domain-separation tag that starts every signed message.
pub const DOMAIN_TAG: &[u8] = b"aither-token-v1";

impl SignedBlock {
    /// What block `index` signs: tag ‖ u32 index ‖ u32 payload length ‖ payload ‖ next_key,
    /// then, for index > 0, the previous block's signature (binding the block to this chain).
    pub fn signed_message(
        index: usize,
        payload: &[u8],
        next_key: &[u8; 32],
        previous_signature: Option<&[u8; 64]>,
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN_TAG.len() + 8 + payload.len() + 32 + 64);
        m.extend_from_slice(DOMAIN_TAG);
        m.extend_from_slice(&(index as u32).to_be_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m.extend_from_slice(next_key);
        if let Some(s) = previous_signature {
            m.extend_from_slice(s);
        }
        m
    }
}

/// A token as decoded; nothing in it is trusted until [`super::verify`] says so.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// First 8 bytes of SHA-256 of the root public key the token claims to be signed with.
    pub root_key_id: [u8; 8],
    pub blocks: Vec<SignedBlock>,
    /// Secret key (seed) of the last block's `next_key`: lets the holder append a block.
    pub proof: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("root_key_id", &super::hex(&self.root_key_id))
            .field("blocks", &self.blocks.len())
            .field("proof", &"<secret>")
            .finish()
    }
}

impl fmt::Debug for SignedBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedBlock")
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .field("next_key", &super::hex(&self.next_key))
            .finish_non_exhaustive()
    }
}

/// A reader over the token's bytes that fails with a message naming what was cut short.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TokenError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(TokenError::Malformed(format!(
                "truncated: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.buf.len() - self.pos
            )));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TokenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
}

impl Token {
    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            42 + self
                .blocks
                .iter()
                .map(|b| 100 + b.payload.len())
                .sum::<usize>(),
        );
        out.push(VERSION);
        out.extend_from_slice(&self.root_key_id);
        out.push(self.blocks.len() as u8);
        for b in &self.blocks {
            out.extend_from_slice(&(b.payload.len() as u32).to_be_bytes());
            out.extend_from_slice(&b.payload);
            out.extend_from_slice(&b.next_key);
            out.extend_from_slice(&b.signature);
        }
        out.extend_from_slice(&self.proof);
        out
    }

    /// Parses the binary form: structure only, no cryptography.
    pub fn from_bytes(bytes: &[u8]) -> Result<Token, TokenError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.array::<1>("the version")?[0];
        if version != VERSION {
            return Err(TokenError::UnknownVersion(u32::from(version)));
        }
        let root_key_id = r.array::<8>("the root key id")?;
        let n = usize::from(r.array::<1>("the block count")?[0]);
        if n == 0 || n > MAX_BLOCKS {
            return Err(TokenError::Malformed(format!(
                "{n} blocks (a token has 1 to {MAX_BLOCKS})"
            )));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let len = u32::from_be_bytes(r.array::<4>("a payload length")?) as usize;
            if len == 0 || len > MAX_PAYLOAD {
                return Err(TokenError::Malformed(format!(
                    "block {i}: payload of {len} bytes (1 to {MAX_PAYLOAD} allowed)"
                )));
            }
            let payload = r.take(len, "a payload")?.to_vec();
            let next_key = r.array::<32>("a next key")?;
            let signature = r.array::<64>("a signature")?;
            blocks.push(SignedBlock {
                payload,
                next_key,
                signature,
            });
        }
        let proof = r.array::<32>("the proof")?;
        if r.pos != bytes.len() {
            return Err(TokenError::Malformed(format!(
                "{} bytes of trailing garbage",
                bytes.len() - r.pos
            )));
        }
        Ok(Token {
            root_key_id,
            blocks,
            proof,
        })
    }

    /// The text form: `aither1.` + base64url (no padding) of the binary form.
    pub fn encode(&self) -> String {
        let mut s = String::from(TEXT_PREFIX);
        URL_SAFE_NO_PAD.encode_string(self.to_bytes(), &mut s);
        s
    }

    /// Parses the text form (surrounding whitespace is ignored).
    pub fn decode(text: &str) -> Result<Token, TokenError> {
        let t = text.trim();
        if t.len() > MAX_TEXT {
            return Err(TokenError::Malformed(format!(
                "{} characters is longer than any token can be",
                t.len()
            )));
        }
        let Some(body) = t.strip_prefix(TEXT_PREFIX) else {
            // "aither2.…" is a token of a version this code does not know.
            if let Some(rest) = t.strip_prefix("aither") {
                if let Some((v, _)) = rest.split_once('.') {
                    if let Ok(v) = v.parse::<u32>() {
                        return Err(TokenError::UnknownVersion(v));
                    }
                }
            }
            return Err(TokenError::Malformed(format!(
                "does not start with {TEXT_PREFIX:?}"
            )));
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("not base64url: {e}")))?;
        Token::from_bytes(&bytes)
    }
}
