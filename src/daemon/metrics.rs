//! Prometheus metrics (`[metrics] listen` in aitherd.toml, `aitherd --metrics ADDR`): a tiny
//! HTTP/1.1 responder for `GET /metrics` in the text exposition format. On by default on a
//! Unix socket beside the control socket (/run/aither/metrics.sock, 0660 root:aither); a TCP
//! address has no authentication, so bind it to loopback or a private network.
//! docs/observability.md lists the series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use super::config::Listen;

use super::supervise::State;
use super::Shared;

/// Counters fed by the daemon's events.
#[derive(Default)]
pub struct Counters {
    inner: Mutex<BTreeMap<(String, String), u64>>,
}

impl Counters {
    /// Counts one event of `kind` (with a label value where it has one).
    pub fn count(&self, kind: &str, data: &serde_json::Value) {
        let key = match kind {
            "started" => ("aither_starts_total", String::new()),
            "backoff" => ("aither_restarts_total", String::new()),
            "failed" => ("aither_failures_total", String::new()),
            "exited" => (
                "aither_exits_total",
                data["reason"]["kind"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string(),
            ),
            "pain" => (
                "aither_pain_events_total",
                data["signal"].as_str().unwrap_or("unknown").to_string(),
            ),
            "watchdog_miss" => ("aither_watchdog_misses_total", String::new()),
            "health" if data["ok"] == false => ("aither_health_failures_total", String::new()),
            "access_denied" => ("aither_control_denied_total", String::new()),
            "net.allowed" | "net.denied" => (
                "aither_egress_decisions_total",
                kind.trim_start_matches("net.").to_string(),
            ),
            "kernel_denial" => (
                "aither_kernel_denials_total",
                data["layer"].as_str().unwrap_or("unknown").to_string(),
            ),
            "gpu.granted" | "gpu.queued" | "gpu.preempted" | "gpu.evicted" => (
                "aither_gpu_decisions_total",
                kind.trim_start_matches("gpu.").to_string(),
            ),
            _ => return,
        };
        // A summary of decisions (docs/network.md, Bounds) stands for `suppressed` of them.
        let n = match (kind, data["suppressed"].as_u64()) {
            ("net.denied" | "net.allowed", Some(n)) => n,
            _ => 1,
        };
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((key.0.to_string(), key.1)).or_default() += n;
    }

    fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

const HELP: &[(&str, &str, &str)] = &[
    (
        "aither_egress_decisions_total",
        "counter",
        "Egress gateway decisions, by decision (allowed, denied).",
    ),
    (
        "aither_kernel_denials_total",
        "counter",
        "Kernel-reported denials of agents (audit records), by layer (landlock, seccomp).",
    ),
    (
        "aither_gpu_decisions_total",
        "counter",
        "MicroScheduler decisions, by kind (granted, queued, preempted, evicted).",
    ),
    (
        "aither_starts_total",
        "counter",
        "Sandboxes started (first starts and restarts).",
    ),
    (
        "aither_restarts_total",
        "counter",
        "Restarts scheduled by the restart policy.",
    ),
    (
        "aither_failures_total",
        "counter",
        "Agents marked failed by the burst limit.",
    ),
    ("aither_exits_total", "counter", "Runs ended, by reason."),
    (
        "aither_pain_events_total",
        "counter",
        "Pain signals, by signal (agent, oom, memory_pressure, cpu_throttling).",
    ),
    (
        "aither_watchdog_misses_total",
        "counter",
        "Watchdog deadlines missed.",
    ),
    (
        "aither_health_failures_total",
        "counter",
        "Failed health checks.",
    ),
    (
        "aither_control_denied_total",
        "counter",
        "Control-socket connections refused.",
    ),
];

fn label_name(metric: &str) -> &'static str {
    match metric {
        "aither_exits_total" => "reason",
        "aither_gpu_decisions_total" | "aither_egress_decisions_total" => "decision",
        "aither_kernel_denials_total" => "layer",
        _ => "signal",
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text.
pub fn render(d: &Shared) -> String {
    let mut out = String::new();
    render_agents(&mut out, d);
    render_spent(&mut out, d);
    render_bus(&mut out, d);
    render_gpu(&mut out, d);
    render_tokens(&mut out, d);
    render_counters(&mut out, d);
    out
}

/// `render`: agents by state, and each agent's restarts, memory, CPU and OOM kills.
fn render_agents(out: &mut String, d: &Shared) {
    let infos: Vec<super::agent::Info> = {
        let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .values()
            .map(|h| h.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    };
    let _ = writeln!(
        out,
        "# HELP aither_agents Agents by lifecycle state.\n# TYPE aither_agents gauge"
    );
    for s in [
        State::Created,
        State::Queued,
        State::Starting,
        State::Running,
        State::Ready,
        State::Unhealthy,
        State::Paused,
        State::Exited,
        State::Backoff,
        State::Failed,
        State::Stopped,
    ] {
        let n = infos.iter().filter(|i| i.state == s).count();
        let _ = writeln!(out, "aither_agents{{state=\"{s}\"}} {n}");
    }
    let per_agent: [(&str, &str, &str); 4] = [
        (
            "aither_agent_restarts",
            "gauge",
            "Restarts of the agent since aitherd started.",
        ),
        (
            "aither_agent_memory_bytes",
            "gauge",
            "Memory in use by the agent's cgroup.",
        ),
        (
            "aither_agent_cpu_percent",
            "gauge",
            "CPU use of the agent's cgroup, percent of one CPU.",
        ),
        (
            "aither_agent_oom_kills",
            "gauge",
            "OOM kills in the agent's current run.",
        ),
    ];
    for (name, ty, help) in per_agent {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
        for i in &infos {
            let v = match name {
                "aither_agent_restarts" => Some(i.restarts as f64),
                "aither_agent_memory_bytes" => i
                    .memory_bytes
                    .filter(|_| i.state.is_live())
                    .map(|m| m as f64),
                "aither_agent_cpu_percent" => i.cpu_percent.filter(|_| i.state.is_live()),
                _ => Some(i.oom_kills as f64),
            };
            if let Some(v) = v {
                let _ = writeln!(out, "{name}{{agent=\"{}\"}} {v}", esc(&i.name));
            }
        }
    }
}

/// `render`: What aitherd spends per agent.
fn render_spent(out: &mut String, d: &Shared) {
    // What aitherd spends per agent (docs/daemon.md "Bounds").
    let usages: Vec<(String, super::budget::UsageView)> =
        d.usages().into_iter().map(|(n, u)| (n, u.view())).collect();
    type Pick = fn(&super::budget::UsageView) -> f64;
    let spent: [(&str, &str, &str, Pick); 8] = [
        (
            "aither_agent_daemon_requests_total",
            "counter",
            "Requests the agent made on its channel.",
            |u| u.requests as f64,
        ),
        (
            "aither_agent_daemon_rate_limited_total",
            "counter",
            "Requests answered rate_limited (not done).",
            |u| u.rate_limited as f64,
        ),
        (
            "aither_agent_daemon_denied_total",
            "counter",
            "Requests denied by the agent's token.",
            |u| u.denied as f64,
        ),
        (
            "aither_agent_daemon_bytes_in_total",
            "counter",
            "Bytes of requests aitherd read from the agent's channel.",
            |u| u.bytes_in as f64,
        ),
        (
            "aither_agent_daemon_bytes_out_total",
            "counter",
            "Bytes aitherd wrote to the agent's channel (replies and bus messages).",
            |u| u.bytes_out as f64,
        ),
        (
            "aither_agent_daemon_cpu_seconds_total",
            "counter",
            "aitherd CPU time spent for the agent (request handling and bus replays).",
            |u| u.cpu_ms / 1000.0,
        ),
        (
            "aither_agent_bus_subscriptions",
            "gauge",
            "The agent's live bus subscriptions.",
            |u| u.bus_subscriptions as f64,
        ),
        (
            "aither_agent_bus_queued_bytes",
            "gauge",
            "Bytes queued in aitherd for the agent's subscriptions.",
            |u| u.bus_queued_bytes as f64,
        ),
    ];
    for (name, ty, help, pick) in spent {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
        for (n, u) in &usages {
            let _ = writeln!(out, "{name}{{agent=\"{}\"}} {}", esc(n), pick(u));
        }
    }
}

/// `render`: tokens per agent and metered service (docs/agents.md "Local inference as a
/// service"), for the agents the gateway serves now.
fn render_tokens(out: &mut String, d: &Shared) {
    let usages = d.token_usages();
    type Pick = fn(&crate::net::gateway::ServiceTokens) -> f64;
    let series: [(&str, &str, &str, Pick); 4] = [
        (
            "aither_agent_tokens_total",
            "counter",
            "Tokens charged to the agent on a metered service (api = \"openai\"), since its ledger began (agent name and token).",
            |t| t.total as f64,
        ),
        (
            "aither_agent_tokens_day",
            "gauge",
            "Tokens the agent used on a metered service over the last 24 h.",
            |t| t.day as f64,
        ),
        (
            "aither_agent_tokens_per_second",
            "gauge",
            "The agent's tokens per second on a metered service, averaged over the last minute.",
            |t| t.minute as f64 / 60.0,
        ),
        (
            "aither_agent_inference_responses_total",
            "counter",
            "Responses of a metered service charged to the agent.",
            |t| t.responses as f64,
        ),
    ];
    for (name, ty, help, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
        for (agent, services) in &usages {
            for t in services {
                let _ = writeln!(
                    out,
                    "{name}{{agent=\"{}\",service=\"{}\"}} {}",
                    esc(agent),
                    esc(&t.service),
                    pick(t)
                );
            }
        }
    }
}

/// `render`: The bus's log and live subscriptions.
fn render_bus(out: &mut String, d: &Shared) {
    // The bus (AitherFlux): the durable log and the live subscriptions.
    if let Ok((log, subs)) = d.bus.stats() {
        let gauges: [(&str, &str, f64); 6] = [
            (
                "aither_bus_last_seq",
                "Sequence number of the newest message published.",
                log.last_seq as f64,
            ),
            (
                "aither_bus_log_messages",
                "Messages kept in the durable log.",
                log.messages as f64,
            ),
            (
                "aither_bus_log_bytes",
                "Bytes kept in the durable log.",
                log.bytes as f64,
            ),
            (
                "aither_bus_subscriptions",
                "Live subscriptions.",
                subs.len() as f64,
            ),
            (
                "aither_bus_delivered",
                "Messages delivered to the live subscriptions.",
                subs.iter().map(|s| s.delivered).sum::<u64>() as f64,
            ),
            (
                "aither_bus_dropped",
                "Messages dropped by full live queues (drop-oldest).",
                subs.iter().map(|s| s.dropped).sum::<u64>() as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
    }
}

/// `render`: The GPU leases, queue and VRAM.
fn render_gpu(out: &mut String, d: &Shared) {
    // The MicroScheduler: leases, the queue, VRAM per device.
    let (leases, queued) = d.gpu.counts();
    let _ = writeln!(
        out,
        "# HELP aither_gpu_leases GPU leases held.\n# TYPE aither_gpu_leases gauge\naither_gpu_leases {leases}\n# HELP aither_gpu_queue_depth Requests waiting for a GPU.\n# TYPE aither_gpu_queue_depth gauge\naither_gpu_queue_depth {queued}"
    );
    let ls = d.gpu.ls();
    for (name, key, help) in [
        (
            "aither_gpu_vram_total_mb",
            "total_mb",
            "VRAM of the device, MiB.",
        ),
        (
            "aither_gpu_vram_reserved_mb",
            "reserved_mb",
            "VRAM reserved by leases, MiB.",
        ),
        (
            "aither_gpu_vram_used_mb",
            "used_mb",
            "VRAM in use as the backend reads it, MiB.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for dev in ls["devices"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{name}{{gpu=\"{}\",uuid=\"{}\"}} {}",
                dev["index"],
                esc(dev["uuid"].as_str().unwrap_or("")),
                dev[key].as_u64().unwrap_or(0)
            );
        }
    }
}

/// `render`: The event counters (`HELP`).
fn render_counters(out: &mut String, d: &Shared) {
    let snap = d.counters.snapshot();
    for (name, ty, help) in HELP {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
        let mut any = false;
        for ((m, label), v) in &snap {
            if m != name {
                continue;
            }
            any = true;
            if label.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{}=\"{}\"}} {v}", label_name(name), esc(label));
            }
        }
        if !any
            && !matches!(
                *name,
                "aither_exits_total"
                    | "aither_pain_events_total"
                    | "aither_gpu_decisions_total"
                    | "aither_egress_decisions_total"
                    | "aither_kernel_denials_total"
            )
        {
            let _ = writeln!(out, "{name} 0");
        }
    }
}

/// One connection: reads the request head (5 s at most), answers `GET /metrics`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(d: Shared, mut s: S) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while n < buf.len() {
            let got = s.read(&mut buf[n..]).await.ok()?;
            if got == 0 {
                return None;
            }
            n += got;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
        }
        None
    })
    .await;
    if !matches!(head, Ok(Some(()))) {
        return;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let first = line.lines().next().unwrap_or("");
    let (status, body) = if first.starts_with("GET /metrics ") || first == "GET /metrics" {
        ("200 OK", render(&d))
    } else {
        ("404 Not Found", "not found: try GET /metrics\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
}

/// Serves `GET /metrics` on a TCP `listener` until the task is aborted.
pub async fn serve(d: Shared, listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer(d.clone(), s));
    }
}

/// Serves `GET /metrics` on a Unix socket until the task is aborted.
pub async fn serve_unix(d: Shared, listener: UnixListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer(d.clone(), s));
    }
}

/// Binds the metrics socket: 0660 root:`group` (0600 without the group). A missing directory
/// is made 0755; an existing one is left as it is (it may be a shared one); a stale socket is
/// replaced, anything else at the path is refused.
fn bind_unix(path: &std::path::Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is at this path; aitherd does not replace it",
            ))
        }
        Err(_) => {}
    }
    super::server::bind_private(path, group)
}

/// The metrics listener in force: replaced at a reload that changes `metrics.listen`.
#[derive(Default)]
pub struct Server {
    running: Mutex<Option<(Listen, tokio::task::JoinHandle<()>)>>,
    /// The group that may read a Unix socket (aither), resolved at start.
    group: Mutex<Option<u32>>,
}

/// Why the metrics listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("binding the metrics listener {listen}: {source}")]
pub struct BindError {
    pub listen: String,
    #[source]
    pub source: std::io::Error,
}

impl Server {
    /// Serves on `listen` (in a tokio runtime), replacing what served before. On an error the
    /// listener before stays.
    pub fn start(&self, d: &Shared, listen: &Listen, group: Option<u32>) -> Result<(), BindError> {
        *self.group.lock().unwrap_or_else(|e| e.into_inner()) = group;
        self.switch(d, listen)
    }

    /// Moves the listener to `listen` (a reload), keeping the group given at start.
    pub fn switch(&self, d: &Shared, listen: &Listen) -> Result<(), BindError> {
        let group = *self.group.lock().unwrap_or_else(|e| e.into_inner());
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|(l, _)| l == listen) {
            return Ok(());
        }
        let err = |source| BindError {
            listen: listen.to_string(),
            source,
        };
        // The old Unix socket goes first: the new one may have the same path only when the
        // address is unchanged, which returned above.
        let task = match listen {
            Listen::Off => None,
            Listen::Unix(p) => {
                let l = bind_unix(p, group).map_err(err)?;
                tracing::info!(socket = %p.display(), "metrics on unix:{}", p.display());
                Some(tokio::spawn(serve_unix(d.clone(), l)))
            }
            Listen::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
                    .map_err(err)?;
                if !a.ip().is_loopback() {
                    tracing::warn!(%a, "metrics on a non-loopback address: they have no authentication");
                }
                tracing::info!(%a, "metrics on http://{a}/metrics");
                Some(tokio::spawn(serve(d.clone(), l)))
            }
        };
        if let Some((old, t)) = running.take() {
            t.abort();
            if let Listen::Unix(p) = old {
                let _ = std::fs::remove_file(p);
            }
        }
        *running = task.map(|t| (listen.clone(), t));
        Ok(())
    }

    /// Stops serving and removes a Unix socket (the daemon's exit).
    pub fn stop(&self) {
        if let Some((l, t)) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
            if let Listen::Unix(p) = l {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
