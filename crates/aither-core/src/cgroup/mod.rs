//! cgroups: one interface, a v1 backend (also used on hybrid hosts, plus membership in the
//! unified hierarchy) and a v2 backend. Roots are parameters so that a temporary directory can
//! stand in for /sys/fs/cgroup (see the shared test table in `tests.rs`).
//!
//! Aither only ever creates cgroups below `<root>/aither/` (v2) or `<root>/<controller>/aither/`
//! (v1), or, on pure v2 in a cgroup systemd delegated to it, below `<delegated>/aither/`
//! (`delegate.rs`); it never touches another cgroup. docs/cgroups.md says what is written
//! where, and why this is a small cgroupfs layer rather than the cgroups-rs crate.

pub mod delegate;
pub mod devices;
pub mod freezer;
pub mod stats;
mod v1;
mod v2;

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::policy::Protection;

pub use v1::V1;
pub use v2::V2;

/// The default cgroupfs mount.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// The directory (below each hierarchy) that holds every Aither cgroup.
pub const SUBTREE: &str = "aither";

/// Errors of the cgroup layer. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot detect the cgroup mode of {root}: {source}")]
    Detect {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup controller `{controller}` is not available ({detail}); the policy requires it (allow it to be missing with best_effort = [\"{protection}\"])")]
    ControllerMissing {
        controller: &'static str,
        detail: String,
        protection: Protection,
    },
    #[error("failed to create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {value:?} to {path}: {source}{hint}")]
    Write {
        path: PathBuf,
        value: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach the device program to {path}: {source}; the policy requires it (allow it to be missing with best_effort = [\"cgroup-devices\"])")]
    DeviceProgram {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup freezer: {detail}; pause needs cgroup v2 (cgroup.freeze, Linux 5.2+) or the v1 freezer hierarchy (mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer)")]
    FreezerMissing { detail: String },
    #[error("{path} did not read frozen within {waited_ms} ms (last: {last:?}; a task in an uninterruptible sleep holds a freeze off); the cgroup was thawed again")]
    FreezeTimeout {
        path: PathBuf,
        waited_ms: u64,
        last: String,
    },
    #[error("failed to remove cgroup {path}: {source} (processes still inside)")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup layout the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Only v1 hierarchies.
    V1,
    /// v1 controllers plus a controller-less cgroup2 at `<root>/unified`.
    Hybrid,
    /// One unified cgroup2 hierarchy.
    V2,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

fn fs_magic(p: &Path) -> io::Result<i64> {
    let st = nix::sys::statfs::statfs(p).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64)
}

/// Detects the cgroup mode by the filesystem magic of `root` (and `root/unified`).
/// `AITHER_CGROUP_MODE=v1|hybrid|v2` overrides detection (for fake roots in tests; a test
/// switch, compiled out of release builds: src/testhooks.rs).
pub fn detect(root: &Path) -> Result<CgroupMode, CgroupError> {
    if let Some(m) = crate::testhooks::var("AITHER_CGROUP_MODE") {
        match m.as_str() {
            "v1" => return Ok(CgroupMode::V1),
            "hybrid" => return Ok(CgroupMode::Hybrid),
            "v2" => return Ok(CgroupMode::V2),
            _ => {}
        }
    }
    let err = |source| CgroupError::Detect {
        root: root.to_path_buf(),
        source,
    };
    match fs_magic(root).map_err(err)? {
        CGROUP2_SUPER_MAGIC => Ok(CgroupMode::V2),
        TMPFS_MAGIC | CGROUP_SUPER_MAGIC => {
            if fs_magic(&root.join("unified")).ok() == Some(CGROUP2_SUPER_MAGIC) {
                Ok(CgroupMode::Hybrid)
            } else {
                Ok(CgroupMode::V1)
            }
        }
        other => Err(err(io::Error::other(format!(
            "not a cgroup filesystem (magic {other:#x})"
        )))),
    }
}

/// The cgroup root in use: `AITHER_CGROUP_ROOT` or /sys/fs/cgroup.
pub fn root() -> PathBuf {
    crate::testhooks::var_os("AITHER_CGROUP_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// Limits, with one meaning on both versions. `None` means "not limited".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limits {
    /// Bytes of memory (RAM + page cache).
    pub memory: Option<u64>,
    /// Bytes of swap on top of memory; `Some(0)` = no swap.
    pub swap: Option<u64>,
    /// CPU bandwidth: quota microseconds per period microseconds.
    pub cpu: Option<CpuQuota>,
    /// Maximum number of tasks; never 0 (0 is refused, not "unlimited").
    pub pids: Option<u64>,
    /// Devices the sandbox may open (everything else: EPERM); None: no device rules (the
    /// sandbox's /dev holds only the harmless base set and a user namespace cannot mknod).
    /// Set for GPU leases: enforced by the v1 devices controller and by a BPF device program
    /// on cgroup2 (both on a hybrid host).
    #[serde(default)]
    pub devices: Option<Vec<devices::DeviceRule>>,
}

impl Limits {
    /// The controllers these limits need, each with the protection that names it in a
    /// policy's `best_effort`. One list for both backends, so a limit means the same on each.
    pub fn controllers(&self) -> Vec<(&'static str, Protection)> {
        let mut v = Vec::with_capacity(3);
        if self.memory.is_some() || self.swap.is_some() {
            v.push(("memory", Protection::CgroupMemory));
        }
        if self.cpu.is_some() {
            v.push(("cpu", Protection::CgroupCpu));
        }
        if self.pids.is_some() {
            v.push(("pids", Protection::CgroupPids));
        }
        v
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuQuota {
    /// A quota of `cpus` CPUs over a 100 ms period.
    pub fn from_cpus(cpus: f64) -> CpuQuota {
        let period_us = 100_000;
        CpuQuota {
            quota_us: ((cpus * period_us as f64).round() as u64).max(1000),
            period_us,
        }
    }
}

/// A backend: creates cgroups for sandboxes.
pub trait CgroupManager: Send + Sync {
    fn mode(&self) -> CgroupMode;
    /// Creates `aither/<id>` in every hierarchy used and applies the limits. A limit whose
    /// controller is missing fails unless its protection is in `best_effort` (then it is
    /// skipped and named in `Cgroup::skipped`).
    fn create(
        &self,
        id: &str,
        limits: &Limits,
        best_effort: &[Protection],
    ) -> Result<Cgroup, CgroupError>;
    /// Reads the limits back from the kernel's files.
    fn read_limits(&self, cg: &Cgroup) -> Result<Limits, CgroupError>;
    /// Number of OOM kills in the cgroup so far.
    fn oom_kills(&self, cg: &Cgroup) -> u64;
    /// Kills every process in the cgroup, a frozen one included (v1: signalled, then thawed).
    fn kill_all(&self, cg: &Cgroup);
    /// Freezes every process in the cgroup (`aitherctl pause`) and waits, at most
    /// `freezer::FREEZE_TIMEOUT`, until the kernel reports it frozen; a freeze not confirmed
    /// in time is undone. `FreezerMissing` where the host (or this cgroup) has no freezer.
    fn freeze(&self, cg: &Cgroup) -> Result<(), CgroupError>;
    /// Thaws a frozen cgroup (`aitherctl resume`); a thawed one stays as it is.
    fn thaw(&self, cg: &Cgroup) -> Result<(), CgroupError>;
    /// Whether the cgroup is frozen or being frozen (a paused agent adopted after a restart).
    fn frozen(&self, cg: &Cgroup) -> bool;
    /// Where this host's freezer is, for `doctor`; `FreezerMissing` when it has none.
    fn freezer(&self) -> Result<PathBuf, CgroupError>;
    /// The `aither/` directories this backend creates sandboxes in.
    fn subtree_dirs(&self) -> Vec<PathBuf>;
    /// The cgroup2 directory of `id` (pure v2, or the unified hierarchy of a hybrid host),
    /// created now so that the sandbox can be born in it (clone3 CLONE_INTO_CGROUP); `create`
    /// later completes it. `None` on pure v1.
    fn birth_dir(&self, id: &str) -> Result<Option<PathBuf>, CgroupError>;
}

/// One sandbox's cgroup: a directory per hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    pub id: String,
    /// (controller or "unified", directory).
    pub dirs: Vec<(&'static str, PathBuf)>,
    /// Protections that were skipped as best-effort.
    pub skipped: Vec<Protection>,
}

impl Cgroup {
    /// An O_DIRECTORY descriptor of `dir` when it is a real cgroup2 directory (for
    /// CLONE_INTO_CGROUP); None for a fake root.
    pub fn open_cgroup2(dir: &Path) -> Result<Option<OwnedFd>, CgroupError> {
        if fs_magic(dir).ok() != Some(CGROUP2_SUPER_MAGIC) {
            return Ok(None);
        }
        crate::sys::open(dir, libc::O_RDONLY | libc::O_DIRECTORY)
            .map(Some)
            .map_err(|source| CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            })
    }

    /// How a new process gets into this cgroup without stalling (docs/cgroups.md): a cgroup2
    /// directory is entered at birth with clone3(CLONE_INTO_CGROUP); each v1 hierarchy by the
    /// child writing "0" to `tasks`, which moves only the calling thread and so skips the
    /// global threadgroup lock that a `cgroup.procs` write takes (an RCU grace period, 8 ms
    /// and more when launches are spaced out). The files are opened here, by the launcher: the
    /// kernel checks the opener's credentials (since 5.16), not the writer's.
    pub fn join_handles(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        let mut files = Vec::new();
        for (ctrl, d) in &self.dirs {
            if *ctrl == "unified" && fs_magic(d).ok() == Some(CGROUP2_SUPER_MAGIC) {
                // Entered at birth (clone3 CLONE_INTO_CGROUP, see `open_cgroup2`).
                continue;
            }
            // v1 `tasks`; a fake (plain-directory) v2 root gets `cgroup.procs`.
            let file = if *ctrl == "unified" {
                "cgroup.procs"
            } else {
                "tasks"
            };
            let p = d.join(file);
            let fd = crate::sys::open(&p, libc::O_WRONLY | libc::O_CREAT)
                .map_err(|source| CgroupError::Read { path: p, source })?;
            files.push(fd);
        }
        Ok(files)
    }

    /// Pids currently in the cgroup (from the first hierarchy).
    pub fn pids(&self) -> Vec<i32> {
        let Some((_, d)) = self.dirs.first() else {
            return vec![];
        };
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// One rmdir per directory, no retry: true when every directory is gone. For a cgroup
    /// that should be empty already (its sandbox's pid namespace has ended); when one is still
    /// busy (a process that joined from outside, e.g. `aitherctl exec`), kill and `remove`.
    pub fn remove_now(&self) -> bool {
        let mut all = true;
        for (_, d) in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A fake (plain-directory) root holds the files we wrote.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    all &= fs::remove_dir_all(d).is_ok();
                }
                Err(_) => all = false,
            }
        }
        all
    }

    /// Removes every directory, retrying while the kernel still tears processes down (EBUSY).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut last = Ok(());
        for (_, d) in &self.dirs {
            last = remove_dir_retry(d);
        }
        last
    }
}

/// Puts the device rules on a cgroup2 directory as a BPF device program. A fake root (a plain
/// directory, in tests) has no hook: the rules are written to `aither.devices` there instead,
/// as a record of what a real host would attach.
pub(crate) fn attach_device_rules(
    dir: &Path,
    rules: &[devices::DeviceRule],
    best_effort: &[Protection],
    skipped: &mut Vec<Protection>,
) -> Result<(), CgroupError> {
    if fs_magic(dir).ok() != Some(CGROUP2_SUPER_MAGIC) {
        let text: String = rules.iter().map(|r| r.v1_line() + "\n").collect();
        return fs::write(dir.join("aither.devices"), text).map_err(|source| CgroupError::Write {
            path: dir.join("aither.devices"),
            value: "device rules".into(),
            hint: "",
            source,
        });
    }
    let fd = crate::sys::open(dir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|source| {
        CgroupError::Read {
            path: dir.to_path_buf(),
            source,
        }
    })?;
    match devices::attach(&fd, rules) {
        Ok(()) => Ok(()),
        Err(_) if best_effort.contains(&Protection::CgroupDevices) => {
            skipped.push(Protection::CgroupDevices);
            Ok(())
        }
        Err(source) => Err(CgroupError::DeviceProgram {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Parses a v1 `devices.list` back into rules.
pub(crate) fn parse_devices_list(text: &str) -> Vec<devices::DeviceRule> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let ty = it.next()?;
            let (ma, mi) = it.next()?.split_once(':')?;
            let access = it.next()?.to_string();
            Some(devices::DeviceRule {
                block: ty == "b",
                major: if ma == "*" {
                    u32::MAX
                } else {
                    ma.parse().ok()?
                },
                minor: if mi == "*" { None } else { mi.parse().ok() },
                access,
            })
        })
        .collect()
}

pub(crate) fn remove_dir_retry(d: &Path) -> Result<(), CgroupError> {
    let mut delay = Duration::from_micros(200);
    for _ in 0..40 {
        match fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(50));
            }
            // A fake (plain-directory) root holds the files we wrote: clear them and retry.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                if fs::remove_dir_all(d).is_ok() {
                    return Ok(());
                }
                return Err(CgroupError::Remove {
                    path: d.to_path_buf(),
                    source: e,
                });
            }
            Err(e) => {
                return Err(CgroupError::Remove {
                    path: d.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Err(CgroupError::Remove {
        path: d.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EBUSY),
    })
}

/// Writes a control file in one write(2); creates it only under a fake root.
pub(crate) fn write_ctl(
    dir: &Path,
    file: &str,
    value: &str,
    hint: &'static str,
) -> Result<(), CgroupError> {
    let path = dir.join(file);
    let r = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|f| {
            use std::os::fd::AsFd;
            crate::sys::write_all_once(f.as_fd(), value.as_bytes())
        });
    r.map_err(|source| CgroupError::Write {
        path,
        value: value.to_string(),
        hint,
        source,
    })
}

pub fn read_ctl(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| CgroupError::Read { path, source })
}

/// Reads "key N" from a flat-keyed file such as memory.events.
pub(crate) fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let s = fs::read_to_string(dir.join(file)).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub(crate) fn mkdir_p(p: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = p.parent() {
                mkdir_p(parent)?;
            }
            fs::create_dir(p)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|source| CgroupError::Create {
                    path: p.to_path_buf(),
                    source,
                })
        }
        Err(source) => Err(CgroupError::Create {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// The manager for this host (or for `AITHER_CGROUP_ROOT` / `AITHER_CGROUP_MODE`).
pub fn manager() -> Result<Box<dyn CgroupManager>, CgroupError> {
    manager_at(&root())
}

/// The manager for the hierarchy at `root`. On pure v2 its subtree is `<base>/aither` where
/// this process already sits in a delegated cgroup's leaf (`delegate::placement`: aitherd's
/// shims), else `<root>/aither`.
pub fn manager_at(root: &Path) -> Result<Box<dyn CgroupManager>, CgroupError> {
    Ok(match detect(root)? {
        CgroupMode::V1 => Box::new(V1::new(root.to_path_buf(), false)),
        CgroupMode::Hybrid => Box::new(V1::new(root.to_path_buf(), true)),
        CgroupMode::V2 => match delegate::placement(root, CgroupMode::V2) {
            delegate::Placement::Delegated { base } => Box::new(V2::new(base)),
            delegate::Placement::Scopes { slice, .. } => {
                Box::new(V2::in_scopes(root.to_path_buf(), slice))
            }
            delegate::Placement::TopLevel { .. } => Box::new(V2::new(root.to_path_buf())),
        },
    })
}

/// The manager, and where its sandboxes go (`delegate::placement`), for aitherd to log.
pub fn manager_placed() -> Result<(Box<dyn CgroupManager>, delegate::Placement), CgroupError> {
    let root = root();
    let mode = detect(&root)?;
    Ok((manager_at(&root)?, delegate::placement(&root, mode)))
}

/// Removes leftovers of runs whose launcher died without cleaning up (e.g. SIGKILL): cgroups
/// named `*-<pid>` whose pid no longer exists and that hold no process. Only our subtree.
pub fn collect_garbage(cg_dirs: &[PathBuf]) {
    // Every launch runs this over every hierarchy (six on a v1 host), and each sandbox has a
    // directory of the same name in each: its launcher's pid is asked about once, not once
    // per hierarchy (with 200 agents, 200 kill(0) calls instead of 1,200 per launch).
    let mut seen: std::collections::HashMap<i32, bool> = std::collections::HashMap::new();
    for base in cg_dirs {
        let Ok(rd) = fs::read_dir(base) else { continue };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            // Signal 0 only checks for existence (EPERM: it exists, someone else's).
            let alive = *seen.entry(pid).or_insert_with(|| {
                matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                    Ok(()) | Err(nix::errno::Errno::EPERM)
                )
            });
            if alive || !e.path().is_dir() {
                continue;
            }
            let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                let _ = remove_dir_retry(&e.path());
            }
        }
    }
}

/// The directories of Aither cgroups (below `aither/` in a hierarchy under `root`) that
/// process `pid` belongs to, read from /proc/<pid>/cgroup. Lines outside the subtree are not
/// ours and are ignored.
pub fn aither_dirs_of(root: &Path, pid: i32) -> Result<Vec<PathBuf>, CgroupError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(|source| CgroupError::Read {
        path: file.clone(),
        source,
    })?;
    Ok(parse_membership(root, &text))
}

fn parse_membership(root: &Path, text: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        // `/aither/<id>`, or `<delegated>/aither/<id>` (delegate.rs): a sandbox's cgroup is
        // always the child of an `aither` directory.
        let comps: Vec<&str> = path.split('/').collect();
        if comps.len() < 3
            || comps[comps.len() - 2] != SUBTREE
            || comps.iter().any(|c| *c == ".." || *c == ".")
        {
            continue;
        }
        let rel = path.trim_start_matches('/');
        // cgroup2 (`0::`) is `root/unified` on a hybrid host and `root` itself on pure v2; a
        // v1 hierarchy is mounted under its controller list ("cpu,cpuacct") or, through a
        // symlink or on its own, under one of its controllers.
        let candidates: Vec<PathBuf> = if ctrls.is_empty() {
            vec![root.join("unified").join(rel), root.join(rel)]
        } else {
            std::iter::once(ctrls)
                .chain(ctrls.split(','))
                .map(|c| root.join(c.trim_start_matches("name=")).join(rel))
                .collect()
        };
        if let Some(d) = candidates
            .into_iter()
            .find(|d| d.join("cgroup.procs").exists())
        {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// Moves the calling process into each of `dirs` (its `cgroup.procs`).
pub fn join(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let me = std::process::id().to_string();
    for d in dirs {
        write_ctl(d, "cgroup.procs", &me, "")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
