//! cgroup v1 (and hybrid): one directory per controller hierarchy.

use std::path::{Path, PathBuf};

use super::{
    freezer, keyed, mkdir_p, read_ctl, write_ctl, Cgroup, CgroupError, CgroupManager, CgroupMode,
    CpuQuota, Limits, SUBTREE,
};
use crate::policy::Protection;

/// v1 cgroups under `root/<controller>/aither/<id>`; on hybrid hosts also `root/unified/aither/<id>`
/// (no controllers there, but BPF device programs attach to it and the cgroup namespace sees it).
pub struct V1 {
    root: PathBuf,
    unified: bool,
}

/// Memory limits larger than this are "unlimited" in v1 (PAGE_COUNTER_MAX rounded to pages).
const V1_UNLIMITED: u64 = 0x7FFF_FFFF_FFFF_F000;

impl V1 {
    pub fn new(root: PathBuf, unified: bool) -> V1 {
        V1 { root, unified }
    }

    fn hierarchy(&self, controller: &str) -> PathBuf {
        self.root.join(controller)
    }

    fn dir(cg: &Cgroup, controller: &str) -> Option<PathBuf> {
        cg.dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.clone())
    }

    fn require(
        &self,
        controller: &'static str,
        protection: Protection,
        best_effort: &[Protection],
        skipped: &mut Vec<Protection>,
    ) -> Result<Option<PathBuf>, CgroupError> {
        let h = self.hierarchy(controller);
        if h.join("cgroup.procs").exists() {
            return Ok(Some(h));
        }
        if best_effort.contains(&protection) {
            skipped.push(protection);
            return Ok(None);
        }
        Err(CgroupError::ControllerMissing {
            controller,
            detail: format!("no v1 hierarchy mounted at {}", h.display()),
            protection,
        })
    }
}

impl CgroupManager for V1 {
    fn mode(&self) -> CgroupMode {
        if self.unified {
            CgroupMode::Hybrid
        } else {
            CgroupMode::V1
        }
    }

    fn create(
        &self,
        id: &str,
        limits: &Limits,
        best_effort: &[Protection],
    ) -> Result<Cgroup, CgroupError> {
        let mut cg = Cgroup {
            id: id.to_string(),
            dirs: Vec::new(),
            skipped: Vec::new(),
        };
        let mut result = Ok(());
        for (controller, protection) in limits.controllers() {
            let Some(h) = self.require(controller, protection, best_effort, &mut cg.skipped)?
            else {
                continue;
            };
            let d = h.join(SUBTREE).join(id);
            if let Err(e) = mkdir_p(&d) {
                result = Err(e);
                break;
            }
            cg.dirs.push((controller, d));
        }
        if result.is_ok() && limits.devices.is_some() {
            match self.require(
                "devices",
                Protection::CgroupDevices,
                best_effort,
                &mut cg.skipped,
            ) {
                Ok(Some(h)) => {
                    let d = h.join(SUBTREE).join(id);
                    result = mkdir_p(&d).map(|()| cg.dirs.push(("devices", d)));
                }
                Ok(None) => {}
                Err(e) => result = Err(e),
            }
        }
        // The freezer (`aitherctl pause`), wherever its hierarchy is mounted; not a protection,
        // so a host without it (or a read-only one) still launches, and pause says why not.
        let fz = self.hierarchy("freezer");
        if result.is_ok() && fz.join("cgroup.procs").exists() {
            let d = fz.join(SUBTREE).join(id);
            if mkdir_p(&d).is_ok() {
                cg.dirs.push(("freezer", d));
            }
        }
        if result.is_ok() && self.unified {
            let d = self.root.join("unified").join(SUBTREE).join(id);
            result = mkdir_p(&d).map(|()| cg.dirs.push(("unified", d)));
        }
        if let Err(e) = result.and_then(|()| self.apply(&mut cg, limits, best_effort)) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn read_limits(&self, cg: &Cgroup) -> Result<Limits, CgroupError> {
        let mut l = Limits::default();
        if let Some(d) = Self::dir(cg, "memory") {
            let mem: u64 = read_ctl(&d, "memory.limit_in_bytes")?
                .parse()
                .unwrap_or(u64::MAX);
            l.memory = (mem < V1_UNLIMITED).then_some(mem);
            if let Ok(sw) = read_ctl(&d, "memory.memsw.limit_in_bytes") {
                let sw: u64 = sw.parse().unwrap_or(u64::MAX);
                l.swap = (sw < V1_UNLIMITED).then(|| sw.saturating_sub(mem));
            } else if read_ctl(&d, "memory.swappiness").ok().as_deref() == Some("0") {
                l.swap = Some(0);
            }
        }
        if let Some(d) = Self::dir(cg, "cpu") {
            let q: i64 = read_ctl(&d, "cpu.cfs_quota_us")?.parse().unwrap_or(-1);
            let p: u64 = read_ctl(&d, "cpu.cfs_period_us")?
                .parse()
                .unwrap_or(100_000);
            l.cpu = (q > 0).then_some(CpuQuota {
                quota_us: q as u64,
                period_us: p,
            });
        }
        if let Some(d) = Self::dir(cg, "pids") {
            l.pids = read_ctl(&d, "pids.max")?.parse().ok();
        }
        if let Some(d) = Self::dir(cg, "devices") {
            l.devices = Some(super::parse_devices_list(&read_ctl(&d, "devices.list")?));
        }
        Ok(l)
    }

    fn oom_kills(&self, cg: &Cgroup) -> u64 {
        Self::dir(cg, "memory")
            .and_then(|d| keyed(&d, "memory.oom_control", "oom_kill"))
            .unwrap_or(0)
    }

    fn birth_dir(&self, id: &str) -> Result<Option<PathBuf>, CgroupError> {
        if !self.unified {
            return Ok(None);
        }
        let d = self.root.join("unified").join(SUBTREE).join(id);
        mkdir_p(&d)?;
        Ok(Some(d))
    }

    fn subtree_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = ["memory", "cpu", "pids", "devices", "freezer"]
            .iter()
            .map(|c| self.hierarchy(c).join(SUBTREE))
            .collect();
        if self.unified {
            v.push(self.root.join("unified").join(SUBTREE));
        }
        v
    }

    fn kill_all(&self, cg: &Cgroup) {
        // v1 has no cgroup.kill: signal each member (all of them are ours, started in it).
        for _ in 0..3 {
            let pids = cg.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // A pid listed in our own cgroup; one gone meanwhile is no error.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // Signalled first, thawed after: a frozen task acts on its pending SIGKILL only
            // once thawed, and then dies before it runs another instruction of its own.
            if self.frozen(cg) {
                let _ = self.thaw(cg);
            }
        }
    }

    fn freeze(&self, cg: &Cgroup) -> Result<(), CgroupError> {
        match self.freezer_dir(cg)? {
            (Freezer::V1, d) => freezer::freeze_v1(&d, freezer::FREEZE_TIMEOUT),
            (Freezer::Unified, d) => freezer::freeze_v2(&d, freezer::FREEZE_TIMEOUT),
        }
    }

    fn thaw(&self, cg: &Cgroup) -> Result<(), CgroupError> {
        match self.freezer_dir(cg)? {
            (Freezer::V1, d) => freezer::thaw_v1(&d),
            (Freezer::Unified, d) => freezer::thaw_v2(&d),
        }
    }

    fn frozen(&self, cg: &Cgroup) -> bool {
        match self.freezer_dir(cg) {
            Ok((Freezer::V1, d)) => freezer::frozen_v1(&d),
            Ok((Freezer::Unified, d)) => freezer::frozen_v2(&d),
            Err(_) => false,
        }
    }

    fn freezer(&self) -> Result<PathBuf, CgroupError> {
        let fz = self.hierarchy("freezer");
        if fz.join("cgroup.procs").exists() {
            return Ok(fz);
        }
        if self.unified {
            return Ok(self.root.join("unified"));
        }
        Err(CgroupError::FreezerMissing {
            detail: format!("no v1 freezer hierarchy mounted at {}", fz.display()),
        })
    }
}

/// Which freezer a v1 (or hybrid) cgroup is frozen with.
enum Freezer {
    /// The v1 freezer hierarchy: preferred, so that every host with v1 controllers freezes
    /// the same way (and this hybrid CI host exercises the v1 kill-while-frozen path).
    V1,
    /// A hybrid host without the v1 freezer: cgroup.freeze of the unified directory.
    Unified,
}

impl V1 {
    fn freezer_dir(&self, cg: &Cgroup) -> Result<(Freezer, PathBuf), CgroupError> {
        if let Some(d) = Self::dir(cg, "freezer") {
            return Ok((Freezer::V1, d));
        }
        if let Some(d) = Self::dir(cg, "unified") {
            return Ok((Freezer::Unified, d));
        }
        // The host has a freezer, but this cgroup was made without it (before the freezer
        // was mounted): say so rather than "no freezer".
        let detail = match self.freezer() {
            Ok(at) => format!(
                "cgroup {} has no directory in the freezer hierarchy at {} (it was created without one; restart the agent)",
                cg.id,
                at.display()
            ),
            Err(CgroupError::FreezerMissing { detail }) => detail,
            Err(e) => e.to_string(),
        };
        Err(CgroupError::FreezerMissing { detail })
    }

    fn apply(
        &self,
        cg: &mut Cgroup,
        limits: &Limits,
        best_effort: &[Protection],
    ) -> Result<(), CgroupError> {
        if let (Some(mem), Some(d)) = (limits.memory, Self::dir(cg, "memory")) {
            write_ctl(&d, "memory.limit_in_bytes", &mem.to_string(), "")?;
            self.apply_swap(cg, &d, mem, limits.swap, best_effort)?;
        }
        if let (Some(cpu), Some(d)) = (limits.cpu, Self::dir(cg, "cpu")) {
            write_ctl(&d, "cpu.cfs_period_us", &cpu.period_us.to_string(), "")?;
            write_ctl(&d, "cpu.cfs_quota_us", &cpu.quota_us.to_string(), "")?;
        }
        if let (Some(pids), Some(d)) = (limits.pids, Self::dir(cg, "pids")) {
            write_ctl(&d, "pids.max", &pids.to_string(), "")?;
        }
        if let Some(rules) = &limits.devices {
            // Deny everything first, then allow the list: a new v1 devices cgroup inherits
            // its parent's (here: everything) and rules only narrow from there.
            if let Some(d) = Self::dir(cg, "devices") {
                write_ctl(&d, "devices.deny", "a", "")?;
                for r in rules {
                    write_ctl(&d, "devices.allow", &r.v1_line(), "")?;
                }
            }
            // On a hybrid host the cgroup2 side is enforced too (docs/cgroups.md): both layers.
            if let Some(d) = Self::dir(cg, "unified") {
                super::attach_device_rules(&d, rules, best_effort, &mut cg.skipped)?;
            }
        }
        Ok(())
    }

    fn apply_swap(
        &self,
        cg: &mut Cgroup,
        d: &Path,
        mem: u64,
        swap: Option<u64>,
        best_effort: &[Protection],
    ) -> Result<(), CgroupError> {
        let Some(swap) = swap else { return Ok(()) };
        // memsw = memory + swap; it exists only with swap accounting (swapaccount=1).
        if d.join("memory.memsw.limit_in_bytes").exists() {
            return write_ctl(
                d,
                "memory.memsw.limit_in_bytes",
                &mem.saturating_add(swap).to_string(),
                " (memsw must be >= limit_in_bytes)",
            );
        }
        if swap == 0 {
            // Without memsw, swappiness 0 keeps anonymous memory out of swap; on a host without
            // swap (SwapTotal 0) that is exact.
            let _ = write_ctl(d, "memory.swappiness", "0", "");
            if host_swap_total() == 0 {
                return Ok(());
            }
        }
        if best_effort.contains(&Protection::CgroupSwap) {
            cg.skipped.push(Protection::CgroupSwap);
            return Ok(());
        }
        Err(CgroupError::ControllerMissing {
            controller: "memory",
            detail: "the host has swap but no swap accounting (memory.memsw.limit_in_bytes); boot with swapaccount=1".into(),
            protection: Protection::CgroupSwap,
        })
    }
}

fn host_swap_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("SwapTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
