//! Capability tokens, end to end: tampering, refusals, the CLI, random attenuation sequences,
//! and sandboxes built from attenuated tokens (cgroup limits read from the host while the agent
//! runs, and a narrower filesystem view).
//!
//! The sandbox tests need root (cgroups, user namespaces mapping host id ranges) and fail with
//! a clear message without it; none skips.

// Only for its test-wide setting: no aitherd of the host serves these runs.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aither::policy::{NetworkMode, Policy};
use aither::token::{
    self, narrows, Attenuation, Claims, HostKey, NoRevocations, RevocationStore, Token, TokenError,
};
use aither::units::Size;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

const AITHERCTL: &str = env!("CARGO_BIN_EXE_aitherctl");

fn policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn strict() -> Policy {
    Policy::load_file(&policy_dir().join("strict.toml"))
        .expect("the repository's strict policy")
        .policy
}

fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test runs sandboxes and must run as root (it creates cgroups and maps host id \
         ranges into user namespaces); euid is {euid}. Run it as root, e.g. \
         `sudo -E cargo test --test tokens`"
    );
}

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "tok{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A private state directory (host key, state.db) for one test.
struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> State {
        State {
            dir: tempfile::Builder::new()
                .prefix("aither-tok-state-")
                .tempdir()
                .expect("temp state dir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AITHERCTL);
        c.env("AITHER_STATE_DIR", self.path())
            .env("AITHER_POLICY_DIR", policy_dir())
            .env("AITHER_AUDIT_LOG", self.path().join("audit.jsonl"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run aitherctl")
    }

    fn run_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aitherctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Mints a token with the CLI into a file and returns the path.
    fn mint_file(&self, policy: &str, subject: &str) -> PathBuf {
        let out = self.path().join(format!("{subject}.tok"));
        let o = self.run(&[
            "token",
            "mint",
            "--policy",
            policy,
            "--subject",
            subject,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_success(&o, "token mint");
        out
    }

    fn host_key(&self) -> HostKey {
        HostKey::load(self.path()).expect("the host key in the test's state dir")
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_success(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed\n{}", text(o));
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tampering

fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5a; 32])
}

/// A root token and a 2-block attenuation of another root token, from strict with a short
/// description and no /etc entries (the payload's size is what the byte-flip test pays for:
/// every flip costs up to one signature check per block).
fn tokens(now: u64) -> (Token, Token) {
    let mut p = strict();
    p.description = "strict, trimmed".into();
    p.filesystem.etc.clear();
    let c0 =
        Claims::from_policy_at(&p, "flip", "aither@test", now, Duration::from_secs(3600)).unwrap();
    let t0 = token::mint(&test_key(), &c0).unwrap();
    let c1 = Attenuation {
        memory: Some(Size(64 << 20)),
        pids: Some(16),
        read: vec!["/usr".into(), "/bin".into()],
        ..Default::default()
    }
    .apply(&c0, now)
    .unwrap();
    (t0.clone(), t0.append(&c1).unwrap())
}

/// Flipping any single byte of a token's bytes (then re-encoding the text form) makes it
/// invalid, for a root token and for an attenuated one. The positions are checked on every
/// core (each flip costs signature checks, slow in unoptimised test builds).
#[test]
fn flipping_any_byte_is_rejected() {
    let now = token::now_unix();
    let pk = test_key().verifying_key();
    let (t1, t2) = tokens(now);
    for (label, t) in [("root", &t1), ("attenuated", &t2)] {
        token::verify(
            &Token::decode(&t.encode()).unwrap(),
            &pk,
            now,
            &NoRevocations,
        )
        .unwrap_or_else(|e| panic!("the untouched {label} token must verify: {e}"));
        let bytes = t.to_bytes();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let kinds = std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new());
        std::thread::scope(|s| {
            for k in 0..threads {
                let (bytes, kinds) = (&bytes, &kinds);
                s.spawn(move || {
                    for i in (k..bytes.len()).step_by(threads) {
                        let mut b = bytes.clone();
                        b[i] ^= 0xff;
                        let mut text = String::from(token::TEXT_PREFIX);
                        base64_url(&b, &mut text);
                        let r = Token::decode(&text)
                            .and_then(|d| token::verify(&d, &pk, now, &NoRevocations));
                        let e = match r {
                            Ok(_) => panic!("{label}: flipping byte {i} still verifies"),
                            Err(e) => format!("{e:?}"),
                        };
                        let kind = e.split([' ', '(', '{']).next().unwrap_or("").to_string();
                        *kinds.lock().unwrap().entry(kind).or_default() += 1;
                    }
                });
            }
        });
        let kinds = kinds.into_inner().unwrap();
        assert_eq!(kinds.values().sum::<usize>(), bytes.len());
        // Each region of the token is covered by its own check.
        for k in [
            "UnknownVersion",
            "WrongKey",
            "Malformed",
            "BadSignature",
            "BadProof",
        ] {
            assert!(kinds.contains_key(k), "{label}: no {k} among {kinds:?}");
        }
    }
}

/// base64url without padding (the test's own, independent of the crate's encoder).
fn base64_url(bytes: &[u8], out: &mut String) {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for j in 0..=n {
            out.push(A[((v >> (18 - 6 * j)) & 63) as usize] as char);
        }
    }
}

#[test]
fn the_test_encoder_matches_the_crate() {
    let (_, t) = tokens(token::now_unix());
    let mut s = String::from(token::TEXT_PREFIX);
    base64_url(&t.to_bytes(), &mut s);
    assert_eq!(s, t.encode());
}

// ---------------------------------------------------------------------------------------------
// The CLI

#[test]
fn cli_mint_verify_inspect_attenuate() {
    let st = State::new();
    let pk = st.run(&["token", "pubkey"]);
    assert_success(&pk, "token pubkey");
    let b64 = stdout(&pk).trim().to_string();
    assert_eq!(b64.len(), 43, "{b64}");
    let hex = stdout(&st.run(&["token", "pubkey", "--hex"]))
        .trim()
        .to_string();
    assert_eq!(hex.len(), 64);
    let md = std::fs::metadata(st.path().join("keys/host.ed25519")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o600
    );

    let tok = st.mint_file("strict", "agent-a");
    let tok_s = tok.to_str().unwrap();
    let text_form = std::fs::read_to_string(&tok).unwrap();
    assert!(text_form.starts_with("aither1."));

    // verify: by file, by text, from stdin, with an explicit key in both forms.
    for args in [
        vec!["token", "verify", tok_s],
        vec!["token", "verify", text_form.trim()],
        vec!["token", "verify", tok_s, "--pubkey", &hex],
        vec!["token", "verify", tok_s, "--pubkey", &b64],
    ] {
        let o = st.run(&args);
        assert_success(&o, &format!("{args:?}"));
        assert!(stdout(&o).starts_with("valid: token "), "{}", text(&o));
    }
    let o = st.run_stdin(&["token", "verify", "-"], &text_form);
    assert_success(&o, "verify -");

    // A different key: exit 1, the reason on stderr.
    let other = aither::token::keys::encode_public_key(&test_key().verifying_key());
    let o = st.run(&["token", "verify", tok_s, "--pubkey", &other]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("wrong key"), "{}", text(&o));

    // attenuate, then inspect shows the chain.
    let att = st.path().join("att.tok");
    let o = st.run(&[
        "token",
        "attenuate",
        tok_s,
        "--memory",
        "64M",
        "--pids",
        "16",
        "--out",
        att.to_str().unwrap(),
    ]);
    assert_success(&o, "attenuate");
    let o = st.run(&["token", "inspect", att.to_str().unwrap()]);
    assert_success(&o, "inspect");
    let out = stdout(&o);
    for want in [
        "status      valid",
        "block 0",
        "block 1",
        "rules.resources.memory: \"512M\" -> \"64M\"",
        "rules.resources.pids: 128 -> 16",
        "memory 64M",
    ] {
        assert!(out.contains(want), "inspect lacks {want:?}\n{out}");
    }
    let o = st.run(&["token", "inspect", att.to_str().unwrap(), "--json"]);
    assert_success(&o, "inspect --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["blocks"].as_array().unwrap().len(), 2);
    assert_eq!(v["effective"]["rules"]["resources"]["pids"], 16);
    assert_eq!(v["blocks"][1]["changes"].as_array().unwrap().len(), 2);

    // A widening attenuation is refused naming the field, and writes nothing.
    for (flag, value, field) in [
        ("--memory", "1G", "rules.resources.memory"),
        ("--pids", "17", "rules.resources.pids"),
        ("--cpus", "2", "rules.resources.cpus"),
        ("--net", "loopback", "rules.network.mode"),
        ("--read", "/etc", "rules.filesystem.read_only"),
        ("--ttl", "2h", "exp"),
    ] {
        let out = st.path().join("never.tok");
        let o = st.run(&[
            "token",
            "attenuate",
            att.to_str().unwrap(),
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}\n{}", text(&o));
        assert!(
            stderr(&o).contains(&format!("widens {field}:")),
            "{flag} {value}\n{}",
            text(&o)
        );
        assert!(!out.exists());
    }

    // Offline attenuation with no key at all: a holder elsewhere.
    let elsewhere = State::new();
    let o = elsewhere.run_stdin(&["token", "attenuate", "-", "--cpus", "0.5"], &text_form);
    assert_success(&o, "offline attenuate");
    assert!(stderr(&o).contains("without verifying"), "{}", text(&o));
    let o = st.run(&["token", "verify", stdout(&o).trim()]);
    assert_success(&o, "the host verifies the offline attenuation");
}

#[test]
fn cli_revoke_and_list() {
    let st = State::new();
    let tok = st.mint_file("strict", "agent-r");
    let att = st.path().join("att.tok");
    assert_success(
        &st.run(&[
            "token",
            "attenuate",
            tok.to_str().unwrap(),
            "--pids",
            "8",
            "--out",
            att.to_str().unwrap(),
        ]),
        "attenuate",
    );
    let v: serde_json::Value = serde_json::from_slice(
        &st.run(&["token", "inspect", "--json", att.to_str().unwrap()])
            .stdout,
    )
    .unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let o = st.run(&["token", "revoked", "--json"]);
    assert_success(&o, "revoked (empty)");
    assert_eq!(stdout(&o).trim(), "[]");

    let o = st.run(&["token", "revoke", &id, "--reason", "agent misbehaved"]);
    assert_success(&o, "revoke");
    for t in [&tok, &att] {
        let o = st.run(&["token", "verify", t.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            stderr(&o).contains(&format!("token {id} was revoked at"))
                && stderr(&o).contains("agent misbehaved"),
            "{}",
            text(&o)
        );
    }
    let o = st.run(&["token", "revoked", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["reason"], "agent misbehaved");
    let o = st.run(&["token", "revoked"]);
    assert!(stdout(&o).contains(&id), "{}", text(&o));
    let o = st.run(&["token", "revoke", "xyz"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

/// `run --token` refuses revoked, expired, forged and foreign tokens with exit 125 and one
/// line, before anything starts (the command would have left a marker file).
#[test]
fn run_refuses_bad_tokens_before_launching() {
    let st = State::new();
    let good = st.mint_file("strict", "agent-x");
    let key = st.host_key();
    let now = token::now_unix();
    let ws = tempfile::Builder::new()
        .prefix("aither-tok-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let marker = ws.path().join("ran");

    let claims = |iat: u64, ttl: u64| {
        Claims::from_policy_at(
            &strict(),
            "agent-x",
            "aither@test",
            iat,
            Duration::from_secs(ttl),
        )
        .unwrap()
    };
    let expired = token::mint(key.signing_key(), &claims(now - 7200, 3600)).unwrap();
    let future = token::mint(key.signing_key(), &claims(now + 3600, 3600)).unwrap();
    let foreign = token::mint(&test_key(), &claims(now, 3600)).unwrap();
    let mut forged = token::mint(key.signing_key(), &claims(now, 3600)).unwrap();
    let p = &mut forged.blocks[0].payload;
    let at = p.windows(4).position(|w| w == b"512M").unwrap();
    p[at] = b'9'; // 912M
    let revoked = token::mint(key.signing_key(), &claims(now, 3600)).unwrap();
    let rid = Claims::from_payload(&revoked.blocks[0].payload).unwrap().id;
    RevocationStore::open(st.path())
        .unwrap()
        .revoke(&rid, "test", now)
        .unwrap();

    let cases: Vec<(String, &str)> = vec![
        (expired.encode(), "expired at"),
        (future.encode(), "not yet valid"),
        (foreign.encode(), "wrong key"),
        (forged.encode(), "bad signature on block 0"),
        (revoked.encode(), "was revoked at"),
        ("aither1.AAAA".into(), "unknown token version"),
        ("aither1.AQ".into(), "malformed token"),
    ];
    for (tok, want) in cases {
        let o = st.run(&[
            "run",
            "--token",
            &tok,
            "--workspace",
            ws.path().to_str().unwrap(),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(125), "{want}\n{}", text(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line on stderr\n{}", text(&o));
        assert!(
            err.starts_with("aither: token refused: ") && err.contains(want),
            "{want}\n{}",
            text(&o)
        );
        assert!(!marker.exists(), "{want}: the command ran");
    }
    // --workspace outside an attenuated workspace_root.
    let att = st.path().join("root.tok");
    assert_success(
        &st.run(&[
            "token",
            "attenuate",
            good.to_str().unwrap(),
            "--write",
            "/srv/nowhere",
            "--out",
            att.to_str().unwrap(),
        ]),
        "attenuate --write",
    );
    let o = st.run(&[
        "run",
        "--token",
        att.to_str().unwrap(),
        "--workspace",
        ws.path().to_str().unwrap(),
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(
        stderr(&o).contains("outside the token's workspace_root"),
        "{}",
        text(&o)
    );
    assert!(!marker.exists());
}

// ---------------------------------------------------------------------------------------------
// Random attenuation sequences never widen

const PATHS: &[&str] = &[
    "/",
    "/usr",
    "/usr/lib",
    "/usr/bin",
    "/usr/share/doc",
    "/bin",
    "/lib",
    "/lib64",
    "/sbin",
    "/etc",
    "/home",
    "/usrx",
    "/var",
    "/var/tmp",
    "/srv",
    "/srv/a",
    "/srv/a/b",
];

#[derive(Clone, Debug)]
struct Request {
    memory_mib: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u64>,
    net: Option<u8>,
    read: Vec<usize>,
    write: Option<usize>,
    ttl: Option<u64>,
    timeout: Option<u64>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        proptest::option::of(8u64..2048),
        proptest::option::of(0.01f64..4.0),
        proptest::option::of(2u64..512),
        proptest::option::of(0u8..3),
        proptest::collection::vec(0..PATHS.len(), 0..4),
        proptest::option::of(0..PATHS.len()),
        proptest::option::of(1u64..8000),
        proptest::option::of(1u64..8000),
    )
        .prop_map(
            |(memory_mib, cpus, pids, net, read, write, ttl, timeout)| Request {
                memory_mib,
                cpus,
                pids,
                net,
                read,
                write,
                ttl,
                timeout,
            },
        )
}

fn under(child: &str, parent: &str) -> bool {
    Path::new(child).starts_with(parent)
}

fn mode(n: u8) -> NetworkMode {
    [NetworkMode::None, NetworkMode::Loopback, NetworkMode::Host][usize::from(n)]
}

/// Whether `r`, applied to `cur` at `now`, asks for more than `cur` grants (the test's own
/// judgement, independent of `narrows`).
fn asks_wider(r: &Request, cur: &Claims, now: u64) -> bool {
    let res = &cur.rules.resources;
    r.memory_mib.is_some_and(|m| m << 20 > res.memory.0)
        || r.cpus.is_some_and(|c| c > res.cpus)
        || r.pids.is_some_and(|p| p > res.pids)
        || r.net.is_some_and(|n| mode(n) > cur.rules.network.mode)
        || r.read.iter().any(|&i| {
            !cur.rules
                .filesystem
                .read_only
                .iter()
                .any(|p| under(PATHS[i], p))
        })
        || r.write.is_some_and(|i| {
            cur.workspace_root
                .as_deref()
                .is_some_and(|root| !under(PATHS[i], root))
        })
        || r.ttl.is_some_and(|t| now + t > cur.exp)
        || r.timeout.is_some_and(|t| {
            cur.rules
                .process
                .timeout
                .is_some_and(|p| Duration::from_secs(t) > p.0)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_attenuations_never_widen(reqs in proptest::collection::vec(request(), 1..7)) {
        let now = token::now_unix();
        let key = test_key();
        let root = Claims::from_policy_at(&strict(), "prop", "aither@test", now, Duration::from_secs(3600)).unwrap();
        let mut tok = token::mint(&key, &root).unwrap();
        let mut cur = root.clone();
        for r in &reqs {
            let att = Attenuation {
                memory: r.memory_mib.map(|m| Size(m << 20)),
                cpus: r.cpus,
                pids: r.pids,
                // The disk quota's narrowing has its own tests (token::tests::attenuation_…,
                // narrows_checks_every_field).
                workspace_disk: None,
                net: r.net.map(mode),
                read: r.read.iter().map(|&i| PATHS[i].to_string()).collect(),
                write: r.write.map(|i| PATHS[i].to_string()),
                ttl: r.ttl.map(Duration::from_secs),
                timeout: r.timeout.map(Duration::from_secs),
                // Memory narrowing has its own test (token::tests::memory_tiers_…).
                mem_drop: Vec::new(),
                mem_read_only: Vec::new(),
                mem_quota: Vec::new(),
                no_memory_grants: false,
                net_drop: Vec::new(),
            };
            let child = att.apply(&cur, now).expect("in-range values are well-formed requests");
            let wider = asks_wider(r, &cur, now);
            match tok.append(&child) {
                Ok(t) => {
                    prop_assert!(!wider, "a widening request was accepted: {r:?} on {cur:?}");
                    tok = t;
                    cur = child;
                }
                Err(TokenError::Widening { .. }) => {
                    prop_assert!(wider, "a narrowing request was refused: {r:?}");
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
        let v = token::verify(&Token::decode(&tok.encode()).unwrap(), &key.verifying_key(), now, &NoRevocations).unwrap();
        let e = v.effective();
        prop_assert_eq!(e, &cur);
        // Field by field, against the root, by the test's own reading...
        let (er, rr) = (&e.rules, &root.rules);
        prop_assert!(er.resources.memory <= rr.resources.memory);
        prop_assert!(er.resources.cpus <= rr.resources.cpus);
        prop_assert!(er.resources.pids <= rr.resources.pids);
        prop_assert!(er.resources.swap == rr.resources.swap);
        prop_assert!(er.network.mode <= rr.network.mode);
        prop_assert!(er.filesystem.read_only.iter().all(|c| rr.filesystem.read_only.iter().any(|p| under(c, p))));
        prop_assert!(er.filesystem.etc == rr.filesystem.etc);
        prop_assert!(er.filesystem.workspace <= rr.filesystem.workspace);
        prop_assert!(er.landlock.enabled && er.seccomp.profile == "agent");
        prop_assert!(er.namespaces == rr.namespaces);
        prop_assert!(e.exp <= root.exp);
        let mut process = er.process.clone();
        process.timeout = rr.process.timeout;
        prop_assert!(process == rr.process);
        prop_assert!(e.gpu == root.gpu && e.bus == root.bus && e.memory_tiers == root.memory_tiers && !e.may_spawn);
        // ...and by the library's complete check.
        prop_assert!(narrows(e, &root).is_ok());
        for w in v.blocks.windows(2) {
            prop_assert!(narrows(&w[1], &w[0]).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sandboxes from attenuated tokens

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

struct Limits {
    memory: String,
    pids: String,
}

/// Runs `aitherctl run --token TOKEN` with an agent that signals "ready" and waits for "go"
/// (marker files in the workspace); reads the run's cgroup limits from the host meanwhile.
fn run_and_read_limits(st: &State, tok: &Path, subject: &str, ws: &Path) -> (Limits, Output) {
    let ready = ws.join("ready");
    let go = ws.join("go");
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&go);
    let child = st
        .cmd(&[
            "run",
            "--token",
            tok.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "touch ready; while [ ! -e go ]; do sleep 0.01; done; echo agent-done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aitherctl run");
    let cg = format!("aither/{subject}-{}", child.id());
    let up = poll_until(Duration::from_secs(60), || ready.exists());
    let read = |h: &str, f: &str| {
        std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(h).join(&cg).join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("<cannot read {h}/{cg}/{f}: {e}>"))
    };
    let limits = Limits {
        memory: read("memory", "memory.limit_in_bytes"),
        pids: read("pids", "pids.max"),
    };
    std::fs::write(&go, b"").expect("create the go marker");
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("aitherctl run did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(up, "the agent never became ready\n{}", text(&out));
    assert_success(&out, "aitherctl run --token");
    assert!(stdout(&out).contains("agent-done"), "{}", text(&out));
    assert!(
        !Path::new("/sys/fs/cgroup/memory").join(&cg).exists(),
        "the run's cgroup was left behind"
    );
    (limits, out)
}

#[test]
fn attenuated_token_narrows_the_sandboxs_cgroup() {
    require_root();
    let st = State::new();
    let subject = unique("cg");
    let root_tok = st.mint_file("strict", &subject);
    let att = st.path().join("att.tok");
    assert_success(
        &st.run(&[
            "token",
            "attenuate",
            root_tok.to_str().unwrap(),
            "--memory",
            "64M",
            "--pids",
            "16",
            "--out",
            att.to_str().unwrap(),
        ]),
        "attenuate",
    );
    let ws = tempfile::Builder::new()
        .prefix("aither-tok-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (root_limits, _) = run_and_read_limits(&st, &root_tok, &subject, ws.path());
    assert_eq!(
        root_limits.memory,
        (512u64 << 20).to_string(),
        "strict's memory limit"
    );
    assert_eq!(root_limits.pids, "128", "strict's pids limit");
    let (att_limits, _) = run_and_read_limits(&st, &att, &subject, ws.path());
    assert_eq!(
        att_limits.memory,
        (64u64 << 20).to_string(),
        "the attenuated memory limit"
    );
    assert_eq!(att_limits.pids, "16", "the attenuated pids limit");
}

#[test]
fn attenuated_token_narrows_the_filesystem_view() {
    require_root();
    let st = State::new();
    let subject = unique("fs");
    let root_tok = st.mint_file("strict", &subject);
    let att = st.path().join("att.tok");
    let mut args = vec!["token", "attenuate", root_tok.to_str().unwrap()];
    for p in [
        "/usr/bin",
        "/usr/lib",
        "/usr/lib64",
        "/bin",
        "/lib",
        "/lib64",
    ] {
        args.extend(["--read", p]);
    }
    args.extend(["--out", att.to_str().unwrap()]);
    assert_success(&st.run(&args), "attenuate --read");
    assert!(Path::new("/usr/share").is_dir() && Path::new("/usr/sbin").is_dir());
    let ws = tempfile::Builder::new()
        .prefix("aither-tok-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let look = |tok: &Path| {
        let o = st.run(&[
            "run",
            "--token",
            tok.to_str().unwrap(),
            "--workspace",
            ws.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "for p in /usr/share /usr/sbin /usr/bin/env; do \
               if [ -e $p ]; then echo present $p; else echo absent $p; fi; done",
        ]);
        assert_success(&o, "run --token");
        stdout(&o)
    };
    let wide = look(&root_tok);
    let narrow = look(&att);
    for line in [
        "present /usr/share",
        "present /usr/sbin",
        "present /usr/bin/env",
    ] {
        assert!(wide.contains(line), "root token: {line}\n{wide}");
    }
    for line in [
        "absent /usr/share",
        "absent /usr/sbin",
        "present /usr/bin/env",
    ] {
        assert!(narrow.contains(line), "attenuated token: {line}\n{narrow}");
    }
}

/// `run --policy` goes through the same mint-and-verify path: it creates the host key in the
/// state directory at first use, and the sandbox's name is the agent name.
#[test]
fn run_policy_mints_and_verifies_internally() {
    require_root();
    let st = State::new();
    let ws = tempfile::Builder::new()
        .prefix("aither-tok-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let o = st.run(&[
        "run",
        "--workspace",
        ws.path().to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo $AITHER_AGENT $AITHER_POLICY",
    ]);
    assert_success(&o, "run with the default policy");
    assert_eq!(stdout(&o).trim(), "run strict");
    // The claims are a one-launch token's (docs/tokens.md): `run --policy` needs no host key
    // and leaves no state behind.
    assert!(!st.path().join("keys/host.ed25519").exists());
    assert!(
        !st.path().join("state.db").exists(),
        "a run without revocations creates no database"
    );
}

/// A base64url public key can begin with '-' (1 key in 64): `--pubkey -xyz…` must be taken as
/// a value, not rejected as a missing one (found as a flaky CLI test).
#[test]
fn a_public_key_beginning_with_a_dash_is_a_value() {
    let st = State::new();
    let o = st.run(&[
        "token",
        "verify",
        "aither1.AAAA",
        "--pubkey",
        "-hidboYTCtOYe8x66h1OGMcvogc3jLruJ6OraiEIvi",
    ]);
    let err = stderr(&o);
    assert!(!err.contains("a value is required"), "{err}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "an invalid key or token, not a usage error: {err}"
    );
}

/// `token attenuate A > B` (the README's form) and `token mint > B`: a bearer token printed to
/// stdout that is a regular file the caller owns ends up at 0600 (it was 0644, the umask's); a
/// readable file someone else owns is refused with nothing written (issue 20).
#[test]
fn a_token_redirected_to_a_file_is_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    let st = State::new();
    let tok = st.mint_file("strict", "agent-redirect");
    let run_to = |args: &[&str], file: &Path| -> Output {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(file)
            .unwrap();
        st.cmd(args)
            .stdout(Stdio::from(f))
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for args in [
        vec!["token", "attenuate", tok.to_str().unwrap(), "--pids", "8"],
        vec![
            "token",
            "mint",
            "--policy",
            "strict",
            "--subject",
            "agent-m",
        ],
    ] {
        let out = st.path().join("redirected.tok");
        std::fs::write(&out, "").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = run_to(&args, &out);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert_eq!(mode(&out), 0o600, "{args:?}: the token file's mode");
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(written.starts_with("aither1."), "{written}");
        assert_success(
            &st.run(&["token", "verify", out.to_str().unwrap()]),
            "the redirected token verifies",
        );
        std::fs::remove_file(&out).unwrap();
    }

    // Someone else's 0644 file: refused, empty, its mode untouched.
    let foreign = st.path().join("foreign.tok");
    std::fs::write(&foreign, "").unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let o = run_to(
        &["token", "attenuate", tok.to_str().unwrap(), "--pids", "8"],
        &foreign,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(stderr(&o).contains("--out FILE"), "{}", text(&o));
    let md = std::fs::metadata(&foreign).unwrap();
    assert_eq!((md.len(), md.mode() & 0o7777, md.uid()), (0, 0o644, 65534));

    // A pipe is left alone: the token still comes out.
    let o = st.run(&["token", "attenuate", tok.to_str().unwrap(), "--pids", "8"]);
    assert_success(&o, "attenuate to a pipe");
    assert!(stdout(&o).starts_with("aither1."), "{}", text(&o));
}

/// Issue 20: `policy check` takes a name (installed or built-in) as well as a path, and reports
/// every error in one pass; `policy show` lists a policy's `[net]` grants (it printed
/// `network None` for a policy with services, egress rules and routes).
#[test]
fn policy_check_takes_a_name_and_show_lists_net_grants() {
    let st = State::new();
    let o = st.run(&["policy", "check", "strict"]);
    assert_success(&o, "policy check strict");
    assert!(
        stdout(&o).contains("ok (policy \"strict\")"),
        "{}",
        text(&o)
    );

    let strict = std::fs::read_to_string(policy_dir().join("strict.toml")).unwrap();
    let bad = st.path().join("bad.toml");
    std::fs::write(
        &bad,
        strict
            .replace("memory = \"512M\"", "memory = \"1M\"")
            .replace("pids = 128", "pids = 1"),
    )
    .unwrap();
    let o = st.run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.contains("field `resources.memory`"), "{err}");
    assert!(err.contains("field `resources.pids`"), "{err}");

    let net = st.path().join("withnet.toml");
    std::fs::write(
        &net,
        strict.replace("name = \"strict\"", "name = \"withnet\"")
            + "\n[[net.egress]]\nhosts = [\"api.openai.com\"]\nports = [443]\n\n\
               [[net.services]]\nname = \"llm\"\ntarget = \"127.0.0.1:11434\"\n\n\
               [[net.routes]]\nname = \"openai\"\nupstream = \"https://api.openai.com/v1\"\n\
               secret = \"openai\"\n",
    )
    .unwrap();
    let o = st.run(&["policy", "show", net.to_str().unwrap()]);
    assert_success(&o, "policy show");
    let out = stdout(&o);
    assert!(!out.contains("network       None"), "{out}");
    for line in [
        "network       none, plus through the egress gateway: 1 egress rule(s), 1 service(s), 1 route(s)",
        "  egress      api.openai.com port 443",
        "  service     llm.aither.internal -> 127.0.0.1:11434",
        "  route       /openai/ -> https://api.openai.com/v1 (secret \"openai\" in Authorization)",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}\n{out}");
    }
}
