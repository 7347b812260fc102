//! The enforcement report: proof, after a launch, of what was enforced — the namespaces, the id
//! maps, the cgroup's limits as read back from the kernel, the Landlock status and rights, the
//! seccomp filter's digest and rule count, and, read from /proc by the sandbox's pid 1 after it
//! confined itself (the state the agent inherits): capability sets, no_new_privs, seccomp mode,
//! rlimits, mounts, the id maps as seen inside. A requirement that is not met refuses the launch
//! (fail closed); the report is the proof when it starts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One rlimit as /proc/self/limits shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub name: String,
    pub soft: String,
    pub hard: String,
}

/// One mount of the sandbox's view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    pub target: String,
    pub fstype: String,
    /// Per-mount options (ro/rw, nosuid, nodev, noexec, idmapped …).
    pub options: String,
}

/// What pid 1 read from /proc about itself, after confinement.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inside {
    /// From /proc/self/status: Uid, Gid, Groups, CapInh, CapPrm, CapEff, CapBnd, CapAmb,
    /// NoNewPrivs, Seccomp, Seccomp_filters.
    pub status: BTreeMap<String, String>,
    pub rlimits: Vec<Rlimit>,
    pub mounts: Vec<Mount>,
    pub uid_map: String,
    pub gid_map: String,
}

const STATUS_KEYS: &[&str] = &[
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

/// Reads the facts of the calling process (pid 1, confined). Never fails: what cannot be read
/// is left out.
pub fn read_inside() -> Inside {
    let mut i = Inside::default();
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        for l in s.lines() {
            if let Some((k, v)) = l.split_once(':') {
                if STATUS_KEYS.contains(&k) {
                    i.status.insert(
                        k.to_string(),
                        v.split_whitespace().collect::<Vec<_>>().join(" "),
                    );
                }
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/self/limits") {
        // "Max open files            1024                 1024                 files"
        for l in s.lines().skip(1) {
            let name = l.get(..26).unwrap_or("").trim().to_string();
            let rest: Vec<&str> = l.get(26..).unwrap_or("").split_whitespace().collect();
            if rest.len() >= 2 && !name.is_empty() {
                i.rlimits.push(Rlimit {
                    name,
                    soft: rest[0].to_string(),
                    hard: rest[1].to_string(),
                });
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") {
        // id parent major:minor root target options [optional…] - fstype source superopts
        for l in s.lines().take(64) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let Some(dash) = f.iter().position(|x| *x == "-") else {
                continue;
            };
            if f.len() < 6 || dash + 1 >= f.len() {
                continue;
            }
            i.mounts.push(Mount {
                target: f[4].chars().take(200).collect(),
                fstype: f[dash + 1].to_string(),
                options: f[5].chars().take(120).collect(),
            });
        }
    }
    i.uid_map = std::fs::read_to_string("/proc/self/uid_map")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    i.gid_map = std::fs::read_to_string("/proc/self/gid_map")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    i
}

/// The cgroup part: where, and the limits as the kernel has them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupReport {
    pub id: String,
    pub dirs: Vec<String>,
    pub memory_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    pub pids: Option<u64>,
}

/// Landlock as enforced.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LandlockReport {
    /// The kernel's verdict on the ruleset (e.g. FullyEnforced), "disabled" when the policy
    /// has none.
    pub status: String,
    pub abi: u8,
    pub filesystem: bool,
    pub tcp: bool,
    pub ioctl_dev: bool,
    pub scopes: bool,
}

/// The seccomp filter installed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeccompReport {
    pub profile: String,
    /// sha256 of the profile, architecture and compiler version (the cache key).
    pub digest: String,
    /// sha256 of the programs handed to the kernel, computed from the loaded bytes
    /// (`seccomp::Filter::program_digest`), whether they were compiled or read from the cache.
    #[serde(default)]
    pub program_digest: String,
    /// Syscalls the allowlist names.
    pub rules: usize,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    pub policy: String,
    /// Namespaces created: user, pid, mnt, and net, ipc, uts, cgroup as the policy asks.
    pub namespaces: Vec<String>,
    /// The agent's ids inside, and the host ids they map to.
    pub uid: u32,
    pub gid: u32,
    pub host_uid: u32,
    pub host_gid: u32,
    pub cgroup: CgroupReport,
    pub landlock: LandlockReport,
    pub seccomp: Option<SeccompReport>,
    /// Protections the policy allowed to be missing and that were missing.
    pub best_effort_skipped: Vec<String>,
    /// Test switches in force (`NAME=value`, debug builds only: src/testhooks.rs); empty in
    /// a release build, which ignores them.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// Protections this kernel lacks, each with the layers that stood in for it (the policy's
    /// `[compensated]`, docs/security-model.md).
    #[serde(default)]
    pub compensated: Vec<String>,
    pub inside: Option<Inside>,
}
