//! Claims: what one block of a token grants, and the mechanical check that a child block only
//! narrows its parent.
//!
//! The sandbox rules are the [`Policy`] value itself (`rules`), so that a sandbox is rebuilt
//! from the claims with [`Claims::to_policy`] and derived exactly as from a policy file. The
//! fields for later stages (GPU, bus, memory tiers, delegation) default to granting nothing.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{new_id, now_unix, TokenError};
use crate::policy::{
    Filesystem, LandlockPolicy, Namespaces, Network, Policy, Process, Resources, Rlimits,
    SeccompPolicy,
};

/// Longest lifetime a token may be minted with (ten years).
pub const MAX_TTL_SECS: u64 = 10 * 365 * 86_400;

/// GPU access: how many devices, how much memory on each, the scheduling class, exclusive.
pub type GpuClaim = crate::policy::GpuGrant;

/// Event-bus topics the agent may publish to and subscribe to (NATS-style patterns).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BusClaim {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Access to one memory tier of the agent's own memory.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TierClaim {
    pub read: bool,
    pub write: bool,
    pub quota_bytes: u64,
    /// Entries the agent may hold in the tier. Added with the memory service: a claim written
    /// before it has none, and 0 (no entry at all) is the narrowest value, so the default
    /// cannot widen an old token.
    #[serde(default)]
    pub quota_entries: u64,
}

/// Read access to a tier of another agent's memory (`mem.get`/`mem.search` with `owner`).
/// A grant never gives write access to another agent's memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct MemoryGrant {
    /// The agent whose memory may be read.
    pub owner: String,
    /// The tier (working, active, spirit, codegraph, knowledge).
    pub tier: String,
}

/// The claims of one block. Every field is required in the signed payload: a block cannot
/// leave a field out and fall back to a default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Random 128-bit id in hex; block 0's id is the token id.
    pub id: String,
    /// The agent's name.
    pub subject: String,
    /// Who minted the token: "aither@<hostname>".
    pub issuer: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds (the token is valid while now < exp).
    pub exp: u64,
    /// The policy the claims were minted from (informational; the rules are in `rules`).
    pub policy: String,
    /// The sandbox rules.
    pub rules: Policy,
    /// The workspace must be this directory or below it; None: any directory. (Required in
    /// the payload: serde would otherwise read a missing Option as None, the widest value.)
    #[serde(deserialize_with = "Option::deserialize")]
    pub workspace_root: Option<String>,
    pub gpu: GpuClaim,
    pub bus: BusClaim,
    /// Memory tier name (working, active, spirit, codegraph, knowledge) → access.
    pub memory_tiers: BTreeMap<String, TierClaim>,
    /// Read access to other agents' memory tiers. The one field that may be missing from a
    /// payload (tokens minted before the memory service lack it): its default, no grant at
    /// all, is the narrowest value, so a block cannot widen itself by leaving it out. Left out
    /// of the payload when empty, so tokens without grants serialise exactly as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_grants: Vec<MemoryGrant>,
    /// Network egress (docs/network.md). May be missing from a payload (tokens minted before
    /// egress): its default grants nothing, the narrowest value; left out when empty, so
    /// tokens without egress serialise exactly as before.
    #[serde(
        default,
        skip_serializing_if = "crate::policy::net_rules::NetGrants::is_default"
    )]
    pub net: crate::policy::net_rules::NetGrants,
    /// Whether the agent may ask for agents of its own (with narrower tokens).
    pub may_spawn: bool,
    /// The host uid the token was minted for (issue 18): a non-admin may spawn with a token
    /// only when block 0 names them. May be missing (tokens minted before owners, and tokens
    /// for root and admins only): None is usable by root and admins alone, the narrowest
    /// reading. Left out of the payload when None, so such tokens serialise as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

impl Claims {
    /// Root claims for `subject` from a policy, issued now by this host, valid for `ttl`.
    pub fn from_policy(
        policy: &Policy,
        subject: &str,
        ttl: Duration,
    ) -> Result<Claims, TokenError> {
        Self::from_policy_at(policy, subject, &default_issuer(), now_unix(), ttl)
    }

    /// Root claims with an explicit issuer and clock (tests, tools).
    pub fn from_policy_at(
        policy: &Policy,
        subject: &str,
        issuer: &str,
        now: u64,
        ttl: Duration,
    ) -> Result<Claims, TokenError> {
        check_subject(subject)?;
        let ttl = ttl.as_secs();
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(TokenError::BadRequest {
                field: "ttl",
                reason: format!("must be between 1s and {}d", MAX_TTL_SECS / 86_400),
            });
        }
        Ok(Claims {
            id: new_id()?,
            subject: subject.to_string(),
            issuer: issuer.to_string(),
            iat: now,
            exp: now + ttl,
            policy: policy.name.clone(),
            rules: policy.clone(),
            workspace_root: None,
            gpu: policy.gpu.clone(),
            bus: BusClaim {
                publish: expand_bus("bus.publish", &policy.bus.publish, subject)?,
                subscribe: expand_bus("bus.subscribe", &policy.bus.subscribe, subject)?,
            },
            memory_tiers: policy
                .memory
                .iter()
                .map(|(tier, t)| {
                    (
                        tier.clone(),
                        TierClaim {
                            read: t.read,
                            write: t.write,
                            quota_bytes: t.quota_bytes.0,
                            quota_entries: t.quota_entries,
                        },
                    )
                })
                .collect(),
            memory_grants: Vec::new(),
            net: policy.net.clone(),
            may_spawn: false,
            owner: None,
        })
    }

    /// The policy the sandbox is derived from.
    pub fn to_policy(&self) -> Policy {
        self.rules.clone()
    }

    /// The canonical payload: compact JSON in field order (maps sorted).
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising plain structs, strings, numbers and BTreeMaps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a payload; unknown and missing fields are errors.
    pub fn from_payload(payload: &[u8]) -> Result<Claims, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// A policy's bus patterns with `$self` replaced by the agent's name. A name that is not one
/// subject token (token subjects may contain '.') cannot stand for `$self`: those patterns
/// grant nothing for it (never a wider or another agent's subject).
fn expand_bus(field: &'static str, v: &[String], subject: &str) -> Result<Vec<String>, TokenError> {
    use crate::policy::bus_subject::{expand_self, SELF_TOKEN};
    let mut out = Vec::new();
    for p in v {
        match expand_self(field, p, subject) {
            Ok(x) => out.push(x),
            Err(_) if p.split('.').any(|t| t == SELF_TOKEN) => {}
            Err(e) => {
                return Err(TokenError::BadRequest {
                    field,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

impl Claims {
    /// Adds bus subjects to a root token being minted (an operator's grant on top of the
    /// policy's template, `aitherctl spawn --bus-publish/--bus-subscribe`): `$self` is the
    /// subject, every pattern is checked, duplicates are dropped.
    pub fn grant_bus(
        &mut self,
        publish: &[String],
        subscribe: &[String],
    ) -> Result<(), TokenError> {
        for (field, extra, into) in [
            ("bus.publish", publish, &mut self.bus.publish),
            ("bus.subscribe", subscribe, &mut self.bus.subscribe),
        ] {
            for p in expand_bus(field, extra, &self.subject)? {
                if !into.contains(&p) {
                    into.push(p);
                }
            }
        }
        Ok(())
    }
}

/// "aither@<hostname>".
pub fn default_issuer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "aither@{}",
        if host.is_empty() { "localhost" } else { &host }
    )
}

/// Subjects are agent names: 1 to 64 of letters, digits, '.', '_', '-', '@'.
pub fn check_subject(s: &str) -> Result<(), TokenError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadRequest {
            field: "subject",
            reason: format!("{s:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"),
        })
    }
}

/// An enum value as policies spell it ("read-write", "loopback").
pub fn kebab<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn widen(field: impl Into<String>, detail: impl Into<String>) -> TokenError {
    TokenError::Widening {
        block: 0,
        field: field.into(),
        detail: detail.into(),
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    field: &str,
    child: &T,
    parent: &T,
) -> Result<(), TokenError> {
    if child == parent {
        Ok(())
    } else {
        Err(widen(
            field,
            format!("{child:?} differs from the parent's {parent:?} (this field cannot change)"),
        ))
    }
}

/// `child <= parent`; a NaN never passes.
fn at_most<T: PartialOrd + Display>(field: &str, child: T, parent: T) -> Result<(), TokenError> {
    if child <= parent {
        Ok(())
    } else {
        Err(widen(
            field,
            format!("{child} exceeds the parent's {parent}"),
        ))
    }
}

/// Optional limits where None means unlimited (the widest).
fn at_most_opt<T: PartialOrd + Display>(
    field: &str,
    child: Option<T>,
    parent: Option<T>,
) -> Result<(), TokenError> {
    match (child, parent) {
        (_, None) => Ok(()),
        (None, Some(p)) => Err(widen(field, format!("unlimited exceeds the parent's {p}"))),
        (Some(c), Some(p)) => at_most(field, c, p),
    }
}

/// A permission the child may hold only if the parent holds it.
fn only_if(field: &str, child: bool, parent: bool) -> Result<(), TokenError> {
    if !child || parent {
        Ok(())
    } else {
        Err(widen(field, "true where the parent has false"))
    }
}

/// A protection the child must keep if the parent has it.
fn kept(field: &str, child: bool, parent: bool) -> Result<(), TokenError> {
    if child || !parent {
        Ok(())
    } else {
        Err(widen(field, "turned off where the parent has it on"))
    }
}

fn subset<T: PartialEq + std::fmt::Debug>(
    field: &str,
    child: &[T],
    parent: &[T],
) -> Result<(), TokenError> {
    match child.iter().find(|c| !parent.contains(c)) {
        None => Ok(()),
        Some(c) => Err(widen(field, format!("{c:?} is not granted by the parent"))),
    }
}

/// Every child bus pattern must be valid and lie inside one of the parent's patterns (every
/// subject it matches is matched by the parent's pattern).
fn patterns_within(field: &str, child: &[String], parent: &[String]) -> Result<(), TokenError> {
    use crate::policy::bus_subject::Pattern;
    let parents: Vec<Pattern> = parent
        .iter()
        .filter_map(|p| Pattern::parse("pattern", p).ok())
        .collect();
    for c in child {
        let cp = Pattern::parse("pattern", c).map_err(|e| widen(field, e.to_string()))?;
        if !parents.iter().any(|p| p.contains(&cp)) {
            return Err(widen(
                field,
                format!("{c:?} is not inside any of the parent's patterns {parent:?}"),
            ));
        }
    }
    Ok(())
}

/// An absolute path without '..' or '.' components and without NUL, as a `Path`.
pub fn clean_absolute(p: &str) -> Option<&Path> {
    let path = Path::new(p);
    let ok = p.starts_with('/')
        && !p.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.split('/').any(|c| c == "." || c == "..");
    ok.then_some(path)
}

/// Whether `child` is `parent` or lies below it, compared component by component.
pub fn path_under(child: &str, parent: &str) -> bool {
    match (clean_absolute(child), clean_absolute(parent)) {
        (Some(c), Some(p)) => c.starts_with(p),
        _ => false,
    }
}

/// Every child path must lie at or under one of the parent's paths.
fn paths_under(field: &str, child: &[String], parent: &[String]) -> Result<(), TokenError> {
    for c in child {
        if clean_absolute(c).is_none() {
            return Err(widen(
                field,
                format!("{c:?} is not an absolute path without '.' or '..'"),
            ));
        }
        if !parent.iter().any(|p| path_under(c, p)) {
            return Err(widen(
                field,
                format!("{c:?} is not at or under any of the parent's {parent:?}"),
            ));
        }
    }
    Ok(())
}

/// Checks, field by field, that `child` grants nothing that `parent` does not. The error names
/// the first field that widens (`Widening.block` is 0 here; the chain sets the real index).
pub fn narrows(child: &Claims, parent: &Claims) -> Result<(), TokenError> {
    // Destructured without `..`: a field added to Claims or Policy does not compile until its
    // narrowing rule is written here.
    let Claims {
        id: _,
        subject,
        issuer,
        iat: _,
        exp,
        policy,
        rules,
        workspace_root,
        gpu,
        bus,
        memory_tiers,
        memory_grants,
        net,
        may_spawn,
        owner,
    } = child;
    same("owner", owner, &parent.owner)?;
    same("subject", subject, &parent.subject)?;
    same("issuer", issuer, &parent.issuer)?;
    same("policy", policy, &parent.policy)?;
    at_most("exp", *exp, parent.exp)?;
    rules_narrow(rules, &parent.rules)?;
    match (workspace_root, &parent.workspace_root) {
        (_, None) => {}
        (None, Some(p)) => {
            return Err(widen(
                "workspace_root",
                format!("any directory is wider than the parent's {p:?}"),
            ))
        }
        (Some(c), Some(p)) => {
            if !path_under(c, p) {
                return Err(widen(
                    "workspace_root",
                    format!("{c:?} is not at or under the parent's {p:?}"),
                ));
            }
        }
    }
    if let Some(c) = workspace_root {
        if clean_absolute(c).is_none() {
            return Err(widen(
                "workspace_root",
                format!("{c:?} is not an absolute path without '.' or '..'"),
            ));
        }
    }
    let GpuClaim {
        count,
        vram_mb,
        priority,
        exclusive,
        mig_profile,
    } = gpu;
    // A MIG instance is part of a GPU: a whole-GPU claim may narrow to one, a MIG claim may
    // not widen to whole GPUs or change profile.
    if let Some(p) = &parent.gpu.mig_profile {
        if mig_profile.as_ref() != Some(p) {
            return Err(widen(
                "gpu.mig_profile",
                format!(
                    "{} where the parent grants MIG instances of {p}",
                    mig_profile
                        .as_ref()
                        .map(|m| format!("MIG instances of {m}"))
                        .unwrap_or_else(|| "whole GPUs".into())
                ),
            ));
        }
    }
    if *exclusive && !parent.gpu.exclusive {
        return Err(widen(
            "gpu.exclusive",
            "whole devices where the parent grants shared ones",
        ));
    }
    at_most("gpu.count", *count, parent.gpu.count)?;
    at_most("gpu.vram_mb", *vram_mb, parent.gpu.vram_mb)?;
    at_most("gpu.priority", *priority, parent.gpu.priority)?;
    let BusClaim { publish, subscribe } = bus;
    patterns_within("bus.publish", publish, &parent.bus.publish)?;
    patterns_within("bus.subscribe", subscribe, &parent.bus.subscribe)?;
    for (tier, c) in memory_tiers {
        let Some(p) = parent.memory_tiers.get(tier) else {
            return Err(widen(
                format!("memory_tiers.{tier}"),
                "tier not granted by the parent",
            ));
        };
        let TierClaim {
            read,
            write,
            quota_bytes,
            quota_entries,
        } = c;
        only_if(&format!("memory_tiers.{tier}.read"), *read, p.read)?;
        only_if(&format!("memory_tiers.{tier}.write"), *write, p.write)?;
        at_most(
            &format!("memory_tiers.{tier}.quota_bytes"),
            *quota_bytes,
            p.quota_bytes,
        )?;
        at_most(
            &format!("memory_tiers.{tier}.quota_entries"),
            *quota_entries,
            p.quota_entries,
        )?;
    }
    subset("memory_grants", memory_grants, &parent.memory_grants)?;
    net.narrows(&parent.net).map_err(|e| match e {
        crate::policy::net_rules::RuleError::Widening { field, detail }
        | crate::policy::net_rules::RuleError::Invalid {
            field,
            reason: detail,
        } => widen(field, detail),
    })?;
    only_if("may_spawn", *may_spawn, parent.may_spawn)
}

/// `rules.network`: the mode at most the parent's, and publishing on the host only where the
/// parent allows it.
fn network_narrows(child: &Network, parent: &Network) -> Result<(), TokenError> {
    let Network { mode, publish_host } = child;
    if *publish_host && !parent.publish_host {
        return Err(widen(
            "rules.network.publish_host",
            "true where the parent forbids publishing on the host",
        ));
    }
    if mode > &parent.mode {
        return Err(widen(
            "rules.network.mode",
            format!(
                "{} exceeds the parent's {}",
                kebab(mode),
                kebab(&parent.mode)
            ),
        ));
    }
    Ok(())
}

/// The sandbox rules: every field of the child `Policy` within the parent's.
fn rules_narrow(child: &Policy, parent: &Policy) -> Result<(), TokenError> {
    let Policy {
        name,
        description,
        warning,
        best_effort,
        compensated,
        namespaces,
        filesystem,
        network,
        landlock,
        seccomp,
        resources,
        rlimits,
        process,
        pain,
        bus,
        memory,
        gpu,
        net: net_template,
    } = child;
    same("rules.name", name, &parent.name)?;
    // The policy's GPU grant as minted; what the token grants is `gpu` (narrowed above).
    same("rules.gpu", gpu, &parent.gpu)?;
    // What the supervisor does on pain is the host's choice, not the holder's.
    same("rules.pain", pain, &parent.pain)?;
    // The policy's bus template; what the token grants is `bus` (narrowed above).
    same("rules.bus", bus, &parent.bus)?;
    // The policy's memory defaults are a record of what was minted; access is `memory_tiers`,
    // which narrows on its own.
    same("rules.memory", memory, &parent.memory)?;
    // The policy's egress template; what the token grants is `net` (narrowed above).
    same("rules.net", net_template, &parent.net)?;
    same("rules.description", description, &parent.description)?;
    same("rules.warning", warning, &parent.warning)?;
    subset("rules.best_effort", best_effort, &parent.best_effort)?;
    // A stand-in accepts less than the protection itself: a child may drop one, never add one.
    let child_comp: Vec<_> = compensated.iter().collect();
    let parent_comp: Vec<_> = parent.compensated.iter().collect();
    subset("rules.compensated", &child_comp, &parent_comp)?;

    let Namespaces {
        net,
        ipc,
        uts,
        cgroup,
    } = namespaces;
    let pn = &parent.namespaces;
    kept("rules.namespaces.net", *net, pn.net)?;
    kept("rules.namespaces.ipc", *ipc, pn.ipc)?;
    kept("rules.namespaces.uts", *uts, pn.uts)?;
    kept("rules.namespaces.cgroup", *cgroup, pn.cgroup)?;

    let Filesystem {
        read_only,
        etc,
        workspace,
        exec_workspace,
        workspace_git,
        tmp_size,
        dev_shm_size,
    } = filesystem;
    let pf = &parent.filesystem;
    paths_under("rules.filesystem.read_only", read_only, &pf.read_only)?;
    subset("rules.filesystem.etc", etc, &pf.etc)?;
    if workspace > &pf.workspace {
        return Err(widen(
            "rules.filesystem.workspace",
            format!(
                "{} exceeds the parent's {}",
                kebab(workspace),
                kebab(&pf.workspace)
            ),
        ));
    }
    only_if(
        "rules.filesystem.exec_workspace",
        *exec_workspace,
        pf.exec_workspace,
    )?;
    if workspace_git > &pf.workspace_git {
        return Err(widen(
            "rules.filesystem.workspace_git",
            format!(
                "{} exceeds the parent's {}",
                kebab(workspace_git),
                kebab(&pf.workspace_git)
            ),
        ));
    }
    at_most("rules.filesystem.tmp_size", *tmp_size, pf.tmp_size)?;
    at_most(
        "rules.filesystem.dev_shm_size",
        *dev_shm_size,
        pf.dev_shm_size,
    )?;

    network_narrows(network, &parent.network)?;
    let LandlockPolicy { enabled } = landlock;
    kept("rules.landlock.enabled", *enabled, parent.landlock.enabled)?;
    let SeccompPolicy { profile } = seccomp;
    let pp = &parent.seccomp.profile;
    if profile != pp && !(profile == "agent" && pp == "none") {
        return Err(widen(
            "rules.seccomp.profile",
            format!(
                "{profile:?} is not the parent's {pp:?} (only \"none\" may narrow to \"agent\")"
            ),
        ));
    }

    let Resources {
        memory,
        swap,
        cpus,
        pids,
        workspace_disk,
    } = resources;
    let pr = &parent.resources;
    at_most("rules.resources.memory", *memory, pr.memory)?;
    at_most_opt("rules.resources.swap", *swap, pr.swap)?;
    at_most("rules.resources.cpus", *cpus, pr.cpus)?;
    at_most("rules.resources.pids", *pids, pr.pids)?;
    at_most_opt(
        "rules.resources.workspace_disk",
        *workspace_disk,
        pr.workspace_disk,
    )?;

    let Rlimits {
        nofile,
        core,
        nproc,
        fsize,
    } = rlimits;
    let pl = &parent.rlimits;
    at_most("rules.rlimits.nofile", *nofile, pl.nofile)?;
    at_most("rules.rlimits.core", *core, pl.core)?;
    at_most_opt("rules.rlimits.nproc", *nproc, pl.nproc)?;
    at_most_opt("rules.rlimits.fsize", *fsize, pl.fsize)?;

    let Process {
        uid,
        gid,
        hostname,
        timeout,
        env,
        pass_env,
    } = process;
    let pp = &parent.process;
    same("rules.process.uid", uid, &pp.uid)?;
    same("rules.process.gid", gid, &pp.gid)?;
    same("rules.process.hostname", hostname, &pp.hostname)?;
    at_most_opt("rules.process.timeout", *timeout, pp.timeout)?;
    same("rules.process.env", env, &pp.env)?;
    same("rules.process.pass_env", pass_env, &pp.pass_env)
}

/// Where a read-only entry lands on this host: its parent directory resolved (symbolic links
/// followed), then its own name (the sandbox recreates a final symlink as a link). None when
/// the parent directory does not exist here (the sandbox skips absent entries).
fn resolve_on_host(p: &str) -> Option<PathBuf> {
    let path = clean_absolute(p)?;
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|d| d.join(name)),
        _ => Some(PathBuf::from("/")),
    }
}

/// The host-side half of the read_only rule: a child entry that is not one of the parent's
/// must also *resolve* on this host to a place at or under one of the parent's entries, so
/// that a symbolic link inside a granted tree cannot carry a bind mount outside it.
pub(crate) fn read_paths_resolve_within(child: &Policy, parent: &Policy) -> Result<(), TokenError> {
    let pf = &parent.filesystem.read_only;
    // Resolved lazily: most blocks keep their parent's paths and need no system call.
    let mut parents: Option<Vec<PathBuf>> = None;
    for c in &child.filesystem.read_only {
        if pf.contains(c) {
            continue;
        }
        let Some(at) = resolve_on_host(c) else {
            continue;
        };
        let resolved =
            parents.get_or_insert_with(|| pf.iter().filter_map(|p| resolve_on_host(p)).collect());
        if !resolved.iter().any(|p| at.starts_with(p)) {
            return Err(widen(
                "rules.filesystem.read_only",
                format!(
                    "{c:?} resolves on this host to {}, which is not at or under any of the parent's {pf:?}",
                    at.display(),
                ),
            ));
        }
    }
    Ok(())
}

/// The fields that differ between two blocks, as (field, parent value, child value), for
/// display. Ids and issue times are left out (they always differ).
pub fn changes(parent: &Claims, child: &Claims) -> Vec<(String, String, String)> {
    let (Ok(p), Ok(c)) = (serde_json::to_value(parent), serde_json::to_value(child)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    diff_values("", &p, &c, &mut out);
    out.retain(|(f, _, _)| f != "id" && f != "iat");
    out
}

fn diff_values(
    prefix: &str,
    p: &serde_json::Value,
    c: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    if let (Value::Object(pm), Value::Object(cm)) = (p, c) {
        let mut keys: Vec<&String> = pm.keys().chain(cm.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let f = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            diff_values(
                &f,
                pm.get(k).unwrap_or(&Value::Null),
                cm.get(k).unwrap_or(&Value::Null),
                out,
            );
        }
    } else if p != c {
        out.push((prefix.to_string(), p.to_string(), c.to_string()));
    }
}
