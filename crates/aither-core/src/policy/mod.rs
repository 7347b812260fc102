//! Policies: TOML templates of what an agent may touch (`policies/*.toml`).
//!
//! A policy is parsed and validated with no side effects. Every error names the file, the line,
//! the column and the field. See docs/policies.md for the format.

mod builtin;
pub mod bus_subject;
pub mod extends;
pub mod locate;
pub mod net_rules;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{HumanDuration, Size};

pub use builtin::BUILTIN_POLICIES;
pub use extends::Parent;

/// Errors of loading or validating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {name:?} not found (looked in: {searched}); `aitherctl policy ls` lists the installed ones")]
    NotFound { name: String, searched: String },
    #[error("cannot read policy file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: field `{field}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    /// More than one error in one policy: each `Invalid` on its own line, in file order.
    #[error("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several { errors: Vec<PolicyError> },
}

impl PolicyError {
    /// `Ok` for none, the error itself for one, `Several` (sorted by line and column) for more.
    fn from_list(mut errors: Vec<PolicyError>) -> Result<(), PolicyError> {
        let pos = |e: &PolicyError| match e {
            PolicyError::Invalid { line, column, .. } => (*line, *column),
            _ => (0, 0),
        };
        errors.sort_by_key(pos);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(PolicyError::Several { errors }),
        }
    }
}

/// Which filesystem access the agent gets to its workspace.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceAccess {
    /// No workspace is mounted at all.
    None,
    ReadOnly,
    /// The directory is the read-only lower layer of an overlay; the agent writes into an
    /// upper layer of its own under the state directory, which reaches the directory only
    /// through `aitherctl apply` (docs/workspaces.md). Between read-only and read-write: a
    /// token may narrow read-write to it, never widen it.
    Layered,
    ReadWrite,
}

/// What the agent may do to the git files of its workspace that name commands the host runs
/// (`.git/config`, `.git/hooks`, …; docs/security-model.md, "The host side").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceGit {
    /// `.git` is pinned (cannot be renamed or removed) and its config, hooks, info, modules,
    /// worktrees, commondir and config.worktree are read-only binds; objects, refs and the index stay
    /// writable, so `git commit` works. The default: a policy that says nothing gets this.
    #[default]
    ReadOnly,
    /// `.git` is like any other workspace directory.
    Writable,
}

/// Network exposure, from least to most.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// Own network namespace with loopback up; Landlock denies every TCP bind and connect.
    None,
    /// Own network namespace; TCP on its private loopback is allowed.
    Loopback,
    /// The host's network namespace (permissive only).
    Host,
}

/// A protection that a policy may mark as best-effort: missing on this host, it is skipped
/// (and reported) instead of refusing to start.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Landlock filesystem rules.
    Landlock,
    /// Landlock TCP bind/connect rules (ABI >= 4).
    LandlockNet,
    /// Landlock abstract-socket and signal scoping (ABI >= 6).
    LandlockScope,
    /// Landlock ioctl control on device files (ABI >= 5).
    LandlockIoctl,
    CgroupMemory,
    CgroupCpu,
    CgroupPids,
    /// "No swap": needs memory.swap.max (v2) or memory.memsw.* (v1) when the host has swap.
    CgroupSwap,
    /// Device access rules for GPU leases: the v1 devices controller and, where a cgroup2
    /// hierarchy exists, a BPF device program.
    CgroupDevices,
}

impl Protection {
    /// The defence map (docs/security-model.md): the layers that stop the threats this
    /// protection stops, and may stand in for it on a kernel without it. Empty: never
    /// compensated (cgroup limits, like namespaces, seccomp, capabilities and no_new_privs,
    /// which are not `Protection`s at all because nothing may replace them).
    pub fn stand_ins(self) -> &'static [Layer] {
        match self {
            // Below ABI 3: every path outside the view is absent, and everything in it but the
            // workspace, /tmp and /dev/shm is a read-only, nosuid bind on a tmpfs root.
            Protection::Landlock => &[Layer::ReadOnlyView],
            // Below ABI 4: the private network namespace has only loopback, so no TCP
            // connection leaves the sandbox; its own loopback stays usable.
            Protection::LandlockNet => &[Layer::NetNamespace],
            // Below ABI 6: abstract unix sockets are per network namespace; signals reach only
            // processes the pid namespace shows.
            Protection::LandlockScope => &[Layer::NetNamespace, Layer::PidNamespace],
            // Below ABI 5: the view's /dev holds only null, zero, full, random, urandom, tty and
            // the sandbox's own devpts; the agent's terminal is its own pty; seccomp refuses
            // TIOCSTI and TIOCLINUX.
            Protection::LandlockIoctl => &[Layer::MinimalDev, Layer::OwnPty, Layer::SeccompIoctl],
            Protection::CgroupMemory
            | Protection::CgroupCpu
            | Protection::CgroupPids
            | Protection::CgroupSwap
            | Protection::CgroupDevices => &[],
        }
    }
}

/// An always-enforced layer that can stand in for a [`Protection`] the kernel lacks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// The mount view: tmpfs root, host paths absent unless listed, read-only nosuid binds.
    ReadOnlyView,
    /// The sandbox's own network namespace with loopback only.
    NetNamespace,
    /// The sandbox's own pid namespace.
    PidNamespace,
    /// The curated /dev (no host device but the harmless character devices).
    MinimalDev,
    /// The agent's own pty (the caller's terminal never crosses in).
    OwnPty,
    /// The seccomp allowlist's ioctl argument filters (TIOCSTI, TIOCLINUX).
    SeccompIoctl,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Namespaces {
    #[serde(default = "yes")]
    pub net: bool,
    #[serde(default = "yes")]
    pub ipc: bool,
    #[serde(default = "yes")]
    pub uts: bool,
    #[serde(default = "yes")]
    pub cgroup: bool,
}

fn yes() -> bool {
    true
}

impl Default for Namespaces {
    fn default() -> Self {
        Namespaces {
            net: true,
            ipc: true,
            uts: true,
            cgroup: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Filesystem {
    /// Host paths bound read-only at the same place (symbolic links are recreated as links).
    #[serde(default)]
    pub read_only: Vec<String>,
    /// Entries of the host's /etc copied into the sandbox's curated /etc.
    #[serde(default)]
    pub etc: Vec<String>,
    pub workspace: WorkspaceAccess,
    /// Whether programs in the workspace and /tmp may be executed (compilers, test binaries).
    #[serde(default = "yes")]
    pub exec_workspace: bool,
    /// The workspace's git files that name host commands: read-only (default) or writable.
    #[serde(default)]
    pub workspace_git: WorkspaceGit,
    pub tmp_size: Size,
    pub dev_shm_size: Size,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub mode: NetworkMode,
    /// Whether `aitherctl spawn --publish-host` may publish the agent's ports on the host's
    /// loopback (docs/network.md): inbound only, chosen by whoever spawns. Default true;
    /// `false` refuses such a spawn. Left out of a token's payload when true, so tokens
    /// minted before it verify and mean what they meant.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub publish_host: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LandlockPolicy {
    pub enabled: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SeccompPolicy {
    /// A built-in profile ("agent") or "none" (permissive only).
    pub profile: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub memory: Size,
    #[serde(default)]
    pub swap: Option<Size>,
    pub cpus: f64,
    pub pids: u64,
    /// A layered workspace's upper layer holds at most this much (an ext4 image of this size,
    /// docs/workspaces.md "Disk quota"); absent: no quota (the state directory's filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_disk: Option<Size>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub nofile: u64,
    #[serde(default)]
    pub core: u64,
    #[serde(default)]
    pub nproc: Option<u64>,
    #[serde(default)]
    pub fsize: Option<Size>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// The agent's uid and gid inside the sandbox (never 0: the agent is not root inside).
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// Wall-clock limit; the agent is stopped after it.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// The agent's environment starts empty: these, then `pass_env`, then `--env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables copied from the caller's environment when set (e.g. TERM).
    #[serde(default)]
    pub pass_env: Vec<String>,
}

/// A parsed, validated policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub description: String,
    /// Printed on stderr at every use (e.g. permissive).
    #[serde(default)]
    pub warning: Option<String>,
    #[serde(default)]
    pub best_effort: Vec<Protection>,
    /// Protections that, missing from the kernel, are stood in for by the named layers (each
    /// one exactly its `Protection::stand_ins`). Absent from here and from `best_effort`: the
    /// protection is required, and its absence refuses the run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compensated: BTreeMap<Protection, Vec<Layer>>,
    #[serde(default)]
    pub namespaces: Namespaces,
    pub filesystem: Filesystem,
    pub network: Network,
    pub landlock: LandlockPolicy,
    pub seccomp: SeccompPolicy,
    pub resources: Resources,
    pub rlimits: Rlimits,
    pub process: Process,
    /// What the supervisor (aitherd) does on each pain signal.
    #[serde(default)]
    pub pain: PainPolicy,
    /// Event-bus permissions granted to agents minted from this policy (docs/bus.md).
    #[serde(default)]
    pub bus: BusPolicy,
    /// Memory tier name → access and quotas, copied into a token's `memory_tiers` when it is
    /// minted from this policy (docs/memory.md). Absent: no tier at all (the narrowest value,
    /// so that policies and tokens written before the memory service still decode).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub memory: BTreeMap<String, MemoryTierPolicy>,
    /// `[net]`: egress rules, host services, credential routes and quotas, copied into a
    /// token's `net` claim when it is minted (docs/network.md). Absent: no egress at all.
    #[serde(default, skip_serializing_if = "net_rules::NetGrants::is_default")]
    pub net: net_rules::NetGrants,
    /// `[gpu]`: what agents minted from this policy may ask the MicroScheduler for (copied
    /// into a token's `gpu` claim; docs/gpu.md). Absent: no GPU.
    #[serde(default, skip_serializing_if = "GpuGrant::is_none")]
    pub gpu: GpuGrant,
}

/// GPU access: how many devices, VRAM reserved on each, the priority class, and whether the
/// devices are whole (exclusive) or shared. The same value is a token's `gpu` claim.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GpuGrant {
    pub count: u32,
    pub vram_mb: u64,
    /// Priority class: higher is scheduled first and may preempt strictly lower classes.
    pub priority: u32,
    /// Whole devices. Left out of a token when false, so tokens minted before it still
    /// verify byte for byte; false (shared) is the narrower value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    /// MIG instances of this profile (e.g. `"1g.10gb"`) instead of whole GPUs. Left out of a
    /// token when unset (tokens minted before it verify byte for byte).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
}

impl GpuGrant {
    pub fn is_none(&self) -> bool {
        self.count == 0
    }
}

/// `[bus]`: subject patterns (NATS `*`/`>`) an agent may publish to and subscribe to.
/// `$self` (a whole token) becomes the agent's name when its token is minted. Missing: nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BusPolicy {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The memory tiers (docs/memory.md).
pub const MEMORY_TIERS: &[&str] = &["working", "active", "spirit", "codegraph", "knowledge"];

/// One memory tier in a policy's `[memory.<tier>]` table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryTierPolicy {
    #[serde(default)]
    pub read: bool,
    #[serde(default)]
    pub write: bool,
    /// Bytes of keys and values the agent may hold in the tier.
    pub quota_bytes: Size,
    /// Entries (keys; nodes and edges for codegraph) the agent may hold in the tier.
    pub quota_entries: u64,
}

/// What the supervisor does when a pain signal arrives (docs/daemon.md, "Pain").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PainAction {
    /// Record the event only.
    #[default]
    Log,
    /// Halve the agent's CPU quota (down to 0.05 CPU).
    Throttle,
    /// Restart the agent (counted against the restart burst limit).
    Restart,
    /// Stop the agent.
    Stop,
}

/// Pain signal → action. Kernel-sourced: `oom` (an OOM kill in the agent's cgroup that left the
/// agent running; one that kills the agent ends the run and the restart policy applies),
/// `memory_pressure`, `cpu_throttling`; agent-reported, by severity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PainPolicy {
    pub oom: PainAction,
    pub memory_pressure: PainAction,
    pub cpu_throttling: PainAction,
    pub info: PainAction,
    pub warning: PainAction,
    pub error: PainAction,
    pub critical: PainAction,
}

impl Default for PainPolicy {
    fn default() -> PainPolicy {
        PainPolicy {
            oom: PainAction::Log,
            memory_pressure: PainAction::Log,
            cpu_throttling: PainAction::Log,
            info: PainAction::Log,
            warning: PainAction::Log,
            error: PainAction::Log,
            critical: PainAction::Restart,
        }
    }
}

/// A policy together with where it came from.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    pub policy: Policy,
    /// A file path, or "built-in".
    pub source: String,
    /// What it extends (`extends = "NAME"`), nearest first; empty for a whole policy.
    pub extends: Vec<Parent>,
}

/// Known seccomp profiles.
pub const SECCOMP_PROFILES: &[&str] = &["agent", "none"];

/// How `Policy::validate`'s checks report a problem: table, key, message.
type Fail<'a> = &'a dyn Fn(&str, &str, String);

impl Policy {
    /// Parses and validates policy text. `origin` names the file in errors.
    pub fn parse(src: &str, origin: &str) -> Result<Policy, PolicyError> {
        Self::parse_extended(src, origin).map(|(p, _)| p)
    }

    /// [`Policy::parse`], following `extends` (module `extends`): the policy and what it
    /// extends, nearest first.
    pub fn parse_extended(src: &str, origin: &str) -> Result<(Policy, Vec<Parent>), PolicyError> {
        Self::parse_extended_in(src, origin, &policy_dirs())
    }

    /// [`Policy::parse_extended`] with the directories a parent is looked up in (before the
    /// built-in policies).
    pub fn parse_extended_in(
        src: &str,
        origin: &str,
        dirs: &[PathBuf],
    ) -> Result<(Policy, Vec<Parent>), PolicyError> {
        // A whole policy seen before (only whole ones are kept, and whether a text is whole
        // depends on the text alone).
        if let Some(p) = parsed_cache::get(src, origin) {
            return Ok((p, vec![]));
        }
        // Most policies are whole: no second parse of their text on the launch path.
        let table = match src.contains("extends") {
            true => Some(extends::parse_table(src, origin)?),
            false => None,
        };
        let Some(table) = table.filter(|t| t.contains_key("extends")) else {
            // A whole policy: parsed from its own text, so serde's errors have its positions.
            // Its parse depends on nothing but the text and its origin (named in errors), so a
            // long-lived process (aitherd, for every run and spawn) keeps it by their digest.
            let policy: Policy =
                toml::from_str(src).map_err(|e| extends::toml_error(src, origin, &e))?;
            policy.validate(&extends::Sources::one(origin, src))?;
            parsed_cache::put(src, origin, &policy);
            return Ok((policy, vec![]));
        };
        if !table.contains_key("name") {
            let (line, column) = locate::key(src, "", "extends");
            return Err(PolicyError::Invalid {
                path: origin.to_string(),
                line,
                column,
                field: "name".into(),
                message: "a policy that extends another names itself (`name = \"...\"`): \
                          the name is this policy's, never inherited"
                    .into(),
            });
        }
        let layers = extends::chain(src, origin, table, dirs)?;
        let sources = extends::Sources::of(&layers);
        let text =
            toml::to_string(&extends::merged(&layers)).map_err(|e| PolicyError::Invalid {
                path: origin.to_string(),
                line: 1,
                column: 1,
                field: "(document)".into(),
                message: e.to_string(),
            })?;
        let policy: Policy = toml::from_str(&text).map_err(|e| {
            // The field, found in the merged text, is shown where a policy of the chain
            // writes it.
            let (_, _, field) = locate::from_toml_error(&text, &e);
            let (table, key) = field.rsplit_once('.').unwrap_or(("", field.as_str()));
            let (path, line, column) = sources.at(table, key);
            PolicyError::Invalid {
                path,
                line,
                column,
                field: field.clone(),
                message: e.message().trim().to_string(),
            }
        })?;
        policy.validate(&sources)?;
        Ok((policy, extends::parents(&layers)))
    }

    /// Semantic checks that serde cannot make; errors point at the offending key.
    /// Every check runs: all errors are reported in one pass, in file order.
    fn validate(&self, sources: &extends::Sources<'_>) -> Result<(), PolicyError> {
        let errors = std::cell::RefCell::new(Vec::new());
        let fail = |table: &str, key: &str, message: String| {
            let (path, line, column) = sources.at(table, key);
            let field = if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            };
            errors.borrow_mut().push(PolicyError::Invalid {
                path,
                line,
                column,
                field,
                message,
            });
        };
        self.check_name_and_filesystem(&fail);
        self.check_network_and_seccomp(&fail);
        if let Err(e) = self.net.validate() {
            let (field, message) = match e {
                net_rules::RuleError::Invalid { field, reason } => (field, reason),
                net_rules::RuleError::Widening { field, detail } => (field, detail),
            };
            let (path, line, column) = sources.at_with(|src| locate_net(src, &field));
            errors.borrow_mut().push(PolicyError::Invalid {
                path,
                line,
                column,
                field: format!("net.{field}"),
                message,
            });
        }
        self.check_limits_and_process(&fail);
        // Last, and only when everything above held: a stand-in depends on the namespaces,
        // network and seccomp checked above (each protection reports its first problem only).
        let held = errors.borrow().is_empty();
        if held {
            self.check_compensated(&fail);
        }
        PolicyError::from_list(errors.into_inner())
    }

    /// `validate`: the name, the bus patterns and the filesystem keys.
    fn check_name_and_filesystem(&self, fail: Fail<'_>) {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            fail(
                "",
                "name",
                "must be non-empty and use only letters, digits, '-' and '_'".into(),
            );
        }
        for (key, list) in [
            ("publish", &self.bus.publish),
            ("subscribe", &self.bus.subscribe),
        ] {
            for p in list {
                if let Err(e) = bus_subject::check_policy_pattern("bus", p) {
                    fail("bus", key, e.to_string());
                }
            }
        }
        for p in &self.filesystem.read_only {
            if !p.starts_with('/')
                || p.contains("..")
                || p == "/" && self.network.mode != NetworkMode::Host
            {
                fail(
                    "filesystem",
                    "read_only",
                    format!("{p:?}: paths must be absolute without '..' (and \"/\" only in a host-network debugging policy)"),
                );
            }
        }
        for e in &self.filesystem.etc {
            if e.is_empty() || e.starts_with('/') || e.split('/').any(|c| c == ".." || c.is_empty())
            {
                fail(
                    "filesystem",
                    "etc",
                    format!("{e:?}: entries are relative names under /etc, e.g. \"ssl/certs\""),
                );
            }
            if matches!(
                e.as_str(),
                "shadow"
                    | "gshadow"
                    | "shadow-"
                    | "gshadow-"
                    | "ssh"
                    | "sudoers"
                    | "sudoers.d"
                    | "aither"
            ) {
                fail(
                    "filesystem",
                    "etc",
                    format!("{e:?} holds host secrets and is never exposed"),
                );
            }
        }
        if self.filesystem.tmp_size.0 < (1 << 20) {
            fail("filesystem", "tmp_size", "must be at least 1M".into());
        }
        if self.filesystem.dev_shm_size.0 < (64 << 10) {
            fail("filesystem", "dev_shm_size", "must be at least 64K".into());
        }
    }

    /// `validate`: the network mode against the namespaces, seccomp, the `warning` they need,
    /// and the memory tiers.
    fn check_network_and_seccomp(&self, fail: Fail<'_>) {
        if self.network.mode == NetworkMode::Host && self.namespaces.net {
            fail(
                "network",
                "mode",
                "\"host\" needs namespaces.net = false".into(),
            );
        }
        if self.network.mode != NetworkMode::Host && !self.namespaces.net {
            fail(
                "namespaces",
                "net",
                "false is only allowed with network.mode = \"host\"".into(),
            );
        }
        if !SECCOMP_PROFILES.contains(&self.seccomp.profile.as_str()) {
            fail(
                "seccomp",
                "profile",
                format!(
                    "unknown profile {:?}; known: {}",
                    self.seccomp.profile,
                    SECCOMP_PROFILES.join(", ")
                ),
            );
        }
        if (self.seccomp.profile == "none" || !self.landlock.enabled) && self.warning.is_none() {
            fail(
                "",
                "warning",
                "a policy that turns seccomp or Landlock off must carry a `warning` shown at every use".into(),
            );
        }
        for tier in self.memory.keys() {
            if !MEMORY_TIERS.contains(&tier.as_str()) {
                fail(
                    "memory",
                    tier,
                    format!(
                        "unknown memory tier {tier:?}; known: {}",
                        MEMORY_TIERS.join(", ")
                    ),
                );
            }
        }
    }

    /// `validate`: resources, rlimits and the process table.
    fn check_limits_and_process(&self, fail: Fail<'_>) {
        if self.resources.memory.0 < (8 << 20) {
            fail("resources", "memory", "must be at least 8M".into());
        }
        if !(self.resources.cpus.is_finite()
            && self.resources.cpus >= 0.01
            && self.resources.cpus <= 1024.0)
        {
            fail("resources", "cpus", "must be between 0.01 and 1024".into());
        }
        if self.resources.pids < 2 {
            fail(
                "resources",
                "pids",
                "must be at least 2 (the reaper and the agent)".into(),
            );
        }
        if let Some(d) = self.resources.workspace_disk {
            if !(crate::sandbox::layer::MIN_QUOTA..=crate::sandbox::layer::MAX_QUOTA).contains(&d.0)
            {
                fail(
                    "resources",
                    "workspace_disk",
                    "must be between 8M and 16T (the layer's ext4 image)".into(),
                );
            }
        }
        if self.rlimits.nofile < 16 {
            fail("rlimits", "nofile", "must be at least 16".into());
        }
        if self.process.uid == 0 || self.process.gid == 0 {
            let key = if self.process.uid == 0 { "uid" } else { "gid" };
            fail(
                "process",
                key,
                "the agent never runs as root inside the sandbox; pick a non-zero id".into(),
            );
        }
        if self.process.uid > 65535 || self.process.gid > 65535 {
            let key = if self.process.uid > 65535 {
                "uid"
            } else {
                "gid"
            };
            fail("process", key, "must be at most 65535".into());
        }
        if self.process.hostname.is_empty() || self.process.hostname.len() > 64 {
            fail("process", "hostname", "must be 1 to 64 characters".into());
        }
        for k in self.process.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                fail("process.env", k, "invalid variable name".into());
            }
        }
    }

    /// `validate`, last: every `compensated` entry (each protection reports its first problem
    /// only).
    fn check_compensated(&self, fail: Fail<'_>) {
        for (protection, layers) in self.compensated.iter() {
            let key = protection.to_string();
            let want = protection.stand_ins();
            if want.is_empty() {
                fail(
                    "compensated",
                    &key,
                    format!("{protection} is never compensated: nothing stands in for it"),
                );
                continue;
            }
            let mut got = layers.clone();
            got.sort();
            got.dedup();
            let mut expected = want.to_vec();
            expected.sort();
            if got != expected {
                let list: Vec<String> = want.iter().map(|l| format!("\"{l}\"")).collect();
                fail(
                    "compensated",
                    &key,
                    format!("{protection} can only be stood in for by all of [{}] together (docs/security-model.md, the defence map)", list.join(", ")),
                );
                continue;
            }
            if self.best_effort.contains(protection) {
                fail(
                    "compensated",
                    &key,
                    format!("{protection} is also in best_effort: name it in one of them"),
                );
                continue;
            }
            for layer in layers {
                let in_effect = match layer {
                    Layer::NetNamespace => {
                        self.namespaces.net && self.network.mode != NetworkMode::Host
                    }
                    Layer::SeccompIoctl => self.seccomp.profile != "none",
                    Layer::ReadOnlyView
                    | Layer::PidNamespace
                    | Layer::MinimalDev
                    | Layer::OwnPty => true,
                };
                if !in_effect {
                    fail(
                        "compensated",
                        &key,
                        format!(
                            "{layer} cannot stand in for {protection}: this policy turns it off"
                        ),
                    );
                }
            }
        }
    }

    /// Loads a policy by name (installed, then built-in) or by path (anything with a '/' or
    /// ending in ".toml").
    pub fn load(name_or_path: &str) -> Result<LoadedPolicy, PolicyError> {
        if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
            return Self::load_file(Path::new(name_or_path));
        }
        let mut searched = Vec::new();
        for dir in policy_dirs() {
            let p = dir.join(format!("{name_or_path}.toml"));
            searched.push(p.display().to_string());
            if p.is_file() {
                return Self::load_file(&p);
            }
        }
        if let Some((_, src)) = BUILTIN_POLICIES.iter().find(|(n, _)| *n == name_or_path) {
            let origin = format!("built-in:{name_or_path}.toml");
            let (policy, extends) = Self::parse_extended(src, &origin)?;
            return Ok(LoadedPolicy {
                policy,
                source: "built-in".into(),
                extends,
            });
        }
        searched.push("built-in".into());
        Err(PolicyError::NotFound {
            name: name_or_path.to_string(),
            searched: searched.join(", "),
        })
    }

    pub fn load_file(path: &Path) -> Result<LoadedPolicy, PolicyError> {
        let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (policy, extends) = Self::parse_extended(&src, &path.display().to_string())?;
        Ok(LoadedPolicy {
            policy,
            source: path.display().to_string(),
            extends,
        })
    }

    /// Every policy that `load` could find by name: installed first, then built-in ones not
    /// shadowed. Broken files are listed with their error.
    pub fn list() -> Vec<(String, Result<LoadedPolicy, PolicyError>)> {
        let mut out: Vec<(String, Result<LoadedPolicy, PolicyError>)> = Vec::new();
        for dir in policy_dirs() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for p in names {
                if p.extension().and_then(|e| e.to_str()) != Some("toml") {
                    continue;
                }
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                if out.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                out.push((name, Self::load_file(&p)));
            }
        }
        for (name, _) in BUILTIN_POLICIES {
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name.to_string(), Self::load(name)));
            }
        }
        out
    }
}

/// Line and column of a `net` field (`egress[1].hosts`, `quota.bytes`): the key inside the
/// N-th `[[net.egress]]` table (or `[net.quota]`), else the table header, else 1:1.
fn locate_net(src: &str, field: &str) -> (usize, usize) {
    let (table, rest) = field.split_once(['[', '.']).unwrap_or((field, ""));
    let (index, key) = match field.find('[') {
        Some(_) => {
            let (n, k) = rest.split_once(']').unwrap_or((rest, ""));
            (n.parse::<usize>().unwrap_or(0), k.trim_start_matches('.'))
        }
        None => (0, rest),
    };
    let headers = [format!("[[net.{table}]]"), format!("[net.{table}]")];
    let mut seen = 0;
    let mut found: Option<(usize, usize)> = None;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if found.is_some() && t.starts_with('[') {
            break;
        }
        if headers.iter().any(|h| t == h) {
            if seen == index {
                found = Some((i + 1, line.len() - line.trim_start().len() + 1));
            }
            seen += 1;
            continue;
        }
        if found.is_some() {
            let k = t.split('=').next().unwrap_or("").trim();
            if !key.is_empty() && k == key {
                return (i + 1, line.len() - line.trim_start().len() + 1);
            }
        }
    }
    found.unwrap_or((1, 1))
}

/// Directories searched for policies by name: `AITHER_POLICY_DIR` (colon-separated), then
/// /etc/aither/policies.
pub fn policy_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(v) = std::env::var("AITHER_POLICY_DIR") {
        dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs.push(PathBuf::from(crate::DEFAULT_POLICY_DIR));
    dirs
}

#[cfg(test)]
mod tests;

/// Whole policies parsed and validated before, by the SHA-256 of their origin and text: the
/// same bytes give the same `Policy` (parsing and validation read nothing else), so a changed
/// file is a new key and is parsed again. A policy that extends another is not kept (its
/// parents are other files). At most `MAX` entries; when full, it starts again empty.
mod parsed_cache {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use sha2::{Digest, Sha256};

    use super::Policy;

    const MAX: usize = 64;

    static CACHE: Mutex<Option<HashMap<[u8; 32], Policy>>> = Mutex::new(None);

    fn key(src: &str, origin: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update((origin.len() as u64).to_le_bytes());
        h.update(origin.as_bytes());
        h.update(src.as_bytes());
        h.finalize().into()
    }

    pub(super) fn get(src: &str, origin: &str) -> Option<Policy> {
        let k = key(src, origin);
        let g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()?.get(&k).cloned()
    }

    pub(super) fn put(src: &str, origin: &str, p: &Policy) {
        let k = key(src, origin);
        let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.get_or_insert_with(HashMap::new);
        if m.len() >= MAX {
            m.clear();
        }
        m.insert(k, p.clone());
    }
}
