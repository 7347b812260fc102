//! The egress gateway: the only way out of a sandbox (docs/network.md).
//!
//! One listening socket per agent, created on the sandbox's own loopback by the launcher and
//! handed to the gateway, which accepts the agent's connections directly. On each connection
//! the first byte picks the protocol: 0x05 is SOCKS5 (host names only), anything else is
//! HTTP/1 (served by hyper): `CONNECT host:port` opens a tunnel, an absolute-form request
//! (`GET http://host/…`) is proxied, an origin-form request (`GET /NAME/…`) goes to the
//! credential route NAME.
//!
//! Every destination is decided by host name against the agent's `net` claim, resolved here on
//! the host, refused when any address is internal (unless it is a granted service), and
//! connected to at exactly the address that was checked (no second lookup, so no rebinding).
//! A tunnel must begin with a TLS ClientHello whose SNI is the tunnel's host (a service may
//! carry any protocol, and plain HTTP to a service is served request by request); a CONNECT
//! request inside a tunnel is refused in every case. The upstream connection is opened only
//! once the first flight passed.
//!
//! Bounds per agent (docs/network.md, "Bounds"): descriptors (a client connection and its
//! upstream each count, tunnels until they close) within a share of the process's limit that
//! leaves the manager a reserve; pending request heads; an idle timeout on every connection
//! and tunnel; a denial budget (429 once spent) and summarised denial records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::addr::{internal_reason, HostAddrs};
use super::inspect::{first_flight, Flight};
use super::resolve::Resolve;
use super::rules::{NetGrants, ServiceGrant, ServiceTarget, Upstream, SERVICE_DOMAIN};
use super::socks::{socks5_request, socks_reply, SocksAsk};
use super::usage::{unix_now_s, Charge as TokenCharge, TokenLedger, UsageScanner};
use crate::audit::summary::{Offered, Summariser, Summary, TokenBucket};

/// Longest an agent may take to send a request head, a SOCKS5 handshake or a tunnel's first
/// TLS flight (slow clients are cut after it; the gateway serves others meanwhile).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted: every larger head is answered 431. Heads up to
/// [`HEAD_ALWAYS_ACCEPTED`] always pass (the agent's bytes are read at most
/// [`CLIENT_READ_CHUNK`] at a time, and hyper stops at `HEAD_ALWAYS_ACCEPTED` buffered).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The agent's bytes are read at most this many at a time.
pub const CLIENT_READ_CHUNK: usize = 8 * 1024;
/// hyper's read-buffer limit: heads up to this size are always accepted.
pub const HEAD_ALWAYS_ACCEPTED: usize = MAX_HEAD_BYTES - CLIENT_READ_CHUNK;
/// Connections one agent may hold open at once, whatever the descriptor budget.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections of one agent that may be waiting for their first request head, SOCKS5
/// handshake or tunnel first flight at once (each may buffer up to 64 KiB in the manager).
pub const MAX_PENDING_HEADS: usize = 64;
/// The denial budget: this many denials at once, refilled at [`DENIAL_REFILL`] a second.
/// Once spent, every request of the agent is answered 429 (rule `denial-budget`).
pub const DENIAL_BURST: u32 = 200;
pub const DENIAL_REFILL: u32 = 20;
/// Per (agent, rule), the first [`SUMMARY_PASS`] denials of each [`SUMMARY_INTERVAL`] are
/// recorded (audit, events, bus); the rest become one summary record when it ends. Allowed
/// decisions likewise, counted apart.
pub const SUMMARY_PASS: u64 = 20;
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnel copy buffer per direction.
const COPY_BUF: usize = 64 * 1024;

type Body = BoxBody<Bytes, hyper::Error>;

/// One allow/deny decision: the `aither.net.allowed` / `aither.net.denied` event.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NetEvent {
    pub agent: String,
    pub allowed: bool,
    /// What decided: `egress[0]`, `service:llm`, `route:openai`, `default-deny`, `quota`, ….
    pub rule: String,
    /// How the agent asked: `connect`, `http`, `socks5`, `route`.
    pub via: &'static str,
    pub host: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For a denial: why, as the agent was told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A summary record (`via` "summary"): how many denials it stands for that were not
    /// recorded one by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// A usage record (`via` "usage"): the tokens the agent used on a service that counts
    /// them (`api = "openai"`) since the previous record (docs/agents.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageRecord>,
}

/// What an agent used on one metered service over one window: the audit record's `usage`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct UsageRecord {
    pub service: String,
    /// Unix seconds: the window's first and last charged response.
    pub from: u64,
    pub to: u64,
    /// Responses charged.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Charged to the quotas (estimates included).
    pub total_tokens: u64,
    /// Responses without a usable `usage`, charged the estimate from their bytes.
    pub estimated: u64,
    /// Responses whose figure was above the per-response bound and cut to it.
    pub clamped: u64,
    /// Requests refused by the service's quotas in the window.
    pub refused: u64,
}

impl NetEvent {
    /// The bus subject of the event.
    pub fn subject(&self) -> &'static str {
        if self.usage.is_some() {
            "aither.net.usage"
        } else if self.allowed {
            "aither.net.allowed"
        } else {
            "aither.net.denied"
        }
    }
}

/// Counters of one rule for one agent.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RuleStats {
    pub connections: u64,
    pub requests: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub denials: u64,
}

/// Where secrets for credential routes come from (the host's secret store): the secret a
/// route's `secret` field names for an agent owned by `agent_owner` (`NAME`: the owner's,
/// `root:NAME`: root's; net::secrets::SecretRef).
pub trait SecretSource: Send + Sync {
    fn get(&self, agent_owner: u32, reference: &str) -> Option<String>;
}

/// Receives every decision (audit log, daemon events). Must not block.
pub type EventSink = Arc<dyn Fn(&NetEvent) + Send + Sync>;

/// How a gateway is built.
pub struct GatewayConfig {
    pub resolver: Box<dyn Resolve>,
    pub events: EventSink,
    pub secrets: Option<Arc<dyn SecretSource>>,
    /// The operator's settings: trust anchors for route upstreams (the system store plus the
    /// configured CA file), the idle timeout.
    pub egress: super::config::Egress,
}

/// The gateway: shared by every agent of a manager.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    resolver: Box<dyn Resolve>,
    events: EventSink,
    secrets: Option<Arc<dyn SecretSource>>,
    /// Services agents publish now, keyed by (owner uid, name): a member's agents see their
    /// own user's and root's, never another member's (docs/network.md, "Published services").
    published: RwLock<HashMap<(u32, String), Publication>>,
    tls: Arc<rustls::ClientConfig>,
    /// The host's own addresses (internal unless granted as a service).
    host_addrs: HostAddrs,
    summary: Mutex<Summariser>,
    summary_allowed: Mutex<Summariser>,
    /// Descriptors the gateway holds now (client connections and upstreams), all agents.
    fds: AtomicUsize,
    budget: FdBudget,
    idle: Duration,
}

/// The gateway's share of the process's descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// All agents together: half the soft RLIMIT_NOFILE (the other half is the manager's
    /// reserve: its control socket, state database, logs and shims).
    pub total: usize,
    /// One agent: an eighth of `total` (at least 16, at most two per [`MAX_CONNECTIONS`]).
    pub per_agent: usize,
}

impl FdBudget {
    /// From the process's soft RLIMIT_NOFILE, read now.
    pub fn from_rlimit() -> FdBudget {
        let limit = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            Ok((soft, _)) => usize::try_from(soft).unwrap_or(usize::MAX),
            Err(_) => 1024,
        };
        FdBudget::for_limit(limit)
    }

    /// For a process whose descriptor limit is `limit`.
    pub fn for_limit(limit: usize) -> FdBudget {
        Self::for_total((limit / 2).max(32))
    }

    /// For a gateway that may hold `total` descriptors.
    pub fn for_total(total: usize) -> FdBudget {
        FdBudget {
            total,
            per_agent: (total / 8).clamp(16, 2 * MAX_CONNECTIONS),
        }
    }
}

/// An agent's request windows and byte count: what its quotas charge. Kept by the manager
/// per (agent name, token id) across the agent's runs (aitherd persists it, docs/network.md).
#[derive(Debug, Default)]
pub struct QuotaState {
    window: Mutex<VecDeque<Instant>>,
    service_windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Tokens per metered service (`api = "openai"`): bounded ledgers (net::usage).
    tokens: Mutex<BTreeMap<String, TokenLedger>>,
    bytes: AtomicU64,
    dirty: AtomicBool,
}

/// A [`QuotaState`] as stored: times as Unix milliseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QuotaSnapshot {
    pub bytes: u64,
    pub requests_ms: Vec<u64>,
    #[serde(default)]
    pub services_ms: BTreeMap<String, Vec<u64>>,
    /// Token ledgers of metered services (Unix times: stored as they are).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services_tokens: BTreeMap<String, TokenLedger>,
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl QuotaState {
    /// The state as stored (requests older than the one-minute window are left out).
    pub fn snapshot(&self) -> QuotaSnapshot {
        let (now, now_ms) = (Instant::now(), unix_ms_now());
        let to_ms = |w: &VecDeque<Instant>| -> Vec<u64> {
            w.iter()
                .filter(|t| now.duration_since(**t) < Duration::from_secs(60))
                .map(|t| now_ms.saturating_sub(now.duration_since(*t).as_millis() as u64))
                .collect()
        };
        QuotaSnapshot {
            bytes: self.bytes.load(Ordering::Relaxed),
            requests_ms: self.window.lock().map(|w| to_ms(&w)).unwrap_or_default(),
            services_ms: self
                .service_windows
                .lock()
                .map(|m| m.iter().map(|(k, w)| (k.clone(), to_ms(w))).collect())
                .unwrap_or_default(),
            services_tokens: self.tokens.lock().map(|t| t.clone()).unwrap_or_default(),
        }
    }

    /// The state a snapshot describes (times in the future are taken as now).
    pub fn restore(s: &QuotaSnapshot) -> QuotaState {
        let (now, now_ms) = (Instant::now(), unix_ms_now());
        let to_instants = |v: &[u64]| -> VecDeque<Instant> {
            let mut w: VecDeque<Instant> = v
                .iter()
                .filter_map(|ms| {
                    let age = Duration::from_millis(now_ms.saturating_sub(*ms));
                    (age < Duration::from_secs(60)).then(|| now.checked_sub(age).unwrap_or(now))
                })
                .collect();
            w.make_contiguous().sort();
            w
        };
        QuotaState {
            window: Mutex::new(to_instants(&s.requests_ms)),
            service_windows: Mutex::new(
                s.services_ms
                    .iter()
                    .map(|(k, v)| (k.clone(), to_instants(v)))
                    .collect(),
            ),
            tokens: Mutex::new(s.services_tokens.clone()),
            bytes: AtomicU64::new(s.bytes),
            dirty: AtomicBool::new(false),
        }
    }

    /// Tokens used per metered service: (service, last 24 h, last minute, all time).
    pub fn token_usage(&self) -> Vec<ServiceTokens> {
        let now = unix_now_s();
        self.tokens
            .lock()
            .map(|t| {
                t.iter()
                    .map(|(k, l)| ServiceTokens {
                        service: k.clone(),
                        day: l.day(now),
                        minute: l.minute(now),
                        total: l.total,
                        responses: l.responses,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn charge_tokens(&self, service: &str, c: &TokenCharge) {
        if let Ok(mut t) = self.tokens.lock() {
            t.entry(service.to_string())
                .or_default()
                .charge(unix_now_s(), c);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Whether anything was charged since the last call (and clears the mark).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    fn add_bytes(&self, n: u64) {
        if n > 0 {
            self.bytes.fetch_add(n, Ordering::Relaxed);
            self.dirty.store(true, Ordering::Relaxed);
        }
    }
}

/// Tokens one agent used on one metered service (`stats`, metrics).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServiceTokens {
    pub service: String,
    /// The last 24 h (in 10-minute buckets).
    pub day: u64,
    /// The last 60 s.
    pub minute: u64,
    /// Since the ledger began (this agent name and token).
    pub total: u64,
    /// Responses charged since the ledger began.
    pub responses: u64,
}

/// How often an agent's usage on a metered service becomes an audit record (and at the end
/// of its run): one record per (agent, service) per interval with traffic.
pub const USAGE_RECORD_INTERVAL: Duration = Duration::from_secs(60);

/// One agent as the gateway sees it: its grants and its accounting.
pub struct AgentNet {
    pub name: String,
    /// The uid the agent belongs to: its routes' secrets are this user's (or root's, named
    /// `root:NAME`).
    pub owner: u32,
    pub grants: NetGrants,
    stats: Mutex<BTreeMap<String, RuleStats>>,
    quota: Arc<QuotaState>,
    denials: Mutex<TokenBucket>,
    /// Client connections open now (tunnels included, until they close).
    open: AtomicUsize,
    /// Descriptors the gateway holds for this agent now.
    fds: AtomicUsize,
    /// Connections waiting for a first head, handshake or first flight.
    pending: AtomicUsize,
    /// Usage per metered service since its last audit record (one entry per service granted).
    usage_window: Mutex<BTreeMap<String, (Instant, UsageRecord)>>,
}

impl AgentNet {
    pub fn new(name: &str, grants: NetGrants) -> Arc<AgentNet> {
        Self::with_quota(name, grants, Arc::default())
    }

    /// An agent whose quotas charge `quota` (kept across its runs by the manager).
    pub fn with_quota(name: &str, grants: NetGrants, quota: Arc<QuotaState>) -> Arc<AgentNet> {
        Self::owned(name, 0, grants, quota)
    }

    /// [`with_quota`](Self::with_quota) for an agent of uid `owner` (its routes use that
    /// user's secrets).
    pub fn owned(
        name: &str,
        owner: u32,
        grants: NetGrants,
        quota: Arc<QuotaState>,
    ) -> Arc<AgentNet> {
        Arc::new(AgentNet {
            name: name.to_string(),
            owner,
            grants,
            stats: Mutex::new(BTreeMap::new()),
            quota,
            denials: Mutex::new(TokenBucket::new(
                DENIAL_BURST,
                DENIAL_REFILL,
                Instant::now(),
            )),
            open: AtomicUsize::new(0),
            fds: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            usage_window: Mutex::new(BTreeMap::new()),
        })
    }

    /// The quota state this agent charges.
    pub fn quota(&self) -> Arc<QuotaState> {
        self.quota.clone()
    }

    /// Client connections open now (tunnels count until they close).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Descriptors the gateway holds for this agent now.
    pub fn descriptors(&self) -> usize {
        self.fds.load(Ordering::Relaxed)
    }

    /// Counters per rule (`default-deny` and `quota` count denials that no rule made).
    pub fn stats(&self) -> BTreeMap<String, RuleStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn count(&self, rule: &str, f: impl FnOnce(&mut RuleStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(s.entry(rule.to_string()).or_default());
        }
    }

    /// Charges one metered response (the usage the gateway read, or its estimate).
    fn charge_tokens(&self, service: &str, c: &TokenCharge) {
        self.quota.charge_tokens(service, c);
        let now = unix_now_s();
        if let Ok(mut w) = self.usage_window.lock() {
            let (_, r) = w
                .entry(service.to_string())
                .or_insert_with(|| (Instant::now(), UsageRecord::default()));
            if r.requests == 0 && r.refused == 0 {
                r.from = now;
            }
            r.to = now;
            r.requests += 1;
            r.prompt_tokens = r.prompt_tokens.saturating_add(c.prompt_tokens);
            r.completion_tokens = r.completion_tokens.saturating_add(c.completion_tokens);
            r.total_tokens = r.total_tokens.saturating_add(c.total_tokens);
            r.estimated += u64::from(c.estimated);
            r.clamped += u64::from(c.clamped);
        }
    }

    fn count_refused(&self, service: &str) {
        if let Ok(mut w) = self.usage_window.lock() {
            let (_, r) = w
                .entry(service.to_string())
                .or_insert_with(|| (Instant::now(), UsageRecord::default()));
            if r.requests == 0 && r.refused == 0 {
                r.from = unix_now_s();
            }
            r.to = unix_now_s();
            r.refused += 1;
        }
    }

    /// Tokens used per metered service (this agent under this token, across its runs).
    pub fn token_usage(&self) -> Vec<ServiceTokens> {
        self.quota.token_usage()
    }

    /// The token quotas of a metered service: refused when the last minute's or the last
    /// day's tokens have reached the limit (a response is charged after it ends, so one
    /// request may go past the limit; the next is refused).
    fn admit_tokens(&self, g: &ServiceGrant) -> Result<(), QuotaError> {
        if g.tokens_per_minute.is_none() && g.tokens_per_day.is_none() {
            return Ok(());
        }
        let now = unix_now_s();
        let t = self.quota.tokens.lock().map_err(|_| QuotaError::Poisoned)?;
        let empty = TokenLedger::default();
        let l = t.get(&g.name).unwrap_or(&empty);
        if let Some(limit) = g.tokens_per_minute {
            let used = l.minute(now);
            if used >= limit {
                return Err(QuotaError::Tokens {
                    used,
                    limit,
                    window: "minute",
                    field: format!("net.services.{}.tokens_per_minute", g.name),
                    retry_after: l.minute_retry_after(now, limit),
                });
            }
        }
        if let Some(limit) = g.tokens_per_day {
            let used = l.day(now);
            if used >= limit {
                return Err(QuotaError::Tokens {
                    used,
                    limit,
                    window: "day",
                    field: format!("net.services.{}.tokens_per_day", g.name),
                    retry_after: super::usage::DAY_BUCKET_S,
                });
            }
        }
        Ok(())
    }

    /// Admits one request or connection against the quotas, or says which one it hits.
    fn admit(&self, service: Option<&ServiceGrant>) -> Result<(), QuotaError> {
        if let Some(g) = service {
            self.admit_tokens(g)?;
        }
        if let Some(limit) = self.grants.quota.bytes {
            let used = self.quota.bytes.load(Ordering::Relaxed);
            if used >= limit {
                return Err(QuotaError::Bytes { used, limit });
            }
        }
        let now = Instant::now();
        let slide = |w: &mut VecDeque<Instant>, limit: u64, what: &str| -> Result<(), QuotaError> {
            while w
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                w.pop_front();
            }
            if w.len() as u64 >= limit {
                return Err(QuotaError::Requests {
                    limit,
                    field: what.to_string(),
                });
            }
            Ok(())
        };
        // Both windows are checked before either is charged: a refused request costs nothing.
        let mut global = self.quota.window.lock().map_err(|_| QuotaError::Poisoned)?;
        if let Some(l) = self.grants.quota.requests_per_minute {
            slide(&mut global, l, "net.quota.requests_per_minute")?;
        }
        if let Some((name, Some(l))) = service.map(|g| (g.name.as_str(), g.requests_per_minute)) {
            let mut sw = self
                .quota
                .service_windows
                .lock()
                .map_err(|_| QuotaError::Poisoned)?;
            let w = sw.entry(name.to_string()).or_default();
            slide(w, l, &format!("net.services.{name}.requests_per_minute"))?;
            w.push_back(now);
            self.quota.dirty.store(true, Ordering::Relaxed);
        }
        if self.grants.quota.requests_per_minute.is_some() {
            global.push_back(now);
            self.quota.dirty.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether the denial budget has a token left (takes none).
    fn denial_budget_left(&self) -> bool {
        self.denials
            .lock()
            .map(|mut b| b.has(Instant::now()))
            .unwrap_or(false)
    }
}

/// The quota a request or connection hits (the reason its denial carries).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    #[error("byte quota reached: {used} of {limit} bytes used (net.quota.bytes)")]
    Bytes { used: u64, limit: u64 },
    /// `field` is the claim that sets the limit (`net.quota.requests_per_minute`, …).
    #[error("request quota reached: {limit} per minute ({field}); retry later")]
    Requests { limit: u64, field: String },
    /// A metered service's token quota (`window`: minute or day).
    #[error("token quota reached: {used} of {limit} tokens used in the last {window} ({field}); retry in {retry_after} s")]
    Tokens {
        used: u64,
        limit: u64,
        window: &'static str,
        field: String,
        retry_after: u64,
    },
    #[error("quota state poisoned")]
    Poisoned,
}

/// Descriptors charged to an agent and to the gateway, given back on drop.
struct Charge {
    agent: Arc<AgentNet>,
    shared: Arc<Shared>,
    n: usize,
}

impl Charge {
    /// `n` descriptors for `agent`, or None when its budget or the gateway's is spent.
    fn take(shared: &Arc<Shared>, agent: &Arc<AgentNet>, n: usize) -> Option<Charge> {
        let b = shared.budget;
        if agent.fds.fetch_add(n, Ordering::Relaxed) + n > b.per_agent {
            agent.fds.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        if shared.fds.fetch_add(n, Ordering::Relaxed) + n > b.total {
            shared.fds.fetch_sub(n, Ordering::Relaxed);
            agent.fds.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        Some(Charge {
            agent: agent.clone(),
            shared: shared.clone(),
            n,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.agent.fds.fetch_sub(self.n, Ordering::Relaxed);
        self.shared.fds.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// One connection waiting for its first head, handshake or first flight.
struct PendingHead(Arc<AgentNet>);

impl PendingHead {
    fn take(agent: &Arc<AgentNet>) -> Option<PendingHead> {
        if agent.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_HEADS {
            agent.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(PendingHead(agent.clone()))
    }
}

impl Drop for PendingHead {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Milliseconds since the first call (the clock of [`Activity`]).
fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One client connection: its descriptor charge, the time of its last byte either way, and
/// (until the first request head arrives) its pending-head slot. Shared by the connection's
/// task and any tunnel it became, so the charge lasts until both have ended.
struct Conn {
    _charge: Charge,
    agent: Arc<AgentNet>,
    last: AtomicU64,
    pending: Mutex<Option<PendingHead>>,
}

impl Conn {
    fn touch(&self) {
        self.last.store(mono_ms(), Ordering::Relaxed);
    }

    fn head_arrived(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.take();
        }
    }

    /// Returns once the connection has seen no byte for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let since = mono_ms().saturating_sub(self.last.load(Ordering::Relaxed));
            let since = Duration::from_millis(since);
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.agent.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The agent's side of a connection: reads at most [`CLIENT_READ_CHUNK`] at a time (so the
/// head limit is exact to that much) and marks activity for the idle timeout.
struct ClientIo<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let cap = buf.remaining().min(CLIENT_READ_CHUNK);
        let dst = buf.initialize_unfilled_to(cap);
        let mut sub = ReadBuf::new(dst);
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut sub);
        let n = sub.filled().len();
        if n > 0 {
            buf.advance(n);
            self.conn.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A denial: the rule that decided and what the agent is told.
struct Denied {
    rule: String,
    reason: String,
    /// A quota of a service that speaks the OpenAI API: the refusal is an OpenAI error
    /// object of this `type` ("requests" or "tokens"), with Retry-After.
    openai: Option<(&'static str, u64)>,
}

fn denied(rule: impl Into<String>, reason: impl Into<String>) -> Denied {
    Denied {
        rule: rule.into(),
        reason: reason.into(),
        openai: None,
    }
}

/// Where an allowed request goes, exactly (addresses already checked).
enum Dest {
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
    /// A port on the loopback of another sandbox (a published service).
    Netns(Arc<OwnedFd>, u16),
}

/// A service published at run time (aitherd, `spawn --publish`).
#[derive(Clone, Debug)]
pub enum Published {
    /// A host address or unix socket.
    Host(ServiceTarget),
    /// 127.0.0.1:PORT in the network namespace held by the descriptor (the publishing
    /// agent's sandbox).
    Netns(Arc<OwnedFd>, u16),
}

/// A published service and the agent that published it (only it may withdraw it).
#[derive(Clone, Debug)]
struct Publication {
    agent: String,
    target: Published,
}

/// A service name already published by another of the owner's agents.
#[derive(Debug, thiserror::Error)]
#[error("service {name:?} is already published by agent {by:?}")]
pub struct PublishConflict {
    pub name: String,
    pub by: String,
}

struct Allowed {
    rule: String,
    dest: Dest,
    /// A granted service (its quotas, its api, and any protocol inside a tunnel).
    service: Option<ServiceGrant>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig) -> Gateway {
        let mut roots = rustls::RootCertStore::empty();
        if cfg.egress.roots.is_empty() {
            // No system store on this host: the bundled web roots (config::system_roots).
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        let (added, ignored) = roots.add_parsable_certificates(cfg.egress.roots);
        if ignored > 0 {
            tracing::warn!(
                added,
                ignored,
                "trust anchors that rustls cannot use were left out"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                // The ring provider supports the default versions; this branch is unreachable
                // in practice and yields a config that trusts nothing.
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by ring")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
            });
        Gateway {
            shared: Arc::new(Shared {
                resolver: cfg.resolver,
                events: cfg.events,
                secrets: cfg.secrets,
                published: RwLock::new(HashMap::new()),
                tls: Arc::new(tls),
                host_addrs: HostAddrs::default(),
                summary: Mutex::new(Summariser::new(SUMMARY_PASS, SUMMARY_INTERVAL, 32)),
                summary_allowed: Mutex::new(Summariser::new(SUMMARY_PASS, SUMMARY_INTERVAL, 32)),
                fds: AtomicUsize::new(0),
                budget: match cfg.egress.max_descriptors {
                    Some(n) => FdBudget::for_total(n),
                    None => FdBudget::from_rlimit(),
                },
                idle: cfg.egress.idle_timeout,
            }),
        }
    }

    /// The gateway's descriptor budget (from RLIMIT_NOFILE when it was built).
    pub fn fd_budget(&self) -> FdBudget {
        self.shared.budget
    }

    /// Descriptors the gateway holds now, all agents.
    pub fn descriptors(&self) -> usize {
        self.shared.fds.load(Ordering::Relaxed)
    }

    /// Records the summaries of every summarising interval that has ended (a ticker calls
    /// it; `serve` does once a second).
    pub fn flush_summaries(&self) {
        let now = Instant::now();
        self.flush_with(|s| s.flush(now));
    }

    fn flush_with(&self, f: impl Fn(&mut Summariser) -> Vec<Summary>) {
        let mut due: Vec<(bool, Summary)> = Vec::new();
        for (allowed, m) in [
            (true, &self.shared.summary_allowed),
            (false, &self.shared.summary),
        ] {
            if let Ok(mut s) = m.lock() {
                due.extend(f(&mut s).into_iter().map(|x| (allowed, x)));
            }
        }
        self.record_summaries(due);
    }

    /// Records `agent`'s open summaries now (its run ended), or everyone's (None: the
    /// gateway stops).
    pub fn flush_summaries_now(&self, agent: Option<&str>) {
        let now = Instant::now();
        self.flush_with(|s| match agent {
            Some(a) => s.flush_agent(a, now),
            None => s.flush_all(now),
        });
    }

    fn record_summaries(&self, due: Vec<(bool, Summary)>) {
        for (allowed, s) in due {
            let ev = NetEvent {
                agent: s.agent.clone(),
                allowed,
                rule: s.key.clone(),
                via: "summary",
                host: String::new(),
                port: 0,
                method: None,
                reason: Some(s.message(if allowed {
                    "allowed requests"
                } else {
                    "denials"
                })),
                suppressed: Some(s.suppressed),
                usage: None,
            };
            (self.shared.events)(&ev);
        }
    }

    /// Records `agent`'s usage of metered services: each (service) window older than
    /// [`USAGE_RECORD_INTERVAL`], or every window (`all`: its run ended). One record per
    /// agent, service and interval with traffic, outside the summariser (it is bounded
    /// already).
    pub fn flush_usage(&self, agent: &AgentNet, all: bool) {
        let due: Vec<UsageRecord> = match agent.usage_window.lock() {
            Ok(mut w) => {
                let keys: Vec<String> = w
                    .iter()
                    .filter(|(_, (since, _))| all || since.elapsed() >= USAGE_RECORD_INTERVAL)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.into_iter()
                    .filter_map(|k| {
                        w.remove(&k).map(|(_, mut r)| {
                            r.service = k;
                            r
                        })
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for r in due {
            let ev = NetEvent {
                agent: agent.name.clone(),
                allowed: true,
                rule: format!("service:{}", r.service),
                via: "usage",
                host: format!("{}.{SERVICE_DOMAIN}", r.service),
                port: 0,
                method: None,
                reason: None,
                suppressed: None,
                usage: Some(r),
            };
            (self.shared.events)(&ev);
        }
    }

    /// Makes `name` reachable at `target` to the agents granted it that belong to `owner`
    /// (and to every user's agents when `owner` is root): a service `agent` published. A name
    /// another of the owner's agents publishes now is refused, never taken over.
    pub fn publish(
        &self,
        owner: u32,
        agent: &str,
        name: &str,
        target: Published,
    ) -> Result<(), PublishConflict> {
        let mut p = self
            .shared
            .published
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let key = (owner, name.to_string());
        if let Some(held) = p.get(&key) {
            if held.agent != agent {
                return Err(PublishConflict {
                    name: name.to_string(),
                    by: held.agent.clone(),
                });
            }
        }
        p.insert(
            key,
            Publication {
                agent: agent.to_string(),
                target,
            },
        );
        Ok(())
    }

    /// Withdraws `name` if `agent` of `owner` publishes it (never another agent's).
    pub fn unpublish(&self, owner: u32, agent: &str, name: &str) {
        let mut p = self
            .shared
            .published
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let key = (owner, name.to_string());
        if p.get(&key).is_some_and(|h| h.agent == agent) {
            p.remove(&key);
        }
    }

    /// The agent of `owner` that publishes `name` now, if any.
    pub fn publisher(&self, owner: u32, name: &str) -> Option<String> {
        let p = self
            .shared
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner());
        p.get(&(owner, name.to_string())).map(|h| h.agent.clone())
    }

    fn lookup_published(&self, owner: u32, name: &str) -> Option<Publication> {
        let p = self
            .shared
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner());
        p.get(&(owner, name.to_string()))
            .or_else(|| p.get(&(0, name.to_string())))
            .cloned()
    }

    /// Serves `agent` on `listener` (the socket on the sandbox's loopback) until the listener
    /// fails or the task is aborted. Must run inside a tokio runtime.
    pub async fn serve(&self, listener: std::net::TcpListener, agent: Arc<AgentNet>) {
        let _ = listener.set_nonblocking(true);
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    // EMFILE and friends: back off instead of spinning; the agent retries.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = tick.tick() => {
                    self.flush_summaries();
                    self.flush_usage(&agent, false);
                    continue;
                }
            };
            // Accepted, then closed at once when over a bound: leaving it in the backlog would
            // let the agent fill the listen queue and wait; the refusal is summarised.
            let bound = if agent.open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                Err("connections (MAX_CONNECTIONS)")
            } else {
                match Charge::take(&self.shared, &agent, 1) {
                    None => Err("descriptor budget"),
                    Some(c) => match PendingHead::take(&agent) {
                        None => Err("pending request heads"),
                        Some(p) => Ok((c, p)),
                    },
                }
            };
            let (charge, pending) = match bound {
                Ok(x) => x,
                Err(what) => {
                    drop(stream);
                    self.bound_refused(&agent, what);
                    continue;
                }
            };
            agent.open.fetch_add(1, Ordering::Relaxed);
            let conn = Arc::new(Conn {
                _charge: charge,
                agent: agent.clone(),
                last: AtomicU64::new(mono_ms()),
                pending: Mutex::new(Some(pending)),
            });
            let (gw, agent) = (self.clone(), agent.clone());
            tokio::spawn(async move {
                let idle = gw.shared.idle;
                tokio::select! {
                    _ = gw.connection(stream, &agent, conn.clone()) => {}
                    _ = conn.idle(idle) => {}
                }
            });
        }
    }

    /// A connection closed by a per-agent bound.
    fn bound_refused(&self, agent: &AgentNet, what: &str) {
        self.emit(
            agent,
            NetEvent {
                agent: agent.name.clone(),
                allowed: false,
                rule: "bounds".into(),
                via: "accept",
                host: String::new(),
                port: 0,
                method: None,
                reason: Some(format!("connection closed: the agent's {what} is spent")),
                suppressed: None,
                usage: None,
            },
        );
    }

    fn emit(&self, agent: &AgentNet, ev: NetEvent) {
        if ev.allowed {
            agent.count(&ev.rule, |s| {
                if ev.via == "http" || ev.via == "route" {
                    s.requests += 1
                } else {
                    s.connections += 1
                }
            });
            // Allowed requests are summarised the same way: a flood of them (within the
            // quotas) cannot rotate the audit trail away either.
            let verdict = self
                .shared
                .summary_allowed
                .lock()
                .map(|mut s| s.offer(&agent.name, &ev.rule, Instant::now()))
                .unwrap_or(Offered::Suppress);
            if verdict == Offered::Suppress {
                return;
            }
        } else {
            agent.count(&ev.rule, |s| s.denials += 1);
            let now = Instant::now();
            // Every denied request is charged to the agent's denial budget (a connection closed
            // by a bound is not: closing it cost nothing more); its record goes out only while
            // the (agent, rule) is within its per-interval allowance.
            if ev.rule != "bounds" {
                if let Ok(mut b) = agent.denials.lock() {
                    b.take(now);
                }
            }
            let verdict = self
                .shared
                .summary
                .lock()
                .map(|mut s| s.offer(&agent.name, &ev.rule, now))
                .unwrap_or(Offered::Suppress);
            if verdict == Offered::Suppress {
                return;
            }
        }
        (self.shared.events)(&ev);
    }

    /// The denial once the agent's denial budget is spent (no lookup, no upstream).
    fn denial_budget(&self, agent: &AgentNet) -> Option<Denied> {
        (!agent.denial_budget_left()).then(|| {
            denied(
                "denial-budget",
                format!(
                    "too many denied requests (budget {DENIAL_BURST}, {DENIAL_REFILL} a second); retry later"
                ),
            )
        })
    }

    async fn connection(&self, stream: TcpStream, agent: &Arc<AgentNet>, conn: Arc<Conn>) {
        let _ = stream.set_nodelay(true);
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        let client = ClientIo {
            inner: stream,
            conn: conn.clone(),
        };
        if first[0] == 0x05 {
            self.socks5(client, agent, conn).await;
            return;
        }
        let cache: Arc<tokio::sync::Mutex<Option<Pooled>>> = Arc::default();
        let (gw, ag, c) = (self.clone(), agent.clone(), conn.clone());
        let svc = hyper::service::service_fn(move |req| {
            let (gw, ag, cache, c) = (gw.clone(), ag.clone(), cache.clone(), c.clone());
            c.head_arrived();
            async move { Ok::<_, Infallible>(gw.http(req, &ag, &cache, c).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(HEAD_ALWAYS_ACCEPTED)
            .serve_connection(TokioIo::new(client), svc)
            .with_upgrades()
            .await;
    }

    /// Decides a destination by name, resolves it on the host and checks every address.
    /// `Lookup::Skip`: the rules only (a request on a pooled upstream connection, made to an
    /// address that was checked when the connection was opened).
    async fn decide(
        &self,
        agent: &AgentNet,
        host: &str,
        port: u16,
        method: Option<&str>,
        lookup: Lookup,
    ) -> Result<Allowed, Denied> {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        let h = h.trim_start_matches('[').trim_end_matches(']');
        if h.parse::<IpAddr>().is_ok() {
            return Err(denied(
                "ip-literal",
                format!("{host} is an IP address: the gateway connects by host name only"),
            ));
        }
        if let Some(name) = h
            .strip_suffix(SERVICE_DOMAIN)
            .and_then(|n| n.strip_suffix('.'))
        {
            let rule = format!("service:{name}");
            let Some(g) = agent.grants.services.iter().find(|s| s.name == name) else {
                return Err(denied(
                    "default-deny",
                    format!("no net.services grant for {name:?}"),
                ));
            };
            let target = match &g.target {
                Some(t) => Published::Host(
                    ServiceTarget::parse(t).map_err(|e| denied(&rule, e.to_string()))?,
                ),
                None => self
                    .lookup_published(agent.owner, name)
                    .map(|p| p.target)
                    .ok_or_else(|| {
                        denied(
                            &rule,
                            format!("service {name:?} is granted but nothing publishes it now"),
                        )
                    })?,
            };
            return Ok(Allowed {
                rule,
                dest: match target {
                    Published::Host(ServiceTarget::Tcp(a)) => Dest::Tcp(vec![a]),
                    Published::Host(ServiceTarget::Unix(p)) => Dest::Unix(p),
                    Published::Netns(ns, port) => Dest::Netns(ns, port),
                },
                service: Some(g.clone()),
            });
        }
        let Some(i) = agent.grants.find_rule(h, port, method) else {
            let what = match method {
                Some(m) => format!("{m} http://{h}:{port}"),
                None => format!("a tunnel to {h}:{port}"),
            };
            return Err(denied(
                "default-deny",
                format!("no net.egress rule allows {what}"),
            ));
        };
        let rule = format!("egress[{i}]");
        if lookup == Lookup::Skip {
            return Ok(Allowed {
                rule,
                dest: Dest::Tcp(Vec::new()),
                service: None,
            });
        }
        let ips = self.resolve_external(h, &rule).await?;
        Ok(Allowed {
            rule,
            dest: Dest::Tcp(
                ips.into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect(),
            ),
            service: None,
        })
    }

    /// Resolves `h` on the host and checks every address it has: none may be internal or one
    /// of the host's own. The denial names the rule, never an address (an agent must not
    /// learn what names resolve to, nor use the gateway as a lookup tool).
    async fn resolve_external(&self, h: &str, rule: &str) -> Result<Vec<IpAddr>, Denied> {
        let ips = self
            .shared
            .resolver
            .resolve(h)
            .await
            .map_err(|_| denied(rule, format!("cannot resolve {h}")))?;
        if ips.is_empty() {
            return Err(denied(rule, format!("cannot resolve {h}")));
        }
        if ips
            .iter()
            .any(|ip| internal_reason(*ip).is_some() || self.shared.host_addrs.contains(*ip))
        {
            return Err(denied(
                rule,
                format!(
                    "{h} resolves to an internal address or one of this host's own: reachable only as a granted service"
                ),
            ));
        }
        Ok(ips)
    }

    /// Decision, quota and event in one: Ok when the request may go on.
    async fn authorize(
        &self,
        agent: &AgentNet,
        via: &'static str,
        host: &str,
        port: u16,
        method: Option<&str>,
        lookup: Lookup,
    ) -> Result<Allowed, Denied> {
        let ev = |allowed: bool, rule: &str, reason: Option<&str>| NetEvent {
            agent: agent.name.clone(),
            allowed,
            rule: rule.to_string(),
            via,
            host: host.to_string(),
            port,
            method: method.map(str::to_string),
            reason: reason.map(str::to_string),
            suppressed: None,
            usage: None,
        };
        let decided = match self.denial_budget(agent) {
            Some(d) => Err(d),
            None => {
                self.decide(
                    agent,
                    host,
                    port,
                    if via == "http" { method } else { None },
                    lookup,
                )
                .await
            }
        }
        .and_then(|a| match agent.admit(a.service.as_ref()) {
            Ok(()) => Ok(a),
            Err(r) => {
                let mut d = denied("quota", r.to_string());
                if let Some(g) = a.service.as_ref().filter(|g| g.metered()) {
                    agent.count_refused(&g.name);
                    d.openai = Some(match &r {
                        QuotaError::Tokens { retry_after, .. } => ("tokens", *retry_after),
                        _ => ("requests", 60),
                    });
                }
                Err(d)
            }
        });
        match &decided {
            Ok(a) => self.emit(agent, ev(true, &a.rule, None)),
            Err(d) => self.emit(agent, ev(false, &d.rule, Some(&d.reason))),
        }
        decided
    }

    async fn http(
        &self,
        req: Request<Incoming>,
        agent: &Arc<AgentNet>,
        cache: &tokio::sync::Mutex<Option<Pooled>>,
        conn: Arc<Conn>,
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.connect(req, agent, conn).await;
        }
        match req.uri().scheme_str() {
            Some("http") => self.forward(req, agent, cache).await,
            Some(_) => text(
                StatusCode::BAD_REQUEST,
                "aither egress: only http:// is proxied as plain HTTP; https goes through CONNECT (HTTPS_PROXY)",
            ),
            None => self.route(req, agent).await,
        }
    }

    async fn connect(
        &self,
        req: Request<Incoming>,
        agent: &Arc<AgentNet>,
        conn: Arc<Conn>,
    ) -> Response<Body> {
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "aither egress: CONNECT needs host:port",
            );
        };
        let allowed = match self
            .authorize(agent, "connect", &host, port, None, Lookup::Resolve)
            .await
        {
            Ok(a) => a,
            Err(d) => return deny_response(&d),
        };
        // The upstream is opened only once the first flight passed (tunnel): a refused
        // tunnel costs no upstream connection, and the answer says nothing of its port.
        let (gw, agent) = (self.clone(), agent.clone());
        tokio::spawn(async move {
            if let Ok(up) = hyper::upgrade::on(req).await {
                // The tunnel holds the connection's descriptor charge until it ends, and
                // ends after the idle timeout without a byte either way.
                let idle = gw.shared.idle;
                tokio::select! {
                    _ = gw.tunnel(TokioIo::new(up), &agent, &host, port, allowed, "connect") => {}
                    _ = conn.idle(idle) => {}
                }
            }
        });
        Response::new(empty())
    }

    /// Carries a tunnel once its first flight passed the checks.
    #[allow(clippy::too_many_arguments)]
    async fn tunnel<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut client: C,
        agent: &Arc<AgentNet>,
        host: &str,
        port: u16,
        allowed: Allowed,
        via: &'static str,
    ) {
        // Plain HTTP is served request by request (each decided, CONNECT refused anywhere in
        // the stream) when it comes through SOCKS5 or goes to a service (which may itself be
        // a proxy); anything else to a service is relayed.
        let plain_ok = via == "socks5" || allowed.service.is_some();
        let Some(pending) = PendingHead::take(agent) else {
            self.bound_refused(agent, "pending request heads");
            return;
        };
        let flight = first_flight(&mut client, host, allowed.service.is_some(), plain_ok).await;
        drop(pending);
        // A service whose tokens are counted is served as plain HTTP only: anything relayed
        // (TLS, another protocol) would pass uncounted.
        let metered = allowed.service.as_ref().is_some_and(|g| g.metered());
        let flight = match flight {
            Ok((_, Flight::Relay)) if metered => {
                Err(super::inspect::FlightError::Metered(host.to_string()))
            }
            f => f,
        };
        let first = match flight {
            Ok((b, Flight::Relay)) => b,
            Ok((b, Flight::PlainHttp)) => {
                self.plain_in_tunnel(Rewind::new(b, client), agent, host, port)
                    .await;
                return;
            }
            Err(reason) => {
                self.emit(
                    agent,
                    NetEvent {
                        agent: agent.name.clone(),
                        allowed: false,
                        rule: "tunnel-inspection".into(),
                        via,
                        host: host.to_string(),
                        port,
                        method: None,
                        reason: Some(reason.to_string()),
                        suppressed: None,
                        usage: None,
                    },
                );
                return;
            }
        };
        let Some(charge) = Charge::take(&self.shared, agent, 1) else {
            self.bound_refused(agent, "descriptor budget");
            return;
        };
        // A failed connect closes the tunnel, as a refused first flight does.
        let Ok(upstream) = open(&allowed.dest).await else {
            return;
        };
        let mut up = Metered::new(upstream, agent.clone(), allowed.rule.clone(), Some(charge));
        if up.write_all(&first).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut up, COPY_BUF, COPY_BUF)
            .await;
    }

    /// Serves plain HTTP that arrived through a SOCKS5 tunnel to `host:port`: each request is
    /// treated as `GET http://host:port/path` through HTTP_PROXY would be.
    async fn plain_in_tunnel<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        client: C,
        agent: &Arc<AgentNet>,
        host: &str,
        port: u16,
    ) {
        let cache: Arc<tokio::sync::Mutex<Option<Pooled>>> = Arc::default();
        let (gw, ag) = (self.clone(), agent.clone());
        let base = format!("http://{}", authority(host, port, 80));
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (gw, ag, cache) = (gw.clone(), ag.clone(), cache.clone());
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let abs: Option<Uri> = format!("{base}{pq}").parse().ok();
            async move {
                if req.method() == Method::CONNECT {
                    let d = denied(
                        "tunnel-inspection",
                        "a CONNECT request inside a tunnel (relayed proxying) is refused",
                    );
                    return Ok::<_, Infallible>(deny_response(&d));
                }
                let Some(abs) = abs else {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        "aither egress: bad request path",
                    ));
                };
                *req.uri_mut() = abs;
                Ok(gw.forward(req, &ag, &cache).await)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(HEAD_ALWAYS_ACCEPTED)
            .serve_connection(TokioIo::new(client), svc)
            // A CONNECT in the stream is answered 403 (an upgrade refused), not dropped.
            .with_upgrades()
            .await;
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        agent: &Arc<AgentNet>,
        cache: &tokio::sync::Mutex<Option<Pooled>>,
    ) -> Response<Body> {
        let uri = req.uri().clone();
        let Some(host) = uri.host().map(str::to_string) else {
            return text(StatusCode::BAD_REQUEST, "aither egress: no host in the URL");
        };
        let port = uri.port_u16().unwrap_or(80);
        let method = req.method().as_str().to_string();
        let key = (host.to_ascii_lowercase(), port);
        let mut slot = cache.lock().await;
        let reuse = matches!(&*slot, Some(p) if p.key == key && !p.sender.is_closed());
        // Every request is decided by the rules; the name is looked up (and the addresses
        // checked) only for a new upstream connection.
        let lookup = if reuse { Lookup::Skip } else { Lookup::Resolve };
        let allowed = match self
            .authorize(agent, "http", &host, port, Some(&method), lookup)
            .await
        {
            Ok(a) => a,
            Err(d) => return deny_response(&d),
        };
        if !reuse {
            // The previous upstream (another host) is let go before a new one is charged.
            *slot = None;
            let Some(charge) = Charge::take(&self.shared, agent, 1) else {
                return self.bounds_response(agent, "descriptor budget");
            };
            let Ok(stream) = open(&allowed.dest).await else {
                return unreachable(&allowed.rule);
            };
            let io = Metered::new(stream, agent.clone(), allowed.rule.clone(), Some(charge));
            match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    *slot = Some(Pooled { key, sender });
                }
                Err(_) => return unreachable(&allowed.rule),
            }
        }
        let Some(pooled) = slot.as_mut() else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: no upstream");
        };
        let origin = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        // A request to a service that counts tokens: its response's usage is charged. GET,
        // HEAD and OPTIONS (`/v1/models`, `/health`) cost nothing; every other method is
        // charged, whatever the server makes of it.
        let meter = allowed
            .service
            .as_ref()
            .filter(|g| g.metered() && !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS"))
            .map(|g| {
                let declared = req
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                (g.name.clone(), ReqBytes::new(declared))
            });
        *req.uri_mut() = origin.parse().unwrap_or_else(|_| Uri::from_static("/"));
        strip_hop_headers(req.headers_mut());
        strip_override_headers(req.headers_mut());
        if meter.is_some() {
            // A compressed answer would hide its usage from the reader (and shrink the
            // estimate): a metered response comes uncompressed.
            req.headers_mut().insert(
                hyper::header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // Host is always the name that was decided: an agent's own Host header could make a
        // virtual-hosting upstream (a CDN) serve another site (domain fronting).
        if let Ok(v) = HeaderValue::from_str(&authority(&host, port, 80)) {
            req.headers_mut().insert(HOST, v);
        }
        if pooled.sender.ready().await.is_err() {
            *slot = None;
            return unreachable(&allowed.rule);
        }
        // A metered request's body is counted as it goes (the estimate's request part; a
        // chunked body has no Content-Length to go by).
        let req = match &meter {
            Some((_, n)) => {
                let n = n.clone();
                req.map(|b| CountedRequest { inner: b, bytes: n }.boxed())
            }
            None => req.map(|b| b.boxed()),
        };
        match pooled.sender.send_request(req).await {
            Ok(mut resp) => {
                strip_hop_headers(resp.headers_mut());
                match meter {
                    Some((service, req_bytes)) => {
                        let ct = resp
                            .headers()
                            .get(hyper::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        resp.map(|b| {
                            Counted {
                                inner: b,
                                scan: UsageScanner::new(ct.as_deref()),
                                agent: agent.clone(),
                                service,
                                req_bytes,
                                charged: false,
                            }
                            .boxed()
                        })
                    }
                    None => resp.map(|b| b.boxed()),
                }
            }
            Err(_) => {
                *slot = None;
                // The request went out: a metered service charges its estimate.
                if let Some((service, req_bytes)) = meter {
                    agent.charge_tokens(&service, &UsageScanner::new(None).charge(req_bytes.get()));
                }
                unreachable(&allowed.rule)
            }
        }
    }

    /// A request refused by a per-agent bound: 503, and a (summarised) record.
    fn bounds_response(&self, agent: &AgentNet, what: &str) -> Response<Body> {
        self.bound_refused(agent, what);
        let d = denied(
            "bounds",
            format!("the agent's {what} is spent; retry later"),
        );
        let mut r = deny_response(&d);
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    }

    /// `GET /NAME/rest` on the gateway itself: the credential route NAME.
    async fn route(&self, mut req: Request<Incoming>, agent: &Arc<AgentNet>) -> Response<Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let name = route_name(&path);
        let ev =
            |allowed: bool, rule: &str, host: &str, port: u16, reason: Option<String>| NetEvent {
                agent: agent.name.clone(),
                allowed,
                rule: rule.to_string(),
                via: "route",
                host: host.to_string(),
                port,
                method: Some(method.clone()),
                reason,
                suppressed: None,
                usage: None,
            };
        if let Some(d) = self.denial_budget(agent) {
            self.emit(
                agent,
                ev(false, &d.rule, "gateway", 0, Some(d.reason.clone())),
            );
            return deny_response(&d);
        }
        // The path is checked before anything is matched on it: a route's prefix holds only
        // for a normalised path (no `//`, `.` or `..` segments, no encoded separators).
        if let Err(why) = normalised_path(&path) {
            let d = denied("route-path", why.to_string());
            self.emit(
                agent,
                ev(false, &d.rule, "gateway", 0, Some(d.reason.clone())),
            );
            let mut r = deny_response(&d);
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
        let Some(route) = agent.grants.routes.iter().find(|r| r.name == name).cloned() else {
            self.emit(
                agent,
                ev(
                    false,
                    "default-deny",
                    "gateway",
                    0,
                    Some(format!("no net.routes grant {name:?}")),
                ),
            );
            return text(
                StatusCode::NOT_FOUND,
                &format!(
                    "aither egress: this is the sandbox's egress gateway; no route {name:?} is granted (set HTTP_PROXY/HTTPS_PROXY to reach allowed hosts)"
                ),
            );
        };
        let rule = format!("route:{name}");
        let Ok(up) = Upstream::parse(&route.upstream) else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: bad route upstream");
        };
        // `rest` is "" or starts with '/': the path was normalised and begins with /NAME.
        let rest = &path[1 + name.len()..];
        let target = format!(
            "{}{}{}",
            up.path,
            if rest.is_empty() { "/" } else { rest },
            query.map(|q| format!("?{q}")).unwrap_or_default()
        );
        let checked = self
            .check_route(agent, &route, &up, &rule, &method, &target)
            .await;
        let (ips, secret) = match checked {
            Ok(x) => {
                self.emit(agent, ev(true, &rule, &up.host, up.port, None));
                x
            }
            Err(d) => {
                self.emit(
                    agent,
                    ev(false, &d.rule, &up.host, up.port, Some(d.reason.clone())),
                );
                let mut r = deny_response(&d);
                if d.rule == rule && d.reason.starts_with("method ") {
                    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                }
                return r;
            }
        };
        let addrs: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, up.port))
            .collect();
        let Some(charge) = Charge::take(&self.shared, agent, 1) else {
            return self.bounds_response(agent, "descriptor budget");
        };
        let Ok(Stream::Tcp(tcp)) = open(&Dest::Tcp(addrs)).await else {
            return unreachable(&rule);
        };
        let Ok(server_name) = rustls::pki_types::ServerName::try_from(up.host.clone()) else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: bad upstream name");
        };
        let Ok(tls) = tokio_rustls::TlsConnector::from(self.shared.tls.clone())
            .connect(
                server_name,
                Metered::new(Stream::Tcp(tcp), agent.clone(), rule.clone(), Some(charge)),
            )
            .await
        else {
            return text(
                StatusCode::BAD_GATEWAY,
                &format!("aither egress ({rule}): the upstream's TLS certificate is not trusted or the handshake failed"),
            );
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
        else {
            return unreachable(&rule);
        };
        tokio::spawn(conn);
        *req.uri_mut() = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        strip_hop_headers(req.headers_mut());
        strip_override_headers(req.headers_mut());
        let headers = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&authority(&up.host, up.port, 443)) {
            headers.insert(HOST, v);
        }
        match (
            HeaderName::from_bytes(route.header.as_bytes()),
            HeaderValue::from_str(&format!("{}{}", route.prefix, secret)),
        ) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                // The agent's own value (a placeholder) is replaced, never forwarded.
                headers.insert(n, v);
            }
            // Never send the request without its credential (nor say what the secret holds).
            _ => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                    "aither egress: secret {:?} cannot be sent in header {:?} (visible ASCII only)",
                    route.secret, route.header
                ),
                )
            }
        }
        match sender.send_request(req).await {
            Ok(mut resp) => {
                strip_hop_headers(resp.headers_mut());
                resp.map(|b| b.boxed())
            }
            Err(_) => unreachable(&rule),
        }
    }

    /// `route`'s checks before anything is sent: the method, the target under the route's
    /// prefix, the agent's quota, the upstream's addresses and the owner's secret.
    async fn check_route(
        &self,
        agent: &Arc<AgentNet>,
        route: &super::rules::RouteGrant,
        up: &Upstream,
        rule: &str,
        method: &str,
        target: &str,
    ) -> Result<(Vec<IpAddr>, String), Denied> {
        if !route.allows_method(method) {
            return Err(denied(
                rule,
                format!("method {method} is not forwarded by this route (net.routes.methods)"),
            ));
        }
        // Belt and braces: the credential goes only to a target under the route's prefix.
        let under = format!("{}/", up.path);
        if !target.starts_with(&under) {
            return Err(denied(
                rule,
                "the request's target leaves the route's prefix",
            ));
        }
        agent
            .admit(None)
            .map_err(|r| denied("quota", r.to_string()))?;
        let ips = self.resolve_external(&up.host, rule).await?;
        let secret = self
            .shared
            .secrets
            .as_ref()
            .and_then(|s| s.get(agent.owner, &route.secret))
            .ok_or_else(|| {
                denied(
                    rule,
                    format!(
                        "no secret named {:?} of the agent's owner (aitherctl secret set)",
                        route.secret
                    ),
                )
            })?;
        Ok((ips, secret))
    }

    async fn socks5<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut s: C,
        agent: &Arc<AgentNet>,
        conn: Arc<Conn>,
    ) {
        let head = tokio::time::timeout(HEAD_TIMEOUT, socks5_request(&mut s)).await;
        conn.head_arrived();
        let (host, port) = match head {
            Ok(Ok(SocksAsk::Name(h, p))) => (h, p),
            Ok(Ok(SocksAsk::Address(a))) => {
                self.emit(
                    agent,
                    NetEvent {
                        agent: agent.name.clone(),
                        allowed: false,
                        rule: "ip-literal".into(),
                        via: "socks5",
                        host: a.ip().to_string(),
                        port: a.port(),
                        method: None,
                        reason: Some("SOCKS5 by address: use host names (socks5h://)".into()),
                        suppressed: None,
                        usage: None,
                    },
                );
                let _ = s.write_all(&socks_reply(0x02)).await;
                return;
            }
            Ok(Ok(SocksAsk::Refused(code))) => {
                let _ = s.write_all(&socks_reply(code)).await;
                return;
            }
            _ => return,
        };
        let allowed = match self
            .authorize(agent, "socks5", &host, port, None, Lookup::Resolve)
            .await
        {
            Ok(a) => a,
            Err(_) => {
                // 0x02: connection not allowed by ruleset.
                let _ = s.write_all(&socks_reply(0x02)).await;
                return;
            }
        };
        // Success before the upstream is opened: it is opened once the first flight passed
        // (a failed connect then closes the tunnel; the port's state is not told).
        if s.write_all(&socks_reply(0x00)).await.is_err() {
            return;
        }
        self.tunnel(s, agent, &host, port, allowed, "socks5").await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Resolve,
    Skip,
}

struct Pooled {
    key: (String, u16),
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

fn authority(host: &str, port: u16, default: u16) -> String {
    if port == default {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
}

/// The route a gateway path names: its first segment (`/NAME/rest`).
fn route_name(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn strip_hop_headers(h: &mut hyper::HeaderMap) {
    let listed: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|x| x.trim().to_ascii_lowercase()))
        .collect();
    for n in listed {
        if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
            h.remove(n);
        }
    }
    for n in [
        "connection",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// Headers that would let the agent change what a rule decided (the method) or what the
/// upstream believes about the request's origin: removed from every forwarded request.
pub const STRIPPED_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
    "x-real-ip",
];

fn strip_override_headers(h: &mut hyper::HeaderMap) {
    for n in STRIPPED_HEADERS {
        h.remove(*n);
    }
}

/// A route's request path that [`normalised_path`] refuses, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the route path is not normalised ({0})")]
pub struct NotNormalised(pub &'static str);

/// A route's request path is normalised: it starts with '/', has no empty, `.` or `..`
/// segment (also before a `;` parameter), no backslash and no percent-encoded '/', '\\', '.' or NUL (an upstream may
/// decode them into separators after the prefix was checked).
pub fn normalised_path(path: &str) -> Result<(), NotNormalised> {
    let bad = |why: &'static str| Err(NotNormalised(why));
    let Some(rest) = path.strip_prefix('/') else {
        return bad("it must start with '/'");
    };
    if path.contains('\\') {
        return bad("a backslash");
    }
    let lower = path.to_ascii_lowercase();
    for enc in ["%2f", "%5c", "%2e", "%00"] {
        if lower.contains(enc) {
            return bad("an encoded separator or dot");
        }
    }
    let segs: Vec<&str> = rest.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        // A trailing '/' (an empty last segment) is allowed; an empty one elsewhere is `//`.
        if seg.is_empty() && i + 1 < segs.len() {
            return bad("an empty segment, `//`");
        }
        // `..;x` is `..` to servers that take `;` as a path parameter (Tomcat, Jetty).
        let bare = seg.split(';').next().unwrap_or_default();
        if bare == "." || bare == ".." {
            return bad("a `.` or `..` segment");
        }
    }
    if segs[0].is_empty() {
        return bad("no route name");
    }
    Ok(())
}

/// The answer when an upstream cannot be reached or fails: names the rule only (not the
/// address, nor whether the port refused or timed out).
fn unreachable(rule: &str) -> Response<Body> {
    text(
        StatusCode::BAD_GATEWAY,
        &format!("aither egress ({rule}): the upstream did not answer"),
    )
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn deny_response(d: &Denied) -> Response<Body> {
    if let Some((kind, retry_after)) = d.openai {
        return openai_error(d, kind, retry_after);
    }
    let status = if d.rule == "quota" || d.rule == "denial-budget" {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::FORBIDDEN
    };
    let mut r = text(
        status,
        &format!("aither egress denied ({}): {}", d.rule, d.reason),
    );
    if let Ok(v) = HeaderValue::from_str(&d.rule) {
        r.headers_mut().insert("x-aither-rule", v);
    }
    r
}

/// A quota refusal by a service that speaks the OpenAI API, as OpenAI answers one: 429, an
/// error object (`type` "requests" or "tokens", `code` "rate_limit_exceeded") whose message
/// names the quota, `Retry-After`, and `X-Aither-Rule: quota`.
fn openai_error(d: &Denied, kind: &str, retry_after: u64) -> Response<Body> {
    let body = serde_json::json!({
        "error": {
            "message": format!("aither egress denied ({}): {}", d.rule, d.reason),
            "type": kind,
            "param": null,
            "code": "rate_limit_exceeded",
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string() + "\n"))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_after));
    if let Ok(v) = HeaderValue::from_str(&d.rule) {
        h.insert("x-aither-rule", v);
    }
    r
}

/// The response body of a metered service: passed on frame by frame, its bytes read by a
/// [`UsageScanner`] on the way (nothing buffered but at most one `usage` object). The
/// response is charged once: when its last frame is read (before the agent has it all), or
/// when it is dropped unfinished (the agent or the server went away), with what was seen.
struct Counted {
    inner: Incoming,
    scan: UsageScanner,
    agent: Arc<AgentNet>,
    service: String,
    req_bytes: ReqBytes,
    charged: bool,
}

impl Counted {
    fn charge(&mut self) {
        if !self.charged {
            self.charged = true;
            self.agent
                .charge_tokens(&self.service, &self.scan.charge(self.req_bytes.get()));
        }
    }
}

/// The size of a metered request's body: what its Content-Length declared, or what was sent
/// of it, whichever is larger.
#[derive(Clone)]
struct ReqBytes {
    declared: u64,
    sent: Arc<AtomicU64>,
}

impl ReqBytes {
    fn new(declared: u64) -> ReqBytes {
        ReqBytes {
            declared,
            sent: Arc::default(),
        }
    }

    fn get(&self) -> u64 {
        self.declared.max(self.sent.load(Ordering::Relaxed))
    }
}

/// A metered request's body on its way to the service, its bytes counted.
struct CountedRequest {
    inner: Incoming,
    bytes: ReqBytes,
}

impl hyper::body::Body for CountedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.bytes.sent.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.scan.feed(d);
                }
                if self.inner.is_end_stream() {
                    self.charge();
                }
            }
            Poll::Ready(_) => self.charge(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.charge();
    }
}

/// A client stream whose first bytes (already read for inspection) are read again.
struct Rewind<C> {
    prefix: Vec<u8>,
    pos: usize,
    inner: C,
}

impl<C> Rewind<C> {
    fn new(prefix: Vec<u8>, inner: C) -> Rewind<C> {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Rewind<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Rewind<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection to an upstream.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connects to the checked addresses in order (never looking the name up again).
async fn open(dest: &Dest) -> io::Result<Stream> {
    match dest {
        Dest::Netns(ns, port) => {
            let fd = socket_in_netns(ns.clone()).await?;
            let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            let addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), *port);
            let s = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        Dest::Unix(p) => Ok(Stream::Unix(
            tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(p))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??,
        )),
        Dest::Tcp(addrs) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                }
            }
            Err(last)
        }
    }
}

/// A TCP socket created in the network namespace `ns` (it stays there; connecting it later
/// reaches that namespace's loopback). Made on a short-lived thread of its own: `setns` changes
/// the calling thread, and no pooled thread may ever be left in an agent's namespace.
pub(crate) async fn socket_in_netns(ns: Arc<OwnedFd>) -> io::Result<OwnedFd> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("aither-netns".into())
        .spawn(move || {
            let _ = tx.send(crate::sandbox::netns::socket_in(&ns));
        })?;
    rx.await
        .map_err(|_| io::Error::other("the namespace thread died"))?
}

/// An upstream connection that counts bytes per rule and enforces the byte quota.
struct Metered {
    inner: Stream,
    agent: Arc<AgentNet>,
    rule: String,
    out: u64,
    inn: u64,
    /// The upstream's descriptor, charged to the agent while it is open.
    _charge: Option<Charge>,
}

impl Metered {
    fn new(inner: Stream, agent: Arc<AgentNet>, rule: String, charge: Option<Charge>) -> Metered {
        Metered {
            inner,
            agent,
            rule,
            out: 0,
            inn: 0,
            _charge: charge,
        }
    }

    fn over_quota(&self) -> bool {
        self.agent
            .grants
            .quota
            .bytes
            .is_some_and(|l| self.agent.quota.bytes.load(Ordering::Relaxed) > l)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let (o, i) = (self.out, self.inn);
        self.agent.count(&self.rule, |s| {
            s.bytes_out += o;
            s.bytes_in += i;
        });
    }
}

fn quota_error() -> io::Error {
    io::Error::other("aither egress: byte quota reached (net.quota.bytes)")
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.over_quota() {
            return Poll::Ready(Err(quota_error()));
        }
        let before = buf.filled().len();
        let r = match &mut self.inner {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        let n = (buf.filled().len() - before) as u64;
        self.inn += n;
        self.agent.quota.add_bytes(n);
        r
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.over_quota() {
            return Poll::Ready(Err(quota_error()));
        }
        let r = match &mut self.inner {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = &r {
            self.out += *n as u64;
            self.agent.quota.add_bytes(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_paths_must_be_normalised() {
        for ok in ["/api", "/api/", "/api/x", "/api/x/y?z", "/api/a%20b"] {
            let p = ok.split('?').next().unwrap();
            assert!(normalised_path(p).is_ok(), "{ok}");
        }
        for bad in [
            "//api/x",
            "///api",
            "/api//x",
            "/api/../x",
            "/api/./x",
            "/api/..",
            "/api/%2e%2e/x",
            "/api/%2F/x",
            "/api\\x",
            "/api/..;/x",
            "/api/.;x/y",
            "/",
            "api",
        ] {
            assert!(normalised_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_forward_no_reflecting_method() {
        let r = super::super::rules::RouteGrant::default();
        for m in ["GET", "POST", "DELETE"] {
            assert!(r.allows_method(m), "{m}");
        }
        for m in ["TRACE", "TRACK", "CONNECT", "OPTIONS", "PROPFIND"] {
            assert!(!r.allows_method(m), "{m}");
        }
        let only_get = super::super::rules::RouteGrant {
            methods: vec!["GET".into()],
            ..Default::default()
        };
        assert!(only_get.allows_method("GET") && !only_get.allows_method("POST"));
    }

    #[test]
    fn budgets_leave_the_manager_a_reserve() {
        let b = FdBudget::for_limit(1024);
        assert_eq!((b.total, b.per_agent), (512, 64));
        let b = FdBudget::for_limit(1 << 20);
        assert_eq!(b.per_agent, 2 * MAX_CONNECTIONS);
    }

    #[test]
    fn quotas_survive_a_snapshot() {
        let q = QuotaState::default();
        q.add_bytes(500);
        q.window.lock().unwrap().push_back(Instant::now());
        q.charge_tokens(
            "model",
            &TokenCharge {
                total_tokens: 42,
                ..TokenCharge::default()
            },
        );
        let snap = serde_json::to_string(&q.snapshot()).unwrap();
        let r = QuotaState::restore(&serde_json::from_str(&snap).unwrap());
        assert_eq!(r.bytes.load(Ordering::Relaxed), 500);
        assert_eq!(r.window.lock().unwrap().len(), 1);
        let t = r.token_usage();
        assert_eq!(
            (t[0].service.as_str(), t[0].day, t[0].total),
            ("model", 42, 42)
        );
        // A state stored before token ledgers existed reads as none.
        let old: QuotaSnapshot =
            serde_json::from_str(r#"{"bytes":1,"requests_ms":[],"services_ms":{}}"#).unwrap();
        assert!(QuotaState::restore(&old).token_usage().is_empty());
    }

    #[test]
    fn token_quotas_refuse_once_reached_and_say_which() {
        let g = ServiceGrant {
            name: "model".into(),
            api: Some(super::super::rules::ServiceApi::Openai),
            tokens_per_minute: Some(1000),
            tokens_per_day: Some(100),
            ..Default::default()
        };
        let a = AgentNet::new(
            "a",
            NetGrants {
                services: vec![g.clone()],
                ..Default::default()
            },
        );
        let c = |t| TokenCharge {
            total_tokens: t,
            ..TokenCharge::default()
        };
        a.charge_tokens("model", &c(60));
        a.admit(Some(&g)).unwrap();
        // Charged after the response: the request that crosses the limit was served.
        a.charge_tokens("model", &c(60));
        let e = a.admit(Some(&g)).unwrap_err();
        assert!(
            matches!(
                &e,
                QuotaError::Tokens {
                    used: 120,
                    limit: 100,
                    window: "day",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains(
                "120 of 100 tokens used in the last day (net.services.model.tokens_per_day)"
            ),
            "{e}"
        );
        assert_eq!(a.token_usage()[0].day, 120);
        // The refusal the agent sees: an OpenAI error object.
        let d = Denied {
            rule: "quota".into(),
            reason: e.to_string(),
            openai: Some(("tokens", 600)),
        };
        let r = deny_response(&d);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "600");
        assert_eq!(r.headers()["content-type"], "application/json");
        // Another agent's ledger is its own.
        let b = AgentNet::new(
            "b",
            NetGrants {
                services: vec![g.clone()],
                ..Default::default()
            },
        );
        b.admit(Some(&g)).unwrap();
    }

    #[test]
    fn quotas_admit_exactly_the_limit() {
        let a = AgentNet::new(
            "a",
            NetGrants {
                quota: super::super::rules::NetQuota {
                    requests_per_minute: Some(3),
                    bytes: None,
                },
                ..Default::default()
            },
        );
        for _ in 0..3 {
            a.admit(None).unwrap();
        }
        let e = a.admit(None).unwrap_err();
        assert_eq!(
            e,
            QuotaError::Requests {
                limit: 3,
                field: "net.quota.requests_per_minute".into()
            }
        );
        assert!(e.to_string().contains("3 per minute"), "{e}");
    }
}
