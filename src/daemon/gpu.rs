//! The daemon's side of the MicroScheduler (docs/gpu.md): agents' requests go into the queue,
//! grants wake the waiting agent, preemption and eviction stop running ones, and the queue and
//! leases are kept in state.db so that they survive a daemon restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::json;
use tokio::sync::oneshot;

use super::Daemon;
use crate::audit::{Entry, Verdict};
use crate::gpu::scheduler::{DeviceSlot, Queued, Rejected};
use crate::gpu::{self, GpuBackend, GpuDevice, Lease, Request, Scheduler, SchedulerAction};
use crate::policy::GpuGrant;
use crate::sandbox::SandboxSpec;

/// What an agent waits for: its devices, or the reason it will never get them.
pub type Grant = Result<Vec<u32>, String>;

/// Why a running agent must stop for the scheduler.
#[derive(Clone, Debug)]
pub enum Eviction {
    /// A strictly higher class needs its devices; it is requeued at its original time.
    Preempted { by: String },
    /// It used more VRAM than it reserved.
    Overuse {
        device: u32,
        used_mb: u64,
        reserved_mb: u64,
    },
}

/// A GPU lease as the agent sees it (`gpu.lease` on the agent channel): wire types.
pub use aither_proto::{GpuLease, GpuState, LeasedDevice};

/// A `gpu.lease` reply's data.
fn lease_value(lease: GpuLease) -> serde_json::Value {
    serde_json::to_value(lease).unwrap_or_default()
}

struct Inner {
    sched: Scheduler,
    waiters: HashMap<String, oneshot::Sender<Grant>>,
    /// Requests restored from state.db, taken by their agent's next request (original time).
    restored: HashMap<String, Request>,
    /// The last reading of per-agent use: (agent, device, MiB).
    usage: Vec<(String, u32, u64)>,
    /// Use by processes that are no agent's, per device (drift).
    foreign_mb: HashMap<u32, u64>,
    /// (agent, device) with a process whose use the driver does not report (NVML's
    /// "not available"): their figure is a lower bound, shown as unknown.
    unknown: std::collections::HashSet<(String, u32)>,
    /// Processes of no agent with unknown use, per device.
    foreign_unknown: HashMap<u32, u32>,
    /// Devices the backend lost, with its reason.
    lost: HashMap<u32, String>,
    /// Agents being evicted for overuse (until their lease ends).
    evicting: std::collections::HashSet<String>,
}

pub struct GpuService {
    backend: Box<dyn GpuBackend>,
    devices: Vec<GpuDevice>,
    driver_paths: Vec<PathBuf>,
    /// Why there are no GPUs (no driver, a static build), for `gpu ls` and doctor.
    pub note: Option<String>,
    inner: Mutex<Inner>,
}

impl GpuService {
    /// From AITHER_GPUS or /etc/aither/gpus.toml (else NVML); a broken file is an error.
    /// The backend (`backend`: aitherd.toml's `gpu.backend`, if set there) and scheduler.
    pub fn load(section: &super::config::GpuSection) -> Result<GpuService, gpu::GpuError> {
        let kind = section.backend.map(|b| match b {
            super::config::GpuBackend::Nvml => gpu::BackendKind::Nvml,
            super::config::GpuBackend::None => gpu::BackendKind::None,
        });
        let (backend, cfg, note) = gpu::load(kind, section.nvml_library.as_deref())?;
        Ok(Self::with(backend, cfg.scheduler, cfg.driver_paths, note))
    }

    pub fn with(
        backend: Box<dyn GpuBackend>,
        config: gpu::SchedulerConfig,
        driver_paths: Vec<PathBuf>,
        note: Option<String>,
    ) -> GpuService {
        let devices = backend.devices();
        let slots: Vec<DeviceSlot> = devices
            .iter()
            .map(|d| DeviceSlot {
                index: d.index,
                total_mb: d.total_mb,
                profile: d.mig.as_ref().map(|m| m.profile.clone()),
            })
            .collect();
        GpuService {
            backend,
            devices,
            driver_paths,
            note,
            inner: Mutex::new(Inner {
                sched: Scheduler::new(&slots, config),
                waiters: HashMap::new(),
                restored: HashMap::new(),
                usage: Vec::new(),
                foreign_mb: HashMap::new(),
                unknown: Default::default(),
                foreign_unknown: HashMap::new(),
                lost: HashMap::new(),
                evicting: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn grace_ms(&self) -> u64 {
        self.lock().sched.config().preempt_grace_ms
    }

    /// Puts back the persisted queue and leases (at daemon start, before agents start).
    /// `running`: agents whose sandbox is still alive; other leases were released by their
    /// end while the daemon was down.
    pub fn restore(
        &self,
        d: &Daemon,
        rows: Vec<(String, String, serde_json::Value)>,
        running: &[String],
    ) {
        let mut g = self.lock();
        for (name, state, data) in rows {
            match state.as_str() {
                "granted" => match serde_json::from_value::<Lease>(data) {
                    Ok(l) if running.contains(&name) => g.sched.restore_lease(l),
                    Ok(l) => {
                        // Its run ended meanwhile: a restart queues again at its first time.
                        g.restored.insert(name.clone(), l.request);
                        d.store.delete_gpu(&name);
                    }
                    Err(e) => tracing::warn!(agent = %name, error = %e, "bad GPU lease row"),
                },
                _ => match serde_json::from_value::<Request>(data) {
                    Ok(r) => {
                        g.restored.insert(name, r);
                    }
                    Err(e) => tracing::warn!(agent = %name, error = %e, "bad GPU request row"),
                },
            }
        }
    }

    /// Asks for GPUs for `agent`. `original`: keep this enqueue time (a preempted agent). The
    /// receiver yields the devices when granted (maybe at once).
    pub fn request(
        &self,
        d: &Daemon,
        agent: &str,
        ask: &GpuGrant,
        original: Option<(u64, u64)>,
    ) -> Result<oneshot::Receiver<Grant>, Rejected> {
        let (tx, rx) = oneshot::channel();
        let decisions = {
            let mut g = self.lock();
            let now = super::store::now_ms();
            let (enqueued_ms, seq) = original
                .or_else(|| g.restored.remove(agent).map(|r| (r.enqueued_ms, r.seq)))
                .unwrap_or((now, 0));
            let req = Request {
                agent: agent.to_string(),
                count: ask.count,
                vram_mb: ask.vram_mb,
                priority: ask.priority,
                exclusive: ask.exclusive,
                enqueued_ms,
                seq,
                profile: ask.mig_profile.clone(),
            };
            g.sched.submit(req)?;
            g.waiters.insert(agent.to_string(), tx);
            let decisions = g.sched.schedule(now);
            if g.sched.is_queued(agent) {
                let pos = g
                    .sched
                    .position(agent, now)
                    .zip(g.sched.queued(agent).cloned());
                if let Some((position, r)) = pos {
                    d.store.put_gpu(
                        agent,
                        "queued",
                        &serde_json::to_value(&r).unwrap_or_default(),
                    );
                    d.emit(
                        Some(agent),
                        "gpu.queued",
                        json!({"position": position, "count": r.count, "vram_mb": r.vram_mb, "priority": r.priority, "exclusive": r.exclusive}),
                    );
                    d.audit.record(
                        Entry::new(
                            "gpu_queue",
                            Verdict::Info,
                            format!(
                                "gpu claim: {} x {} MiB, priority {}: no room now (position {position})",
                                r.count, r.vram_mb, r.priority
                            ),
                        )
                        .agent(agent)
                        .actor("microscheduler"),
                    );
                }
            }
            decisions
        };
        self.carry_out(d, decisions);
        Ok(rx)
    }

    /// Takes an agent's request out of the queue (stopped or removed while waiting).
    pub fn cancel(&self, d: &Daemon, agent: &str) {
        let removed = {
            let mut g = self.lock();
            g.waiters.remove(agent);
            g.sched.cancel(agent).is_some()
        };
        if removed {
            d.store.delete_gpu(agent);
        }
        self.pass(d);
    }

    /// Ends an agent's lease (its run ended) and lets the queue move.
    pub fn release(&self, d: &Daemon, agent: &str) {
        let lease = {
            let mut g = self.lock();
            g.evicting.remove(agent);
            g.sched.release(agent)
        };
        if let Some(l) = lease {
            d.store.delete_gpu(agent);
            d.emit(
                Some(agent),
                "gpu.released",
                json!({"devices": l.devices, "vram_mb": l.request.vram_mb}),
            );
            self.pass(d);
        }
    }

    /// A scheduling pass (after a release, and periodically for aging).
    pub fn pass(&self, d: &Daemon) {
        let decisions = self.lock().sched.schedule(super::store::now_ms());
        self.carry_out(d, decisions);
    }

    fn carry_out(&self, d: &Daemon, decisions: Vec<SchedulerAction>) {
        for dec in decisions {
            match dec {
                SchedulerAction::Grant { agent, devices } => {
                    let (lease, waiter) = {
                        let mut g = self.lock();
                        (g.sched.lease(&agent).cloned(), g.waiters.remove(&agent))
                    };
                    let Some(lease) = lease else { continue };
                    d.store.put_gpu(
                        &agent,
                        "granted",
                        &serde_json::to_value(&lease).unwrap_or_default(),
                    );
                    let uuids: Vec<String> = devices
                        .iter()
                        .filter_map(|i| self.device(*i).map(|d| d.uuid.clone()))
                        .collect();
                    d.emit(
                        Some(&agent),
                        "gpu.granted",
                        json!({"devices": devices, "uuids": uuids, "vram_mb": lease.request.vram_mb,
                               "waited_ms": lease.granted_ms.saturating_sub(lease.request.enqueued_ms)}),
                    );
                    d.audit.record(
                        Entry::new(
                            "gpu_grant",
                            Verdict::Allow,
                            format!(
                                "gpu claim: {} x {} MiB, priority {}{}",
                                lease.request.count,
                                lease.request.vram_mb,
                                lease.request.priority,
                                if lease.request.exclusive {
                                    ", exclusive"
                                } else {
                                    ""
                                }
                            ),
                        )
                        .agent(&agent)
                        .actor("microscheduler")
                        .data(json!({"devices": devices, "uuids": uuids})),
                    );
                    match waiter {
                        Some(w) => {
                            if w.send(Ok(devices)).is_err() {
                                // Nobody waits any more (stopped meanwhile): give it back.
                                self.release(d, &agent);
                            }
                        }
                        None => self.release(d, &agent),
                    }
                }
                SchedulerAction::Preempt { for_agent, victims } => {
                    for v in &victims {
                        d.emit(
                            Some(v),
                            "gpu.preempted",
                            json!({"by": for_agent, "grace_ms": self.grace_ms()}),
                        );
                        d.audit.record(
                            Entry::new(
                                "gpu_preempt",
                                Verdict::Deny,
                                format!(
                                    "a strictly higher priority class ({for_agent}) needs its GPU"
                                ),
                            )
                            .agent(v)
                            .actor("microscheduler"),
                        );
                        d.evict(
                            v,
                            Eviction::Preempted {
                                by: for_agent.clone(),
                            },
                        );
                    }
                }
            }
        }
    }

    /// The queue position of an agent's lease (enqueue time, sequence), for a requeue.
    pub fn origin(&self, agent: &str) -> Option<(u64, u64)> {
        self.lock()
            .sched
            .lease(agent)
            .map(|l| (l.request.enqueued_ms, l.request.seq))
    }

    pub fn device(&self, index: u32) -> Option<&GpuDevice> {
        self.devices.iter().find(|d| d.index == index)
    }

    /// Applies a lease to a spec: the leased nodes and the control nodes in /dev and in the
    /// device rules, the visible-devices variables, the driver directories read-only.
    pub fn apply(&self, spec: &mut SandboxSpec, devices: &[u32]) -> Result<(), gpu::GpuError> {
        // Each leased device's node (a MIG instance: its GPU's node and its nvidia-caps access
        // nodes), then the control nodes; a node shared by two leased MIG instances once.
        let mut nodes: Vec<(PathBuf, String)> = Vec::new();
        for d in devices.iter().filter_map(|i| self.device(*i)) {
            let name = self.backend.dev_name(&d.node);
            nodes.push((d.node.clone(), name));
            nodes.extend(d.extra_nodes.iter().cloned());
        }
        for c in self.backend.control_nodes() {
            let name = self.backend.dev_name(&c);
            nodes.push((c, name));
        }
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|(p, _)| seen.insert(p.clone()));
        let visible: Vec<String> = devices
            .iter()
            .filter_map(|i| self.device(*i).map(|d| d.uuid.clone()))
            .collect();
        spec.grant_named_devices(&nodes, &visible.join(","))?;
        for p in &self.driver_paths {
            if p.exists() && !spec.mounts.read_only.contains(p) {
                spec.mounts.read_only.push(p.clone());
            }
        }
        Ok(())
    }

    /// What `gpu.lease` answers an agent.
    pub fn lease_info(&self, agent: &str) -> serde_json::Value {
        let g = self.lock();
        if let Some(l) = g.sched.lease(agent) {
            let devs: Vec<LeasedDevice> = l
                .devices
                .iter()
                .filter_map(|i| self.device(*i))
                .map(|d| LeasedDevice {
                    index: d.index,
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    vram_mb: l.request.vram_mb,
                    total_mb: d.total_mb,
                    node: format!("/dev/{}", self.backend.dev_name(&d.node)),
                })
                .collect();
            let visible: Vec<String> = devs.iter().map(|d| d.uuid.clone()).collect();
            return lease_value(GpuLease {
                granted: true,
                state: GpuState::Granted,
                devices: devs,
                visible_devices: visible.join(","),
                priority: Some(l.request.priority),
                exclusive: Some(l.request.exclusive),
            });
        }
        let state = if g.sched.is_queued(agent) {
            GpuState::Queued
        } else {
            GpuState::None
        };
        lease_value(GpuLease {
            state,
            ..GpuLease::default()
        })
    }

    /// The `ps` column: `0,1:8G`, `queued#3`, or None.
    pub fn column(&self, agent: &str) -> Option<String> {
        let g = self.lock();
        if let Some(l) = g.sched.lease(agent) {
            let devs: Vec<String> = l.devices.iter().map(|i| i.to_string()).collect();
            return Some(format!(
                "{}:{}",
                devs.join(","),
                crate::units::Size(l.request.vram_mb << 20)
            ));
        }
        if g.sched.is_queued(agent) {
            let pos = g.sched.position(agent, super::store::now_ms()).unwrap_or(0);
            return Some(format!("queued#{pos}"));
        }
        None
    }

    /// The `stats` figures of an agent's GPU claim: its lease's devices with the VRAM reserved
    /// and used (the last reading), or its place in the queue; None without a claim.
    pub fn stats_of(&self, agent: &str) -> Option<super::stats::GpuStats> {
        use super::stats::{GpuDeviceStats, GpuStats};
        let g = self.lock();
        if let Some(l) = g.sched.lease(agent) {
            let devices = l
                .devices
                .iter()
                .map(|&index| {
                    let d = self.device(index);
                    let used = g
                        .usage
                        .iter()
                        .filter(|u| u.0 == agent && u.1 == index)
                        .map(|u| u.2)
                        .sum();
                    GpuDeviceStats {
                        index,
                        name: d.map(|d| d.name.clone()).unwrap_or_default(),
                        vram_mb: l.request.vram_mb,
                        used_mb: used,
                        total_mb: d.map(|d| d.total_mb).unwrap_or(0),
                        used_unknown: g.unknown.contains(&(agent.to_string(), index)),
                        lost: g.lost.get(&index).cloned(),
                    }
                })
                .collect();
            return Some(GpuStats {
                state: GpuState::Granted,
                queue_position: None,
                devices,
            });
        }
        if g.sched.is_queued(agent) {
            return Some(GpuStats {
                state: GpuState::Queued,
                queue_position: g
                    .sched
                    .position(agent, super::store::now_ms())
                    .map(|p| p as u64),
                devices: Vec::new(),
            });
        }
        None
    }

    /// `aitherctl gpu ls`.
    pub fn ls(&self) -> serde_json::Value {
        let g = self.lock();
        let devices: Vec<serde_json::Value> = g
            .sched
            .devices()
            .map(|(index, total, reserved, n, exclusive)| {
                let d = self.device(index);
                let used: u64 = g
                    .usage
                    .iter()
                    .filter(|u| u.1 == index)
                    .map(|u| u.2)
                    .sum::<u64>()
                    + g.foreign_mb.get(&index).copied().unwrap_or(0);
                let leases: Vec<serde_json::Value> = g
                    .sched
                    .leases()
                    .filter(|l| l.devices.contains(&index))
                    .map(|l| json!({"agent": l.request.agent, "vram_mb": l.request.vram_mb,
                                    "priority": l.request.priority, "exclusive": l.request.exclusive,
                                    "granted_ms": l.granted_ms, "preempting": l.preempting}))
                    .collect();
                // Processes whose use the driver does not report: `used_mb` is then a lower
                // bound (docs/gpu.md "What the scheduler guarantees").
                let unknown = g.unknown.iter().filter(|(_, i)| *i == index).count() as u64
                    + g.foreign_unknown.get(&index).copied().unwrap_or(0) as u64;
                json!({"index": index, "uuid": d.map(|d| d.uuid.clone()), "name": d.map(|d| d.name.clone()),
                       "node": d.map(|d| d.node.clone()), "total_mb": total, "reserved_mb": reserved,
                       "used_mb": used, "foreign_mb": g.foreign_mb.get(&index).copied().unwrap_or(0),
                       "used_unknown": unknown, "lost": g.lost.get(&index),
                       "mig": d.and_then(|d| d.mig.clone()),
                       "lease_count": n, "exclusive": exclusive, "leases": leases})
            })
            .collect();
        json!({"backend": self.backend.kind(), "library": self.backend.library(),
               "note": self.note, "devices": devices,
               "queued": g.sched.queue_len(), "scheduler": g.sched.config()})
    }

    /// Every `gpu.poll_ms` of aitherd.toml (`AITHER_GPU_POLL_MS`; default 2 s, read again at
    /// each tick so that a reload changes it): a pass (aging reorders the queue) and a reading
    /// of VRAM use (overuse evicts).
    pub async fn ticker(d: std::sync::Arc<Daemon>) {
        if d.gpu.devices.is_empty() {
            return;
        }
        loop {
            let every = std::time::Duration::from_millis(d.config().config.gpu.poll_ms);
            tokio::time::sleep(every).await;
            d.gpu.pass(&d);
            let d2 = d.clone();
            // The backend (NVML, a file) may block: off the async workers.
            let _ = tokio::task::spawn_blocking(move || d2.gpu.poll_usage(&d2)).await;
        }
    }

    /// `aitherctl gpu queue`.
    pub fn queue(&self) -> Vec<Queued> {
        self.lock().sched.queue_view(super::store::now_ms())
    }

    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.sched.leases().count(), g.sched.queue_len())
    }

    /// Reads the backend's per-process use, maps it to agents (a process's cgroup names its
    /// sandbox), records drift, and evicts agents above their reservation.
    pub fn poll_usage(&self, d: &Daemon) {
        let usage = match self.backend.usage() {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "GPU usage unreadable");
                return;
            }
        };
        let cgroups: HashMap<String, String> = d
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(n, h)| {
                let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
                i.cgroup.clone().map(|c| (c, n.clone()))
            })
            .collect();
        let mut per_agent: HashMap<(String, u32), u64> = HashMap::new();
        let mut unknown = std::collections::HashSet::new();
        let mut foreign: HashMap<u32, u64> = HashMap::new();
        let mut foreign_unknown: HashMap<u32, u32> = HashMap::new();
        for u in usage {
            // NVML reports host pids: a process's cgroup (its sandbox's, `aither/<name>-<shim
            // pid>`) names its agent, whatever pid namespace it runs in.
            let agent = u.agent.clone().or_else(|| {
                u.pid.and_then(|pid| {
                    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                    text.lines().find_map(|l| {
                        let id = l.rsplit('/').next()?;
                        cgroups.get(id).cloned()
                    })
                })
            });
            match (agent, u.used_mb) {
                (Some(a), Some(mb)) => *per_agent.entry((a, u.device)).or_default() += mb,
                // Unknown is not 0: the agent keeps its known sum (which can still evict it)
                // and is shown as unknown; an unknown reading alone evicts no one.
                (Some(a), None) => {
                    per_agent.entry((a.clone(), u.device)).or_default();
                    unknown.insert((a, u.device));
                }
                (None, Some(mb)) => *foreign.entry(u.device).or_default() += mb,
                (None, None) => *foreign_unknown.entry(u.device).or_default() += 1,
            }
        }
        let usage: Vec<(String, u32, u64)> = per_agent
            .into_iter()
            .map(|((a, dev), mb)| (a, dev, mb))
            .collect();
        let lost: HashMap<u32, String> = self.backend.lost().into_iter().collect();
        let (over, newly_lost, back) = {
            let mut g = self.lock();
            g.usage = usage.clone();
            g.foreign_mb = foreign;
            g.unknown = unknown;
            g.foreign_unknown = foreign_unknown;
            let newly: Vec<(u32, String)> = lost
                .iter()
                .filter(|(i, _)| !g.lost.contains_key(i))
                .map(|(i, w)| (*i, w.clone()))
                .collect();
            let back: Vec<u32> = g
                .lost
                .keys()
                .filter(|i| !lost.contains_key(i))
                .copied()
                .collect();
            for (i, _) in &newly {
                g.sched.set_offline(*i, true);
            }
            for i in &back {
                g.sched.set_offline(*i, false);
            }
            g.lost = lost;
            (g.sched.overusers(&usage), newly, back)
        };
        for (device, why) in &newly_lost {
            tracing::warn!(device, error = %why, "GPU lost: no new lease goes to it");
            d.emit(None, "gpu.lost", json!({"device": device, "error": why}));
            d.audit.record(
                Entry::new(
                    "gpu_lost",
                    Verdict::Info,
                    format!("GPU {device} lost: {why}"),
                )
                .actor("microscheduler"),
            );
        }
        if !back.is_empty() {
            self.pass(d);
        }
        for (agent, device, used_mb, reserved_mb) in over {
            // Once per run: readings while it stops do not evict it again.
            if !self.lock().evicting.insert(agent.clone()) {
                continue;
            }
            d.emit(
                Some(&agent),
                "gpu.evicted",
                json!({"device": device, "used_mb": used_mb, "reserved_mb": reserved_mb}),
            );
            d.audit.record(
                Entry::new(
                    "gpu_evict",
                    Verdict::Deny,
                    format!("gpu claim: {reserved_mb} MiB reserved, {used_mb} MiB used on device {device}"),
                )
                .agent(&agent)
                .actor("microscheduler"),
            );
            d.evict(
                &agent,
                Eviction::Overuse {
                    device,
                    used_mb,
                    reserved_mb,
                },
            );
        }
    }
}
