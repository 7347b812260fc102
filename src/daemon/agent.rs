//! One supervised agent: a tokio task that launches its sandbox through a shim, watches it
//! (exit, READY, heartbeats, health checks, the kernel's pain signals), and applies the restart
//! policy. Users talk to it through `Cmd`s; `ps` and `inspect` read its `Info`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::bus::{Outcome, Slot};
use super::lifecycle::{
    idle_command, idle_pause, resting_state, Action, Command, Frame, Idle, IdleReply, PauseRefusal,
    Run, Then,
};
use super::proto::{self, aio, ErrorBody, ErrorCode, FrameError, SpawnRequest};
use super::shim::{self, ExitRecord, Live, Probe, ShimError};
use super::supervise::{Decision, EndReason, RestartTracker, State, Supervision};
use super::Daemon;
use crate::audit::{Entry, Verdict};
use crate::cgroup::{self, stats, CpuQuota};
use crate::policy::{PainAction, PainPolicy};
use crate::sandbox::SandboxSpec;

/// What the daemon keeps about an agent across its own restarts (agents.record).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub request: SpawnRequest,
    pub spec: SandboxSpec,
    pub token: String,
    pub token_id: String,
    pub pain: PainPolicy,
    pub created_ms: u64,
    /// What it asks the MicroScheduler for (the token's `gpu` claim, narrowed by spawn
    /// flags); None: no GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::policy::GpuGrant>,
    /// The uid that spawned it (SO_PEERCRED), issue 18. Records stored before owners read as
    /// 0: root's, visible to root and admins only.
    #[serde(default)]
    pub owner: u32,
}

/// What `ps` and `inspect` show.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    /// The uid that spawned it (admins see an OWNER column).
    #[serde(default)]
    pub owner: u32,
    /// What it counts against its owner's per-user limits (daemon/users.rs): its memory
    /// limit in bytes and CPU quota in CPUs.
    #[serde(skip)]
    pub charged: (Option<u64>, Option<f64>),
    pub state: State,
    pub policy: String,
    pub argv: Vec<String>,
    pub workspace: Option<PathBuf>,
    pub token_id: String,
    pub pid1: Option<i32>,
    pub agent_pid: Option<i32>,
    pub shim_pid: Option<i32>,
    pub cgroup: Option<String>,
    /// The current run was served by a prepared sandbox (warm start, daemon/pool.rs).
    #[serde(default)]
    pub warm: bool,
    pub started_ms: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub last_reason: Option<EndReason>,
    pub next_start_ms: Option<u64>,
    pub ready: bool,
    pub health_failures: u32,
    pub last_health: Option<String>,
    pub last_heartbeat_ms: Option<u64>,
    pub status_text: Option<String>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit: Option<u64>,
    /// Tasks (processes and threads) in the sandbox and the pids limit, at the last sample.
    #[serde(default)]
    pub pids: Option<u64>,
    #[serde(default)]
    pub pids_limit: Option<u64>,
    pub oom_kills: u64,
    /// What the current run's sandbox enforces, read back after the start (docs/audit.md).
    /// Kept as the JSON text it arrived as (compact: 200 agents' reports as parsed values
    /// would cost megabytes). `ps` leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Box<serde_json::value::RawValue>>,
    pub supervision: Supervision,
    pub log_dir: PathBuf,
    /// The `ps` GPU column: devices and VRAM of the lease (`0:8G`), or `queued#N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// The operator's labels, from the spawn request.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Ports published on the host's loopback (`--publish-host`), as given:
    /// `127.0.0.1:8080=8000`. `inspect` adds their counters under `host_ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_host: Vec<String>,
}

/// Why an agent's task did not do a user's command or its first launch: the reply's error,
/// each kind with its wire code (`code`).
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The command does not apply in the agent's state (lifecycle::idle_command): `conflict`.
    #[error("{0}")]
    Refused(String),
    /// The signal could not be handed to the agent's shim: `conflict` when the shim is gone,
    /// `io` otherwise.
    #[error("{name}: the signal was not delivered: {source}")]
    NotSignalled {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The first launch failed (spawn's reply): `launch_failed`.
    #[error("{0}")]
    Launch(String),
}

impl CmdError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CmdError::Refused(_) => ErrorCode::Conflict,
            CmdError::NotSignalled { source, .. } if source.raw_os_error() == Some(libc::ESRCH) => {
                ErrorCode::Conflict
            }
            CmdError::NotSignalled { .. } => ErrorCode::Io,
            CmdError::Launch(_) => ErrorCode::LaunchFailed,
        }
    }
}

/// Requests to an agent's task.
pub enum Cmd {
    Stop {
        timeout: Option<Duration>,
        reply: oneshot::Sender<Result<(), CmdError>>,
    },
    Kill {
        signal: i32,
        reply: oneshot::Sender<Result<(), CmdError>>,
    },
    Restart {
        reply: oneshot::Sender<Result<(), CmdError>>,
    },
    Remove {
        reply: oneshot::Sender<Result<(), CmdError>>,
    },
    /// Freeze every process of the running sandbox (`aitherctl pause`).
    Pause {
        reply: oneshot::Sender<Result<(), ErrorBody>>,
    },
    /// Thaw it (`aitherctl resume`).
    Resume {
        reply: oneshot::Sender<Result<(), ErrorBody>>,
    },
    /// The MicroScheduler takes the GPUs back (preemption, overuse).
    Evict(super::gpu::Eviction),
}

/// The handle the daemon keeps per agent.
pub struct Handle {
    pub info: Arc<Mutex<Info>>,
    pub cmd: mpsc::UnboundedSender<Cmd>,
    /// The agent's sandbox spec, for the commands `aitherctl exec` runs in it.
    pub spec: Arc<SandboxSpec>,
}

/// How a first launch went, for the `spawn` reply.
pub type Launched = oneshot::Sender<Result<(), CmdError>>;

enum ChannelItem {
    /// A request, its frame's size in bytes, and the CPU time its parsing took (ns).
    Frame(serde_json::Value, usize, u64),
    Error(FrameError),
}

struct Agent {
    d: Arc<Daemon>,
    name: String,
    rec: Record,
    info: Arc<Mutex<Info>>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    tracker: RestartTracker,
    /// The current run's bus subscriptions and their queues.
    outbox: Option<Arc<crate::bus::Outbox>>,
    /// The queue position (enqueue time, sequence) a preempted agent goes back to.
    gpu_origin: Option<(u64, u64)>,
    /// Its request budget on the channel, kept across runs (daemon/budget.rs).
    budget: super::budget::Budget,
    /// What aitherd spends for it.
    usage: Arc<super::budget::Usage>,
    /// Its listeners on the host's loopback (`--publish-host`): open from its first launch
    /// while it runs, restarts included; closed when it rests (stopped, exited, failed) or
    /// is removed.
    host_ports: Option<super::publish::HostPorts>,
}

/// What serves one run's network: the gateway on its socket, its published services, and
/// its host ports pointed at its namespace; dropped when the run ends.
struct RunNet {
    _egress: Option<super::egress::Serving>,
    _published: Option<super::egress::PublishedBy>,
    host: Option<Arc<super::publish::PortsState>>,
}

impl Drop for RunNet {
    fn drop(&mut self) {
        // Between runs the host ports refuse connections (closed at once).
        if let Some(h) = &self.host {
            h.set_target(None);
        }
    }
}

/// How waiting for GPUs ended.
enum Acquired {
    /// Launch this spec (with the lease applied, if any).
    Spec(Box<SandboxSpec>),
    /// Never: the request cannot be admitted.
    Refused(String),
    /// A user's command came first.
    Interrupted(After),
}

/// How a watched run ended, plus anything a user asked for meanwhile.
struct RunEnd {
    reason: EndReason,
    healthy_since: Option<Instant>,
    then: After,
}

enum After {
    /// Apply the restart policy.
    Policy,
    /// Stay stopped (a user's stop).
    Stop(Vec<oneshot::Sender<Result<(), CmdError>>>),
    /// Start again now, whatever the policy (a user's restart).
    Restart(oneshot::Sender<Result<(), CmdError>>),
    /// Remove the agent.
    Remove(oneshot::Sender<Result<(), CmdError>>),
}

/// Starts the task of a new or recovered agent. `adopted`: its sandbox is already running.
/// `initial`: the state to rest in without launching (a recovered stopped/exited/failed agent).
pub fn start(
    d: Arc<Daemon>,
    rec: Record,
    adopted: Option<Live>,
    initial: Option<State>,
    launched: Option<Launched>,
    restarts: u32,
) -> Handle {
    let name = rec.request.name.clone();
    let spec = Arc::new(rec.spec.clone());
    d.owners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), rec.owner);
    let info = Arc::new(Mutex::new(Info {
        name: name.clone(),
        owner: rec.owner,
        charged: (
            rec.spec.limits.memory,
            rec.spec
                .limits
                .cpu
                .map(|c| c.quota_us as f64 / c.period_us.max(1) as f64),
        ),
        state: initial.unwrap_or(State::Created),
        policy: rec.spec.policy.clone(),
        argv: rec.spec.argv.clone(),
        workspace: rec.spec.workspace.as_ref().map(|w| w.path.clone()),
        token_id: rec.token_id.clone(),
        pid1: None,
        agent_pid: None,
        shim_pid: None,
        cgroup: None,
        warm: false,
        started_ms: None,
        restarts,
        last_exit: None,
        last_reason: None,
        next_start_ms: None,
        ready: false,
        health_failures: 0,
        last_health: None,
        last_heartbeat_ms: None,
        status_text: None,
        cpu_percent: None,
        memory_bytes: None,
        memory_limit: None,
        pids: None,
        pids_limit: None,
        oom_kills: 0,
        report: None,
        supervision: rec.request.supervision.clone(),
        log_dir: d.log_dir(&name),
        gpu: None,
        labels: rec.request.labels.clone(),
        publish_host: rec
            .request
            .publish_host
            .iter()
            .map(ToString::to_string)
            .collect(),
    }));
    let (tx, rx) = mpsc::unbounded_channel();
    let seed = super::store::now_ms() ^ (std::process::id() as u64) << 32;
    let usage = d.usage_of(&name);
    // The budget's terms in force now (`[limits]`, changed by a reload for new agents).
    let budget = super::budget::Budget::with(&d.config().config.limits, std::time::Instant::now());
    let agent = Agent {
        d,
        name,
        rec,
        info: info.clone(),
        cmds: rx,
        tracker: {
            let mut t = RestartTracker::new(seed ^ info_hash(&info));
            t.total = restarts;
            t
        },
        outbox: None,
        gpu_origin: None,
        budget,
        usage,
        host_ports: None,
    };
    tokio::spawn(agent.main(adopted, initial, launched));
    Handle {
        info,
        cmd: tx,
        spec,
    }
}

fn info_hash(info: &Arc<Mutex<Info>>) -> u64 {
    Arc::as_ptr(info) as u64
}

impl Agent {
    fn set<F: FnOnce(&mut Info)>(&self, f: F) {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut i);
    }

    fn state(&self, s: State) {
        let prev = {
            let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut i.state, s)
        };
        if prev != s {
            self.d.store.set_state(&self.name, &s.to_string());
            self.d
                .emit(Some(&self.name), "state", json!({"from": prev, "to": s}));
        }
    }

    fn sup(&self) -> &Supervision {
        &self.rec.request.supervision
    }

    async fn main(
        mut self,
        mut adopted: Option<Live>,
        initial: Option<State>,
        mut launched: Option<Launched>,
    ) {
        let mut idle = initial;
        loop {
            if let Some(s) = idle.take() {
                // Resting (stopped, exited, failed): only a user can move it; its host ports
                // close before the state says so.
                self.close_host_ports().await;
                self.state(s);
                match self.rest().await {
                    Some(After::Restart(reply)) => {
                        self.tracker.reset();
                        let _ = reply.send(Ok(()));
                    }
                    Some(After::Remove(reply)) => {
                        self.remove(reply).await;
                        return;
                    }
                    _ => return,
                }
            }
            // Re-check the token at every start: a revoked or expired one never launches.
            if let Err(e) = self.d.check_token(&self.rec.token) {
                self.audit(Entry::new("launch", Verdict::Deny, format!("token: {e}")));
                let reason = EndReason::TokenInvalid {
                    error: e.to_string(),
                };
                self.ended(&reason);
                if let Some(l) = launched.take() {
                    let _ = l.send(Err(CmdError::Launch(reason.describe())));
                }
                idle = Some(State::Failed);
                continue;
            }
            let was_adopted = adopted.is_some();
            // Listening before the launch: a host port in use is the spawn's error, and no
            // sandbox is built for a run that could not be published.
            if let Err(error) = self.open_host_ports(was_adopted) {
                idle = self.launch_failed(&mut launched, 125, error.to_string());
                continue;
            }
            let live = match adopted.take() {
                Some(l) => Ok(l),
                None => match self.acquire_gpu(&mut launched).await {
                    Acquired::Spec(spec) => self.launch(&spec).await,
                    Acquired::Refused(error) => {
                        idle = self.launch_failed(&mut launched, 125, error);
                        continue;
                    }
                    Acquired::Interrupted(After::Stop(replies)) => {
                        self.stopped(replies).await;
                        idle = Some(State::Stopped);
                        continue;
                    }
                    Acquired::Interrupted(After::Remove(reply)) => {
                        self.remove(reply).await;
                        return;
                    }
                    Acquired::Interrupted(After::Restart(reply)) => {
                        let _ = reply.send(Ok(()));
                        continue;
                    }
                    Acquired::Interrupted(After::Policy) => return,
                },
            };
            let end = match live {
                Ok(live) => {
                    if let Some(l) = launched.take() {
                        let _ = l.send(Ok(()));
                    }
                    self.watch(live, was_adopted).await
                }
                Err(e) => {
                    let (code, error) = match &e {
                        ShimError::Launch { code, error } => (*code, error.clone()),
                        other => (125, other.to_string()),
                    };
                    // A sandbox that cannot be built will not build on retry (a missing
                    // command, a protection the kernel lacks): no restart loop.
                    idle = self.launch_failed(&mut launched, code, error);
                    continue;
                }
            };
            self.ended(&end.reason);
            if matches!(end.reason, EndReason::GpuPreempted { .. })
                && matches!(end.then, After::Policy)
            {
                // Back into the queue at its original time; not a restart, not a failure.
                continue;
            }
            self.gpu_origin = None;
            let now = self.d.mono_ms();
            if let Some(h) = end.healthy_since {
                let healthy = now.saturating_sub(self.d.to_mono_ms(h));
                let sup = self.sup().clone();
                self.tracker.note_healthy(&sup, healthy);
            }
            match end.then {
                After::Remove(reply) => {
                    self.remove(reply).await;
                    return;
                }
                After::Stop(replies) => {
                    self.stopped(replies).await;
                    idle = Some(State::Stopped);
                    continue;
                }
                After::Restart(reply) => {
                    self.tracker.reset();
                    self.tracker.total += 1;
                    self.set(|i| i.restarts = self.tracker.total);
                    self.d.store.set_restarts(&self.name, self.tracker.total);
                    let _ = reply.send(Ok(()));
                    continue;
                }
                After::Policy => {}
            }
            let sup = self.sup().clone();
            let decision = self.tracker.decide(&sup, &end.reason, now);
            self.audit_decision(&sup, &end.reason, decision);
            self.set(|i| i.restarts = self.tracker.total);
            self.d.store.set_restarts(&self.name, self.tracker.total);
            let Decision::Restart(delay) = decision else {
                if decision == Decision::GiveUp {
                    self.d.emit(
                        Some(&self.name),
                        "failed",
                        json!({"reason": format!("more than {} restarts in {} s", sup.burst_limit, sup.burst_window_ms / 1000)}),
                    );
                }
                idle = resting_state(decision, &end.reason);
                continue;
            };
            match self.back_off(delay).await {
                Some(rest) => idle = rest,
                None => return,
            }
        }
    }

    /// The restart policy's decision, in the audit stream.
    fn audit_decision(&self, sup: &Supervision, reason: &EndReason, decision: Decision) {
        self.audit(
            Entry::new(
                "restart_decision",
                Verdict::Info,
                format!(
                    "restart={} burst_limit={} in {}s: {}",
                    serde_json::to_value(sup.restart)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    sup.burst_limit,
                    sup.burst_window_ms / 1000,
                    reason.describe()
                ),
            )
            .data(json!({"decision": format!("{decision:?}"), "reason": reason})),
        );
    }

    /// State `backoff` for `delay`, then the next start. Some(Some(state)): a user's stop
    /// came first (rest in it); Some(None): start now; None: a user removed the agent.
    async fn back_off(&mut self, delay: Duration) -> Option<Option<State>> {
        self.state(State::Backoff);
        let at = super::store::now_ms() + delay.as_millis() as u64;
        self.set(|i| i.next_start_ms = Some(at));
        self.d.emit(
            Some(&self.name),
            "backoff",
            json!({"delay_ms": delay.as_millis() as u64, "restarts": self.tracker.total}),
        );
        let mut rest = None;
        match self.backoff(delay).await {
            None | Some(After::Policy) => {}
            Some(After::Stop(replies)) => {
                self.stopped(replies).await;
                rest = Some(State::Stopped);
            }
            Some(After::Remove(reply)) => {
                self.remove(reply).await;
                return None;
            }
            Some(After::Restart(reply)) => {
                let _ = reply.send(Ok(()));
            }
        }
        self.set(|i| i.next_start_ms = None);
        Some(rest)
    }

    /// Records the end of a run.
    fn ended(&self, reason: &EndReason) {
        // Its GPUs go back to the queue first: the next agent may start while we record.
        self.d.gpu.release(&self.d, &self.name);
        let text = reason.describe();
        self.d.store.run_ended(&self.name, &text);
        self.d.clear_working_memory(&self.name);
        self.set(|i| {
            i.last_exit = Some(text.clone());
            i.last_reason = Some(reason.clone());
            i.pid1 = None;
            i.agent_pid = None;
            i.shim_pid = None;
            i.cgroup = None;
            i.ready = false;
            i.cpu_percent = None;
        });
        self.d.emit(
            Some(&self.name),
            "exited",
            json!({"reason": reason, "description": text}),
        );
    }

    async fn remove(&mut self, reply: oneshot::Sender<Result<(), CmdError>>) {
        // Its host ports are closed when `rm` returns.
        self.close_host_ports().await;
        self.d.store.delete_agent(&self.name);
        self.d.emit(Some(&self.name), "removed", json!({}));
        self.d.forget(&self.name);
        let _ = reply.send(Ok(()));
    }

    /// A user's stop is done: its host ports closed first, so that `stop` returning means
    /// they are.
    async fn stopped(&mut self, replies: Vec<oneshot::Sender<Result<(), CmdError>>>) {
        self.close_host_ports().await;
        for r in replies {
            let _ = r.send(Ok(()));
        }
    }

    async fn close_host_ports(&mut self) {
        if let Some(h) = self.host_ports.take() {
            h.close().await;
        }
    }

    /// Waits in a resting state for a user's command.
    async fn rest(&mut self) -> Option<After> {
        while let Some(cmd) = self.cmds.recv().await {
            if let Some(after) = self.idle(Idle::Resting, cmd) {
                return Some(after);
            }
        }
        None
    }

    /// A user's command between runs, answered as the lifecycle says
    /// (`lifecycle::idle_command`); Some: leave the wait.
    fn idle(&self, at: Idle, cmd: Cmd) -> Option<After> {
        let (c, reply) = match cmd {
            Cmd::Stop { timeout, reply } => (
                Command::Stop {
                    grace: timeout.unwrap_or_default(),
                },
                reply,
            ),
            Cmd::Kill { signal, reply } => (
                Command::Kill {
                    signal,
                    delivered: false,
                },
                reply,
            ),
            Cmd::Restart { reply } => (Command::Restart, reply),
            Cmd::Remove { reply } => (Command::Remove, reply),
            Cmd::Pause { reply } | Cmd::Resume { reply } => {
                let state = self.info.lock().unwrap_or_else(|e| e.into_inner()).state;
                let _ = reply.send(Err(ErrorBody {
                    code: ErrorCode::Conflict,
                    message: idle_pause(at, &self.name, state),
                }));
                return None;
            }
            Cmd::Evict(_) => return None,
        };
        match idle_command(at, &self.name, &c) {
            IdleReply::Ok => {
                let _ = reply.send(Ok(()));
                None
            }
            IdleReply::Refuse(m) => {
                let _ = reply.send(Err(CmdError::Refused(m)));
                None
            }
            IdleReply::Ignore => None,
            IdleReply::Leave(Then::Stop) => Some(After::Stop(vec![reply])),
            IdleReply::Leave(Then::Restart) => Some(After::Restart(reply)),
            IdleReply::Leave(Then::Remove) => Some(After::Remove(reply)),
            IdleReply::Leave(Then::Policy) => Some(After::Policy),
        }
    }

    /// Sleeps out a backoff; a user's command cuts it short.
    async fn backoff(&mut self, delay: Duration) -> Option<After> {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                cmd = self.cmds.recv() => {
                    if let Some(after) = self.idle(Idle::Backoff, cmd?) {
                        return Some(after);
                    }
                }
            }
        }
    }

    /// Waits for the agent's GPUs (if it asks for any) and applies the lease to its spec.
    /// While queued it answers `spawn` (state `queued`) and users' commands.
    async fn acquire_gpu(&mut self, launched: &mut Option<Launched>) -> Acquired {
        let mut spec = Box::new(self.rec.spec.clone());
        let Some(ask) = self.rec.gpu.clone().filter(|g| g.count > 0) else {
            return Acquired::Spec(spec);
        };
        let mut rx = match self
            .d
            .gpu
            .request(&self.d, &self.name, &ask, self.gpu_origin.take())
        {
            Ok(rx) => rx,
            Err(e) => {
                // A host with no GPUs says why (a driver that failed at init, no driver).
                let why = self.d.gpu.note.as_ref().map(|n| format!(" (no GPUs: {n})"));
                return Acquired::Refused(format!(
                    "GPU request refused: {e}{}",
                    why.unwrap_or_default()
                ));
            }
        };
        let granted = match rx.try_recv() {
            Ok(g) => g,
            Err(oneshot::error::TryRecvError::Closed) => {
                return Acquired::Refused("the GPU scheduler dropped the request".into())
            }
            Err(oneshot::error::TryRecvError::Empty) => {
                self.state(State::Queued);
                if let Some(l) = launched.take() {
                    let _ = l.send(Ok(()));
                }
                loop {
                    tokio::select! {
                        g = &mut rx => match g {
                            Ok(g) => break g,
                            Err(_) => return Acquired::Refused("the GPU scheduler dropped the request".into()),
                        },
                        cmd = self.cmds.recv() => match cmd {
                            None => {
                                self.d.gpu.cancel(&self.d, &self.name);
                                return Acquired::Interrupted(After::Policy);
                            }
                            Some(cmd) => {
                                if let Some(after) = self.idle(Idle::Queued, cmd) {
                                    self.d.gpu.cancel(&self.d, &self.name);
                                    return Acquired::Interrupted(after);
                                }
                            }
                        },
                    }
                }
            }
        };
        let devices = match granted {
            Ok(d) => d,
            Err(e) => return Acquired::Refused(e),
        };
        if let Err(e) = self.d.gpu.apply(&mut spec, &devices) {
            self.d.gpu.release(&self.d, &self.name);
            return Acquired::Refused(e.to_string());
        }
        Acquired::Spec(spec)
    }

    async fn launch(&mut self, spec: &SandboxSpec) -> Result<Live, ShimError> {
        self.state(State::Starting);
        let r = self.d.config().config.retention;
        let rotation = shim::LogRotation {
            max_bytes: r.agent_log_max_bytes.0,
            keep: r.agent_log_keep,
        };
        let log_dir = self.d.log_dir(&self.name);
        let start_timeout = Duration::from_secs(60);
        // Warm: a prepared sandbox of this shape, if one waits (daemon/pool.rs; a shape not
        // poolable, or not yet seen, is launched cold and, if poolable, learnt). Its launcher
        // becomes the agent's shim, under the same contract as a cold one.
        let mut warm = None;
        if super::pool::warm_spawns() {
            if let Some(ready) = self.d.pool.take(spec) {
                let shape = ready.shape().to_string();
                warm = shim::launch_warm(ready, spec, &log_dir, rotation, start_timeout).await;
                // Served (or failed): the pool refills the shape now that the start is over.
                self.d.pool.refill(&shape);
            }
        }
        let live = match warm {
            Some(r) => r?,
            None => shim::launch(&self.d.init, spec, &log_dir, rotation, start_timeout).await?,
        };
        tracing::info!(agent = %self.name, shim_pid = live.shim_pid, warm = live.warm, "agent launched");
        self.d
            .store
            .run_started(&self.name, live.shim_pid, live.pid1, &live.cgroup_id);
        Ok(live)
    }

    /// Opens the agent's host ports unless they are open (or it publishes none). For an
    /// `adopted` sandbox a failure is only logged: it runs anyway, and must stay supervised.
    fn open_host_ports(&mut self, adopted: bool) -> Result<(), super::publish::PublishError> {
        if self.host_ports.is_some() || self.rec.request.publish_host.is_empty() {
            return Ok(());
        }
        match super::publish::open(&self.d, &self.name, &self.rec.request.publish_host) {
            Ok(h) => self.host_ports = Some(h),
            Err(e) if adopted => {
                tracing::error!(agent = %self.name, error = %e, "cannot publish the agent's host ports again");
                self.d.emit(
                    Some(&self.name),
                    "net.host_publish_failed",
                    json!({"error": e.to_string()}),
                );
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// A launch that did not happen: the spawn's answer, the end, and the state to rest in.
    fn launch_failed(
        &self,
        launched: &mut Option<Launched>,
        code: i32,
        error: String,
    ) -> Option<State> {
        if let Some(l) = launched.take() {
            let _ = l.send(Err(CmdError::Launch(error.clone())));
        }
        self.ended(&EndReason::LaunchFailed { code, error });
        Some(State::Failed)
    }

    /// Egress, published services and host ports for this run, until the value is dropped
    /// (docs/network.md).
    fn run_net(&self, live: &mut Live) -> RunNet {
        let egress = live.egress.take().map(|fd| {
            let (token, grants) = self
                .d
                .check_token(&self.rec.token)
                .map(|v| (v.effective().id.clone(), v.effective().net.clone()))
                .unwrap_or_default();
            super::egress::serve(&self.d, &self.name, self.rec.owner, &token, grants, fd)
        });
        // The namespace the launcher opened before the agent existed, checked to be one.
        let netns = live
            .netns
            .take()
            .filter(super::publish::is_netns)
            .map(Arc::new);
        // Its published ports, as services for other agents, while this run lives.
        let published = super::egress::publish(
            &self.d,
            &self.name,
            self.rec.owner,
            &self.rec.request.publish,
            netns.clone(),
        );
        let host = self.host_ports.as_ref().map(|h| h.state().clone());
        if let Some(h) = &host {
            if netns.is_none() {
                tracing::error!(agent = %self.name, "no network namespace to reach: its host ports refuse connections");
            }
            h.set_target(netns);
        }
        RunNet {
            _egress: egress,
            _published: published,
            host,
        }
    }

    /// Watches one run until it ends.
    async fn watch(&mut self, mut live: Live, adopted: bool) -> RunEnd {
        let sup = self.sup().clone();
        let started = Instant::now();
        self.note_start(&live);
        let _net = self.run_net(&mut live);
        self.d.emit(
            Some(&self.name),
            "started",
            json!({"pid1": live.pid1, "shim_pid": live.shim_pid, "cgroup": live.cgroup_id, "warm": live.warm}),
        );
        let cg = {
            let mgr = &*self.d.cgroups;
            stats::open_existing(mgr, &live.cgroup_id)
        };
        let mut run = Run::new(&sup, started, live.was_ready);
        // Adopted after a daemon restart with its cgroup frozen: it stays paused (a resume
        // thaws it), its watchdog not counting the frozen time; no new `paused` event.
        if adopted && cg.as_ref().is_some_and(|c| self.d.cgroups.frozen(c)) {
            run.on_paused(run.initial_state(), started);
            self.state(State::Paused);
        } else {
            self.state(run.initial_state());
        }

        let Channel {
            mut frames_rx,
            mut writer,
            reader_task,
            writer_task,
            outbox,
        } = self.attach_channel(live.channel.take(), adopted);

        let (health_tx, mut health_rx) = mpsc::channel::<Probe>(1);
        let mut kernel = KernelSampler::default();
        let stats_every = self.d.stats_interval;
        let mut next_stats = started + stats_every.min(Duration::from_millis(500));
        let mut replies = Replies::default();

        let pid1 = live.pid1;
        let shim_sig = match live.signaller() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(agent = %self.name, error = %e, "cannot hold the shim's pidfd");
                return RunEnd {
                    reason: EndReason::Lost,
                    healthy_since: None,
                    then: After::Policy,
                };
            }
        };
        let exit = live.wait();
        tokio::pin!(exit);
        // Over its request or CPU budget, the agent's channel is not read until the budget
        // has refilled (at most 1 s): its flood waits in its own socket buffer instead of
        // costing aitherd a refusal per frame.
        let mut paused_until: Option<Instant> = None;
        let record: Option<ExitRecord> = loop {
            let next = [run.next_deadline(), paused_until]
                .into_iter()
                .flatten()
                .fold(next_stats, Instant::min);
            if paused_until.is_some_and(|t| Instant::now() >= t) {
                paused_until = None;
            }
            let actions = tokio::select! {
                rec = &mut exit => break rec,
                item = frames_rx.recv(), if paused_until.is_none() && writer.as_ref().is_some_and(|w| w.capacity() > 0) => {
                    let Some(item) = item else {
                        // The agent closed its channel: nothing more to read.
                        writer = None;
                        continue;
                    };
                    let (actions, reply) = self.on_channel_item(item, &mut run, &mut writer, &mut paused_until, cg.as_ref());
                    // The lifecycle's part first (READY: state, event), then the reply: an
                    // agent that has its answer sees itself ready in `ps`.
                    for a in actions {
                        self.perform(a, &shim_sig, cg.as_ref(), pid1, &health_tx);
                    }
                    if let (Some(w), Some(r)) = (writer.as_ref(), reply) {
                        if w.try_send(r).is_err() {
                            writer = None;
                        }
                    }
                    Vec::new()
                }
                probe = health_rx.recv() => match probe {
                    Some(p) => run.on_probe(p.ok, p.code, &p.output, Instant::now()),
                    None => Vec::new(),
                },
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd, &mut run, &shim_sig, cg.as_ref(), &mut replies),
                    None => Vec::new(),
                },
                _ = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    let actions = run.on_tick(now);
                    if actions.is_empty() && now >= next_stats {
                        next_stats = now + stats_every;
                        self.sample(&mut run, &mut kernel, cg.as_ref(), now);
                    }
                    actions
                }
            };
            for a in actions {
                self.perform(a, &shim_sig, cg.as_ref(), pid1, &health_tx);
            }
            if let Some((tx, r)) = replies.now.take() {
                let _ = tx.send(r);
            }
            if let Some((tx, r)) = replies.coded.take() {
                let _ = tx.send(r);
            }
        };
        if let Some(t) = reader_task {
            t.abort();
        }
        self.d.bus.close(&outbox);
        self.outbox = None;
        drop(writer);
        if let Some(t) = writer_task {
            t.abort();
        }
        let (reason, healthy_since, then) = run.finish(record.as_ref());
        if reason == EndReason::OomKilled {
            self.record_oom_end();
        }
        // Whatever is left in the cgroup goes (the shim removes the directories).
        if let Some(c) = cg.as_ref() {
            self.d.cgroups.kill_all(c);
        }
        let then = match (then, replies.then.take()) {
            (Then::Stop, _) => After::Stop(std::mem::take(&mut replies.stop)),
            (Then::Restart, Some(r)) => After::Restart(r),
            (Then::Remove, Some(r)) => After::Remove(r),
            _ => After::Policy,
        };
        for r in replies.stop {
            let _ = r.send(Ok(()));
        }
        RunEnd {
            reason,
            healthy_since,
            then,
        }
    }

    /// The agent channel for a run: a reader task turns frames into items; a writer task
    /// puts the replies (in order) and the bus's pushes on it. `adopted`: the daemon
    /// restarted, and the agent is told its subscriptions are gone.
    fn attach_channel(&mut self, fd: Option<OwnedFd>, adopted: bool) -> Channel {
        let (frames_tx, frames_rx) = mpsc::channel::<ChannelItem>(16);
        let mut writer: Option<mpsc::Sender<Slot>> = None;
        let mut reader_task = None;
        let mut writer_task = None;
        let bus_claim = self
            .d
            .check_token(&self.rec.token)
            .map(|v| v.effective().bus.clone())
            .unwrap_or_default();
        let outbox = self
            .d
            .bus
            .outbox(crate::bus::Principal::agent(&self.name, &bus_claim));
        self.outbox = Some(outbox.clone());
        *self.usage.outbox.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::downgrade(&outbox));
        if let Some(fd) = fd {
            match channel_stream(fd) {
                Ok(stream) => {
                    let (r, w) = stream.into_split();
                    let (slots_tx, slots_rx) = mpsc::channel::<Slot>(256);
                    if adopted {
                        // The daemon restarted: the agent's subscriptions are gone.
                        let _ = slots_tx.try_send(Slot::Raw(
                            serde_json::to_string(&aither_proto::Push::BusReset {
                                reason: "aitherd restarted; subscribe again".into(),
                            })
                            .unwrap_or_default(),
                        ));
                    }
                    writer_task = Some(tokio::spawn(super::bus::channel_writer(
                        w,
                        slots_rx,
                        outbox.clone(),
                        self.usage.clone(),
                    )));
                    writer = Some(slots_tx);
                    reader_task = Some(tokio::spawn(read_frames(r, frames_tx)));
                }
                Err(e) => tracing::warn!(agent = %self.name, error = %e, "agent channel unusable"),
            }
        }
        Channel {
            frames_rx,
            writer,
            reader_task,
            writer_task,
            outbox,
        }
    }

    /// What `inspect` shows of a new run, and its enforcement report beside its log.
    fn note_start(&self, live: &Live) {
        self.set(|i| {
            i.pid1 = live.pid1;
            i.agent_pid = live.agent_pid;
            i.shim_pid = Some(live.shim_pid);
            i.cgroup = Some(live.cgroup_id.clone());
            i.warm = live.warm;
            i.started_ms = Some(super::store::now_ms());
            i.health_failures = 0;
            i.oom_kills = 0;
            if live.report.is_some() {
                i.report = live.report.clone();
            }
        });
        if let Some(r) = &live.report {
            // Replaced through the log directory's fd (no link followed). Not fsynced: this
            // runs on a runtime worker at every start, only `shim::adopt` reads it back (a
            // torn or empty file reads as no report), and a power cut ends the run anyway.
            if let Ok(d) = crate::hostpath::open_dir_nofollow(&live.log_dir) {
                let _ = crate::hostpath::replace_file_at_unsynced(
                    std::os::fd::AsFd::as_fd(&d),
                    std::ffi::OsStr::new("report.json"),
                    r.get().as_bytes(),
                    0o640,
                );
            }
        }
    }

    /// An OOM kill that ended the run is a pain event too.
    fn record_oom_end(&self) {
        let what = PainWhat {
            source: "kernel",
            signal: "oom".into(),
            severity: None,
            reason: Some("the agent was killed by the OOM killer".into()),
            data: json!({"memory_limit": self.rec.spec.limits.memory}),
        };
        self.record_pain(&what, PainAction::Log);
    }

    /// Performs one of the lifecycle's actions.
    fn perform(
        &mut self,
        a: Action,
        shim_sig: &shim::Signaller,
        cg: Option<&cgroup::Cgroup>,
        pid1: Option<i32>,
        health_tx: &mpsc::Sender<Probe>,
    ) {
        match a {
            Action::Signal(s) => {
                let _ = shim_sig.signal(s);
            }
            Action::KillAll => match cg {
                Some(c) => self.d.cgroups.kill_all(c),
                None => {
                    let _ = shim_sig.signal(libc::SIGKILL);
                }
            },
            Action::State(s) => self.state(s),
            Action::Emit(kind, data) => self.d.emit(Some(&self.name), kind, data),
            Action::MarkReady => self.set(|i| i.ready = true),
            Action::Health { failures, last } => self.set(|i| {
                i.health_failures = failures;
                i.last_health = Some(last);
            }),
            Action::KeepGpuPlace => self.gpu_origin = self.d.gpu.origin(&self.name),
            Action::Thaw => {
                if let Some(c) = cg {
                    if let Err(e) = self.d.cgroups.thaw(c) {
                        tracing::warn!(agent = %self.name, error = %e, "cannot thaw");
                    }
                }
            }
            Action::StartProbe => {
                // Without a known pid 1 there is nothing to run it in: no more probes.
                let (Some(argv), Some(pid1)) = (self.sup().health_cmd.clone(), pid1) else {
                    return;
                };
                let tx = health_tx.clone();
                let init = self.d.init.clone();
                let spec = self.rec.spec.clone();
                let timeout = Duration::from_millis(self.sup().health_timeout_ms);
                tokio::spawn(async move {
                    let p = shim::exec_in(&init, &spec, pid1, &argv, timeout).await;
                    let _ = tx.send(p).await;
                });
            }
        }
    }

    /// A user's command (or the GPU scheduler's eviction) while the agent runs.
    fn on_command(
        &mut self,
        cmd: Cmd,
        run: &mut Run,
        shim_sig: &shim::Signaller,
        cg: Option<&cgroup::Cgroup>,
        replies: &mut Replies,
    ) -> Vec<Action> {
        let now = Instant::now();
        let sup = self.sup().clone();
        let c = match cmd {
            Cmd::Pause { reply } => {
                let r = self.pause(run, cg, now);
                return answer_coded(replies, reply, r);
            }
            Cmd::Resume { reply } => {
                let r = self.resume(run, cg, now);
                return answer_coded(replies, reply, r);
            }
            Cmd::Stop { timeout, reply } => {
                replies.stop.push(reply);
                Command::Stop {
                    grace: timeout.unwrap_or(sup.stop_timeout()),
                }
            }
            Cmd::Kill { signal, reply } => {
                // The signal goes to the agent through the shim and pid 1.
                let r = shim_sig
                    .signal(signal)
                    .map_err(|source| CmdError::NotSignalled {
                        name: self.name.clone(),
                        source,
                    });
                let delivered = r.is_ok();
                // Answered once its actions are done (SIGKILL: the whole sandbox killed).
                replies.now = Some((reply, r));
                Command::Kill { signal, delivered }
            }
            // A later restart or remove replaces an earlier one (its caller sees the channel
            // closed, as before).
            Cmd::Restart { reply } => {
                replies.then = Some(reply);
                Command::Restart
            }
            Cmd::Remove { reply } => {
                replies.then = Some(reply);
                Command::Remove
            }
            Cmd::Evict(why) => Command::Evict {
                reason: match why {
                    super::gpu::Eviction::Preempted { by } => EndReason::GpuPreempted { by },
                    super::gpu::Eviction::Overuse {
                        device,
                        used_mb,
                        reserved_mb,
                    } => EndReason::GpuEvicted {
                        device,
                        used_mb,
                        reserved_mb,
                    },
                },
                grace: Duration::from_millis(self.d.gpu.grace_ms()),
            },
        };
        run.on_command(c, now)
    }

    /// Freezes the sandbox, then tells the lifecycle (its watchdog and health checks wait).
    /// The freeze blocks this task for at most `freezer::FREEZE_TIMEOUT` (usually well under
    /// a millisecond); the agent's task has nothing else to do until it is answered.
    fn pause(
        &self,
        run: &mut Run,
        cg: Option<&cgroup::Cgroup>,
        now: Instant,
    ) -> Result<Vec<Action>, ErrorBody> {
        run.may_pause().map_err(|r| self.refusal(r))?;
        let cg = cg.ok_or_else(|| self.no_cgroup())?;
        self.d.cgroups.freeze(cg).map_err(freezer_error)?;
        let was = self.info.lock().unwrap_or_else(|e| e.into_inner()).state;
        Ok(run.on_paused(was, now))
    }

    /// Thaws the sandbox, then re-arms the watchdog and health checks from now.
    fn resume(
        &self,
        run: &mut Run,
        cg: Option<&cgroup::Cgroup>,
        now: Instant,
    ) -> Result<Vec<Action>, ErrorBody> {
        run.may_resume().map_err(|r| self.refusal(r))?;
        let cg = cg.ok_or_else(|| self.no_cgroup())?;
        self.d.cgroups.thaw(cg).map_err(freezer_error)?;
        Ok(run.on_resumed(now))
    }

    fn refusal(&self, r: PauseRefusal) -> ErrorBody {
        ErrorBody {
            code: ErrorCode::Conflict,
            message: format!("{}: {r}", self.name),
        }
    }

    fn no_cgroup(&self) -> ErrorBody {
        ErrorBody {
            code: ErrorCode::Unsupported,
            message: format!(
                "{}: its sandbox's cgroup was not found, so it cannot be frozen",
                self.name
            ),
        }
    }

    /// The periodic sample: the token re-checked every tenth time, the cgroup's statistics
    /// for `ps`, and the kernel's pain signals.
    fn sample(
        &self,
        run: &mut Run,
        k: &mut KernelSampler,
        cg: Option<&cgroup::Cgroup>,
        now: Instant,
    ) {
        k.samples += 1;
        if k.samples.is_multiple_of(10) && !run.ending() {
            if let Err(e) = self.d.check_token(&self.rec.token) {
                self.d.emit(
                    Some(&self.name),
                    "token_invalid",
                    json!({"error": e.to_string()}),
                );
                self.audit(
                    Entry::new("token_verify", Verdict::Deny, e.to_string())
                        .data(json!({"token_id": self.rec.token_id, "action": "stop"})),
                );
                run.end(
                    EndReason::TokenInvalid {
                        error: e.to_string(),
                    },
                    now,
                );
                return;
            }
        }
        let Some(c) = cg else { return };
        let s = stats::read(&*self.d.cgroups, c);
        let cpu = match (s.cpu_usec, k.last_cpu) {
            (Some(u), Some((pu, pt))) => {
                let dt = now.duration_since(pt).as_micros().max(1) as f64;
                Some(((u.saturating_sub(pu)) as f64 / dt * 100.0 * 10.0).round() / 10.0)
            }
            _ => None,
        };
        if let Some(u) = s.cpu_usec {
            k.last_cpu = Some((u, now));
        }
        self.set(|i| {
            i.cpu_percent = cpu.or(i.cpu_percent);
            i.memory_bytes = s.memory_bytes;
            i.memory_limit = s.memory_limit;
            i.pids = s.pids_current.or(Some(s.pids as u64));
            i.pids_limit = s.pids_limit;
            i.oom_kills = s.oom_kills;
        });
        // Kernel-sourced pain.
        let mut signals: Vec<(&str, serde_json::Value)> = Vec::new();
        if s.oom_kills > k.last_oom {
            signals.push((
                "oom",
                json!({"oom_kills": s.oom_kills, "new": s.oom_kills - k.last_oom}),
            ));
            k.last_oom = s.oom_kills;
        }
        if let (Some(t), Some(prev)) = (s.nr_throttled, k.last_throttled) {
            if t > prev {
                signals.push((
                    "cpu_throttling",
                    json!({"nr_throttled": t, "new": t - prev}),
                ));
            }
        }
        k.last_throttled = s.nr_throttled;
        if s.memory_pressure()
            && k.pressure_event
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
        {
            k.pressure_event = Some(now);
            signals.push((
                "memory_pressure",
                json!({"memory_bytes": s.memory_bytes, "memory_limit": s.memory_limit, "psi_some_avg10": s.memory_pressure_avg10}),
            ));
        }
        for (kind, data) in signals {
            let action = kernel_action(&self.rec.pain, kind);
            let what = PainWhat {
                source: "kernel",
                signal: kind.to_string(),
                severity: None,
                reason: None,
                data,
            };
            if let Some(p) = self.pain_action(action, &what, Some(c)) {
                run.end(p, now);
            }
        }
    }

    /// One item from the agent channel's reader: a request is charged, handled and answered
    /// (in order, through the writer); a bad frame is answered, and a fatal one closes the
    /// channel.
    fn on_channel_item(
        &mut self,
        item: ChannelItem,
        run: &mut Run,
        writer: &mut Option<mpsc::Sender<Slot>>,
        paused_until: &mut Option<Instant>,
        cg: Option<&cgroup::Cgroup>,
    ) -> (Vec<Action>, Option<Slot>) {
        let mut actions = Vec::new();
        let reply = match item {
            ChannelItem::Frame(v, size, parse_ns) => {
                let cpu0 = super::budget::thread_cpu_ns();
                self.usage.add(&self.usage.bytes_in, size as u64);
                self.usage.add(&self.usage.requests, 1);
                // Charged before anything is done: over budget, nothing is.
                if let Some((reply, pause)) = self.over_budget(&v) {
                    *paused_until = pause.map(|p| Instant::now() + p);
                    self.usage.add(
                        &self.usage.cpu_ns,
                        parse_ns + super::budget::thread_cpu_ns().saturating_sub(cpu0),
                    );
                    return (actions, Some(Slot::Now(reply)));
                }
                let (reply, effect) = self.on_request(&v);
                let op = v.get("op").and_then(|o| o.as_str()).unwrap_or("");
                if let Some(err) = reply.error.as_ref().filter(|e| e.code == ErrorCode::Denied) {
                    self.usage.add(&self.usage.denied, 1);
                    // Bus denials are recorded by the bus with their subject.
                    if !op.starts_with("bus.") {
                        self.d.audit_summarised(
                            Entry::new("channel", Verdict::Deny, err.message.clone())
                                .agent(&self.name)
                                .actor(format!("agent {}", self.name))
                                .data(json!({"op": v.get("op")})),
                            "channel",
                        );
                    }
                }
                let spent = parse_ns + super::budget::thread_cpu_ns().saturating_sub(cpu0);
                self.usage.add(&self.usage.cpu_ns, spent);
                self.budget.charge_cpu(std::time::Instant::now(), spent);
                let mut reply = Slot::Now(reply);
                let now = Instant::now();
                match effect {
                    Effect::None => {}
                    Effect::Later(rx) => {
                        reply = Slot::Later(v.get("id").cloned(), rx);
                    }
                    Effect::Ready => actions = run.on_frame(Frame::Ready, now),
                    Effect::Heartbeat => actions = run.on_frame(Frame::Heartbeat, now),
                    Effect::Pain(action, what) => {
                        if let Some(p) = self.pain_action(action, &what, cg) {
                            run.end(p, now);
                        }
                    }
                }
                reply
            }
            ChannelItem::Error(e) => {
                let r = proto::Reply::err(e.code(), e.to_string());
                if !e.recoverable() {
                    if let Some(w) = writer.take() {
                        let _ = w.try_send(Slot::Close(r));
                    }
                    return (actions, None);
                }
                Slot::Now(r)
            }
        };
        (actions, Some(reply))
    }

    /// Handles one request on the agent channel. Every request is checked against the
    /// agent's token; acting on another agent needs a claim this token cannot carry yet.
    fn on_request(&self, v: &serde_json::Value) -> (proto::Reply, Effect) {
        let id = v.get("id").cloned();
        let with_id = |mut r: proto::Reply| {
            r.id = id.clone();
            r
        };
        let reply = |r: proto::Reply, e: Effect| (with_id(r), e);
        let Some(op) = v.get("op").and_then(|o| o.as_str()) else {
            return reply(
                proto::Reply::err(ErrorCode::Invalid, "missing \"op\""),
                Effect::None,
            );
        };
        let verified = match self.d.check_token(&self.rec.token) {
            Ok(v) => v,
            Err(e) => {
                return reply(
                    proto::Reply::err(ErrorCode::Denied, format!("token no longer valid: {e}")),
                    Effect::None,
                )
            }
        };
        if let Some(target) = v.get("agent").and_then(|a| a.as_str()) {
            if target != self.name {
                return reply(
                    proto::Reply::err(
                        ErrorCode::Denied,
                        format!(
                            "the token of {:?} grants nothing over agent {target:?}",
                            self.name
                        ),
                    ),
                    Effect::None,
                );
            }
        }
        let text = |k: &str| -> Result<Option<String>, proto::Reply> {
            match v.get(k) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) if s.len() <= 1024 => Ok(Some(s.clone())),
                Some(_) => Err(proto::Reply::err(
                    ErrorCode::Invalid,
                    format!("\"{k}\" must be a string of at most 1024 bytes"),
                )),
            }
        };
        match op {
            // The lifecycle marks it ready (daemon/lifecycle.rs), before the reply goes.
            "ready" => reply(proto::Reply::ok(json!({})), Effect::Ready),
            "heartbeat" => {
                self.set(|i| i.last_heartbeat_ms = Some(super::store::now_ms()));
                reply(proto::Reply::ok(json!({})), Effect::Heartbeat)
            }
            "gpu.lease" => reply(
                proto::Reply::ok(self.d.gpu.lease_info(&self.name)),
                Effect::None,
            ),
            "status" => match text("text") {
                Ok(t) => {
                    self.set(|i| i.status_text = t.clone());
                    self.d.emit(Some(&self.name), "status", json!({"text": t}));
                    reply(proto::Reply::ok(json!({})), Effect::None)
                }
                Err(e) => reply(e, Effect::None),
            },
            "pain" => {
                let sev = v.get("severity").and_then(|s| s.as_str()).unwrap_or("");
                use aither_proto::Severity;
                let action = match sev.parse::<Severity>() {
                    Ok(Severity::Info) => self.rec.pain.info,
                    Ok(Severity::Warning) => self.rec.pain.warning,
                    Ok(Severity::Error) => self.rec.pain.error,
                    Ok(Severity::Critical) => self.rec.pain.critical,
                    Err(_) => {
                        return reply(
                            proto::Reply::err(
                                ErrorCode::Invalid,
                                "\"severity\" must be info, warning, error or critical",
                            ),
                            Effect::None,
                        )
                    }
                };
                let reason = match text("reason") {
                    Ok(r) => r,
                    Err(e) => return reply(e, Effect::None),
                };
                let what = PainWhat {
                    source: "agent",
                    signal: "agent".into(),
                    severity: Some(sev.to_string()),
                    reason,
                    data: json!({}),
                };
                reply(
                    proto::Reply::ok(json!({"action": action})),
                    Effect::Pain(action, what),
                )
            }
            // The memory tiers (docs/memory.md), checked against the agent's verified claims.
            op if op.starts_with("mem.") => reply(
                self.d.memory_request(&self.name, verified.effective(), v),
                Effect::None,
            ),
            // The bus (docs/bus.md): the run's outbox carries the token's bus claim.
            op if op.starts_with("bus.") => match self.outbox.as_ref() {
                Some(ob) => match super::bus::channel_op(&self.d, ob, &self.name, v) {
                    Outcome::Now(r) => reply(r, Effect::None),
                    Outcome::Later(rx) => reply(proto::Reply::ok(json!({})), Effect::Later(rx)),
                },
                None => reply(
                    proto::Reply::err(ErrorCode::Internal, "the bus is not attached to this run"),
                    Effect::None,
                ),
            },
            other => reply(
                proto::Reply::err(ErrorCode::UnknownOp, format!("unknown op {other:?}")),
                Effect::None,
            ),
        }
    }

    fn audit(&self, e: Entry) {
        self.d.audit.record(e.agent(&self.name));
    }

    /// Charges one channel request to the agent's budget (daemon/budget.rs). Over it (Some): the
    /// `rate_limited` reply (the request is not done; the refusal is audited, summarised) and,
    /// over the request or CPU budget, how long not to read the channel (until it refills,
    /// at most 1 s).
    fn over_budget(&mut self, v: &serde_json::Value) -> Option<(proto::Reply, Option<Duration>)> {
        let Err(r) = self.budget.charge(std::time::Instant::now(), v) else {
            return None;
        };
        self.usage.add(&self.usage.rate_limited, 1);
        self.d.audit_summarised(
            Entry::new(
                "rate_limit",
                Verdict::Deny,
                format!("budget {}", r.limit.as_str()),
            )
            .agent(&self.name)
            .actor(format!("agent {}", self.name))
            .data(json!({"op": v.get("op"), "limit": r.limit})),
            r.limit.as_str(),
        );
        let pause = matches!(
            r.limit,
            super::budget::Limit::Requests | super::budget::Limit::Cpu
        )
        .then(|| Duration::from_millis(r.retry_ms.clamp(1, 1000)));
        let mut reply = proto::Reply::err(ErrorCode::RateLimited, r.message(&self.name));
        reply.id = v.get("id").cloned();
        Some((reply, pause))
    }

    fn record_pain(&self, what: &PainWhat, action: PainAction) {
        self.audit(
            Entry::new(
                "pain",
                Verdict::Info,
                format!(
                    "policy pain.{} = {}",
                    what.severity.as_deref().unwrap_or(&what.signal),
                    serde_json::to_value(action)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            )
            .actor(if what.source == "agent" {
                format!("agent {}", self.name)
            } else {
                "kernel".into()
            })
            .data(json!({"signal": what.signal, "reason": what.reason})),
        );
        self.d.emit(
            Some(&self.name),
            "pain",
            json!({
                "source": what.source,
                "signal": what.signal,
                "severity": what.severity,
                "reason": what.reason,
                "action": action,
                "data": what.data,
            }),
        );
    }

    /// Applies a pain action. Returns the end reason when the run must end.
    fn pain_action(
        &self,
        action: PainAction,
        what: &PainWhat,
        cg: Option<&cgroup::Cgroup>,
    ) -> Option<EndReason> {
        self.record_pain(what, action);
        match action {
            PainAction::Log => None,
            PainAction::Throttle => {
                if let Some(c) = cg {
                    let cur = self
                        .d
                        .cgroups
                        .read_limits(c)
                        .ok()
                        .and_then(|l| l.cpu)
                        .unwrap_or(CpuQuota::from_cpus(1.0));
                    let q = CpuQuota {
                        quota_us: (cur.quota_us / 2).max(cur.period_us / 20),
                        period_us: cur.period_us,
                    };
                    match stats::set_cpu_quota(&*self.d.cgroups, c, q) {
                        Ok(()) => self.d.emit(
                            Some(&self.name),
                            "throttled",
                            json!({"cpus": q.quota_us as f64 / q.period_us as f64}),
                        ),
                        Err(e) => tracing::warn!(agent = %self.name, error = %e, "throttle failed"),
                    }
                }
                None
            }
            // A failure, so that backoff and the burst limit apply.
            PainAction::Restart => Some(EndReason::Pain {
                signal: what.signal.clone(),
                reason: what.reason.clone().unwrap_or_default(),
            }),
            PainAction::Stop => Some(EndReason::StoppedByUs),
        }
    }
}

fn kernel_action(p: &PainPolicy, kind: &str) -> PainAction {
    match kind {
        "oom" => p.oom,
        "memory_pressure" => p.memory_pressure,
        "cpu_throttling" => p.cpu_throttling,
        _ => PainAction::Log,
    }
}

/// One run's agent channel (`Agent::attach_channel`).
struct Channel {
    frames_rx: mpsc::Receiver<ChannelItem>,
    writer: Option<mpsc::Sender<Slot>>,
    reader_task: Option<tokio::task::JoinHandle<()>>,
    writer_task: Option<tokio::task::JoinHandle<()>>,
    outbox: Arc<crate::bus::Outbox>,
}

/// The reply channels of the commands that wait for the run's end.
#[derive(Default)]
struct Replies {
    /// Stops: answered once stopped (or at once when a restart or remove came first).
    stop: Vec<oneshot::Sender<Result<(), CmdError>>>,
    /// The restart or remove that comes after the run.
    then: Option<oneshot::Sender<Result<(), CmdError>>>,
    /// A kill's answer, sent after the actions it caused.
    now: Option<(Answer, Result<(), CmdError>)>,
    /// A pause's or resume's answer, sent after its state change (the reply shows it).
    coded: Option<(CodedAnswer, Result<(), ErrorBody>)>,
}

/// Where a pause or resume is answered: its refusals carry their own code.
type CodedAnswer = oneshot::Sender<Result<(), ErrorBody>>;

/// Keeps a pause's or resume's answer for after its actions; the actions to perform.
fn answer_coded(
    replies: &mut Replies,
    reply: CodedAnswer,
    r: Result<Vec<Action>, ErrorBody>,
) -> Vec<Action> {
    match r {
        Ok(actions) => {
            replies.coded = Some((reply, Ok(())));
            actions
        }
        Err(e) => {
            replies.coded = Some((reply, Err(e)));
            Vec::new()
        }
    }
}

/// A freezer's error as a reply: a host without one is `unsupported`, the rest `io`.
fn freezer_error(e: cgroup::CgroupError) -> ErrorBody {
    let code = match e {
        cgroup::CgroupError::FreezerMissing { .. } => ErrorCode::Unsupported,
        _ => ErrorCode::Io,
    };
    ErrorBody {
        code,
        message: e.to_string(),
    }
}

/// Where a user's command is answered.
type Answer = oneshot::Sender<Result<(), CmdError>>;

/// The kernel counters of the previous sample, to report what grew.
#[derive(Default)]
struct KernelSampler {
    samples: u32,
    last_cpu: Option<(u64, Instant)>,
    last_oom: u64,
    last_throttled: Option<u64>,
    pressure_event: Option<Instant>,
}

struct PainWhat {
    source: &'static str,
    signal: String,
    severity: Option<String>,
    reason: Option<String>,
    data: serde_json::Value,
}

enum Effect {
    None,
    /// The reply comes later (a durable publish, after its commit).
    Later(tokio::sync::oneshot::Receiver<proto::Reply>),
    Ready,
    Heartbeat,
    Pain(PainAction, PainWhat),
}

/// The agent channel's reader: frames in, items out, until EOF or a fatal frame error.
async fn read_frames(mut r: tokio::net::unix::OwnedReadHalf, frames_tx: mpsc::Sender<ChannelItem>) {
    loop {
        match aio::read_frame(&mut r).await {
            Ok(Some(body)) => {
                // Parsing is work for the agent too: measured, charged.
                let cpu0 = super::budget::thread_cpu_ns();
                let parsed = serde_json::from_slice(&body);
                let ns = super::budget::thread_cpu_ns().saturating_sub(cpu0);
                let item = match parsed {
                    Ok(v) => ChannelItem::Frame(v, body.len() + 4, ns),
                    Err(e) => ChannelItem::Error(FrameError::BadJson(e)),
                };
                if frames_tx.send(item).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = frames_tx.send(ChannelItem::Error(e)).await;
                return;
            }
        }
    }
}

fn channel_stream(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_a_freezer_is_unsupported_and_a_freeze_that_never_came_is_io() {
        let missing = freezer_error(cgroup::CgroupError::FreezerMissing {
            detail: "no v1 freezer hierarchy mounted at /sys/fs/cgroup/freezer".into(),
        });
        assert_eq!(missing.code, ErrorCode::Unsupported);
        assert!(
            missing.message.contains("/sys/fs/cgroup/freezer")
                && missing.message.contains("mount -t cgroup -o freezer"),
            "{}",
            missing.message
        );
        let timeout = freezer_error(cgroup::CgroupError::FreezeTimeout {
            path: "/sys/fs/cgroup/freezer/aither/a-1/freezer.state".into(),
            waited_ms: 2000,
            last: "FREEZING".into(),
        });
        assert_eq!(timeout.code, ErrorCode::Io);
        assert!(timeout.message.contains("FREEZING"), "{}", timeout.message);
    }
}
