//! Fuzz target: the token decoder and verifier on arbitrary input, with a fixed root key.
//!
//! Input is tried twice: as the text form (`aither1.` + base64url) and as the binary form.
//! Nothing may panic and a decoded token must re-encode to the same bytes. The seed
//! (fuzz/seeds/decode) is a 2-block token signed with the fixed key that expired before the
//! fixed clock, so mutations of it reach every stage of verification.

#![no_main]

use std::sync::OnceLock;

use aither_core::token::{self, NoRevocations, Token};
use ed25519_dalek::{SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;

/// 2027-01-15T08:00:00Z: a fixed clock, so runs are reproducible.
const NOW: u64 = 1_800_000_000;

fn root() -> &'static VerifyingKey {
    static KEY: OnceLock<VerifyingKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[0x42; 32]).verifying_key())
}

fn check(t: &Token) {
    let bytes = t.to_bytes();
    let again = Token::from_bytes(&bytes).expect("a decoded token re-decodes");
    assert!(again == *t, "decode(encode(t)) != t");
    assert_eq!(Token::decode(&t.encode()).ok().as_ref(), Some(t));
    let _ = t.unverified_claims();
    let _ = token::verify(t, root(), NOW, &NoRevocations);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = Token::decode(text) {
            check(&t);
        }
    }
    if let Ok(t) = Token::from_bytes(data) {
        check(&t);
    }
});
