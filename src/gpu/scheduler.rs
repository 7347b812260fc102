//! The MicroScheduler's decisions (docs/gpu.md), with no I/O: the daemon feeds it requests,
//! releases and the clock, and carries out what it answers (start an agent on its devices, stop
//! a preempted one).
//!
//! - **Admission**: a request no device could ever hold is refused at once.
//! - **Reservation**: our bookkeeping of reserved VRAM is authoritative; the backend's readings
//!   only detect drift and overuse ([`Scheduler::overusers`]).
//! - **Caps**: leases per GPU and leases in all.
//! - **Order**: priority class plus capped aging (one class per `aging_step_ms` waited, at most
//!   `aging_cap` classes), ties first come first served. Each class is a queue ordered by the
//!   original enqueue time, so the head of the whole queue is the best of the class heads:
//!   O(classes) per decision, whatever the queue's length.
//! - **Backfill** never delays the head: a blocked head holds a reservation on the devices it
//!   will run on, and later requests may only use the other devices (nothing is backfilled when
//!   the global cap is what blocks the head).
//! - **Gang**: a request for N GPUs gets N distinct devices at once or waits.
//! - **Placement**: binpack (the fullest device that fits) by default, or spread.
//! - **Preemption** (optional): only by a strictly higher class, fewest victims first; victims
//!   are stopped by the daemon (SIGTERM, grace, kill) and requeued at their original time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// One device as the scheduler sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceSlot {
    pub index: u32,
    pub total_mb: u64,
    /// A MIG instance's profile (None: a whole GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// How leases are placed on devices.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// The device with the least free VRAM that still fits: keeps whole devices free for big
    /// and exclusive requests.
    #[default]
    Binpack,
    /// The device with the most free VRAM.
    Spread,
}

/// Tunables, from the `[scheduler]` table of gpus.toml.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Leases one GPU may hold at once (0: no cap).
    pub max_per_gpu: u32,
    /// Leases in all (0: no cap).
    pub max_leases: u32,
    /// Milliseconds of waiting that raise a request by one class.
    pub aging_step_ms: u64,
    /// The most classes aging may add.
    pub aging_cap: u32,
    pub placement: Placement,
    /// Whether a strictly higher class may preempt running leases.
    pub preemption: bool,
    /// How long a preempted or evicted agent has between SIGTERM and SIGKILL.
    pub preempt_grace_ms: u64,
    /// VRAM use above the reservation that is tolerated before eviction, in MiB.
    pub overuse_tolerance_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_per_gpu: 0,
            max_leases: 0,
            aging_step_ms: 60_000,
            aging_cap: 2,
            placement: Placement::Binpack,
            preemption: true,
            preempt_grace_ms: 10_000,
            overuse_tolerance_mb: 0,
        }
    }
}

/// What an agent asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    pub agent: String,
    /// GPUs wanted (all at once).
    pub count: u32,
    /// VRAM reserved on each of them, MiB.
    pub vram_mb: u64,
    /// Priority class: higher runs first; only a strictly higher class preempts.
    pub priority: u32,
    /// Whole devices: no other lease may share them.
    pub exclusive: bool,
    /// When the request was first queued (kept across preemption and daemon restarts).
    pub enqueued_ms: u64,
    /// Tie-breaker within one millisecond: order of submission.
    pub seq: u64,
    /// MIG instances of this profile instead of whole GPUs (one lease per instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// A granted request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub request: Request,
    /// Device indices, one per GPU of the request.
    pub devices: Vec<u32>,
    pub granted_ms: u64,
    /// Chosen as a preemption victim and being stopped.
    #[serde(default)]
    pub preempting: bool,
}

/// Why a request is refused at admission.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("asks for no GPU")]
    Empty,
    #[error("asks for {asked} GPUs but this host has {have}")]
    TooMany { asked: u32, have: usize },
    #[error("asks for {asked} MiB of VRAM per GPU but no {count} devices hold that much (largest: {largest} MiB)")]
    TooLarge {
        asked: u64,
        count: u32,
        largest: u64,
    },
    #[error("already has a GPU request or lease")]
    Duplicate,
    #[error("asks for {asked} MIG instances of profile {profile} but this host has {have}")]
    NoProfile {
        profile: String,
        asked: u32,
        have: usize,
    },
}

/// What the daemon must do after a scheduling pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedulerAction {
    /// Start `agent` on `devices`.
    Grant { agent: String, devices: Vec<u32> },
    /// Stop `victims` so that `for_agent` can run.
    Preempt {
        for_agent: String,
        victims: Vec<String>,
    },
}

/// A queued request with its place in line, for `aitherctl gpu queue`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Queued {
    pub position: usize,
    pub request: Request,
    /// Class after aging.
    pub effective_priority: u32,
    pub waited_ms: u64,
    /// The devices held for it while it is the blocked head.
    pub reserved_devices: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
struct DevState {
    total_mb: u64,
    reserved_mb: u64,
    leases: u32,
    exclusive: bool,
    /// The backend lost it (fell off the bus): no new lease goes there.
    offline: bool,
    /// A MIG instance's profile: only requests for it, one at a time.
    profile: Option<String>,
}

/// The queue and the leases.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    devices: BTreeMap<u32, DevState>,
    /// class → (enqueued_ms, seq) → request.
    queue: BTreeMap<u32, ClassQueue>,
    queued_agents: HashMap<String, (u32, (u64, u64))>,
    leases: HashMap<String, Lease>,
    /// The blocked head and the devices held for it.
    head_reservation: Option<(String, Vec<u32>)>,
    next_seq: u64,
}

impl Scheduler {
    pub fn new(devices: &[DeviceSlot], config: Config) -> Scheduler {
        Scheduler {
            config,
            devices: devices
                .iter()
                .map(|d| {
                    (
                        d.index,
                        DevState {
                            total_mb: d.total_mb,
                            profile: d.profile.clone(),
                            ..DevState::default()
                        },
                    )
                })
                .collect(),
            queue: BTreeMap::new(),
            queued_agents: HashMap::new(),
            leases: HashMap::new(),
            head_reservation: None,
            next_seq: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Marks a device lost (or back): a lost device takes no new lease, and no victim is
    /// preempted for it; the leases on it stay until their agents end.
    pub fn set_offline(&mut self, index: u32, offline: bool) {
        if let Some(d) = self.devices.get_mut(&index) {
            d.offline = offline;
        }
    }

    pub fn is_offline(&self, index: u32) -> bool {
        self.devices.get(&index).is_some_and(|d| d.offline)
    }

    /// Refuses what no state of the host could ever grant: whole GPUs for a request without a
    /// profile, MIG instances of the profile for one with.
    pub fn admit(&self, count: u32, vram_mb: u64, profile: Option<&str>) -> Result<(), Rejected> {
        if count == 0 {
            return Err(Rejected::Empty);
        }
        let kind: Vec<&DevState> = self
            .devices
            .values()
            .filter(|d| d.profile.as_deref() == profile)
            .collect();
        if count as usize > kind.len() {
            return Err(match profile {
                Some(p) => Rejected::NoProfile {
                    profile: p.to_string(),
                    asked: count,
                    have: kind.len(),
                },
                None => Rejected::TooMany {
                    asked: count,
                    have: kind.len(),
                },
            });
        }
        let mut totals: Vec<u64> = kind.iter().map(|d| d.total_mb).collect();
        totals.sort_unstable_by(|a, b| b.cmp(a));
        if totals[count as usize - 1] < vram_mb {
            return Err(Rejected::TooLarge {
                asked: vram_mb,
                count,
                largest: totals[0],
            });
        }
        Ok(())
    }

    /// Queues a request after admission. `enqueued_ms` is kept as given (a requeued or
    /// restored request keeps its original place); `seq` is assigned here unless restoring.
    pub fn submit(&mut self, mut req: Request) -> Result<(), Rejected> {
        self.admit(req.count, req.vram_mb, req.profile.as_deref())?;
        if self.queued_agents.contains_key(&req.agent) || self.leases.contains_key(&req.agent) {
            return Err(Rejected::Duplicate);
        }
        if req.seq == 0 {
            self.next_seq += 1;
            req.seq = self.next_seq;
        } else {
            self.next_seq = self.next_seq.max(req.seq);
        }
        let key = (req.enqueued_ms, req.seq);
        self.queued_agents
            .insert(req.agent.clone(), (req.priority, key));
        self.queue.entry(req.priority).or_default().insert(key, req);
        Ok(())
    }

    /// Takes a request out of the queue (the agent was stopped or removed while waiting).
    pub fn cancel(&mut self, agent: &str) -> Option<Request> {
        let (class, key) = self.queued_agents.remove(agent)?;
        let q = self.queue.get_mut(&class)?;
        let r = q.remove(&key);
        if q.is_empty() {
            self.queue.remove(&class);
        }
        if self
            .head_reservation
            .as_ref()
            .is_some_and(|(a, _)| a == agent)
        {
            self.head_reservation = None;
        }
        r
    }

    /// Ends a lease (the agent exited); its devices are free for the next pass.
    pub fn release(&mut self, agent: &str) -> Option<Lease> {
        let lease = self.leases.remove(agent)?;
        for i in &lease.devices {
            if let Some(d) = self.devices.get_mut(i) {
                d.reserved_mb = d.reserved_mb.saturating_sub(lease.request.vram_mb);
                d.leases = d.leases.saturating_sub(1);
                if lease.request.exclusive {
                    d.exclusive = false;
                }
            }
        }
        Some(lease)
    }

    /// Puts back a lease held before a daemon restart (its agent is still running).
    pub fn restore_lease(&mut self, lease: Lease) {
        self.next_seq = self.next_seq.max(lease.request.seq);
        self.take(&lease.request, &lease.devices);
        self.leases.insert(
            lease.request.agent.clone(),
            Lease {
                preempting: false,
                ..lease
            },
        );
    }

    pub fn lease(&self, agent: &str) -> Option<&Lease> {
        self.leases.get(agent)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn queued(&self, agent: &str) -> Option<&Request> {
        let (class, key) = self.queued_agents.get(agent)?;
        self.queue.get(class)?.get(key)
    }

    pub fn is_queued(&self, agent: &str) -> bool {
        self.queued_agents.contains_key(agent)
    }

    pub fn queue_len(&self) -> usize {
        self.queued_agents.len()
    }

    /// (index, total, reserved, leases, exclusive) of every device.
    pub fn devices(&self) -> impl Iterator<Item = (u32, u64, u64, u32, bool)> + '_ {
        self.devices
            .iter()
            .map(|(i, d)| (*i, d.total_mb, d.reserved_mb, d.leases, d.exclusive))
    }

    fn effective(&self, r: &Request, now_ms: u64) -> u32 {
        let step = self.config.aging_step_ms.max(1);
        let aged = (now_ms.saturating_sub(r.enqueued_ms) / step).min(self.config.aging_cap as u64);
        r.priority.saturating_add(aged as u32)
    }

    /// The order key: higher effective class first, then earlier enqueue, then submission.
    fn rank(&self, r: &Request, now_ms: u64) -> (Reverse<u32>, u64, u64) {
        (Reverse(self.effective(r, now_ms)), r.enqueued_ms, r.seq)
    }

    /// The head of the queue: the best of the class heads.
    fn head(&self, now_ms: u64) -> Option<&Request> {
        self.queue
            .values()
            .filter_map(|q| q.values().next())
            .min_by_key(|r| self.rank(r, now_ms))
    }

    /// The whole queue in order (k-way merge of the classes by rank).
    pub fn ordered(&self, now_ms: u64) -> Vec<&Request> {
        let mut all: Vec<&Request> = self.queue.values().flat_map(|q| q.values()).collect();
        all.sort_by_key(|r| self.rank(r, now_ms));
        all
    }

    /// 1-based place of `agent` in the queue (no sort: counts those ranked ahead).
    pub fn position(&self, agent: &str, now_ms: u64) -> Option<usize> {
        let &(class, key) = self.queued_agents.get(agent)?;
        let me = self.rank(&self.queue[&class][&key], now_ms);
        Some(
            1 + self
                .queue
                .values()
                .flat_map(|q| q.values())
                .filter(|r| self.rank(r, now_ms) < me)
                .count(),
        )
    }

    pub fn queue_view(&self, now_ms: u64) -> Vec<Queued> {
        self.ordered(now_ms)
            .into_iter()
            .enumerate()
            .map(|(i, r)| Queued {
                position: i + 1,
                request: r.clone(),
                effective_priority: self.effective(r, now_ms),
                waited_ms: now_ms.saturating_sub(r.enqueued_ms),
                reserved_devices: match &self.head_reservation {
                    Some((a, d)) if *a == r.agent => d.clone(),
                    _ => vec![],
                },
            })
            .collect()
    }

    fn global_full(&self) -> bool {
        self.config.max_leases > 0 && self.leases.len() as u32 >= self.config.max_leases
    }

    /// Whether `r` fits on device `d` now.
    fn fits(&self, d: &DevState, r: &Request) -> bool {
        if d.exclusive || d.offline || d.profile != r.profile {
            return false;
        }
        if d.profile.is_some() && d.leases > 0 {
            // A MIG instance is one agent's.
            return false;
        }
        if self.config.max_per_gpu > 0 && d.leases >= self.config.max_per_gpu {
            return false;
        }
        if r.exclusive {
            return d.leases == 0 && d.total_mb >= r.vram_mb;
        }
        d.total_mb.saturating_sub(d.reserved_mb) >= r.vram_mb
    }

    /// Devices for `r` now, avoiding `blocked`, by the placement rule; None if it cannot run.
    fn place(&self, r: &Request, blocked: &[u32]) -> Option<Vec<u32>> {
        let mut ok: Vec<(u64, u32)> = self
            .devices
            .iter()
            .filter(|(i, d)| !blocked.contains(i) && self.fits(d, r))
            .map(|(i, d)| (d.total_mb.saturating_sub(d.reserved_mb), *i))
            .collect();
        if ok.len() < r.count as usize {
            return None;
        }
        match self.config.placement {
            Placement::Binpack => ok.sort_unstable(),
            Placement::Spread => ok.sort_unstable_by_key(|&(free, i)| (Reverse(free), i)),
        }
        let mut v: Vec<u32> = ok
            .into_iter()
            .take(r.count as usize)
            .map(|(_, i)| i)
            .collect();
        v.sort_unstable();
        Some(v)
    }

    fn take(&mut self, r: &Request, devices: &[u32]) {
        for i in devices {
            if let Some(d) = self.devices.get_mut(i) {
                d.reserved_mb += r.vram_mb;
                d.leases += 1;
                if r.exclusive {
                    d.exclusive = true;
                }
            }
        }
    }

    fn grant(&mut self, agent: &str, devices: Vec<u32>, now_ms: u64) -> SchedulerAction {
        let req = self.cancel(agent).expect("granted request is queued");
        self.take(&req, &devices);
        self.leases.insert(
            agent.to_string(),
            Lease {
                request: req,
                devices: devices.clone(),
                granted_ms: now_ms,
                preempting: false,
            },
        );
        SchedulerAction::Grant {
            agent: agent.to_string(),
            devices,
        }
    }

    /// The devices the blocked head will run on once enough leases end: those able to hold it
    /// with the most free VRAM now (ties: lowest index).
    fn reservation_for(&self, r: &Request) -> Vec<u32> {
        let mut cand: Vec<(u64, u32)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.total_mb >= r.vram_mb && !d.offline && d.profile == r.profile)
            .map(|(i, d)| (d.total_mb.saturating_sub(d.reserved_mb), *i))
            .collect();
        cand.sort_unstable_by_key(|&(free, i)| (Reverse(free), i));
        let mut v: Vec<u32> = cand
            .into_iter()
            .take(r.count as usize)
            .map(|(_, i)| i)
            .collect();
        v.sort_unstable();
        v
    }

    /// Victims that would let `r` run: per device, the fewest strictly lower-class leases
    /// (lowest class first, then the most recently granted) whose removal makes room; then the
    /// `r.count` devices needing the fewest. Leases already being preempted count as gone.
    fn victims_for(&self, r: &Request) -> Option<Vec<String>> {
        let mut per_dev: Vec<(usize, u32, Vec<String>)> = Vec::new();
        for (i, d) in &self.devices {
            if d.total_mb < r.vram_mb || d.offline || d.profile != r.profile {
                continue;
            }
            let mut on: Vec<&Lease> = self
                .leases
                .values()
                .filter(|l| l.devices.contains(i))
                .collect();
            // Departing leases first (free), then victims by class, newest grant first.
            on.sort_by_key(|l| {
                (
                    !l.preempting,
                    l.request.priority,
                    Reverse(l.granted_ms),
                    l.request.seq,
                )
            });
            let mut reserved = d.reserved_mb;
            let mut count = d.leases;
            let mut exclusive = d.exclusive;
            let mut chosen = Vec::new();
            let room = |reserved: u64, count: u32, exclusive: bool| {
                if exclusive || (d.profile.is_some() && count > 0) {
                    return false;
                }
                if self.config.max_per_gpu > 0 && count >= self.config.max_per_gpu {
                    return false;
                }
                if r.exclusive {
                    count == 0
                } else {
                    d.total_mb.saturating_sub(reserved) >= r.vram_mb
                }
            };
            let mut it = on.into_iter();
            while !room(reserved, count, exclusive) {
                let Some(l) = it.next() else { break };
                if !l.preempting && l.request.priority >= r.priority {
                    break;
                }
                reserved = reserved.saturating_sub(l.request.vram_mb);
                count = count.saturating_sub(1);
                if l.request.exclusive {
                    exclusive = false;
                }
                if !l.preempting {
                    chosen.push(l.request.agent.clone());
                }
            }
            if room(reserved, count, exclusive) {
                per_dev.push((chosen.len(), *i, chosen));
            }
        }
        if per_dev.len() < r.count as usize {
            return None;
        }
        per_dev.sort_by_key(|(n, i, _)| (*n, *i));
        let mut victims: Vec<String> = per_dev
            .into_iter()
            .take(r.count as usize)
            .flat_map(|(_, _, v)| v)
            .collect();
        victims.sort();
        victims.dedup();
        Some(victims)
    }

    /// One scheduling pass: grants in order while the head fits, then backfills around a
    /// blocked head, then (if enabled) preempts for it. Call after every submit, release and
    /// periodically (aging changes the order).
    pub fn schedule(&mut self, now_ms: u64) -> Vec<SchedulerAction> {
        let mut out = Vec::new();
        let previous = self.head_reservation.take();
        // 1. In order while the head fits.
        let head = loop {
            let Some(head) = self.head(now_ms) else {
                return out;
            };
            if self.global_full() {
                // The global cap blocks everyone alike: nothing to backfill or preempt
                // within the cap except by class.
                let head = head.clone();
                if let Some(d) = self.preempt_for(&head) {
                    out.push(d);
                }
                return out;
            }
            match self.place(head, &[]) {
                Some(devs) => {
                    let agent = head.agent.clone();
                    out.push(self.grant(&agent, devs, now_ms));
                }
                None => break head.clone(),
            }
        };
        // 2. The head is blocked by VRAM, exclusivity or the per-GPU cap: hold its devices.
        // The same head keeps the devices it holds: moving the hold to a device that a
        // backfilled lease now occupies would delay the head after all.
        let reserved = match previous {
            Some((agent, devs)) if agent == head.agent => devs,
            _ => self.reservation_for(&head),
        };
        self.head_reservation = Some((head.agent.clone(), reserved.clone()));
        if let Some(d) = self.preempt_for(&head) {
            out.push(d);
        }
        // 3. Backfill: later requests, in order, on the other devices only. The queue is
        // walked lazily (a merge of the class queues) and only while some device outside
        // the reservation has room; a grant only shrinks the room, so the walk resumes where
        // it stopped instead of starting over.
        let mut cursors: HashMap<u32, (u64, u64)> = HashMap::new();
        loop {
            if self.global_full() {
                break;
            }
            let room = self.room(&reserved);
            if room.devices == 0 {
                break;
            }
            let mut found = None;
            {
                let mut merge = Merge::new(&self.queue, &cursors);
                while let Some((class, r)) = merge.next(self, now_ms) {
                    cursors.insert(class, (r.enqueued_ms, r.seq));
                    if r.agent == head.agent
                        || r.count > room.devices
                        || (r.exclusive && r.count > room.empty)
                        || (!r.exclusive && r.vram_mb > room.max_free)
                    {
                        continue;
                    }
                    if let Some(devs) = self.place(r, &reserved) {
                        found = Some((r.agent.clone(), devs));
                        break;
                    }
                }
            }
            match found {
                Some((agent, devs)) => out.push(self.grant(&agent, devs, now_ms)),
                None => break,
            }
        }
        out
    }

    /// What is free outside `blocked`: devices with room for one more lease, the largest free
    /// VRAM among them, and how many are empty.
    fn room(&self, blocked: &[u32]) -> Room {
        let mut r = Room::default();
        for (i, d) in &self.devices {
            if blocked.contains(i)
                || d.exclusive
                || d.offline
                || (self.config.max_per_gpu > 0 && d.leases >= self.config.max_per_gpu)
            {
                continue;
            }
            let free = d.total_mb.saturating_sub(d.reserved_mb);
            if free == 0 {
                continue;
            }
            r.devices += 1;
            r.max_free = r.max_free.max(free);
            if d.leases == 0 {
                r.empty += 1;
            }
        }
        r
    }

    /// Marks victims for `head` when preemption is on and it would help.
    fn preempt_for(&mut self, head: &Request) -> Option<SchedulerAction> {
        if !self.config.preemption {
            return None;
        }
        // Already waiting for victims to leave: do not pick more.
        if self.leases.values().any(|l| l.preempting) {
            return None;
        }
        let victims = if self.global_full() {
            // One lower-class lease anywhere frees a slot; it must also leave room for the
            // head's VRAM, which the device search below checks.
            let v = self.victims_for(head)?;
            if v.is_empty() {
                let lowest = self
                    .leases
                    .values()
                    .filter(|l| l.request.priority < head.priority)
                    .min_by_key(|l| (l.request.priority, Reverse(l.granted_ms)))?;
                vec![lowest.request.agent.clone()]
            } else {
                v
            }
        } else {
            self.victims_for(head)?
        };
        if victims.is_empty() {
            return None;
        }
        for v in &victims {
            if let Some(l) = self.leases.get_mut(v) {
                l.preempting = true;
            }
        }
        Some(SchedulerAction::Preempt {
            for_agent: head.agent.clone(),
            victims,
        })
    }

    /// Agents using more VRAM than they reserved (plus the tolerance) on a device of their
    /// lease, from the backend's per-agent readings `(agent, device index, used MiB)`.
    pub fn overusers(&self, usage: &[(String, u32, u64)]) -> Vec<(String, u32, u64, u64)> {
        let mut out = Vec::new();
        for (agent, dev, used) in usage {
            let Some(l) = self.leases.get(agent) else {
                continue;
            };
            let limit = l.request.vram_mb + self.config.overuse_tolerance_mb;
            let on_lease = l.devices.contains(dev);
            if !on_lease || *used > limit {
                out.push((agent.clone(), *dev, *used, l.request.vram_mb));
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

#[derive(Default)]
struct Room {
    devices: u32,
    max_free: u64,
    empty: u32,
}

type ClassQueue = BTreeMap<(u64, u64), Request>;

/// A lazy walk of the queue in rank order: the class queues are each in rank order already
/// (same class, older first), so the next request is the best of the class heads.
struct Merge<'a> {
    heads: Vec<(u32, ClassWalk<'a>)>,
}

type ClassWalk<'a> =
    std::iter::Peekable<std::collections::btree_map::Range<'a, (u64, u64), Request>>;

impl<'a> Merge<'a> {
    /// Starts each class after its cursor (the last request already looked at).
    fn new(queue: &'a BTreeMap<u32, ClassQueue>, cursors: &HashMap<u32, (u64, u64)>) -> Self {
        use std::ops::Bound::{Excluded, Unbounded};
        Merge {
            heads: queue
                .iter()
                .map(|(c, q)| {
                    let it = match cursors.get(c) {
                        Some(k) => q.range((Excluded(*k), Unbounded)),
                        None => q.range(..),
                    };
                    (*c, it.peekable())
                })
                .collect(),
        }
    }

    fn next(&mut self, s: &Scheduler, now_ms: u64) -> Option<(u32, &'a Request)> {
        let best = self
            .heads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, (_, it))| it.peek().map(|(_, r)| (s.rank(r, now_ms), i)))
            .min()?
            .1;
        let (class, it) = &mut self.heads[best];
        it.next().map(|(_, r)| (*class, r))
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
