//! aitherd: the root-level manager that supervises agents (docs/daemon.md; the reasons are in
//! docs/architecture.md, "Design reasons": components, process model, supervision).
//!
//! - `server`: the control socket (/run/aither/aitherd.sock), one request per frame.
//! - `agent`: one tokio task per agent: launch through a shim, watch, restart.
//! - `shim`: the daemon's side of `aither-init shim`, the single-threaded per-run launcher.
//! - `supervise`: the lifecycle states and the restart policy, free of I/O.
//! - `store`: SQLite (WAL) with one writer thread: agents, runs, events.
//! - `recover`: re-adopting running sandboxes after a daemon restart.
//! - `proto`: frames and the control protocol; `client`: the blocking client aitherctl uses.

pub mod agent;
pub mod agentfile;
pub mod budget;
pub mod bus;
pub mod client;
pub mod config;
pub mod egress;
pub mod exec;
pub mod gpu;
pub mod harden;
pub mod identity;
pub mod kernel_audit;
pub mod layer_ops;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod pool;
pub mod proto;
pub mod publish;
pub mod recover;
pub mod reload;
pub mod run;
pub mod secret_ops;
pub mod server;
pub mod shim;
pub mod slots;
pub mod stats;
pub mod store;
pub mod summary;
pub mod supervise;
pub mod users;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::cgroup::CgroupManager;
use crate::memory::{self, MemoryStore, Tier};
use crate::token::{self, HostKey, RevocationStore, TokenError};
use store::{Event, Store};

/// The control socket unless `AITHER_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/aither/aitherd.sock";
/// The group whose members may use the control socket.
pub const GROUP: &str = "aither";

/// Where the control socket is (`AITHER_SOCKET`, else /run/aither/aitherd.sock).
pub fn socket_path() -> PathBuf {
    std::env::var_os("AITHER_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Errors of starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another aitherd is running (pid {pid}, lock {path})")]
    AlreadyRunning { pid: String, path: PathBuf },
    #[error("the launcher aither-init was not found (looked at {0}); install it beside aitherd (AITHER_INIT in debug builds)")]
    NoInit(String),
}

/// Everything the daemon's tasks share.
pub struct Daemon {
    pub store: Store,
    /// The audit stream (docs/audit.md): every decision with the rule that made it.
    pub audit: crate::audit::Sink,
    /// Event counters for `--metrics`.
    pub counters: metrics::Counters,
    /// Agent memory (`memory.db`, docs/memory.md).
    pub memory: MemoryStore,
    pub events: broadcast::Sender<Event>,
    /// AitherFlux, the event bus (docs/bus.md): broker and durable log (`bus.db`).
    pub bus: Arc<crate::bus::Bus>,
    pub init: PathBuf,
    pub state_dir: PathBuf,
    pub cgroups: Box<dyn CgroupManager>,
    /// The MicroScheduler and the GPU backend (docs/gpu.md).
    pub gpu: gpu::GpuService,
    pub key: HostKey,
    revocations: Mutex<RevocationStore>,
    /// Root tokens verified before, by digest; time and revocation are checked at every use
    /// (aither_core::token::cache).
    verified: token::VerifiedCache,
    pub agents: Mutex<HashMap<String, agent::Handle>>,
    pub stats_interval: Duration,
    epoch: Instant,
    /// The egress gateway (daemon/egress.rs), built on first use.
    pub net: std::sync::OnceLock<crate::net::Gateway>,
    /// Agents whose runs the gateway serves now, with their counters.
    pub net_agents: Mutex<HashMap<String, Arc<crate::net::AgentNet>>>,
    /// Agents with ports published on the host's loopback now (daemon/publish.rs), with
    /// their counters.
    pub host_ports: Mutex<HashMap<String, Arc<publish::PortsState>>>,
    /// Every agent's owner by name, for the audit stream (its own lock: never held while
    /// recording). Kept after removal, so late records of an agent still name its owner.
    pub owners: Arc<Mutex<HashMap<String, u32>>>,
    /// aitherd.toml in force (daemon/config.rs): limits, retention, per-user limits, metrics;
    /// replaced by a reload.
    pub settings: config::Live,
    /// The metrics listener (`[metrics] listen`).
    pub metrics: metrics::Server,
    /// What aitherd spends per agent (docs/daemon.md "Bounds"), kept until `rm`.
    usage: Mutex<HashMap<String, Arc<budget::Usage>>>,
    /// Repeated audit records of agents' requests, summarised.
    pub summary: summary::Denials,
    /// Egress quota state per (agent name, token id), kept across the agent's runs.
    pub net_quotas: Mutex<HashMap<(String, String), Arc<crate::net::gateway::QuotaState>>>,
    /// The commands `aitherctl exec` runs now, per agent (daemon/exec.rs).
    pub execs: Arc<exec::Slots>,
    /// The foreground runs (`aitherctl run` through aitherd) per caller's uid.
    pub runs: Arc<run::Slots>,
    /// Prepared sandboxes for those runs (warm start, daemon/pool.rs).
    pub pool: Arc<pool::Pool>,
}

impl Daemon {
    pub fn new(
        state_dir: &Path,
        init: PathBuf,
        settings: config::Live,
    ) -> Result<Daemon, DaemonError> {
        // Canonical: shims are recognised by their working directory under it.
        let state_dir = &std::fs::canonicalize(state_dir).map_err(|source| DaemonError::Io {
            what: "resolving the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let store = Store::open(&state_dir.join("state.db"))?;
        let memory = MemoryStore::open(&state_dir.join("memory.db"))?;
        let key = HostKey::load_or_create(state_dir)?;
        let revocations = RevocationStore::open(state_dir)?;
        // Names' owners, kept across removals and restarts (store.rs `owners`).
        let owners: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(store::load_owners(
            &store.reader()?,
            store.path(),
        )?));
        let (events, _) = broadcast::channel(4096);
        let cfg = settings.get();
        let r = &cfg.config.retention;
        crate::audit::set_rotation(r.audit_rotate_bytes.0, r.audit_keep);
        let bus = Arc::new(crate::bus::Bus::open(
            &state_dir.join("bus.db"),
            crate::bus::log::Retention::of(r.bus_max_bytes.0, r.bus_max_age.0),
        )?);
        // Pure v2, started by systemd in the leaf of a cgroup it delegated: the sandboxes go
        // below that cgroup (src/cgroup/delegate.rs); elsewhere the top-level subtree.
        let (cgroups, placement) = crate::cgroup::manager_placed()?;
        tracing::info!(?placement, "cgroup placement of the sandboxes");
        let stats_interval = std::env::var("AITHER_STATS_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(2));
        let pool = Arc::new(pool::Pool::new(&init, cfg.config.pool));
        Ok(Daemon {
            store,
            audit: crate::audit::Sink::start(crate::audit::log_path()).with_owners({
                let o = owners.clone();
                Arc::new(move |name: &str| {
                    o.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(name)
                        .copied()
                })
            }),
            owners,
            counters: metrics::Counters::default(),
            memory,
            events,
            bus,
            init,
            state_dir: state_dir.to_path_buf(),
            cgroups,
            gpu: gpu::GpuService::load(&cfg.config.gpu)?,
            key,
            revocations: Mutex::new(revocations),
            verified: token::VerifiedCache::default(),
            agents: Mutex::new(HashMap::new()),
            stats_interval,
            epoch: Instant::now(),
            net: std::sync::OnceLock::new(),
            net_agents: Mutex::new(HashMap::new()),
            settings,
            metrics: metrics::Server::default(),
            host_ports: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            summary: summary::Denials::new(summary::WINDOW),
            net_quotas: Mutex::new(HashMap::new()),
            execs: Arc::default(),
            runs: Arc::default(),
            pool,
        })
    }

    /// aitherd.toml in force now (a snapshot).
    pub fn config(&self) -> Arc<config::Loaded> {
        self.settings.get()
    }

    /// An agent's log directory.
    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("agents").join(name)
    }

    /// Milliseconds on the daemon's monotonic clock.
    pub fn mono_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn to_mono_ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Records an event and hands it to `events -f` followers.
    pub fn emit(&self, name: Option<&str>, kind: &str, data: serde_json::Value) {
        let e = Event {
            ts_ms: store::now_ms(),
            name: name.map(str::to_string),
            kind: kind.to_string(),
            data,
        };
        tracing::info!(agent = name.unwrap_or("-"), kind, data = %e.data, "event");
        self.counters.count(kind, &e.data);
        self.store.event(e.clone());
        // System events on the bus: aither.agent.<name>.<kind>, aither.daemon.<kind>.
        self.bus.publish_system(
            &bus::event_subject(name, kind),
            &serde_json::to_value(&e).unwrap_or_default(),
        );
        let _ = self.events.send(e);
    }

    /// An agent's usage counters (created on first use).
    pub fn usage_of(&self, name: &str) -> Arc<budget::Usage> {
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every agent's usage, by name.
    pub fn usages(&self) -> Vec<(String, Arc<budget::Usage>)> {
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = u.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes an audit record of an agent's request through the summariser: repeats of the
    /// same decision within its window are counted into one summary record.
    /// `class` says which records are "similar" (fixed by the daemon, never agent text).
    pub fn audit_summarised(&self, e: crate::audit::Entry, class: &str) {
        let admit = self.summary.admit(&e, class, std::time::Instant::now());
        if admit == summary::Admit::Write {
            self.audit.record(e);
        }
    }

    /// Writes the summaries of windows that have closed (`all`: every open one).
    pub fn flush_summaries(&self, all: bool) {
        for s in self.summary.flush(std::time::Instant::now(), all) {
            self.audit.record(s);
        }
    }

    /// Closes the summary windows every second, so that a flood's summary is written soon
    /// after it ends.
    pub async fn summary_ticker(d: Arc<Daemon>) {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            d.flush_summaries(false);
        }
    }

    /// Verifies a token against the host key and the revocation list, now.
    pub fn check_token(&self, text: &str) -> Result<token::Verified, TokenError> {
        let rev = self.revocations.lock().unwrap_or_else(|e| e.into_inner());
        self.verified
            .verify(text, &self.key.public(), token::now_unix(), &*rev)
    }

    /// Tells a running agent that the MicroScheduler takes its GPUs back.
    pub fn evict(&self, name: &str, why: gpu::Eviction) {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = agents.get(name) {
            let _ = h.cmd.send(agent::Cmd::Evict(why));
        }
    }

    /// Drops an agent from the table (after `rm`).
    pub fn forget(&self, name: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let _ = std::fs::remove_dir_all(self.log_dir(name));
    }

    /// A channel request for the memory tiers (ops `mem.*`), on behalf of agent `name`
    /// holding `claims`. (Bus ops go to `bus::channel_op`, which needs the run's outbox.)
    pub fn memory_request(
        &self,
        name: &str,
        claims: &token::Claims,
        req: &serde_json::Value,
    ) -> proto::Reply {
        let actor = memory::Actor::Agent { name, claims };
        // SQLite work (and the wait for a commit) off the async worker.
        match memory::store::wait(|| memory::service::handle(&self.memory, actor, name, req)) {
            Ok(data) => proto::Reply::ok(data),
            Err(e) => proto::Reply::err(e.code(), e.to_string()),
        }
    }

    /// A run of `name` has ended: its working memory goes (docs/memory.md). Waits for the
    /// commit, so that the next run cannot see the last one's scratch.
    pub fn clear_working_memory(&self, name: &str) {
        match self.memory.clear(name, Some(Tier::Working)) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(agent = name, entries = n, "working memory cleared"),
            Err(e) => {
                tracing::error!(agent = name, error = %e, "cannot clear the working memory")
            }
        }
    }

    pub fn emit_daemon(&self, kind: &str, data: serde_json::Value) {
        self.emit(None, kind, data);
    }

    pub fn info_of(&self, name: &str) -> Option<agent::Info> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .get(name)
            .map(|h| h.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The uid that owns the name (a live agent's, or a removed one's whose memory is kept).
    pub fn name_owner(&self, name: &str) -> Option<u32> {
        self.owner_of(name).or_else(|| {
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .copied()
        })
    }

    /// The uid that owns agent `name`, if there is such an agent.
    pub fn owner_of(&self, name: &str) -> Option<u32> {
        let agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .get(name)
            .map(|h| h.info.lock().unwrap_or_else(|e| e.into_inner()).owner)
    }
}

/// What `uid`'s agents in `agents` hold, against the per-user limits.
pub fn usage_in(agents: &HashMap<String, agent::Handle>, uid: u32) -> users::Usage {
    let mut u = users::Usage::default();
    for h in agents.values() {
        let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
        if i.owner == uid {
            u.agents += 1;
            u.memory += i.charged.0.unwrap_or(0);
            u.cpus += i.charged.1.unwrap_or(0.0);
        }
    }
    u
}

/// Finds `aither-init`: `AITHER_INIT`, else beside the running binary (or one directory up,
/// for cargo's test layout), else on PATH.
pub fn find_init() -> Result<PathBuf, DaemonError> {
    if let Some(p) = crate::testhooks::var_os("AITHER_INIT") {
        return Ok(PathBuf::from(p));
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let c = dir.join("aither-init");
            if c.is_file() {
                return Ok(c);
            }
            looked.push(c.display().to_string());
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let c = Path::new(dir).join("aither-init");
        if c.is_file() {
            return Ok(c);
        }
    }
    looked.push("$PATH".into());
    Err(DaemonError::NoInit(looked.join(", ")))
}

/// A signal's name ("SIGKILL").
pub fn signal_name(sig: i32) -> String {
    let names = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGCHLD, "SIGCHLD"),
        (libc::SIGCONT, "SIGCONT"),
        (libc::SIGSTOP, "SIGSTOP"),
        (libc::SIGTSTP, "SIGTSTP"),
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == sig)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("signal {sig}"))
}

/// Parses "TERM", "SIGTERM" or "15".
pub fn parse_signal(s: &str) -> Result<i32, UnknownSignal> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let up = s.to_ascii_uppercase();
    let full = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    (1..=31)
        .find(|n| signal_name(*n) == full)
        .ok_or_else(|| UnknownSignal(s.to_string()))
}

/// A signal neither named (TERM, SIGTERM) nor numbered (1 to 64).
#[derive(Debug, thiserror::Error)]
#[error("unknown signal {0:?}")]
pub struct UnknownSignal(pub String);

/// The daemon's start event.
pub fn started_event(d: &Daemon, adopted: usize, restarted: usize) {
    d.emit_daemon(
        "daemon_started",
        json!({"pid": std::process::id(), "adopted": adopted, "restarted": restarted}),
    );
}

/// Shared handle.
pub type Shared = Arc<Daemon>;
