//! cgroup v2: one directory, controllers enabled in the parent's cgroup.subtree_control.

use std::path::PathBuf;

use super::{
    freezer, keyed, mkdir_p, read_ctl, write_ctl, Cgroup, CgroupError, CgroupManager, CgroupMode,
    CpuQuota, Limits, SUBTREE,
};
use crate::policy::Protection;

pub struct V2 {
    root: PathBuf,
    /// `Some(slice)`: this process's sandboxes are built by launchers in transient scopes of
    /// their own under `slice` (delegate::Placement::Scopes); it only finds them there and
    /// never creates one itself.
    scopes: Option<PathBuf>,
}

impl V2 {
    pub fn new(root: PathBuf) -> V2 {
        V2 { root, scopes: None }
    }

    /// The manager of a process whose launchers run in scopes under `slice` (aitherd where
    /// systemd is pid 1 and aitherd sits in no delegated leaf).
    pub fn in_scopes(root: PathBuf, slice: PathBuf) -> V2 {
        V2 {
            root,
            scopes: Some(slice),
        }
    }

    fn dir(cg: &Cgroup) -> PathBuf {
        cg.dirs[0].1.clone()
    }
}

impl CgroupManager for V2 {
    fn mode(&self) -> CgroupMode {
        CgroupMode::V2
    }

    fn create(
        &self,
        id: &str,
        limits: &Limits,
        best_effort: &[Protection],
    ) -> Result<Cgroup, CgroupError> {
        if let Some(slice) = &self.scopes {
            // Fail closed: never a cgroup where systemd owns the tree (docs/kernels.md).
            return Err(CgroupError::Create {
                path: self.root.join(SUBTREE).join(id),
                source: std::io::Error::other(format!(
                    "systemd is pid 1 and this process is in no delegated cgroup: a sandbox's cgroup is only made by a launcher in a transient scope of its own under {}",
                    slice.display()
                )),
            });
        }
        let available = read_ctl(&self.root, "cgroup.controllers").unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|x| x == c);
        let mut skipped = Vec::new();
        let mut enable = Vec::new();
        for (controller, protection) in limits.controllers() {
            if has(controller) {
                enable.push(controller);
            } else if best_effort.contains(&protection) {
                skipped.push(protection);
            } else {
                return Err(CgroupError::ControllerMissing {
                    controller,
                    detail: format!(
                        "not listed in {}/cgroup.controllers ({available:?})",
                        self.root.display()
                    ),
                    protection,
                });
            }
        }
        // Controllers are enabled in the parents' subtree_control only: a cgroup with
        // processes cannot enable them for children (the no-internal-process rule, EBUSY).
        let parent = self.root.join(SUBTREE);
        mkdir_p(&parent)?;
        let plus: String = enable
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        if !plus.is_empty() {
            let hint = " (controllers must be enabled in the parent and the parent must hold no processes)";
            let current = read_ctl(&self.root, "cgroup.subtree_control").unwrap_or_default();
            if !enable
                .iter()
                .all(|c| current.split_whitespace().any(|x| x == *c))
            {
                write_ctl(&self.root, "cgroup.subtree_control", &plus, hint)?;
            }
            let current = read_ctl(&parent, "cgroup.subtree_control").unwrap_or_default();
            if !enable
                .iter()
                .all(|c| current.split_whitespace().any(|x| x == *c))
            {
                write_ctl(&parent, "cgroup.subtree_control", &plus, hint)?;
            }
        }
        let d = parent.join(id);
        mkdir_p(&d)?;
        let mut cg = Cgroup {
            id: id.to_string(),
            dirs: vec![("unified", d.clone())],
            skipped,
        };
        if let Some(rules) = &limits.devices {
            // Attached before any process enters (the sandbox is born into the cgroup).
            if let Err(e) = super::attach_device_rules(&d, rules, best_effort, &mut cg.skipped) {
                let _ = cg.remove();
                return Err(e);
            }
        }
        let apply = || -> Result<(), CgroupError> {
            if enable.contains(&"memory") {
                if let Some(mem) = limits.memory {
                    write_ctl(&d, "memory.max", &mem.to_string(), "")?;
                }
                if let Some(swap) = limits.swap {
                    write_ctl(&d, "memory.swap.max", &swap.to_string(), "")?;
                }
            }
            if let (true, Some(cpu)) = (enable.contains(&"cpu"), limits.cpu) {
                write_ctl(
                    &d,
                    "cpu.max",
                    &format!("{} {}", cpu.quota_us, cpu.period_us),
                    "",
                )?;
            }
            if let (true, Some(pids)) = (enable.contains(&"pids"), limits.pids) {
                write_ctl(&d, "pids.max", &pids.to_string(), "")?;
            }
            Ok(())
        };
        if let Err(e) = apply() {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn read_limits(&self, cg: &Cgroup) -> Result<Limits, CgroupError> {
        let d = Self::dir(cg);
        let num = |file: &str| -> Result<Option<u64>, CgroupError> {
            match read_ctl(&d, file) {
                Ok(v) if v == "max" => Ok(None),
                Ok(v) => Ok(v.parse().ok()),
                Err(e) if d.join(file).exists() => Err(e),
                Err(_) => Ok(None),
            }
        };
        let cpu = match read_ctl(&d, "cpu.max") {
            Ok(v) => {
                let mut it = v.split_whitespace();
                match (
                    it.next().and_then(|q| q.parse().ok()),
                    it.next().and_then(|p| p.parse().ok()),
                ) {
                    (Some(quota_us), Some(period_us)) => Some(CpuQuota {
                        quota_us,
                        period_us,
                    }),
                    _ => None,
                }
            }
            Err(_) => None,
        };
        Ok(Limits {
            memory: num("memory.max")?,
            swap: num("memory.swap.max")?,
            cpu,
            pids: num("pids.max")?,
            // A real cgroup2 directory's BPF program cannot be read back as rules; a fake
            // root's record can.
            devices: std::fs::read_to_string(d.join("aither.devices"))
                .ok()
                .map(|t| super::parse_devices_list(&t)),
        })
    }

    fn oom_kills(&self, cg: &Cgroup) -> u64 {
        keyed(&Self::dir(cg), "memory.events", "oom_kill").unwrap_or(0)
    }

    fn birth_dir(&self, id: &str) -> Result<Option<PathBuf>, CgroupError> {
        if self.scopes.is_some() {
            return Ok(None);
        }
        let d = self.root.join(SUBTREE).join(id);
        mkdir_p(&d)?;
        Ok(Some(d))
    }

    fn subtree_dirs(&self) -> Vec<PathBuf> {
        match &self.scopes {
            Some(slice) => super::delegate::shim_subtrees(slice),
            None => vec![self.root.join(SUBTREE)],
        }
    }

    fn freeze(&self, cg: &Cgroup) -> Result<(), CgroupError> {
        freezer::freeze_v2(&Self::dir(cg), freezer::FREEZE_TIMEOUT)
    }

    fn thaw(&self, cg: &Cgroup) -> Result<(), CgroupError> {
        freezer::thaw_v2(&Self::dir(cg))
    }

    fn frozen(&self, cg: &Cgroup) -> bool {
        freezer::frozen_v2(&Self::dir(cg))
    }

    fn freezer(&self) -> Result<PathBuf, CgroupError> {
        // cgroup.freeze is in every non-root cgroup2 directory since 5.2; our subtree's
        // directory stands for them (a fake root's plain directory has none and needs none).
        let sub = match &self.scopes {
            Some(_) => self.root.clone(),
            None => self.root.join(SUBTREE),
        };
        if super::fs_magic(&sub).ok() == Some(super::CGROUP2_SUPER_MAGIC)
            && !sub.join("cgroup.freeze").exists()
        {
            return Err(CgroupError::FreezerMissing {
                detail: format!("{} has no cgroup.freeze (Linux before 5.2)", sub.display()),
            });
        }
        Ok(sub)
    }

    fn kill_all(&self, cg: &Cgroup) {
        // cgroup.kill (5.14+) kills every process, including ones forking right now.
        if write_ctl(&Self::dir(cg), "cgroup.kill", "1", "").is_err() {
            for p in cg.pids() {
                // A pid listed in our own cgroup; one gone meanwhile is no error.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
