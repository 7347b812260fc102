//! What aitherd spends for each agent, and the budget that bounds it (docs/daemon.md,
//! "Bounds"): a token bucket per agent over its fd-3 requests (every request counts: pain,
//! denied requests and memory queries included), a tighter one for requests that write a
//! durable event (`pain`, `status`), one over the bytes of durable bus publishes, one over
//! aitherd's CPU time spent on the agent's requests (measured, so that a query that costs
//! more is charged more), and the counters `aitherctl inspect` and the metrics show (requests, bytes, aitherd CPU time).
//!
//! Over budget, a request is answered `rate_limited` and not done: no event, no bus message,
//! no audit record of its own (the refusals are summarised, see [`super::summary`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Instant;

use serde::Serialize;

use super::config::Limits;

/// Requests per second an agent may make on its channel, sustained.
pub const REQUEST_RATE: f64 = 200.0;
/// Requests an agent may make in a burst above the rate.
pub const REQUEST_BURST: f64 = 400.0;
/// What a memory query (search, graph walk, list, export page) costs in requests: each does
/// SQLite work that a `heartbeat` does not.
pub const QUERY_COST: f64 = 10.0;
/// aitherd CPU seconds an agent's requests may use per second, sustained (a tenth of a CPU),
/// and in a burst. Measured around each request (CLOCK_THREAD_CPUTIME_ID) and charged after
/// it: a request is refused while the agent is in debt.
pub const CPU_RATE: f64 = 0.1;
pub const CPU_BURST: f64 = 1.0;
/// Event-writing requests (`pain`, `status`) per second, sustained; each becomes an event in
/// state.db, a durable bus message and (pain) an audit record, all shared with other agents.
pub const EVENT_RATE: f64 = 2.0;
/// Event-writing requests in a burst.
pub const EVENT_BURST: f64 = 20.0;
/// Bytes of durable bus publishes per second, sustained (the log is shared: 256 MiB of it
/// at this rate takes more than 15 minutes of one agent's flooding to rotate).
pub const DURABLE_RATE: f64 = 256.0 * 1024.0;
/// Bytes of durable publishes in a burst.
pub const DURABLE_BURST: f64 = 2.0 * 1024.0 * 1024.0;

/// Connections to an agent's ports published on the host (`spawn --publish-host`) that
/// aitherd relays at once, over all its published ports (daemon/publish.rs); more are closed
/// at once.
pub const HOST_RELAY_CONNECTIONS: usize = 64;
/// Bytes aitherd buffers per direction of one relayed connection.
pub const HOST_RELAY_BUFFER: usize = 16 * 1024;
/// SO_RCVBUF / SO_SNDBUF of both sockets of a relayed connection (the kernel doubles it; no
/// autotuning): what an agent that never reads can make the kernel hold for aitherd.
pub const HOST_RELAY_SOCKET_BUFFER: usize = 64 * 1024;
/// A relayed connection with no byte either way for this long is closed.
pub const HOST_RELAY_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// A token bucket: `rate` tokens a second up to `burst`. Its own rather than
/// `audit::summary::TokenBucket` (one whole token per take): costs here are weighted (a query
/// counts 10, a publish its bytes) and the CPU budget is charged after the fact, into debt.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether `cost` tokens are there now (they are not taken).
    pub fn has(&mut self, now: Instant, cost: f64) -> bool {
        self.refill(now);
        self.tokens >= cost
    }

    /// Takes `cost` tokens if they are there.
    pub fn take(&mut self, now: Instant, cost: f64) -> bool {
        if self.has(now, cost) {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Takes `cost` tokens even if that leaves the bucket in debt (a cost known only after).
    pub fn spend(&mut self, now: Instant, cost: f64) {
        self.refill(now);
        self.tokens -= cost;
    }

    /// Milliseconds until `cost` tokens are there (0: now).
    pub fn wait_ms(&self, cost: f64) -> u64 {
        if self.tokens >= cost {
            0
        } else {
            (((cost - self.tokens) / self.rate) * 1000.0).ceil() as u64
        }
    }
}

/// Which budget refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Requests,
    Events,
    DurableBytes,
    Cpu,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Events => "events",
            Limit::DurableBytes => "durable_bytes",
            Limit::Cpu => "cpu",
        }
    }
}

/// A refusal: which budget, its terms, when to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_ms: u64,
    /// The budget's terms in force ("200/s, burst 400; ..."), for the message.
    pub terms: String,
}

impl Refused {
    /// The reply's message.
    pub fn message(&self, agent: &str) -> String {
        let terms = &self.terms;
        format!(
            "rate limited: agent {agent:?} is over its {} budget ({terms}); nothing was done; retry in {} ms",
            self.limit.as_str(),
            self.retry_ms
        )
    }
}

/// The terms of the budget `limit` under `l`, for a refusal's message.
fn terms(l: &Limits, limit: Limit) -> String {
    match limit {
        Limit::Requests => format!(
            "{}/s, burst {}; a memory query counts {QUERY_COST}",
            l.request_rate, l.request_burst
        ),
        Limit::Events => format!(
            "pain and status: {}/s, burst {}",
            l.event_rate, l.event_burst
        ),
        Limit::DurableBytes => format!(
            "durable publishes: {}/s, burst {}",
            l.durable_rate, l.durable_burst
        ),
        Limit::Cpu => format!(
            "aitherd CPU time: {} s/s, burst {} s",
            l.cpu_rate, l.cpu_burst
        ),
    }
}

/// An agent's budget on its channel (kept across its runs).
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    requests: Bucket,
    events: Bucket,
    durable: Bucket,
    cpu: Bucket,
}

/// What one request costs, by its op (and for a durable publish, its payload).
pub fn cost_of(req: &serde_json::Value) -> (f64, bool, f64) {
    let op = req.get("op").and_then(|o| o.as_str()).unwrap_or("");
    let requests = match op {
        "mem.search"
        | "mem.list"
        | "mem.graph.neighbors"
        | "mem.graph.neighbours"
        | "mem.export" => QUERY_COST,
        _ => 1.0,
    };
    let event = matches!(op, "pain" | "status");
    let durable =
        if op == "bus.publish" && req.get("durable") == Some(&serde_json::Value::Bool(true)) {
            req.get("data").map_or(0, |d| d.to_string().len()) as f64
                + req
                    .get("subject")
                    .and_then(|s| s.as_str())
                    .map_or(0, str::len) as f64
        } else {
            0.0
        };
    (requests, event, durable)
}

impl Budget {
    /// A full budget on the built-in terms.
    pub fn new(now: Instant) -> Budget {
        Budget::with(&Limits::default(), now)
    }

    /// A full budget on the terms of `[limits]` (aitherd.toml) in force.
    pub fn with(l: &Limits, now: Instant) -> Budget {
        Budget {
            limits: *l,
            requests: Bucket::new(l.request_rate, l.request_burst, now),
            events: Bucket::new(l.event_rate, l.event_burst, now),
            durable: Bucket::new(l.durable_rate.0 as f64, l.durable_burst.0 as f64, now),
            cpu: Bucket::new(l.cpu_rate, l.cpu_burst, now),
        }
    }

    fn refused(&self, limit: Limit, retry_ms: u64) -> Refused {
        Refused {
            limit,
            retry_ms,
            terms: terms(&self.limits, limit),
        }
    }

    /// Charges aitherd's CPU time for a request, measured after it was handled.
    pub fn charge_cpu(&mut self, now: Instant, ns: u64) {
        self.cpu.spend(now, ns as f64 / 1e9);
    }

    /// Charges one request; Err when a budget it needs is spent (then nothing is taken from
    /// the others either, so that a refused publish does not eat the request budget twice).
    pub fn charge(&mut self, now: Instant, req: &serde_json::Value) -> Result<(), Refused> {
        let (cost, event, durable) = cost_of(req);
        // The request budget first: a flood of anything is refused by it.
        if !self.requests.has(now, cost) {
            return Err(self.refused(Limit::Requests, self.requests.wait_ms(cost)));
        }
        // In CPU debt: nothing more until the rate has paid it back.
        if !self.cpu.has(now, 0.0) {
            self.requests.take(now, 1.0);
            return Err(self.refused(Limit::Cpu, self.cpu.wait_ms(0.0)));
        }
        if event && !self.events.has(now, 1.0) {
            // A refused request still costs a request: refusing is work too.
            self.requests.take(now, 1.0);
            return Err(self.refused(Limit::Events, self.events.wait_ms(1.0)));
        }
        // A publish larger than the burst could never pass; it is refused by the bus's own
        // size limit (32 KiB) long before that.
        if durable > 0.0 && !self.durable.has(now, durable) {
            self.requests.take(now, 1.0);
            return Err(self.refused(Limit::DurableBytes, self.durable.wait_ms(durable)));
        }
        self.requests.take(now, cost);
        if event {
            self.events.take(now, 1.0);
        }
        if durable > 0.0 {
            self.durable.take(now, durable);
        }
        Ok(())
    }
}

/// What aitherd has spent for one agent since it started (all runs).
#[derive(Default)]
pub struct Usage {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub denied: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// CPU time of aitherd's threads handling the agent's requests (CLOCK_THREAD_CPUTIME_ID
    /// around each request), in ns.
    pub cpu_ns: AtomicU64,
    /// The current run's bus outbox (queued bytes, replay reads), while it lives.
    pub outbox: Mutex<Option<Weak<crate::bus::Outbox>>>,
    /// Connections aitherd relays now to its host-published ports, and the bytes it relayed
    /// (both ways) on them.
    pub host_relays: AtomicU64,
    pub host_relay_bytes: AtomicU64,
}

/// `Usage` as `inspect` shows it (`daemon_usage`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct UsageView {
    pub requests: u64,
    pub rate_limited: u64,
    pub denied: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// aitherd CPU time for this agent: request handling plus the bus's replay reads.
    pub cpu_ms: f64,
    pub bus_subscriptions: usize,
    pub bus_queued_bytes: u64,
    pub bus_replay_bytes: u64,
    /// Connections relayed now to its host-published ports (at most
    /// `HOST_RELAY_CONNECTIONS`), and the bytes relayed on them, both ways.
    pub host_relays: u64,
    pub host_relay_bytes: u64,
}

impl Usage {
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn view(&self) -> UsageView {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ob = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        let (subs, queued, replay_bytes, replay_ns) = ob.map_or((0, 0, 0, 0), |o| {
            let u = o.usage();
            (
                u.subscriptions,
                u.queued_bytes,
                u.replay_bytes,
                u.replay_cpu_ns,
            )
        });
        UsageView {
            requests: g(&self.requests),
            rate_limited: g(&self.rate_limited),
            denied: g(&self.denied),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            cpu_ms: (g(&self.cpu_ns) + replay_ns) as f64 / 1e6,
            bus_subscriptions: subs,
            bus_queued_bytes: queued,
            bus_replay_bytes: replay_bytes,
            host_relays: g(&self.host_relays),
            host_relay_bytes: g(&self.host_relay_bytes),
        }
    }
}

pub use crate::sys::thread_cpu_ns;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn a_flood_is_cut_at_the_burst_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let hb = json!({"op": "heartbeat"});
        let ok = (0..1000).filter(|_| b.charge(t0, &hb).is_ok()).count();
        assert_eq!(ok, REQUEST_BURST as usize);
        let e = b.charge(t0, &hb).unwrap_err();
        assert_eq!(e.limit, Limit::Requests);
        assert_eq!(e.retry_ms, 5);
        // One second later: the rate's worth again.
        let t1 = t0 + Duration::from_secs(1);
        let ok = (0..1000).filter(|_| b.charge(t1, &hb).is_ok()).count();
        assert_eq!(ok, REQUEST_RATE as usize);
    }

    #[test]
    fn pain_has_its_own_tighter_budget_and_queries_cost_more() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let pain = json!({"op": "pain", "severity": "info"});
        let ok = (0..100).filter(|_| b.charge(t0, &pain).is_ok()).count();
        assert_eq!(ok, EVENT_BURST as usize);
        assert_eq!(b.charge(t0, &pain).unwrap_err().limit, Limit::Events);
        // The other requests still pass.
        assert!(b.charge(t0, &json!({"op": "heartbeat"})).is_ok());
        let mut b = Budget::new(t0);
        let q = json!({"op": "mem.search", "query": "a"});
        let ok = (0..100).filter(|_| b.charge(t0, &q).is_ok()).count();
        assert_eq!(ok, (REQUEST_BURST / QUERY_COST) as usize);
    }

    #[test]
    fn cpu_debt_refuses_until_the_rate_has_paid_it_back() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let q = json!({"op": "mem.graph.neighbors", "node": "hub"});
        assert!(b.charge(t0, &q).is_ok());
        // The query took 1.5 s of aitherd's CPU: 0.5 s in debt.
        b.charge_cpu(t0, 1_500_000_000);
        let e = b.charge(t0, &q).unwrap_err();
        assert_eq!(e.limit, Limit::Cpu);
        assert_eq!(e.retry_ms, 5000);
        assert!(b.charge(t0 + Duration::from_secs(5), &q).is_ok());
    }

    #[test]
    fn durable_publishes_are_charged_by_their_bytes() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let big = json!({"op": "bus.publish", "subject": "a", "durable": true, "data": "x".repeat(30_000)});
        let ok = (0..200).filter(|_| b.charge(t0, &big).is_ok()).count();
        assert_eq!(ok, (DURABLE_BURST / 30_003.0) as usize);
        assert_eq!(b.charge(t0, &big).unwrap_err().limit, Limit::DurableBytes);
        // Live (not durable) publishes do not touch the byte budget.
        let live = json!({"op": "bus.publish", "subject": "a", "data": "x".repeat(30_000)});
        assert!(b.charge(t0, &live).is_ok());
    }
}
