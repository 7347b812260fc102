//! Fuzz target: claims parsing and the narrowing check on arbitrary signed payloads.
//!
//! The decoder target cannot get past signature checks; this one signs whatever claims the
//! input parses to with the fixed key, so the claims parser, `narrows` and the rest of
//! verification see attacker-shaped values (huge numbers, odd paths, unknown profiles).
//! Input: two JSON payloads separated by a NUL byte (parent, child).

#![no_main]

use aither_core::token::{self, narrows, Claims, NoRevocations};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let (Some(a), b) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(parent) = Claims::from_payload(a) else {
        return;
    };
    let key = SigningKey::from_bytes(&[0x42; 32]);
    let Ok(t) = token::mint(&key, &parent) else {
        return;
    };
    let now = parent.iat;
    let root_ok = token::verify(&t, &key.verifying_key(), now, &NoRevocations).is_ok();
    let Some(Ok(child)) = b.map(Claims::from_payload) else {
        return;
    };
    let narrower = narrows(&child, &parent).is_ok();
    if let Ok(t2) = t.append(&child) {
        assert!(narrower, "append accepted a block that does not narrow");
        let v = token::verify(&t2, &key.verifying_key(), now, &NoRevocations);
        if root_ok && child.iat <= now && now < child.exp {
            // Same checks as at append time, so verification must agree.
            assert!(v.is_ok(), "an appended block failed verification: {v:?}");
        }
    }
});
