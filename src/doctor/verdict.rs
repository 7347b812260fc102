//! Whether a policy can run on a host: a pure function of the policy and the facts.

use serde::Serialize;

use super::{parse_kernel_version, HostFacts, Probe, FACTS_FILE};
use crate::cgroup::{CgroupMode, CpuQuota, Limits};
use crate::policy::{Policy, Protection, WorkspaceAccess};
use crate::sandbox::landlock::{self, LandlockError};

/// One thing a policy needs that this host does not give (or that could not be checked).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Missing {
    /// What is missing, and why we think so.
    pub what: String,
    /// The protection that names it in `best_effort`, when it can be best-effort at all.
    pub protection: Option<Protection>,
    /// How to get it: a flag, a sysctl, a container option, a kernel.
    pub fix: String,
}

/// The verdict for one policy.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub policy: String,
    /// True when nothing required is missing: `aitherctl run --policy NAME` would start.
    pub runnable: bool,
    /// Required and missing: each one alone refuses the launch (fail closed).
    pub missing: Vec<Missing>,
    /// Missing, but listed in the policy's `best_effort`: skipped, and reported at each run.
    pub best_effort_skipped: Vec<Missing>,
    /// Missing, and stood in for by the layers the policy's `[compensated]` names; each line
    /// says which layer stands in for which protection (also in every run's report).
    pub compensated: Vec<String>,
}

/// Which container runtime's options a fix should name.
fn runtime(facts: &HostFacts) -> Option<&str> {
    facts.container.kind.as_deref()
}

/// The fix for something a container runtime withholds by default.
enum Withheld {
    Namespaces,
    Clone3,
    Landlock,
    CgroupWrite,
}

fn container_fix(kind: &str, w: Withheld) -> String {
    let cli = if kind == "podman" { "podman" } else { "docker" };
    match (kind, w) {
        ("kubernetes", Withheld::CgroupWrite) => "in the pod spec: securityContext: {privileged: true} (the cgroup filesystem is read-only otherwise); or run Aither on the node".into(),
        ("kubernetes", _) => "in the pod spec: securityContext: {privileged: true}, or at least seccompProfile: {type: Unconfined}, appArmorProfile: {type: Unconfined} and capabilities: {add: [SYS_ADMIN]}; or run Aither on the node".into(),
        ("lxc", Withheld::CgroupWrite) | ("lxc", Withheld::Namespaces) => "lxc config set <container> security.nesting true (and restart it); or run Aither on the host".into(),
        ("docker" | "podman", Withheld::Namespaces) => format!("{cli} run --privileged, or at least --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined; or run Aither on the host"),
        ("docker" | "podman", Withheld::Clone3) => format!("{cli} run --security-opt seccomp=unconfined (the default profile answers clone3 with ENOSYS), or --privileged; or run Aither on the host"),
        ("docker" | "podman", Withheld::Landlock) => format!("{cli} run --security-opt seccomp=unconfined (Docker before 25 blocks the landlock_* calls), or --privileged; or run Aither on the host"),
        ("docker" | "podman", Withheld::CgroupWrite) => format!("{cli} run --privileged --cgroupns=private (the cgroup filesystem is mounted read-only otherwise); or run Aither on the host"),
        (_, _) => "run the container privileged, or run Aither on the host".into(),
    }
}

fn unknown_fix(p: &Probe) -> String {
    format!(
        "could not be checked ({}); on a fake root, state it in {FACTS_FILE}",
        p.detail.as_deref().unwrap_or("no detail")
    )
}

/// The oldest kernel with Landlock ABI `abi`.
fn landlock_kernel(abi: u8) -> &'static str {
    match abi {
        0 | 1 => "5.13",
        2 => "5.19",
        3 => "6.2",
        4 => "6.7",
        5 => "6.10",
        6 => "6.12",
        _ => "6.15",
    }
}

fn landlock_fix(facts: &HostFacts, needed: u8, protection: Protection) -> String {
    let allow = format!(", or allow it to be missing with best_effort = [\"{protection}\"]");
    let base = match facts.landlock.abi {
        None => {
            return format!(
                "the Landlock ABI {}{allow}",
                unknown_fix(&Probe::unknown("not probed"))
            )
        }
        Some(0) => match (&facts.landlock.lsm, runtime(facts)) {
            (Some(lsm), _) if !lsm.split(',').any(|l| l == "landlock") => format!(
                "boot with lsm={lsm},landlock on the kernel command line (the kernel needs CONFIG_SECURITY_LANDLOCK=y; Landlock ABI {needed} needs kernel ≥ {})",
                landlock_kernel(needed)
            ),
            (_, Some(kind)) => container_fix(kind, Withheld::Landlock),
            _ => format!(
                "a kernel ≥ {} with CONFIG_SECURITY_LANDLOCK=y, booted with landlock in lsm=...",
                landlock_kernel(needed)
            ),
        },
        Some(has) => format!(
            "a kernel ≥ {} (Landlock ABI {needed}; this one has ABI {has})",
            landlock_kernel(needed)
        ),
    };
    format!("{base}{allow}")
}

struct Acc<'a> {
    policy: &'a Policy,
    missing: Vec<Missing>,
    skipped: Vec<Missing>,
}

impl Acc<'_> {
    fn lack(&mut self, what: String, protection: Option<Protection>, fix: String) {
        let m = Missing {
            what,
            protection,
            fix,
        };
        match protection {
            Some(p) if self.policy.best_effort.contains(&p) => self.skipped.push(m),
            _ => self.missing.push(m),
        }
    }
}

/// What `policy` needs on this host that it does not have. Mirrors the launcher: user, pid,
/// mount (and the policy's other) namespaces, clone3 with a pidfd, pidfd_open, the seccomp
/// filter, Landlock per `landlock::plan`, the cgroup subtree with the memory, cpu and pids
/// controllers (and "no swap"), id-mapped mounts for a workspace.
pub fn verdict(policy: &Policy, facts: &HostFacts) -> PolicyVerdict {
    let mut acc = Acc {
        policy,
        missing: Vec::new(),
        skipped: Vec::new(),
    };
    let kernel = facts.kernel.as_deref().and_then(parse_kernel_version);
    let kind = runtime(facts);

    namespace_needs(facts, kind, &mut acc);
    clone_needs(facts, kernel, kind, &mut acc);

    // seccomp.
    if policy.seccomp.profile != "none" {
        match facts.seccomp.filter {
            Some(true) => {}
            Some(false) => acc.lack(
                format!("seccomp filters (profile {:?})", policy.seccomp.profile),
                None,
                "a kernel with CONFIG_SECCOMP=y and CONFIG_SECCOMP_FILTER=y".into(),
            ),
            None => acc.lack(
                format!("seccomp filters (profile {:?})", policy.seccomp.profile),
                None,
                unknown_fix(&Probe::unknown(
                    "no /proc/sys/kernel/seccomp/actions_avail or /proc/self/status",
                )),
            ),
        }
    }

    // Landlock: the launcher's own plan, asked again with each missing protection allowed, so
    // that every missing feature is named (not only the first).
    let compensated = landlock_needs(policy, facts, &mut acc);

    cgroup_needs(policy, facts, &mut acc);
    gpu_needs(policy, facts, &mut acc);

    // Id-mapped workspace mount (mount_setattr MOUNT_ATTR_IDMAP, 5.12).
    if policy.filesystem.workspace != WorkspaceAccess::None {
        match kernel {
            Some(v) if v >= (5, 12) => {}
            Some((maj, min)) => acc.lack(
                format!("id-mapped mounts for the workspace (kernel {maj}.{min} < 5.12)"),
                None,
                "a kernel ≥ 5.12 (≥ 6.3 for a workspace on tmpfs); or run with --workspace-as-owner: the agent then runs as the workspace's owner, never root or a uid/gid below 1000 (docs/kernels.md)".into(),
            ),
            None => acc.lack(
                "the kernel version (id-mapped mounts need ≥ 5.12)".into(),
                None,
                unknown_fix(&Probe::unknown("no /proc/sys/kernel/osrelease")),
            ),
        }
    }

    // A layered workspace (docs/workspaces.md): overlayfs with id-mapped layers (5.19), built
    // with fsopen; no fallback.
    if policy.filesystem.workspace == WorkspaceAccess::Layered {
        match kernel {
            Some(v) if v >= (5, 19) => {}
            Some((maj, min)) => acc.lack(
                format!("overlayfs with id-mapped layers for the layered workspace (kernel {maj}.{min} < 5.19)"),
                None,
                "a kernel ≥ 5.19; or a policy with workspace = \"read-write\" (the agent then writes the directory itself; docs/workspaces.md)".into(),
            ),
            None => acc.lack(
                "the kernel version (a layered workspace needs ≥ 5.19)".into(),
                None,
                unknown_fix(&Probe::unknown("no /proc/sys/kernel/osrelease")),
            ),
        }
    }

    let missing = acc.missing;
    PolicyVerdict {
        policy: policy.name.clone(),
        runnable: missing.is_empty(),
        missing,
        best_effort_skipped: acc.skipped,
        compensated,
    }
}

/// A policy with a `[gpu]` grant needs that many GPUs (real or simulated) and a way to
/// enforce device access: the v1 devices controller, and on cgroup2 a BPF device program.
fn gpu_needs(policy: &Policy, facts: &HostFacts, acc: &mut Acc<'_>) {
    if policy.gpu.count == 0 {
        return;
    }
    let g = &facts.gpu;
    let have = match &g.simulated {
        Some((n, _)) => *n,
        None => g.devices.len(),
    };
    if have < policy.gpu.count as usize {
        acc.lack(
            format!(
                "{} GPU(s) (found {have}{})",
                policy.gpu.count,
                match (&g.simulated, &g.nvidia_driver) {
                    (Some((_, f)), _) => format!(", simulated in {f}"),
                    (None, None) => ", no NVIDIA driver".into(),
                    (None, Some(v)) => format!(", driver {v}"),
                }
            ),
            None,
            "install the NVIDIA driver, or declare simulated GPUs in /etc/aither/gpus.toml \
             (docs/gpu.md)"
                .into(),
        );
    }
    let protection = Protection::CgroupDevices;
    let mode = facts.cgroup.mode;
    if matches!(mode, Some(CgroupMode::V1 | CgroupMode::Hybrid))
        && !facts.cgroup.controllers.iter().any(|c| c == "devices")
    {
        acc.lack(
            "the v1 devices controller (GPU device rules)".into(),
            Some(protection),
            format!("mount the devices hierarchy at /sys/fs/cgroup/devices; or allow it to be missing with best_effort = [\"{protection}\"]"),
        );
    }
    if matches!(mode, Some(CgroupMode::V2 | CgroupMode::Hybrid))
        && facts.bpf_cgroup_device.ok != Some(true)
    {
        acc.lack(
            format!(
                "a BPF device program on cgroup2 ({})",
                facts
                    .bpf_cgroup_device
                    .detail
                    .as_deref()
                    .unwrap_or("unknown")
            ),
            Some(protection),
            format!("a kernel with CONFIG_CGROUP_BPF and root (CAP_BPF, CAP_SYS_ADMIN); or allow it to be missing with best_effort = [\"{protection}\"]"),
        );
    }
}

fn abi_text(facts: &HostFacts) -> String {
    match facts.landlock.abi {
        None => "ABI unknown".into(),
        Some(0) => "the kernel has no Landlock".into(),
        Some(n) => format!("the kernel has ABI {n}"),
    }
}

fn landlock_feature(p: Protection) -> (&'static str, u8) {
    match p {
        Protection::LandlockNet => ("TCP bind/connect rules", 4),
        Protection::LandlockIoctl => ("device ioctl rules", 5),
        Protection::LandlockScope => ("abstract-socket and signal scoping", 6),
        _ => ("filesystem rules", 3),
    }
}

/// `verdict`: the sandbox's namespaces.
fn namespace_needs(facts: &HostFacts, kind: Option<&str>, acc: &mut Acc<'_>) {
    // Namespaces.
    let ns = &facts.userns;
    let ns_fix = || -> String {
        if ns.max_user_namespaces == Some(0) {
            return "sysctl -w user.max_user_namespaces=15000 (persist it in /etc/sysctl.d/99-aither.conf); it limits root too".into();
        }
        if let Some(k) = kind {
            return container_fix(k, Withheld::Namespaces);
        }
        if facts.euid != 0 {
            let mut s =
                "run as root (sudo aitherctl …) or through aitherd, which runs as root".to_string();
            if ns.unprivileged_userns_clone == Some(false) {
                s.push_str("; kernel.unprivileged_userns_clone = 0 refuses them to other users");
            }
            if ns.apparmor_restrict_unprivileged_userns == Some(true) {
                s.push_str("; kernel.apparmor_restrict_unprivileged_userns = 1 restricts them for other users");
            }
            return s;
        }
        "a kernel with CONFIG_USER_NS, CONFIG_PID_NS, CONFIG_NET_NS, CONFIG_IPC_NS, CONFIG_UTS_NS and CONFIG_CGROUPS; check for a seccomp, AppArmor or SELinux confinement of this process".into()
    };
    match ns.create.ok {
        Some(true) => {}
        Some(false) => acc.lack(
            format!(
                "creating the sandbox's namespaces ({})",
                ns.create.detail.as_deref().unwrap_or("refused")
            ),
            None,
            ns_fix(),
        ),
        None if ns.max_user_namespaces == Some(0) => acc.lack(
            "user namespaces: user.max_user_namespaces = 0".into(),
            None,
            ns_fix(),
        ),
        // Not probed (fake root): the sysctl is all there is to go by.
        None if ns.max_user_namespaces.is_some() => {}
        None => acc.lack("user namespaces".into(), None, unknown_fix(&ns.create)),
    }
}

/// `verdict`: clone3 and pidfds.
fn clone_needs(
    facts: &HostFacts,
    kernel: Option<(u32, u32)>,
    kind: Option<&str>,
    acc: &mut Acc<'_>,
) {
    // clone3 (CLONE_INTO_CGROUP from 5.7) and pidfds.
    match facts.clone3.ok {
        Some(true) => {
            if let Some((maj, min)) = kernel {
                if (maj, min) < (5, 7) && facts.cgroup.mode != Some(CgroupMode::V1) {
                    acc.lack(
                        format!("clone3 with CLONE_INTO_CGROUP (kernel {maj}.{min} < 5.7)"),
                        None,
                        "a kernel ≥ 5.7".into(),
                    );
                }
            }
        }
        Some(false) => acc.lack(
            format!(
                "clone3 ({})",
                facts.clone3.detail.as_deref().unwrap_or("refused")
            ),
            None,
            match kind {
                Some(k) => container_fix(k, Withheld::Clone3),
                None => {
                    "a kernel ≥ 5.7, with no seccomp filter answering clone3 with ENOSYS".into()
                }
            },
        ),
        None => acc.lack("clone3".into(), None, unknown_fix(&facts.clone3)),
    }
    match facts.pidfd_open.ok {
        Some(true) => {}
        Some(false) => acc.lack(
            format!(
                "pidfd_open ({})",
                facts.pidfd_open.detail.as_deref().unwrap_or("refused")
            ),
            None,
            match kind {
                Some(k) => container_fix(k, Withheld::Clone3).replace("clone3", "pidfd_open"),
                None => "a kernel ≥ 5.3".into(),
            },
        ),
        None => acc.lack("pidfd_open".into(), None, unknown_fix(&facts.pidfd_open)),
    }
}

/// `verdict`: Landlock; returns the stand-ins in use for what the kernel lacks.
fn landlock_needs(policy: &Policy, facts: &HostFacts, acc: &mut Acc<'_>) -> Vec<String> {
    let mut compensated = Vec::new();
    if policy.landlock.enabled {
        let abi = facts.landlock.abi.unwrap_or(0);
        let mut allowed = policy.best_effort.clone();
        loop {
            match landlock::plan_for(
                &policy.name,
                true,
                policy.network.mode,
                &allowed,
                &policy.compensated,
                abi,
            ) {
                Ok(plan) => {
                    compensated = plan
                        .compensated
                        .iter()
                        .map(|c| format!("{c} ({})", abi_text(facts)))
                        .collect();
                    for p in plan
                        .skipped
                        .iter()
                        .filter(|p| policy.best_effort.contains(p))
                    {
                        let (what, needed) = landlock_feature(*p);
                        acc.lack(
                            format!("Landlock {what} (ABI ≥ {needed}; {})", abi_text(facts)),
                            Some(*p),
                            landlock_fix(facts, needed, *p),
                        );
                    }
                    break;
                }
                Err(LandlockError::Unsupported {
                    what,
                    needed,
                    protection,
                    ..
                }) => {
                    acc.lack(
                        format!("Landlock {what} (ABI ≥ {needed}; {})", abi_text(facts)),
                        Some(protection),
                        landlock_fix(facts, needed, protection),
                    );
                    allowed.push(protection);
                }
                Err(e) => {
                    acc.lack(format!("Landlock: {e}"), None, String::new());
                    break;
                }
            }
        }
    }
    compensated
}

fn cgroup_needs(policy: &Policy, facts: &HostFacts, acc: &mut Acc<'_>) {
    let cg = &facts.cgroup;
    let kind = runtime(facts);
    let root = cg.root.display().to_string();
    let Some(mode) = cg.mode else {
        acc.lack(
            format!("a cgroup filesystem at {root}"),
            None,
            match kind {
                Some(k) => container_fix(k, Withheld::CgroupWrite),
                None => format!("mount -t cgroup2 none {root}"),
            },
        );
        return;
    };
    match cg.writable.ok {
        Some(true) => {}
        Some(false) => acc.lack(
            format!(
                "a writable cgroup subtree ({})",
                cg.writable.detail.as_deref().unwrap_or("not writable")
            ),
            None,
            match kind {
                Some(k) => container_fix(k, Withheld::CgroupWrite),
                None if facts.euid != 0 => {
                    "run as root (sudo aitherctl …) or through aitherd".into()
                }
                None => format!("mount {root} read-write (mount -o remount,rw {root})"),
            },
        ),
        None => acc.lack(
            "a writable cgroup subtree".into(),
            None,
            unknown_fix(&cg.writable),
        ),
    }
    let limits = Limits {
        memory: Some(policy.resources.memory.0),
        swap: policy.resources.swap.map(|s| s.0),
        cpu: Some(CpuQuota::from_cpus(policy.resources.cpus)),
        pids: Some(policy.resources.pids),
        devices: None,
    };
    let mut memory_ok = false;
    for (ctrl, protection) in limits.controllers() {
        let listed = cg.controllers.iter().any(|c| c == ctrl);
        let usable = listed && (mode != CgroupMode::V2 || cg.delegated.ok == Some(true));
        if usable {
            memory_ok |= ctrl == "memory";
            continue;
        }
        let (what, fix) = match (mode, listed) {
            (CgroupMode::V2, true) => (
                format!(
                    "cgroup controller {ctrl}: not delegated to {root}/aither ({})",
                    cg.delegated.detail.as_deref().unwrap_or("unknown")
                ),
                match kind {
                    Some(k) => format!(
                        "move the container's processes out of its root cgroup before starting Aither (mkdir {root}/init; echo each pid of {root}/cgroup.procs into {root}/init/cgroup.procs; echo +{ctrl} > {root}/cgroup.subtree_control), or {}",
                        container_fix(k, Withheld::CgroupWrite)
                    ),
                    None => format!(
                        "move the processes of {root} into a leaf cgroup, then echo +{ctrl} > {root}/cgroup.subtree_control (under systemd: Delegate=yes)"
                    ),
                },
            ),
            (CgroupMode::V2, false) => (
                format!("cgroup controller {ctrl}: not in {root}/cgroup.controllers"),
                match kind {
                    Some(k) => format!(
                        "the parent cgroup does not delegate {ctrl}: {}",
                        container_fix(k, Withheld::CgroupWrite)
                    ),
                    None => format!(
                        "enable it in every parent's cgroup.subtree_control (echo +{ctrl} > …/cgroup.subtree_control; under systemd: Delegate=yes), and boot without cgroup_disable={ctrl}"
                    ),
                },
            ),
            (_, _) => (
                format!("cgroup controller {ctrl}: no v1 hierarchy at {root}/{ctrl}"),
                match kind {
                    Some(k) => container_fix(k, Withheld::CgroupWrite),
                    None => format!(
                        "mkdir -p {root}/{ctrl} && mount -t cgroup -o {ctrl} cgroup {root}/{ctrl} (and boot without cgroup_disable={ctrl})"
                    ),
                },
            ),
        };
        acc.lack(
            what,
            Some(protection),
            format!("{fix}; or allow it to be missing with best_effort = [\"{protection}\"]"),
        );
    }
    if limits.swap.is_some() && memory_ok && cg.swap_control.ok != Some(true) {
        let protection = Protection::CgroupSwap;
        let detail = cg.swap_control.detail.as_deref().unwrap_or("unknown");
        let fix = match (cg.swap_control.ok, mode) {
            (None, _) => unknown_fix(&cg.swap_control),
            (_, CgroupMode::V2) => {
                "boot without swapaccount=0 (memory.swap.max appears with swap accounting)".into()
            }
            _ => "boot with swapaccount=1 (swap accounting: memory.memsw.*), or turn swap off (swapoff -a)".into(),
        };
        acc.lack(
            format!("\"no swap\" ({detail})"),
            Some(protection),
            format!("{fix}; or allow it to be missing with best_effort = [\"{protection}\"]"),
        );
    }
}
