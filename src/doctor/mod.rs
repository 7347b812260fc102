//! `aitherctl doctor`: what this host gives, and whether each installed policy can run on it.
//!
//! Three parts, each usable on its own:
//! 1. [`HostFacts::gather`] reads the host from a root directory (`/`, or `AITHER_HOST_ROOT`
//!    for tests): files under /proc and /sys, the cgroup filesystem, container markers, GPUs.
//!    Facts only a system call can tell (the Landlock ABI, clone3, pidfd_open, creating the
//!    sandbox's namespaces, loading a BPF device program) are probed on the running kernel
//!    when the root is `/`; a fake root states them in `<root>/aither-doctor-facts.toml`
//!    ([`Overrides`]), since a directory cannot fake a system call.
//! 2. [`verdict`] is pure: a policy and the facts in, what is missing (each with the fix: a
//!    flag, a sysctl, a container option) out. Anything a policy needs that is missing or that
//!    could not be determined makes it unrunnable, unless the protection is in the policy's
//!    `best_effort` (then it is reported as skipped): fail closed, exactly as the launcher.
//! 3. [`Report`] renders both as text or JSON.
//!
//! Nothing here panics on odd input: a missing or unreadable file is "unknown".
//! See docs/doctor.md.

mod facts;
mod probe;
mod render;
mod verdict;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupMode;

pub use facts::{parse_kernel_version, parse_proc1_cgroup, parse_status_seccomp};
pub use render::Report;
pub use verdict::{verdict, Missing, PolicyVerdict};

/// The policy whose verdict decides doctor's exit status.
pub const DEFAULT_POLICY: &str = "strict";
/// The file in a fake root that states the facts only a system call could tell.
pub const FACTS_FILE: &str = "aither-doctor-facts.toml";
/// Environment variable naming the root directory doctor reads (default `/`).
pub const HOST_ROOT_ENV: &str = "AITHER_HOST_ROOT";

/// Errors of gathering host facts. Missing files are never errors (they are "unknown"); only
/// an unusable override file is.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Overrides { path: PathBuf, message: String },
}

/// The answer of one probe: `ok` is `None` when it could not be determined.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Probe {
    pub ok: Option<bool>,
    /// Why (the errno of a failed call, where an answer came from, why it is unknown).
    pub detail: Option<String>,
}

impl Probe {
    pub fn yes(detail: impl Into<String>) -> Probe {
        Probe {
            ok: Some(true),
            detail: Some(detail.into()),
        }
    }
    pub fn no(detail: impl Into<String>) -> Probe {
        Probe {
            ok: Some(false),
            detail: Some(detail.into()),
        }
    }
    pub fn unknown(detail: impl Into<String>) -> Probe {
        Probe {
            ok: None,
            detail: Some(detail.into()),
        }
    }
    fn from_bool(v: bool, detail: &str) -> Probe {
        if v {
            Probe::yes(detail)
        } else {
            Probe::no(detail)
        }
    }
}

/// User namespaces: the sysctls that limit them and whether the sandbox's set can be created.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct UserNsFacts {
    /// user.max_user_namespaces (0 disables them for everyone, root included).
    pub max_user_namespaces: Option<u64>,
    /// kernel.unprivileged_userns_clone (Debian/Ubuntu patch; restricts non-root only).
    pub unprivileged_userns_clone: Option<bool>,
    /// kernel.apparmor_restrict_unprivileged_userns (Ubuntu ≥ 23.10; restricts non-root only).
    pub apparmor_restrict_unprivileged_userns: Option<bool>,
    /// unshare of user, pid, mount, net, ipc, uts and cgroup namespaces in a throwaway child.
    pub create: Probe,
}

/// Landlock: the ABI the kernel answers and whether the LSM is listed as active.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LandlockFacts {
    /// 0 = no Landlock (not built, not enabled, or blocked by a seccomp filter); None = unknown.
    pub abi: Option<u8>,
    /// The active LSMs (/sys/kernel/security/lsm), when securityfs is mounted.
    pub lsm: Option<String>,
}

/// seccomp: whether the kernel can install filters.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SeccompFacts {
    /// Filter mode available (`errno` in /proc/sys/kernel/seccomp/actions_avail, or a
    /// `Seccomp:` line in /proc/self/status).
    pub filter: Option<bool>,
    /// This process's own mode (0 none, 1 strict, 2 filter: already filtered, e.g. by a
    /// container runtime; filters stack).
    pub mode: Option<u8>,
}

/// The cgroup filesystem as the launcher will use it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CgroupFacts {
    pub root: PathBuf,
    pub mode: Option<CgroupMode>,
    /// Controllers available for limits: v2 `cgroup.controllers`; v1 the mounted hierarchies.
    pub controllers: Vec<String>,
    /// Where Aither's cgroups go (`aither/` below each hierarchy used).
    pub subtree: Vec<PathBuf>,
    /// Whether those directories (or their parents) can be written by this process.
    pub writable: Probe,
    /// Pure v2: whether the needed controllers reach `aither/` (enabled in the root's
    /// `cgroup.subtree_control` or enableable: the root holds no processes or is the real root).
    pub delegated: Probe,
    /// "No swap" can be enforced: v1 memory.memsw.*, v2 memory.swap.max (or the host has no
    /// swap, on v1).
    pub swap_control: Probe,
    /// `aitherctl pause` can freeze a sandbox: cgroup2 `cgroup.freeze`, the v1 `freezer`
    /// hierarchy, or (hybrid) the unified hierarchy's `cgroup.freeze`. Not needed to run.
    pub freezer: Probe,
    /// Where this process's sandboxes go: a cgroup systemd delegated, or the top-level
    /// subtree and why (src/cgroup/delegate.rs). None for a fake root.
    pub placement: Option<crate::cgroup::delegate::Placement>,
}

/// NVIDIA GPUs as the host shows them (no library is loaded).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GpuFacts {
    /// /proc/driver/nvidia/version's first line.
    pub nvidia_driver: Option<String>,
    /// /dev/nvidia0, /dev/nvidia1, …
    pub devices: Vec<String>,
    /// libnvidia-ml.so.1 found in a usual library directory.
    pub nvml_library: Option<String>,
    /// Simulated GPUs declared in gpus.toml (`AITHER_GPUS`, else <root>/etc/aither/gpus.toml
    /// with backend = "simulated"): how many, and the file.
    #[serde(default)]
    pub simulated: Option<(usize, String)>,
}

/// Whether we run inside a container, and on what evidence.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ContainerFacts {
    /// docker, podman, kubernetes, lxc, containerd, or another `container=` value.
    pub kind: Option<String>,
    pub evidence: Vec<String>,
    /// A CI runner (github-actions, gitlab-ci, ci).
    pub ci: Option<String>,
}

/// Everything doctor knows about the host.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HostFacts {
    /// The root directory read ("/" on a real host).
    pub root: PathBuf,
    /// Whether the facts file of a fake root was applied.
    pub overrides: Option<PathBuf>,
    /// /proc/sys/kernel/osrelease.
    pub kernel: Option<String>,
    pub euid: u32,
    pub userns: UserNsFacts,
    pub landlock: LandlockFacts,
    pub seccomp: SeccompFacts,
    pub cgroup: CgroupFacts,
    /// clone3 (5.3; CLONE_INTO_CGROUP 5.7): how every sandbox is created.
    pub clone3: Probe,
    /// pidfd_open (5.3): aitherd and `aither-init exec` hold sandboxes by pidfd.
    pub pidfd_open: Probe,
    /// A BPF_PROG_TYPE_CGROUP_DEVICE program can be loaded (device control on cgroup2).
    pub bpf_cgroup_device: Probe,
    /// Whether the kernel's audit is on (kernel denials in the audit stream).
    pub kernel_audit: Probe,
    pub gpu: GpuFacts,
    pub container: ContainerFacts,
    /// SwapTotal of /proc/meminfo, in KiB.
    pub swap_total_kb: Option<u64>,
}

/// The contents of `<root>/aither-doctor-facts.toml`: facts a fake root cannot show with
/// files. Every key is optional; a key given replaces what would be probed or detected.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub landlock_abi: Option<u8>,
    pub clone3: Option<bool>,
    pub pidfd_open: Option<bool>,
    /// Whether the sandbox's namespaces can be created (the unshare probe).
    pub userns_create: Option<bool>,
    pub bpf_cgroup_device: Option<bool>,
    /// "v1", "hybrid" or "v2" (a plain directory has no cgroupfs magic).
    pub cgroup_mode: Option<String>,
    /// Whether the cgroup subtree can be written (root writes anything on a plain directory).
    pub cgroup_writable: Option<bool>,
    pub euid: Option<u32>,
    /// Replaces the process environment for container and CI detection.
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

impl HostFacts {
    /// Gathers the facts of the root named by `AITHER_HOST_ROOT` (default `/`).
    pub fn gather_default() -> Result<HostFacts, DoctorError> {
        let root = crate::testhooks::var_os(HOST_ROOT_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"));
        HostFacts::gather(&root)
    }

    /// Gathers the facts of `root`: files under it, and, when it is `/`, the system-call
    /// probes; `<root>/aither-doctor-facts.toml` overrides either.
    pub fn gather(root: &std::path::Path) -> Result<HostFacts, DoctorError> {
        facts::gather(root)
    }
}

#[cfg(test)]
mod tests;
