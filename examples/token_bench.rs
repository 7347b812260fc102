//! Token verification throughput on one thread (scripts/bench/tokens.sh): decode + full
//! verification (signature chain, proof, claims parsing and narrowing, time; not the
//! revocation lookup) of a root token minted from the strict policy and of a 3-block token
//! (attenuated twice), then the floor that bounds the first: one ed25519 verification and one
//! proof-key derivation alone; and a root token presented again to aitherd's cache of verified
//! tokens (token::VerifiedCache). An ephemeral key: the host key is not touched.
//!
//! Usage: AITHER_POLICY_DIR=policies cargo run --release --example token_bench -- [N]
//!   N  verifications per case (default 20000)

use std::time::{Duration, Instant};

use aither::policy::Policy;
use aither::token::{
    self, chain::key_id, Attenuation, Claims, NoRevocations, RevocationCheck, Token,
};
use aither::units::Size;
use anyhow::{bail, Context};
use ed25519_dalek::{Signer, SigningKey};

fn main() -> anyhow::Result<()> {
    let n = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .with_context(|| format!("N {a:?}: a number of verifications"))?,
        None => 20_000,
    };
    bench_verify(n)
}

/// Tokens per second of decode + verify on this thread, for a root token and a 3-block
/// attenuated one, with an ephemeral key (the host key is not touched).
fn bench_verify(n: u32) -> anyhow::Result<()> {
    if n == 0 {
        bail!("N must be at least 1");
    }
    let root = SigningKey::from_bytes(&[0x42; 32]);
    let pk = root.verifying_key();
    let policy = Policy::load("strict")?.policy;
    let now = token::now_unix();
    let c0 = Claims::from_policy_at(
        &policy,
        "bench",
        "aither@bench",
        now,
        Duration::from_secs(3600),
    )?;
    let t1 = token::mint(&root, &c0)?;
    let a = Attenuation {
        memory: Some(Size(256 << 20)),
        pids: Some(64),
        ..Default::default()
    };
    let c1 = a.apply(&c0, now)?;
    let t2 = t1.append(&c1)?;
    let b = Attenuation {
        read: vec!["/usr".into(), "/bin".into(), "/lib".into(), "/lib64".into()],
        ttl: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let t3 = t2.append(&b.apply(&c1, now)?)?;
    println!(
        "token verification (decode + every check but the revocation lookup), one thread, {n} per case (key {}):",
        token::hex(&key_id(&pk))
    );
    let rate = |label: &str, secs: f64, extra: &str| {
        println!(
            "  {label:<28} {:>8.0} /s  ({:.1} µs each{extra})",
            f64::from(n) / secs,
            secs * 1e6 / f64::from(n)
        );
    };
    for (label, t) in [
        ("root token (1 block)", &t1),
        ("attenuated (3 blocks)", &t3),
    ] {
        let text = t.encode();
        let once = |check: &dyn RevocationCheck| -> anyhow::Result<()> {
            let d = Token::decode(&text)?;
            let v = token::verify(&d, &pk, now, check)?;
            std::hint::black_box(v);
            Ok(())
        };
        for _ in 0..n.min(1000) {
            once(&NoRevocations)?;
        }
        let start = Instant::now();
        for _ in 0..n {
            once(&NoRevocations)?;
        }
        let extra = format!(", {} characters", text.len());
        rate(label, start.elapsed().as_secs_f64(), &extra);
    }
    // aitherd's cache (token::VerifiedCache): the same root token presented again costs its
    // digest, a lookup and the time check (the revocation lookup is left out here as above).
    let cache = token::VerifiedCache::default();
    let text = t1.encode();
    cache.verify(&text, &pk, now, &NoRevocations)?;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(cache.verify(&text, &pk, now, &NoRevocations)?);
    }
    rate(
        "root token, verified before",
        start.elapsed().as_secs_f64(),
        " (aitherd's cache)",
    );
    // The floor: the cryptography a root token needs, alone (one signature check, one public
    // key derived from the proof), so numbers from different machines can be compared.
    let msg = t1.blocks[0].payload.clone();
    let sig = root.sign(&msg);
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(pk.verify_strict(std::hint::black_box(&msg), &sig))?;
    }
    rate(
        "  of which: ed25519 verify",
        start.elapsed().as_secs_f64(),
        "",
    );
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(
            SigningKey::from_bytes(std::hint::black_box(&t1.proof)).verifying_key(),
        );
    }
    rate(
        "  of which: proof key check",
        start.elapsed().as_secs_f64(),
        "",
    );
    Ok(())
}
