//! Unit tests of the token module: format, chain, narrowing, time, host key (the revocation
//! store's are in aither's src/revocations.rs).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use ed25519_dalek::SigningKey;

use super::claims::{changes, read_paths_resolve_within};
use super::*;
use crate::policy::{NetworkMode, Policy, BUILTIN_POLICIES};
use crate::units::{HumanDuration, Size};

const NOW: u64 = 1_800_000_000;

fn policy(name: &str) -> Policy {
    let src = BUILTIN_POLICIES
        .iter()
        .find(|p| p.0 == name)
        .unwrap_or_else(|| panic!("no built-in policy {name}"))
        .1;
    Policy::parse(src, name).expect("built-in policy parses")
}

fn root_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn claims(p: &str) -> Claims {
    Claims::from_policy_at(
        &policy(p),
        "agent-1",
        "aither@test",
        NOW,
        Duration::from_secs(3600),
    )
    .expect("claims")
}

fn minted(p: &str) -> (Token, Claims) {
    let c = claims(p);
    (mint(&root_key(), &c).expect("mint"), c)
}

fn check(t: &Token) -> Result<Verified, TokenError> {
    verify(t, &root_key().verifying_key(), NOW + 1, &NoRevocations)
}

fn widening_field(r: Result<impl std::fmt::Debug, TokenError>) -> String {
    match r {
        Err(TokenError::Widening { field, .. }) => field,
        other => panic!("expected a widening error, got {other:?}"),
    }
}

#[test]
fn mint_encode_decode_verify_round_trip() {
    let (t, c) = minted("strict");
    let text = t.encode();
    assert!(text.starts_with("aither1."), "{text}");
    assert!(text[8..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let back = Token::decode(&format!("  {text}\n")).expect("decode");
    assert_eq!(back, t);
    let v = check(&back).expect("verify");
    assert_eq!(v.blocks.len(), 1);
    assert_eq!(v.effective(), &c);
    assert_eq!(v.id(), c.id);
    assert_eq!(v.effective().to_policy(), policy("strict"));
    assert!(is_valid_id(&c.id));
}

#[test]
fn claims_payload_is_strict_json() {
    let c = claims("strict");
    let mut v: serde_json::Value = serde_json::from_slice(&c.to_payload()).unwrap();
    v["extra"] = serde_json::json!(1);
    assert!(Claims::from_payload(v.to_string().as_bytes()).is_err());
    let mut v: serde_json::Value = serde_json::from_slice(&c.to_payload()).unwrap();
    v.as_object_mut().unwrap().remove("workspace_root");
    assert!(
        Claims::from_payload(v.to_string().as_bytes()).is_err(),
        "a missing field must not default"
    );
}

#[test]
fn a_payload_from_before_the_memory_service_decodes_to_the_narrowest_values() {
    // Tokens minted before issue 6 have no memory_grants, no quota_entries and no
    // rules.memory: each defaults to granting nothing.
    let mut c = claims("strict");
    c.memory_grants.clear();
    let mut v: serde_json::Value = serde_json::from_slice(&c.to_payload()).unwrap();
    assert!(
        v.get("memory_grants").is_none(),
        "empty grants are left out"
    );
    v["rules"].as_object_mut().unwrap().remove("memory");
    for t in v["memory_tiers"].as_object_mut().unwrap().values_mut() {
        t.as_object_mut().unwrap().remove("quota_entries");
    }
    let old = Claims::from_payload(v.to_string().as_bytes()).unwrap();
    assert!(old.memory_grants.is_empty());
    assert!(old.rules.memory.is_empty());
    assert!(old.memory_tiers.values().all(|t| t.quota_entries == 0));
    // A grant, once there, is part of the signed payload.
    c.memory_grants.push(MemoryGrant {
        owner: "b".into(),
        tier: "knowledge".into(),
    });
    let back = Claims::from_payload(&c.to_payload()).unwrap();
    assert_eq!(back.memory_grants, c.memory_grants);
}

#[test]
fn attenuation_narrows_and_verifies() {
    let (t, c0) = minted("strict");
    let req = Attenuation {
        memory: Some(Size(64 << 20)),
        pids: Some(16),
        cpus: Some(0.5),
        timeout: Some(Duration::from_secs(30)),
        write: Some("/var/tmp/".into()),
        workspace_disk: Some(Size(256 << 20)),
        ..Default::default()
    };
    let c1 = req.apply(&c0, NOW).unwrap();
    let t1 = t.append(&c1).unwrap();
    let v = check(&t1).unwrap();
    let e = v.effective();
    assert_eq!(e.rules.resources.workspace_disk, Some(Size(256 << 20)));
    // Once set, a later block may only lower it.
    let wider = Attenuation {
        workspace_disk: Some(Size(512 << 20)),
        ..Default::default()
    }
    .apply(&c1, NOW)
    .unwrap();
    assert_eq!(
        widening_field(t1.append(&wider)),
        "rules.resources.workspace_disk"
    );
    assert_eq!(e.rules.resources.memory, Size(64 << 20));
    assert_eq!(e.rules.resources.pids, 16);
    assert_eq!(e.rules.resources.cpus, 0.5);
    assert_eq!(
        e.rules.process.timeout,
        Some(HumanDuration(Duration::from_secs(30)))
    );
    assert_eq!(e.workspace_root.as_deref(), Some("/var/tmp"));
    assert_eq!(v.id(), c0.id, "the token id is block 0's");
    assert_ne!(e.id, c0.id);
    let ch: Vec<String> = changes(&c0, e).into_iter().map(|c| c.0).collect();
    assert_eq!(
        ch,
        [
            "rules.process.timeout",
            "rules.resources.cpus",
            "rules.resources.memory",
            "rules.resources.pids",
            "rules.resources.workspace_disk",
            "workspace_root"
        ]
    );
    // A second attenuation narrows further; the chain verifies.
    let c2 = Attenuation {
        memory: Some(Size(32 << 20)),
        ..Default::default()
    }
    .apply(e, NOW)
    .unwrap();
    let t2 = t1.append(&c2).unwrap();
    assert_eq!(
        check(&t2).unwrap().effective().rules.resources.memory,
        Size(32 << 20)
    );
}

#[test]
fn widening_requests_are_refused_naming_the_field() {
    let (t, c0) = minted("strict");
    let cases: Vec<(Attenuation, &str)> = vec![
        (
            Attenuation {
                memory: Some(Size(1 << 30)),
                ..Default::default()
            },
            "rules.resources.memory",
        ),
        (
            Attenuation {
                cpus: Some(2.0),
                ..Default::default()
            },
            "rules.resources.cpus",
        ),
        (
            Attenuation {
                pids: Some(129),
                ..Default::default()
            },
            "rules.resources.pids",
        ),
        (
            Attenuation {
                net: Some(NetworkMode::Loopback),
                ..Default::default()
            },
            "rules.network.mode",
        ),
        (
            Attenuation {
                read: vec!["/etc".into()],
                ..Default::default()
            },
            "rules.filesystem.read_only",
        ),
        (
            Attenuation {
                ttl: Some(Duration::from_secs(7200)),
                ..Default::default()
            },
            "exp",
        ),
    ];
    for (req, field) in cases {
        let child = req.apply(&c0, NOW).unwrap();
        match t.append(&child) {
            Err(TokenError::Widening {
                block, field: f, ..
            }) => {
                assert_eq!(block, 1);
                assert_eq!(f, field);
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    // ci has a timeout: an agent cannot lengthen it, nor drop it (unlimited).
    let (tc, cc) = minted("ci");
    let longer = Attenuation {
        timeout: Some(Duration::from_secs(7200)),
        ..Default::default()
    }
    .apply(&cc, NOW)
    .unwrap();
    assert_eq!(widening_field(tc.append(&longer)), "rules.process.timeout");
    let mut unlimited = cc.clone();
    unlimited.rules.process.timeout = None;
    assert_eq!(
        widening_field(tc.append(&unlimited)),
        "rules.process.timeout"
    );
}

#[test]
fn bad_requests_are_refused() {
    let c0 = claims("strict");
    for (req, field) in [
        (
            Attenuation {
                memory: Some(Size(1 << 20)),
                ..Default::default()
            },
            "memory",
        ),
        (
            Attenuation {
                cpus: Some(f64::NAN),
                ..Default::default()
            },
            "cpus",
        ),
        (
            Attenuation {
                pids: Some(1),
                ..Default::default()
            },
            "pids",
        ),
        (
            Attenuation {
                read: vec!["usr".into()],
                ..Default::default()
            },
            "read",
        ),
        (
            Attenuation {
                read: vec!["/usr/../etc".into()],
                ..Default::default()
            },
            "read",
        ),
        (
            Attenuation {
                write: Some("/tmp/./x".into()),
                ..Default::default()
            },
            "write",
        ),
        (
            Attenuation {
                timeout: Some(Duration::ZERO),
                ..Default::default()
            },
            "timeout",
        ),
    ] {
        match req.apply(&c0, NOW) {
            Err(TokenError::BadRequest { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

/// Every field of the claims, widened by hand, is refused by `narrows` with its own name.
#[test]
// A table of cases, one per claim field: splitting it would hide which field a case covers.
#[allow(clippy::too_many_lines)]
fn narrows_checks_every_field() {
    let mut parent = claims("strict");
    parent.workspace_root = Some("/srv/work".into());
    parent.gpu = GpuClaim {
        count: 1,
        vram_mb: 1000,
        priority: 5,
        exclusive: false,
        mig_profile: None,
    };
    parent.bus = BusClaim {
        publish: vec!["agent.x.>".into()],
        subscribe: vec!["aither.>".into()],
    };
    parent.memory_tiers = BTreeMap::from([(
        "knowledge".to_string(),
        TierClaim {
            read: true,
            write: false,
            quota_bytes: 1 << 20,
            quota_entries: 1000,
        },
    )]);
    parent.memory_grants = vec![MemoryGrant {
        owner: "agent-b".into(),
        tier: "knowledge".into(),
    }];
    parent.rules.filesystem.exec_workspace = false;
    parent.rules.rlimits.nproc = Some(100);
    parent.rules.rlimits.fsize = Some(Size(1 << 30));
    parent.rules.resources.workspace_disk = Some(Size(1 << 30));
    parent.rules.process.timeout = Some(HumanDuration(Duration::from_secs(60)));
    narrows(&parent, &parent).expect("a block narrows itself");

    type Edit = Box<dyn Fn(&mut Claims)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("subject", Box::new(|c| c.subject = "other".into())),
        ("issuer", Box::new(|c| c.issuer = "aither@elsewhere".into())),
        ("policy", Box::new(|c| c.policy = "permissive".into())),
        ("exp", Box::new(|c| c.exp += 1)),
        ("rules.name", Box::new(|c| c.rules.name = "x".into())),
        (
            "rules.description",
            Box::new(|c| c.rules.description = "x".into()),
        ),
        (
            "rules.warning",
            Box::new(|c| c.rules.warning = Some("x".into())),
        ),
        (
            "rules.best_effort",
            Box::new(|c| {
                c.rules
                    .best_effort
                    .push(crate::policy::Protection::Landlock)
            }),
        ),
        (
            "rules.namespaces.net",
            Box::new(|c| c.rules.namespaces.net = false),
        ),
        (
            "rules.namespaces.ipc",
            Box::new(|c| c.rules.namespaces.ipc = false),
        ),
        (
            "rules.namespaces.uts",
            Box::new(|c| c.rules.namespaces.uts = false),
        ),
        (
            "rules.namespaces.cgroup",
            Box::new(|c| c.rules.namespaces.cgroup = false),
        ),
        (
            "rules.filesystem.read_only",
            Box::new(|c| c.rules.filesystem.read_only.push("/home".into())),
        ),
        (
            "rules.filesystem.read_only",
            Box::new(|c| c.rules.filesystem.read_only = vec!["/usr/../etc".into()]),
        ),
        (
            "rules.filesystem.read_only",
            Box::new(|c| c.rules.filesystem.read_only = vec!["/usrx".into()]),
        ),
        (
            "rules.filesystem.etc",
            Box::new(|c| c.rules.filesystem.etc.push("shadow".into())),
        ),
        (
            "rules.filesystem.exec_workspace",
            Box::new(|c| c.rules.filesystem.exec_workspace = true),
        ),
        (
            "rules.filesystem.tmp_size",
            Box::new(|c| c.rules.filesystem.tmp_size = Size(1 << 40)),
        ),
        (
            "rules.filesystem.dev_shm_size",
            Box::new(|c| c.rules.filesystem.dev_shm_size = Size(1 << 40)),
        ),
        (
            "rules.network.mode",
            Box::new(|c| c.rules.network.mode = NetworkMode::Host),
        ),
        (
            "rules.landlock.enabled",
            Box::new(|c| c.rules.landlock.enabled = false),
        ),
        (
            "rules.seccomp.profile",
            Box::new(|c| c.rules.seccomp.profile = "none".into()),
        ),
        (
            "rules.resources.memory",
            Box::new(|c| c.rules.resources.memory = Size(1 << 40)),
        ),
        (
            "rules.resources.swap",
            Box::new(|c| c.rules.resources.swap = None),
        ),
        (
            "rules.resources.swap",
            Box::new(|c| c.rules.resources.swap = Some(Size(1))),
        ),
        (
            "rules.resources.cpus",
            Box::new(|c| c.rules.resources.cpus = 1.5),
        ),
        (
            "rules.resources.cpus",
            Box::new(|c| c.rules.resources.cpus = f64::NAN),
        ),
        (
            "rules.resources.pids",
            Box::new(|c| c.rules.resources.pids += 1),
        ),
        (
            "rules.resources.workspace_disk",
            Box::new(|c| c.rules.resources.workspace_disk = None),
        ),
        (
            "rules.resources.workspace_disk",
            Box::new(|c| c.rules.resources.workspace_disk = Some(Size((1 << 30) + 1))),
        ),
        (
            "rules.rlimits.nofile",
            Box::new(|c| c.rules.rlimits.nofile += 1),
        ),
        ("rules.rlimits.core", Box::new(|c| c.rules.rlimits.core = 1)),
        (
            "rules.rlimits.nproc",
            Box::new(|c| c.rules.rlimits.nproc = None),
        ),
        (
            "rules.rlimits.fsize",
            Box::new(|c| c.rules.rlimits.fsize = Some(Size(1 << 31))),
        ),
        ("rules.process.uid", Box::new(|c| c.rules.process.uid = 0)),
        ("rules.process.gid", Box::new(|c| c.rules.process.gid = 0)),
        (
            "rules.process.hostname",
            Box::new(|c| c.rules.process.hostname = "x".into()),
        ),
        (
            "rules.process.timeout",
            Box::new(|c| c.rules.process.timeout = None),
        ),
        (
            "rules.process.env",
            Box::new(|c| {
                c.rules
                    .process
                    .env
                    .insert("LD_PRELOAD".into(), "/x.so".into());
            }),
        ),
        (
            "rules.process.pass_env",
            Box::new(|c| c.rules.process.pass_env.push("SSH_AUTH_SOCK".into())),
        ),
        ("workspace_root", Box::new(|c| c.workspace_root = None)),
        (
            "workspace_root",
            Box::new(|c| c.workspace_root = Some("/srv".into())),
        ),
        (
            "workspace_root",
            Box::new(|c| c.workspace_root = Some("/srv/work/../x".into())),
        ),
        ("gpu.count", Box::new(|c| c.gpu.count = 2)),
        ("gpu.vram_mb", Box::new(|c| c.gpu.vram_mb = 1001)),
        ("gpu.priority", Box::new(|c| c.gpu.priority = 6)),
        ("gpu.exclusive", Box::new(|c| c.gpu.exclusive = true)),
        ("rules.gpu", Box::new(|c| c.rules.gpu.count = 1)),
        ("bus.publish", Box::new(|c| c.bus.publish.push(">".into()))),
        (
            "bus.subscribe",
            Box::new(|c| c.bus.subscribe.push(">".into())),
        ),
        (
            "memory_tiers.spirit",
            Box::new(|c| {
                c.memory_tiers.insert("spirit".into(), TierClaim::default());
            }),
        ),
        (
            "memory_tiers.knowledge.write",
            Box::new(|c| c.memory_tiers.get_mut("knowledge").unwrap().write = true),
        ),
        (
            "memory_tiers.knowledge.quota_bytes",
            Box::new(|c| c.memory_tiers.get_mut("knowledge").unwrap().quota_bytes += 1),
        ),
        (
            "memory_tiers.knowledge.quota_entries",
            Box::new(|c| c.memory_tiers.get_mut("knowledge").unwrap().quota_entries += 1),
        ),
        (
            "memory_grants",
            Box::new(|c| {
                c.memory_grants.push(MemoryGrant {
                    owner: "agent-c".into(),
                    tier: "knowledge".into(),
                })
            }),
        ),
        (
            "memory_grants",
            Box::new(|c| c.memory_grants[0].tier = "spirit".into()),
        ),
        (
            "rules.memory",
            Box::new(|c| {
                c.rules.memory.remove("working");
            }),
        ),
        ("may_spawn", Box::new(|c| c.may_spawn = true)),
    ];
    for (field, edit) in cases {
        let mut child = parent.clone();
        edit(&mut child);
        match narrows(&child, &parent) {
            Err(TokenError::Widening { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected a widening error, got {other:?}"),
        }
    }
    // MIG: a whole-GPU claim narrows to a profile; a profile claim neither widens to whole
    // GPUs nor changes profile.
    let mut mig = parent.clone();
    mig.gpu.mig_profile = Some("1g.10gb".into());
    narrows(&mig, &parent).unwrap();
    assert_eq!(widening_field(narrows(&parent, &mig)), "gpu.mig_profile");
    let mut other = mig.clone();
    other.gpu.mig_profile = Some("3g.40gb".into());
    assert_eq!(widening_field(narrows(&other, &mig)), "gpu.mig_profile");
    narrows(&mig, &mig).unwrap();
    // Workspace access is ordered none < read-only < read-write.
    let mut ro = parent.clone();
    ro.rules.filesystem.workspace = crate::policy::WorkspaceAccess::ReadOnly;
    narrows(&ro, &parent).unwrap();
    assert_eq!(
        widening_field(narrows(&parent, &ro)),
        "rules.filesystem.workspace"
    );
    // And the narrowing direction passes for each kind of field.
    let mut n = parent.clone();
    n.rules.filesystem.read_only = vec!["/usr/lib".into(), "/lib".into()];
    n.rules.filesystem.etc.truncate(2);
    n.rules.resources.swap = Some(Size(0));
    n.rules.process.timeout = Some(HumanDuration(Duration::from_secs(1)));
    n.workspace_root = Some("/srv/work/a".into());
    n.gpu.count = 0;
    n.bus.publish.clear();
    n.memory_tiers.get_mut("knowledge").unwrap().read = false;
    n.memory_tiers.get_mut("knowledge").unwrap().quota_entries = 10;
    n.memory_grants.clear();
    n.exp -= 1;
    narrows(&n, &parent).unwrap();
}

#[test]
fn seccomp_none_may_narrow_to_agent_only() {
    let parent = claims("permissive");
    let mut child = parent.clone();
    child.rules.seccomp.profile = "agent".into();
    child.rules.landlock.enabled = true;
    child.rules.network.mode = NetworkMode::None;
    child.rules.namespaces.net = true;
    narrows(&child, &parent).unwrap();
    assert_eq!(
        widening_field(narrows(&parent, &child)),
        "rules.namespaces.net"
    );
}

#[test]
fn publishing_on_the_host_may_be_turned_off_never_on() {
    let parent = claims("strict");
    assert!(parent.rules.network.publish_host, "allowed by default");
    let mut closed = parent.clone();
    closed.rules.network.publish_host = false;
    narrows(&closed, &parent).unwrap();
    assert_eq!(
        widening_field(narrows(&parent, &closed)),
        "rules.network.publish_host"
    );
    // Left out of the payload while true: tokens from before the field read the same.
    let v = serde_json::to_value(&parent.rules.network).unwrap();
    assert!(v.get("publish_host").is_none(), "{v}");
    let v = serde_json::to_value(&closed.rules.network).unwrap();
    assert_eq!(v["publish_host"], false);
}

/// A block whose claims widen cannot be produced by `append`, but a holder can sign anything
/// with the proof key: verification must refuse it by itself.
#[test]
fn a_forged_widening_block_is_refused_at_verification() {
    let (t, c0) = minted("strict");
    let mut wide = c0.clone();
    wide.rules.resources.memory = Size(4 << 30);
    let forged = t.append_unchecked(wide.to_payload()).unwrap();
    match check(&forged) {
        Err(TokenError::Widening { block, field, .. }) => {
            assert_eq!(block, 1);
            assert_eq!(field, "rules.resources.memory");
        }
        other => panic!("{other:?}"),
    }
    let garbage = t
        .append_unchecked(b"{\"not\":\"claims\"}".to_vec())
        .unwrap();
    assert!(matches!(
        check(&garbage),
        Err(TokenError::InvalidClaims { block: 1, .. })
    ));
}

#[test]
fn removing_the_last_block_is_detected() {
    let (t, c0) = minted("strict");
    let c1 = Attenuation {
        memory: Some(Size(64 << 20)),
        ..Default::default()
    }
    .apply(&c0, NOW)
    .unwrap();
    let t1 = t.append(&c1).unwrap();
    let mut cut = t1.clone();
    cut.blocks.pop();
    assert!(matches!(check(&cut), Err(TokenError::BadProof)));
    // Splicing: block 1 of one token after block 0 of another.
    let (other, _) = minted("strict");
    let mut spliced = other.clone();
    spliced.blocks.push(t1.blocks[1].clone());
    spliced.proof = t1.proof;
    assert!(matches!(
        check(&spliced),
        Err(TokenError::BadSignature { block: 1 })
    ));
}

#[test]
fn distinct_errors_for_each_refusal() {
    let (t, c0) = minted("strict");
    let pk = root_key().verifying_key();
    // Expired: now == exp is already expired.
    let e = verify(&t, &pk, c0.exp, &NoRevocations).unwrap_err();
    assert!(matches!(e, TokenError::Expired { .. }), "{e:?}");
    assert!(e.to_string().contains("expired at"), "{e}");
    // Not yet valid: beyond the skew.
    let e = verify(&t, &pk, NOW - CLOCK_SKEW_SECS - 1, &NoRevocations).unwrap_err();
    assert!(matches!(e, TokenError::NotYetValid { .. }), "{e:?}");
    assert!(e.to_string().contains("not yet valid"), "{e}");
    verify(&t, &pk, NOW - CLOCK_SKEW_SECS, &NoRevocations).expect("within the skew");
    // Wrong key.
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    let e = verify(&t, &other, NOW, &NoRevocations).unwrap_err();
    assert!(matches!(e, TokenError::WrongKey { .. }), "{e:?}");
    assert!(e.to_string().starts_with("wrong key"), "{e}");
    // A token re-labelled with the other key's id: the signature fails instead.
    let mut relabelled = t.clone();
    relabelled.root_key_id = chain::key_id(&other);
    let e = verify(&relabelled, &other, NOW, &NoRevocations).unwrap_err();
    assert!(matches!(e, TokenError::BadSignature { block: 0 }), "{e:?}");
    // Unknown version, in the bytes and in the text prefix.
    let mut b = t.to_bytes();
    b[0] = 2;
    assert!(matches!(
        Token::from_bytes(&b),
        Err(TokenError::UnknownVersion(2))
    ));
    let text = t.encode().replacen("aither1.", "aither7.", 1);
    let e = Token::decode(&text).unwrap_err();
    assert!(matches!(e, TokenError::UnknownVersion(7)), "{e:?}");
    assert!(e.to_string().contains("unknown token version 7"), "{e}");
    // Malformed.
    for bad in ["", "aither1.", "aither1.!!!", "hello", "aither1.AQ"] {
        assert!(
            matches!(Token::decode(bad), Err(TokenError::Malformed(_))),
            "{bad:?}"
        );
    }
    let mut long = t.to_bytes();
    long.push(0);
    assert!(matches!(
        Token::from_bytes(&long),
        Err(TokenError::Malformed(_))
    ));
    // Every message is different.
    let msgs = [
        TokenError::Malformed("x".into()).to_string(),
        TokenError::UnknownVersion(2).to_string(),
        TokenError::BadSignature { block: 0 }.to_string(),
        TokenError::BadProof.to_string(),
        verify(&t, &other, NOW, &NoRevocations)
            .unwrap_err()
            .to_string(),
        verify(&t, &pk, c0.exp, &NoRevocations)
            .unwrap_err()
            .to_string(),
        verify(&t, &pk, 0, &NoRevocations).unwrap_err().to_string(),
    ];
    for (i, a) in msgs.iter().enumerate() {
        for b in &msgs[i + 1..] {
            assert_ne!(a.split(':').next(), b.split(':').next(), "{a} / {b}");
        }
    }
}

#[test]
fn an_expired_parent_expires_the_child() {
    let (t, c0) = minted("strict");
    let mut c1 = Attenuation::default().apply(&c0, NOW).unwrap();
    c1.exp = c0.exp - 100;
    let t1 = t.append(&c1).unwrap();
    let e = verify(
        &t1,
        &root_key().verifying_key(),
        c0.exp - 50,
        &NoRevocations,
    )
    .unwrap_err();
    assert!(matches!(e, TokenError::Expired { block: 1, .. }), "{e:?}");
}

#[test]
fn host_key_is_created_once_private_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert!(matches!(
        HostKey::load(&state),
        Err(TokenError::HostKeyMissing { .. })
    ));
    // Created by racing threads: all agree on one key.
    let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| HostKey::load_or_create(&state).unwrap().public().to_bytes()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
    let k = HostKey::load(&state).unwrap();
    assert_eq!(k.public().to_bytes(), keys[0]);
    let kd = state.join("keys");
    let file = kd.join("host.ed25519");
    assert_eq!(std::fs::metadata(&kd).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&kd).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");

    // A key readable by others is refused, not used.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = HostKey::load(&state).unwrap_err();
    assert!(e.to_string().contains("must be 0600"), "{e}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&kd, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = HostKey::load_or_create(&state).unwrap_err();
    assert!(e.to_string().contains("must be 0700"), "{e}");
}

#[test]
fn public_keys_parse_in_every_form() {
    let pk = root_key().verifying_key();
    let b64 = keys::encode_public_key(&pk);
    assert_eq!(b64.len(), 43);
    assert_eq!(parse_public_key(&b64).unwrap(), pk);
    assert_eq!(parse_public_key(&hex(pk.as_bytes())).unwrap(), pk);
    assert_eq!(parse_public_key(&format!("ed25519:{b64}\n")).unwrap(), pk);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("host.pub");
    std::fs::write(&f, format!("{b64}\n")).unwrap();
    assert_eq!(parse_public_key(f.to_str().unwrap()).unwrap(), pk);
    for bad in ["", "abc", &hex(&[0u8; 31]), "zz"] {
        assert!(
            matches!(parse_public_key(bad), Err(TokenError::BadPublicKey { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn read_paths_are_resolved_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("granted/sub")).unwrap();
    std::fs::create_dir_all(root.join("secret")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("granted/escape")).unwrap();
    let s = |p: &str| root.join(p).to_str().unwrap().to_string();
    let mut parent = policy("strict");
    parent.filesystem.read_only = vec![s("granted")];
    let mut child = parent.clone();
    child.filesystem.read_only = vec![s("granted/sub")];
    read_paths_resolve_within(&child, &parent).unwrap();
    // Lexically under the parent, but the bind would land in "secret".
    child.filesystem.read_only = vec![s("granted/escape/x")];
    let e = read_paths_resolve_within(&child, &parent).unwrap_err();
    assert!(e.to_string().contains("resolves on this host"), "{e}");
    // The link itself is fine: the sandbox recreates it as a link.
    child.filesystem.read_only = vec![s("granted/escape")];
    read_paths_resolve_within(&child, &parent).unwrap();
}

#[test]
fn workspace_must_lie_under_every_blocks_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("c")).unwrap();
    let (t, c0) = minted("strict");
    let c1 = Attenuation {
        write: Some(root.join("a").to_str().unwrap().into()),
        ..Default::default()
    }
    .apply(&c0, NOW)
    .unwrap();
    let v = check(&t.append(&c1).unwrap()).unwrap();
    v.check_workspace(&root.join("a")).unwrap();
    v.check_workspace(&root.join("a/b")).unwrap();
    assert!(matches!(
        v.check_workspace(&root.join("c")),
        Err(TokenError::WorkspaceOutsideRoot { .. })
    ));
    check(&t).unwrap().check_workspace(&root.join("c")).unwrap();
}

#[test]
fn times_format_as_rfc3339() {
    assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
    assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(format_time(1_800_000_000), "2027-01-15T08:00:00Z");
    assert_eq!(format_time(4_102_444_799), "2099-12-31T23:59:59Z");
}

#[test]
fn subjects_and_ttls_are_checked() {
    for bad in ["", "a b", "x/y", &"n".repeat(65)] {
        assert!(
            Claims::from_policy(&policy("strict"), bad, Duration::from_secs(60)).is_err(),
            "{bad:?}"
        );
    }
    assert!(Claims::from_policy(&policy("strict"), "ok", Duration::ZERO).is_err());
    let c =
        Claims::from_policy(&policy("strict"), "agent@x_1.2-3", Duration::from_secs(60)).unwrap();
    assert_eq!(c.exp - c.iat, 60);
    assert!(c.issuer.starts_with("aither@"));
}

#[test]
fn memory_tiers_grants_and_quotas_only_narrow() {
    let (t, c0) = minted("strict");
    assert!(
        c0.memory_tiers.contains_key("knowledge"),
        "strict grants memory tiers"
    );
    let req = Attenuation {
        mem_drop: vec!["knowledge".into()],
        mem_read_only: vec!["active".into()],
        mem_quota: vec![attenuate::parse_mem_quota("codegraph=1M,10").unwrap()],
        no_memory_grants: true,
        ..Default::default()
    };
    let c1 = req.apply(&c0, NOW).unwrap();
    let t1 = t.append(&c1).unwrap();
    let e = check(&t1).unwrap().effective().clone();
    assert!(!e.memory_tiers.contains_key("knowledge"));
    assert!(!e.memory_tiers["active"].write);
    assert_eq!(e.memory_tiers["codegraph"].quota_bytes, 1 << 20);
    assert_eq!(e.memory_tiers["codegraph"].quota_entries, 10);
    // Back up again: refused, naming the field.
    let wider = Attenuation {
        mem_quota: vec![attenuate::parse_mem_quota("codegraph=2M").unwrap()],
        ..Default::default()
    }
    .apply(&e, NOW)
    .unwrap();
    assert_eq!(
        widening_field(t1.append(&wider)),
        "memory_tiers.codegraph.quota_bytes"
    );
    // A tier the token does not grant cannot be named.
    let none = Attenuation {
        mem_read_only: vec!["knowledge".into()],
        ..Default::default()
    }
    .apply(&e, NOW);
    assert!(none.unwrap_err().to_string().contains("knowledge"));
    assert!(attenuate::parse_mem_quota("codegraph").is_err());
    assert!(attenuate::parse_mem_quota("codegraph=").is_err());
}

/// A one-launch token's claims (`verified_here`, no signature) are exactly what minting and
/// verifying them gives, and the same checks but the signature's refuse them: its time
/// window and the payload's size limit.
#[test]
fn claims_verified_here_are_the_claims_a_verified_token_carries() {
    let c = claims("strict");
    let signed = check(&mint(&root_key(), &c).expect("mint")).expect("verify");
    let here = verified_here(&c, NOW + 1).expect("verified here");
    assert_eq!(here.blocks, signed.blocks);

    let e = verified_here(&c, c.exp).unwrap_err();
    assert!(matches!(e, TokenError::Expired { block: 0, .. }), "{e:?}");
    let e = verified_here(&c, NOW - CLOCK_SKEW_SECS - 1).unwrap_err();
    assert!(
        matches!(e, TokenError::NotYetValid { block: 0, .. }),
        "{e:?}"
    );

    let mut big = claims("strict");
    big.subject = "a".repeat(format::MAX_PAYLOAD);
    let e = verified_here(&big, NOW + 1).unwrap_err();
    assert!(
        matches!(
            e,
            TokenError::BadRequest {
                field: "claims",
                ..
            }
        ),
        "{e:?}"
    );
}

/// A revocation list of one id, for the cache's tests.
struct RevokedId(String);

impl RevocationCheck for RevokedId {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError> {
        Ok((id == self.0).then(|| Revoked {
            id: id.into(),
            at: NOW,
            reason: "test".into(),
        }))
    }
}

/// The verified-token cache gives what `verify` gives, and what can change after a token was
/// verified is checked at every use: a cached token expires, and is refused once revoked.
/// Attenuated tokens are not kept; a forged one is never served from the cache.
#[test]
fn the_verified_cache_rechecks_time_and_revocation_at_every_use() {
    let pk = root_key().verifying_key();
    let cache = VerifiedCache::new(2);
    let (t, c) = minted("strict");
    let text = t.encode();
    let first = cache
        .verify(&text, &pk, NOW + 1, &NoRevocations)
        .expect("verify");
    assert_eq!(cache.len(), 1);
    let again = cache
        .verify(&text, &pk, NOW + 2, &NoRevocations)
        .expect("cached");
    assert_eq!(first.blocks, again.blocks);
    let e = cache.verify(&text, &pk, c.exp, &NoRevocations).unwrap_err();
    assert!(matches!(e, TokenError::Expired { .. }), "{e:?}");
    let e = cache
        .verify(&text, &pk, NOW + 3, &RevokedId(c.id.clone()))
        .unwrap_err();
    assert!(matches!(e, TokenError::Revoked { .. }), "{e:?}");

    // Another key: not the cached entry (the key is part of the digest).
    let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
    let e = cache
        .verify(&text, &other, NOW + 1, &NoRevocations)
        .unwrap_err();
    assert!(matches!(e, TokenError::WrongKey { .. }), "{e:?}");

    // A forged text is verified, and refused, every time.
    let mut forged = t.clone();
    forged.blocks[0].signature[0] ^= 1;
    for _ in 0..2 {
        let e = cache.verify(&forged.encode(), &pk, NOW + 1, &NoRevocations);
        assert!(
            matches!(e, Err(TokenError::BadSignature { block: 0 })),
            "{e:?}"
        );
    }

    // Attenuated: verified, not kept.
    let child = Attenuation {
        pids: Some(16),
        ..Default::default()
    }
    .apply(&c, NOW)
    .expect("attenuate");
    let t2 = t.append(&child).expect("append");
    cache
        .verify(&t2.encode(), &pk, NOW + 1, &NoRevocations)
        .expect("verify");
    assert_eq!(cache.len(), 1);

    // Bounded: a full cache drops what expired, then everything.
    for _ in 0..3 {
        let (t, _) = minted("strict");
        cache
            .verify(&t.encode(), &pk, NOW + 1, &NoRevocations)
            .expect("verify");
        assert!(cache.len() <= 2);
    }
}
