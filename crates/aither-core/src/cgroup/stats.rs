//! What a supervisor reads from a running sandbox's cgroup: usage for `ps`, and the kernel's
//! pain signals (OOM kills, memory pressure, CPU throttling).
//!
//! Sources, by hierarchy:
//! - CPU time: `cpu.stat` `usage_usec` of the cgroup2 directory. cgroup2 keeps it without any
//!   controller enabled, so the unified hierarchy of a hybrid host has it too.
//! - Memory: `memory.current` (v2) or `memory.usage_in_bytes` (v1).
//! - Memory pressure: PSI `memory.pressure` `some avg10` where a cgroup2 directory exists (pure
//!   v2 and hybrid); on pure v1, usage above 90 % of the limit stands in for it.
//! - Throttling: `cpu.stat` `nr_throttled` of the CPU controller (v1 `cpu`, v2 unified).
//! - OOM kills: `CgroupManager::oom_kills`.
//! - Tasks: `pids.current` and `pids.max` of the pids controller (v1 `pids`, v2 unified); the
//!   limit counts threads, so the figure beside it does too.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Cgroup, CgroupError, CgroupManager, CgroupMode, CpuQuota};

/// One reading.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit: Option<u64>,
    /// PSI `some avg10` in percent, where the kernel gives it.
    pub memory_pressure_avg10: Option<f64>,
    pub nr_throttled: Option<u64>,
    pub oom_kills: u64,
    /// Processes in the cgroup (`cgroup.procs` of the first hierarchy).
    pub pids: usize,
    /// Tasks (processes and threads) charged to the pids controller: what `pids_limit` bounds.
    #[serde(default)]
    pub pids_current: Option<u64>,
    /// The pids controller's limit; None: "max", or no pids controller.
    #[serde(default)]
    pub pids_limit: Option<u64>,
}

impl Stats {
    /// Whether memory is under pressure: PSI avg10 ≥ 10 %, or (without PSI) usage ≥ 90 % of the
    /// limit.
    pub fn memory_pressure(&self) -> bool {
        match self.memory_pressure_avg10 {
            Some(p) => p >= 10.0,
            None => match (self.memory_bytes, self.memory_limit) {
                (Some(u), Some(l)) if l > 0 => u.saturating_mul(10) >= l.saturating_mul(9),
                _ => false,
            },
        }
    }
}

/// The controller name a subtree directory belongs to.
fn controller_of(base: &Path, mode: CgroupMode) -> Option<&'static str> {
    if mode == CgroupMode::V2 {
        return Some("unified");
    }
    let parent = base.parent()?.file_name()?.to_str()?;
    ["memory", "cpu", "pids", "freezer", "unified"]
        .into_iter()
        .find(|c| *c == parent)
}

/// The cgroup of sandbox `id`, made of the directories that exist (for a sandbox another
/// process created: the daemon adopting a shim's sandbox).
pub fn open_existing(mgr: &dyn CgroupManager, id: &str) -> Option<Cgroup> {
    let mode = mgr.mode();
    let dirs: Vec<(&'static str, PathBuf)> = mgr
        .subtree_dirs()
        .into_iter()
        .filter_map(|base| {
            let d = base.join(id);
            let c = controller_of(&base, mode)?;
            d.is_dir().then_some((c, d))
        })
        .collect();
    (!dirs.is_empty()).then(|| Cgroup {
        id: id.to_string(),
        dirs,
        skipped: Vec::new(),
    })
}

/// The ids of every sandbox cgroup in our subtree (`<name>-<launcher pid>`).
pub fn list_ids(mgr: &dyn CgroupManager) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for base in mgr.subtree_dirs() {
        let Ok(rd) = fs::read_dir(&base) else {
            continue;
        };
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str() {
                if e.path().is_dir() && !ids.iter().any(|i| i == n) {
                    ids.push(n.to_string());
                }
            }
        }
    }
    ids.sort();
    ids
}

fn dir<'a>(cg: &'a Cgroup, ctrl: &str) -> Option<&'a Path> {
    cg.dirs
        .iter()
        .find(|(c, _)| *c == ctrl)
        .map(|(_, d)| d.as_path())
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn read_file(d: &Path, file: &str) -> Option<String> {
    fs::read_to_string(d.join(file)).ok()
}

fn psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

/// Reads the current figures of `cg`.
pub fn read(mgr: &dyn CgroupManager, cg: &Cgroup) -> Stats {
    let mut s = Stats {
        oom_kills: mgr.oom_kills(cg),
        pids: cg.pids().len(),
        ..Stats::default()
    };
    let unified = dir(cg, "unified");
    if let Some(u) = unified {
        let cpu = read_file(u, "cpu.stat");
        s.cpu_usec = cpu.as_deref().and_then(|t| keyed(t, "usage_usec"));
        s.memory_pressure_avg10 = read_file(u, "memory.pressure")
            .as_deref()
            .and_then(psi_some_avg10);
    }
    // The pids controller: its own hierarchy on v1 and hybrid hosts, the unified one on v2.
    let pids_dir = match mgr.mode() {
        CgroupMode::V2 => unified,
        _ => dir(cg, "pids"),
    };
    if let Some(p) = pids_dir {
        s.pids_current = read_file(p, "pids.current").and_then(|t| t.trim().parse().ok());
        // "max" (no limit) does not parse: None, as in `Limits`.
        s.pids_limit = read_file(p, "pids.max").and_then(|t| t.trim().parse().ok());
    }
    match mgr.mode() {
        CgroupMode::V2 => {
            let u = unified.expect("a v2 cgroup has its directory");
            s.memory_bytes = read_file(u, "memory.current").and_then(|t| t.trim().parse().ok());
            s.memory_limit = read_file(u, "memory.max").and_then(|t| t.trim().parse().ok());
            s.nr_throttled = read_file(u, "cpu.stat").and_then(|t| keyed(&t, "nr_throttled"));
        }
        _ => {
            if let Some(m) = dir(cg, "memory") {
                s.memory_bytes =
                    read_file(m, "memory.usage_in_bytes").and_then(|t| t.trim().parse().ok());
                s.memory_limit = read_file(m, "memory.limit_in_bytes")
                    .and_then(|t| t.trim().parse().ok())
                    .filter(|l: &u64| *l < (1u64 << 62));
            }
            if let Some(c) = dir(cg, "cpu") {
                s.nr_throttled = read_file(c, "cpu.stat").and_then(|t| keyed(&t, "nr_throttled"));
            }
        }
    }
    s
}

/// Sets the CPU quota of a running sandbox (the `throttle` pain action).
pub fn set_cpu_quota(
    mgr: &dyn CgroupManager,
    cg: &Cgroup,
    quota: CpuQuota,
) -> Result<(), CgroupError> {
    let write = |d: &Path, file: &str, v: String| {
        fs::write(d.join(file), &v).map_err(|source| CgroupError::Write {
            path: d.join(file),
            value: v,
            hint: "",
            source,
        })
    };
    match mgr.mode() {
        CgroupMode::V2 => {
            let u = dir(cg, "unified").ok_or_else(|| missing("cpu"))?;
            write(
                u,
                "cpu.max",
                format!("{} {}", quota.quota_us, quota.period_us),
            )
        }
        _ => {
            let c = dir(cg, "cpu").ok_or_else(|| missing("cpu"))?;
            write(c, "cpu.cfs_quota_us", quota.quota_us.to_string())
        }
    }
}

fn missing(controller: &'static str) -> CgroupError {
    CgroupError::ControllerMissing {
        controller,
        detail: "the sandbox has no such cgroup".into(),
        protection: crate::policy::Protection::CgroupCpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_psi_and_keyed_files() {
        let psi = "some avg10=12.50 avg60=0.00 avg300=0.00 total=216587\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=51632\n";
        assert_eq!(psi_some_avg10(psi), Some(12.5));
        assert_eq!(
            keyed("usage_usec 86\nuser_usec 74\n", "user_usec"),
            Some(74)
        );
        assert_eq!(keyed("usage_usec 86\n", "nr_throttled"), None);
        let s = Stats {
            memory_bytes: Some(95),
            memory_limit: Some(100),
            ..Stats::default()
        };
        assert!(s.memory_pressure());
        let s = Stats {
            memory_pressure_avg10: Some(1.0),
            ..s
        };
        assert!(!s.memory_pressure());
    }
}
