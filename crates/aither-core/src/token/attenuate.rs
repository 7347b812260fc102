//! A holder's request to narrow a token ("64M of memory, 16 pids, only /usr") turned into the
//! claims of a new block. Whether the result really narrows is decided by
//! [`narrows`](super::narrows) when the block is appended, and again at every verification.

use std::time::Duration;

use super::claims::{clean_absolute, Claims};
use super::{new_id, TokenError};
use crate::policy::NetworkMode;
use crate::units::{HumanDuration, Size};

/// What to narrow; `None` / empty keeps the parent's value.
#[derive(Clone, Debug, Default)]
pub struct Attenuation {
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// A layered workspace's disk quota (`resources.workspace_disk`): set where the parent
    /// has none, lowered where it has one.
    pub workspace_disk: Option<Size>,
    pub net: Option<NetworkMode>,
    /// Replaces the read-only paths; each must lie under one of the parent's.
    pub read: Vec<String>,
    /// The workspace must be this directory or below it (`workspace_root`).
    pub write: Option<String>,
    /// The new block expires this long after `now` (at most the parent's expiry).
    pub ttl: Option<Duration>,
    /// Wall-clock limit of the agent.
    pub timeout: Option<Duration>,
    /// Memory tiers to take away entirely.
    pub mem_drop: Vec<String>,
    /// Memory tiers made read-only.
    pub mem_read_only: Vec<String>,
    /// Lower quotas of a tier: (tier, bytes, entries); `None` keeps the parent's.
    pub mem_quota: Vec<(String, Option<Size>, Option<u64>)>,
    /// Take away every grant to read other agents' memory.
    pub no_memory_grants: bool,
    /// Egress grants to take away (docs/network.md): `egress[N]` (the parent's rule N),
    /// `service:NAME`, `route:NAME`, or `all`.
    pub net_drop: Vec<String>,
}

/// Parses `TIER=SIZE[,ENTRIES]` (`--mem-quota knowledge=8M,1000`; either side may be empty).
pub fn parse_mem_quota(s: &str) -> Result<(String, Option<Size>, Option<u64>), String> {
    let (tier, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TIER=SIZE[,ENTRIES], e.g. knowledge=8M,1000"))?;
    let (size, entries) = rest.split_once(',').unwrap_or((rest, ""));
    let size = (!size.is_empty())
        .then(|| crate::units::parse_size(size).map_err(|e| e.to_string()))
        .transpose()?;
    let entries = (!entries.is_empty())
        .then(|| {
            entries
                .parse::<u64>()
                .map_err(|e| format!("{entries:?}: {e}"))
        })
        .transpose()?;
    if size.is_none() && entries.is_none() {
        return Err(format!("{s:?}: give a size, a number of entries or both"));
    }
    Ok((tier.to_string(), size, entries))
}

fn bad(field: &'static str, reason: impl Into<String>) -> TokenError {
    TokenError::BadRequest {
        field,
        reason: reason.into(),
    }
}

impl Attenuation {
    /// The child claims: the parent's, with a new id, issued at `now`, and the requested
    /// values. Values that no sandbox could run with are refused here; values wider than the
    /// parent's are refused by the narrowing check when the block is appended.
    pub fn apply(&self, parent: &Claims, now: u64) -> Result<Claims, TokenError> {
        let mut c = parent.clone();
        c.id = new_id()?;
        c.iat = now;
        let r = &mut c.rules;
        if let Some(m) = self.memory {
            if m.0 < (8 << 20) {
                return Err(bad("memory", "must be at least 8M"));
            }
            r.resources.memory = m;
        }
        if let Some(n) = self.cpus {
            if !(n.is_finite() && n >= 0.01) {
                return Err(bad("cpus", "must be at least 0.01"));
            }
            r.resources.cpus = n;
        }
        if let Some(n) = self.pids {
            if n < 2 {
                return Err(bad("pids", "must be at least 2 (the reaper and the agent)"));
            }
            r.resources.pids = n;
        }
        if let Some(d) = self.workspace_disk {
            use crate::sandbox::layer::{MAX_QUOTA, MIN_QUOTA};
            if !(MIN_QUOTA..=MAX_QUOTA).contains(&d.0) {
                return Err(bad("workspace_disk", "must be between 8M and 16T"));
            }
            r.resources.workspace_disk = Some(d);
        }
        if let Some(mode) = self.net {
            r.network.mode = mode;
            if mode != NetworkMode::Host {
                // Anything but the host network needs its own network namespace.
                r.namespaces.net = true;
            }
        }
        if !self.read.is_empty() {
            let mut paths: Vec<String> = Vec::new();
            for p in &self.read {
                if clean_absolute(p).is_none() || p.len() > 4096 {
                    return Err(bad(
                        "read",
                        format!("{p:?}: paths must be absolute, without '.' or '..'"),
                    ));
                }
                let p = p.trim_end_matches('/');
                let p = if p.is_empty() { "/" } else { p };
                if !paths.iter().any(|q| q == p) {
                    paths.push(p.to_string());
                }
            }
            r.filesystem.read_only = paths;
        }
        if let Some(w) = &self.write {
            if clean_absolute(w).is_none() || w.len() > 4096 {
                return Err(bad(
                    "write",
                    format!("{w:?}: the workspace root must be absolute, without '.' or '..'"),
                ));
            }
            c.workspace_root = Some(w.trim_end_matches('/').to_string()).filter(|s| !s.is_empty());
            if c.workspace_root.is_none() {
                c.workspace_root = Some("/".into());
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(bad("timeout", "must be more than 0"));
            }
            c.rules.process.timeout = Some(HumanDuration(t));
        }
        for tier in &self.mem_drop {
            if c.memory_tiers.remove(tier).is_none() {
                return Err(bad(
                    "mem_drop",
                    format!("the token grants no tier {tier:?}"),
                ));
            }
        }
        for tier in &self.mem_read_only {
            let t = c.memory_tiers.get_mut(tier).ok_or_else(|| {
                bad(
                    "mem_read_only",
                    format!("the token grants no tier {tier:?}"),
                )
            })?;
            t.write = false;
        }
        for (tier, bytes, entries) in &self.mem_quota {
            let t = c
                .memory_tiers
                .get_mut(tier)
                .ok_or_else(|| bad("mem_quota", format!("the token grants no tier {tier:?}")))?;
            if let Some(b) = bytes {
                t.quota_bytes = b.0;
            }
            if let Some(n) = entries {
                t.quota_entries = *n;
            }
        }
        if self.no_memory_grants {
            c.memory_grants.clear();
        }
        let mut drop_rules: Vec<usize> = Vec::new();
        for d in &self.net_drop {
            let n = &mut c.net;
            if d == "all" {
                n.egress.clear();
                n.services.clear();
                n.routes.clear();
            } else if let Some(name) = d.strip_prefix("service:") {
                n.services.retain(|s| s.name != name);
            } else if let Some(name) = d.strip_prefix("route:") {
                n.routes.retain(|r| r.name != name);
            } else if let Some(i) = d
                .strip_prefix("egress[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < parent.net.egress.len())
            {
                drop_rules.push(i);
            } else {
                return Err(bad(
                    "net_drop",
                    format!(
                        "{d:?}: expected egress[N] (N < {}), service:NAME, route:NAME or all",
                        parent.net.egress.len()
                    ),
                ));
            }
        }
        // Indices name the parent's rules: removed from the highest down.
        drop_rules.sort_unstable();
        drop_rules.dedup();
        for i in drop_rules.into_iter().rev() {
            if i < c.net.egress.len() {
                c.net.egress.remove(i);
            }
        }
        if let Some(t) = self.ttl {
            if t.as_secs() == 0 {
                return Err(bad("ttl", "must be at least 1s"));
            }
            c.exp = now
                .checked_add(t.as_secs())
                .ok_or_else(|| bad("ttl", "too long"))?;
        }
        Ok(c)
    }
}
