//! Gathering `HostFacts` from a root directory, and the parsers of the files read.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    probe, CgroupFacts, ContainerFacts, DoctorError, GpuFacts, HostFacts, LandlockFacts, Overrides,
    Probe, SeccompFacts, UserNsFacts, FACTS_FILE,
};
use crate::cgroup::{self, CgroupMode, SUBTREE};

/// The controllers every policy's limits use (`Limits::controllers`).
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// A file under `root`, trimmed; None when absent or unreadable.
fn read(root: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_bool(root: &Path, rel: &str) -> Option<bool> {
    match read(root, rel)?.as_str() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

fn is_real_root(root: &Path) -> bool {
    fs::canonicalize(root).is_ok_and(|p| p == Path::new("/"))
}

fn read_overrides(root: &Path) -> Result<Option<(PathBuf, Overrides)>, DoctorError> {
    let path = root.join(FACTS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DoctorError::Read { path, source }),
    };
    let ov: Overrides = toml::from_str(&text).map_err(|e| DoctorError::Overrides {
        path: path.clone(),
        message: e.message().trim().to_string(),
    })?;
    Ok(Some((path, ov)))
}

pub(super) fn gather(root: &Path) -> Result<HostFacts, DoctorError> {
    let real = is_real_root(root);
    let (ov_path, ov) = match read_overrides(root)? {
        Some((p, o)) => (Some(p), o),
        None => (None, Overrides::default()),
    };
    let env = |k: &str| -> Option<String> {
        match &ov.env {
            Some(map) => map.get(k).cloned(),
            None => std::env::var(k).ok(),
        }
    };
    // A syscall fact: stated in the facts file, probed on a real root, unknown otherwise.
    let syscall_fact = |stated: Option<bool>, probe: &dyn Fn() -> Probe| -> Probe {
        match stated {
            Some(v) => Probe::from_bool(v, &format!("stated in {FACTS_FILE}")),
            None if real => probe(),
            None => Probe::unknown(format!(
                "not probed: {} is not the running system's root (state it in {FACTS_FILE})",
                root.display()
            )),
        }
    };

    let kernel = read(root, "proc/sys/kernel/osrelease").or_else(|| {
        if real {
            probe::uname_release()
        } else {
            None
        }
    });
    let euid = ov.euid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());

    let userns = UserNsFacts {
        max_user_namespaces: read(root, "proc/sys/user/max_user_namespaces")
            .and_then(|s| s.parse().ok()),
        unprivileged_userns_clone: read_bool(root, "proc/sys/kernel/unprivileged_userns_clone"),
        apparmor_restrict_unprivileged_userns: read_bool(
            root,
            "proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        ),
        create: syscall_fact(ov.userns_create, &probe::namespaces),
    };

    let landlock = LandlockFacts {
        abi: ov
            .landlock_abi
            .or_else(|| real.then(crate::sandbox::landlock::kernel_abi)),
        lsm: read(root, "sys/kernel/security/lsm").filter(|s| !s.is_empty()),
    };

    let status = read(root, "proc/self/status");
    let (mode, filters_line) = status
        .as_deref()
        .map(parse_status_seccomp)
        .unwrap_or((None, false));
    let filter = match read(root, "proc/sys/kernel/seccomp/actions_avail") {
        Some(a) => Some(a.split_whitespace().any(|x| x == "errno")),
        None if filters_line => Some(true),
        // No `Seccomp:` line at all: a kernel without CONFIG_SECCOMP.
        None if status.is_some() && mode.is_none() => Some(false),
        // actions_avail exists on every kernel with filter support since 4.14.
        None if real && status.is_some() => Some(false),
        None => None,
    };
    let seccomp = SeccompFacts { filter, mode };

    let meminfo = read(root, "proc/meminfo");
    let swap_total_kb = meminfo.as_deref().and_then(parse_meminfo_swap_total);

    let cg_root = if real {
        cgroup::root()
    } else {
        root.join("sys/fs/cgroup")
    };
    let cgroup = cgroup_facts(
        root,
        &cg_root,
        real,
        ov.cgroup_mode.as_deref(),
        ov.cgroup_writable,
        swap_total_kb,
    )?;

    let bpf_root = cgroup_facts_unified(&cgroup);
    Ok(HostFacts {
        root: root.to_path_buf(),
        overrides: ov_path,
        kernel,
        euid,
        userns,
        landlock,
        seccomp,
        cgroup,
        clone3: syscall_fact(ov.clone3, &probe::clone3),
        pidfd_open: syscall_fact(ov.pidfd_open, &probe::pidfd_open),
        bpf_cgroup_device: syscall_fact(ov.bpf_cgroup_device, &|| {
            probe::bpf_cgroup_device(bpf_root.as_deref())
        }),
        kernel_audit: syscall_fact(None, &|| match crate::audit::kernel::enabled() {
            Ok(true) => Probe::yes(
                "audit is on: Landlock (ABI 7) and seccomp-kill denials reach `aitherctl audit`",
            ),
            Ok(false) => Probe::no(
                "audit is off: the kernel records no denials (turn it on with `auditctl -e 1` \
                 or boot with audit=1; docs/audit.md)",
            ),
            Err(e) => Probe::unknown(format!("AUDIT_GET: {e}")),
        }),
        gpu: gpu_facts(root),
        container: container_facts(root, &env),
        swap_total_kb,
    })
}

/// Where a cgroup2 hierarchy is, for the BPF device-program note.
fn cgroup_facts_unified(cg: &CgroupFacts) -> Option<PathBuf> {
    match cg.mode? {
        CgroupMode::V2 => Some(cg.root.clone()),
        CgroupMode::Hybrid => Some(cg.root.join("unified")),
        CgroupMode::V1 => None,
    }
}

/// The mode by what the directory holds: `cgroup.controllers` at the top (v2), in `unified/`
/// (hybrid), or controller hierarchies only (v1). On a real cgroupfs this agrees with the
/// filesystem magic `cgroup::detect` uses; a fake root has only files.
pub(super) fn detect_by_files(cg_root: &Path) -> Option<CgroupMode> {
    if cg_root.join("cgroup.controllers").is_file() {
        return Some(CgroupMode::V2);
    }
    if cg_root.join("unified/cgroup.controllers").is_file() {
        return Some(CgroupMode::Hybrid);
    }
    let any_v1 = fs::read_dir(cg_root)
        .ok()?
        .flatten()
        .any(|e| e.file_name() != "unified" && e.path().join("cgroup.procs").is_file());
    any_v1.then_some(CgroupMode::V1)
}

fn parse_mode(s: &str) -> Option<CgroupMode> {
    match s {
        "v1" => Some(CgroupMode::V1),
        "hybrid" => Some(CgroupMode::Hybrid),
        "v2" => Some(CgroupMode::V2),
        _ => None,
    }
}

/// A directory access(2) does not let us write to, with its errno.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", path.display(), probe::errno_text(source))]
struct NotWritable {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn access_w(p: &Path) -> Result<(), NotWritable> {
    let not_writable = |source| NotWritable {
        path: p.to_path_buf(),
        source,
    };
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| not_writable(std::io::Error::from(e)))
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn cgroup_facts(
    root: &Path,
    cg_root: &Path,
    real: bool,
    stated_mode: Option<&str>,
    stated_writable: Option<bool>,
    swap_total_kb: Option<u64>,
) -> Result<CgroupFacts, DoctorError> {
    let mode = match stated_mode {
        Some(s) => Some(parse_mode(s).ok_or_else(|| DoctorError::Overrides {
            path: root.join(FACTS_FILE),
            message: format!("cgroup_mode {s:?}: expected \"v1\", \"hybrid\" or \"v2\""),
        })?),
        // What the launcher will use (filesystem magic, AITHER_CGROUP_MODE).
        None if real => cgroup::detect(cg_root)
            .ok()
            .or_else(|| detect_by_files(cg_root)),
        None => detect_by_files(cg_root),
    };
    let mut f = CgroupFacts {
        root: cg_root.to_path_buf(),
        mode,
        ..CgroupFacts::default()
    };
    // Where this process's sandboxes go (src/cgroup/delegate.rs); aitherd logs its own.
    if let (true, Some(m)) = (real, mode) {
        f.placement = Some(cgroup::delegate::placement(cg_root, m));
    }
    let Some(mode) = mode else {
        let why = format!("no cgroup filesystem found at {}", cg_root.display());
        f.writable = Probe::unknown(why.clone());
        f.delegated = Probe::unknown(why.clone());
        f.swap_control = Probe::unknown(why.clone());
        f.freezer = Probe::unknown(why);
        return Ok(f);
    };
    match mode {
        CgroupMode::V2 => {
            f.controllers =
                words(&cgroup::read_ctl(cg_root, "cgroup.controllers").unwrap_or_default());
            f.subtree = vec![cg_root.join(SUBTREE)];
            match &f.placement {
                Some(cgroup::delegate::Placement::Delegated { base }) => {
                    f.subtree = vec![base.join(SUBTREE)];
                }
                // systemd makes each scope below the slice; ours is the subtree in each.
                Some(cgroup::delegate::Placement::Scopes { slice, .. }) => {
                    f.subtree = vec![slice.clone()];
                }
                _ => {}
            }
        }
        CgroupMode::V1 | CgroupMode::Hybrid => {
            let mut names: Vec<String> = fs::read_dir(cg_root)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| {
                            e.file_name() != "unified" && e.path().join("cgroup.procs").is_file()
                        })
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            f.controllers = names;
            f.subtree = LIMIT_CONTROLLERS
                .iter()
                .map(|c| cg_root.join(c).join(SUBTREE))
                .collect();
            if mode == CgroupMode::Hybrid {
                f.subtree.push(cg_root.join("unified").join(SUBTREE));
            }
        }
    }

    f.writable = match stated_writable {
        Some(v) => Probe::from_bool(v, &format!("stated in {FACTS_FILE}")),
        None => {
            let mut checked = 0;
            let mut errors = Vec::new();
            for d in &f.subtree {
                let target = if d.is_dir() {
                    d.clone()
                } else {
                    match d.parent() {
                        Some(p) if p.is_dir() => p.to_path_buf(),
                        _ => continue,
                    }
                };
                checked += 1;
                if let Err(e) = access_w(&target) {
                    errors.push(e.to_string());
                }
            }
            if !errors.is_empty() {
                Probe::no(errors.join("; "))
            } else if checked == 0 {
                Probe::unknown("none of the hierarchies of the subtree exists")
            } else {
                Probe::yes("the subtree (or where it will be created) is writable")
            }
        }
    };

    f.delegated = match mode {
        CgroupMode::V2 => match &f.placement {
            Some(cgroup::delegate::Placement::Delegated { base }) => {
                v2_delegation(base, &f.controllers)
            }
            _ => v2_delegation(cg_root, &f.controllers),
        },
        _ => Probe::yes("not needed: the limits use v1 hierarchies"),
    };

    f.freezer = freezer_fact(cg_root, mode);

    f.swap_control = match mode {
        CgroupMode::V2 => v2_swap(root, cg_root),
        _ => {
            if cg_root.join("memory/memory.memsw.limit_in_bytes").exists() {
                Probe::yes("memory.memsw.limit_in_bytes (swap accounting)")
            } else if swap_total_kb == Some(0) {
                Probe::yes("no swap accounting, but the host has no swap (SwapTotal 0)")
            } else if swap_total_kb.is_none() {
                Probe::unknown("no memory.memsw.* and /proc/meminfo unreadable")
            } else {
                Probe::no("the host has swap but no swap accounting (no memory.memsw.*)")
            }
        }
    };
    Ok(f)
}

/// Which freezer `aitherctl pause` uses (the same choice as `CgroupManager::freeze`).
fn freezer_fact(cg_root: &Path, mode: CgroupMode) -> Probe {
    let v1 = cg_root.join("freezer");
    match mode {
        CgroupMode::V2 => Probe::yes("cgroup2 cgroup.freeze (Linux 5.2+)"),
        _ if v1.join("cgroup.procs").is_file() => {
            Probe::yes(format!("v1 freezer hierarchy at {}", v1.display()))
        }
        CgroupMode::Hybrid => Probe::yes("cgroup.freeze of the unified hierarchy"),
        CgroupMode::V1 => Probe::no(format!(
            "no v1 freezer hierarchy at {}: aitherctl pause is refused (mount -t cgroup -o freezer freezer {})",
            v1.display(),
            v1.display()
        )),
    }
}

/// Pure v2: the limit controllers must reach `aither/`: enabled in the root's
/// `cgroup.subtree_control`, or enableable there (the real root, or a namespace root without
/// processes: the no-internal-process rule refuses it otherwise, EBUSY).
fn v2_delegation(cg_root: &Path, available: &[String]) -> Probe {
    let needed: Vec<&str> = LIMIT_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.iter().any(|a| a == c))
        .collect();
    let mut levels = vec![cg_root.to_path_buf()];
    let sub = cg_root.join(SUBTREE);
    if sub.is_dir() {
        levels.push(sub);
    }
    for dir in &levels {
        let enabled = words(&cgroup::read_ctl(dir, "cgroup.subtree_control").unwrap_or_default());
        let lacking: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|c| !enabled.iter().any(|e| e == c))
            .collect();
        if lacking.is_empty() {
            continue;
        }
        // The real root cgroup has no cgroup.type and is exempt from the rule.
        let exempt = dir == cg_root && !dir.join("cgroup.type").exists();
        let procs = cgroup::read_ctl(dir, "cgroup.procs").unwrap_or_default();
        if !exempt && !procs.trim().is_empty() {
            let n = procs.lines().count();
            return Probe::no(format!(
                "{} holds {n} process(es) and does not enable {} for its children (the no-internal-process rule refuses it, EBUSY)",
                dir.display(),
                lacking.join(" ")
            ));
        }
    }
    Probe::yes(format!(
        "{} can be enabled for {}",
        needed.join(" "),
        cg_root.join(SUBTREE).display()
    ))
}

/// Pure v2: memory.swap.max exists wherever the memory controller is enabled, unless the
/// kernel lacks swap support or was booted with swapaccount=0.
fn v2_swap(root: &Path, cg_root: &Path) -> Probe {
    let mut dirs = vec![cg_root.join(SUBTREE)];
    if let Ok(rd) = fs::read_dir(cg_root) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for d in dirs {
        if d.join("memory.max").exists() {
            return Probe::from_bool(
                d.join("memory.swap.max").exists(),
                &format!("memory.swap.max next to {}", d.join("memory.max").display()),
            );
        }
    }
    let cmdline = read(root, "proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "swapaccount=0") {
        return Probe::no("the kernel was booted with swapaccount=0");
    }
    Probe::yes(
        "inferred: no cgroup with the memory controller to look at yet, and no swapaccount=0",
    )
}

fn gpu_facts(root: &Path) -> GpuFacts {
    let nvidia_driver = read(root, "proc/driver/nvidia/version")
        .and_then(|v| v.lines().next().map(|l| l.trim().to_string()));
    let mut devices: Vec<String> = fs::read_dir(root.join("dev"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| {
                    n.strip_prefix("nvidia")
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    devices.sort_by_key(|d| (d.len(), d.clone()));
    let nvml_library = [
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
        "usr/lib64",
        "usr/lib",
        "lib/x86_64-linux-gnu",
    ]
    .iter()
    .map(|d| root.join(d).join("libnvidia-ml.so.1"))
    .find(|p| p.exists())
    .map(|p| p.display().to_string());
    let config = crate::testhooks::var_os("AITHER_GPUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("etc/aither/gpus.toml"));
    let simulated = crate::gpu::GpuConfig::parse_file(&config)
        .ok()
        .filter(|c| c.backend == crate::gpu::BackendKind::Simulated)
        .map(|c| (c.device.len(), config.display().to_string()));
    GpuFacts {
        nvidia_driver,
        devices,
        nvml_library,
        simulated,
    }
}

fn container_facts(root: &Path, env: &dyn Fn(&str) -> Option<String>) -> ContainerFacts {
    let mut strong: Vec<(String, String)> = Vec::new();
    let mut evidence = Vec::new();
    if let Some(text) = read(root, "proc/1/cgroup") {
        if let Some((kind, line)) = parse_proc1_cgroup(&text) {
            strong.push((kind.to_string(), format!("/proc/1/cgroup: {line}")));
        }
    }
    if root.join("run/.containerenv").exists() {
        strong.push(("podman".into(), "/run/.containerenv".into()));
    }
    if env("KUBERNETES_SERVICE_HOST").is_some() {
        strong.push(("kubernetes".into(), "KUBERNETES_SERVICE_HOST is set".into()));
    }
    if let Ok(raw) = fs::read(root.join("proc/1/environ")) {
        if let Some(v) = raw
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("container="))
            .filter(|v| !v.is_empty())
        {
            strong.push((v.to_string(), format!("pid 1 has container={v}")));
        }
    }
    let dockerenv = root.join(".dockerenv").exists();
    let root_fs = read(root, "proc/self/mountinfo")
        .as_deref()
        .and_then(parse_mountinfo_root);
    let mut kind = strong.first().map(|(k, _)| k.clone());
    evidence.extend(strong.into_iter().map(|(_, e)| e));
    if dockerenv {
        match &root_fs {
            Some((fstype, _)) if fstype == "overlay" => {
                evidence.push("/.dockerenv, and / is an overlay filesystem".into());
                kind.get_or_insert_with(|| "docker".into());
            }
            Some((fstype, source)) if kind.is_none() => evidence.push(format!(
                "/.dockerenv present, but / is {fstype} on {source} and pid 1 is in no container's cgroup: not counted (an image-built VM?)"
            )),
            None if kind.is_none() => {
                evidence.push("/.dockerenv".into());
                kind = Some("docker".into());
            }
            _ => evidence.push("/.dockerenv".into()),
        }
    }
    let truthy = |k: &str| {
        env(k).is_some_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    };
    let ci = if truthy("GITHUB_ACTIONS") {
        Some("github-actions")
    } else if truthy("GITLAB_CI") {
        Some("gitlab-ci")
    } else if truthy("BUILDKITE") {
        Some("buildkite")
    } else if truthy("CI") {
        Some("ci")
    } else {
        None
    };
    ContainerFacts {
        kind,
        evidence,
        ci: ci.map(str::to_string),
    }
}

/// The container runtime named by a line of /proc/1/cgroup (`docker`, `kubernetes`, …) and
/// that line; None when pid 1's cgroups name none.
pub fn parse_proc1_cgroup(text: &str) -> Option<(&'static str, String)> {
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let kind = if path.contains("kubepods") {
            "kubernetes"
        } else if path.contains("/docker") || path.contains("docker-") {
            "docker"
        } else if path.contains("libpod") {
            "podman"
        } else if path.contains("/lxc") || path.contains("lxc.payload") {
            "lxc"
        } else if path.contains("containerd") {
            "containerd"
        } else {
            continue;
        };
        return Some((kind, line.trim().to_string()));
    }
    None
}

/// The `Seccomp:` mode of a /proc/<pid>/status, and whether it has a `Seccomp_filters:` line
/// (kernels with filter support, ≥ 5.9).
pub fn parse_status_seccomp(status: &str) -> (Option<u8>, bool) {
    let mut mode = None;
    let mut filters = false;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Seccomp:") {
            mode = v.trim().parse().ok();
        } else if line.starts_with("Seccomp_filters:") {
            filters = true;
        }
    }
    (mode, filters)
}

/// (major, minor) of a kernel release such as "6.18.44-fc-v657" or "5.15.0-91-generic".
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-', '+', '_']);
    let major = it.next()?.parse().ok()?;
    let minor_txt = it.next()?;
    let digits: String = minor_txt.chars().take_while(char::is_ascii_digit).collect();
    Some((major, digits.parse().ok()?))
}

/// SwapTotal of /proc/meminfo in KiB.
pub(super) fn parse_meminfo_swap_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// (filesystem type, source) of the mount at "/" in a mountinfo file (the last one wins:
/// later mounts cover earlier ones).
pub(super) fn parse_mountinfo_root(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut lf = left.split_whitespace();
        let mount_point = lf.nth(4)?;
        if mount_point != "/" {
            return None;
        }
        let mut rf = right.split_whitespace();
        Some((rf.next()?.to_string(), rf.next()?.to_string()))
    })
}
