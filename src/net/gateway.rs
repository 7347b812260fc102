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
//! carry any protocol); a CONNECT request inside a tunnel is refused in every case.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

use super::addr::internal_reason;
use super::inspect::{first_flight, Flight};
use super::resolve::Resolve;
use super::rules::{NetGrants, ServiceTarget, Upstream, SERVICE_DOMAIN};
use super::socks::{socks5_request, socks_reply, SocksAsk};

/// Longest an agent may take to send a request head, a SOCKS5 handshake or a tunnel's first
/// TLS flight (slow clients are cut after it; the gateway serves others meanwhile).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper answers 431 above it).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Connections one agent may hold open at once (more are accepted and closed at once).
pub const MAX_CONNECTIONS: usize = 4096;
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
}

impl NetEvent {
    /// The bus subject of the event.
    pub fn subject(&self) -> &'static str {
        if self.allowed {
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

/// Where secrets for credential routes come from (the host's secret store).
pub trait SecretSource: Send + Sync {
    fn get(&self, name: &str) -> Option<String>;
}

/// Receives every decision (audit log, daemon events). Must not block.
pub type EventSink = Arc<dyn Fn(&NetEvent) + Send + Sync>;

/// How a gateway is built.
pub struct GatewayConfig {
    pub resolver: Box<dyn Resolve>,
    pub events: EventSink,
    pub secrets: Option<Arc<dyn SecretSource>>,
    /// Extra trust anchors for route upstreams (PEM file; tests use a local CA).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
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
    published: RwLock<HashMap<String, Published>>,
    tls: Arc<rustls::ClientConfig>,
}

/// One agent as the gateway sees it: its grants and its accounting.
pub struct AgentNet {
    pub name: String,
    pub grants: NetGrants,
    stats: Mutex<BTreeMap<String, RuleStats>>,
    window: Mutex<VecDeque<Instant>>,
    service_windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    bytes: AtomicU64,
    open: AtomicUsize,
}

impl AgentNet {
    pub fn new(name: &str, grants: NetGrants) -> Arc<AgentNet> {
        Arc::new(AgentNet {
            name: name.to_string(),
            grants,
            stats: Mutex::new(BTreeMap::new()),
            window: Mutex::new(VecDeque::new()),
            service_windows: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        })
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

    /// Admits one request or connection against the quotas, or says which one it hits.
    fn admit(&self, service: Option<(&str, Option<u64>)>) -> Result<(), String> {
        if let Some(limit) = self.grants.quota.bytes {
            let used = self.bytes.load(Ordering::Relaxed);
            if used >= limit {
                return Err(format!(
                    "byte quota reached: {used} of {limit} bytes used (net.quota.bytes)"
                ));
            }
        }
        let now = Instant::now();
        let slide = |w: &mut VecDeque<Instant>, limit: u64, what: &str| -> Result<(), String> {
            while w
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                w.pop_front();
            }
            if w.len() as u64 >= limit {
                return Err(format!(
                    "request quota reached: {limit} per minute ({what}); retry later"
                ));
            }
            Ok(())
        };
        // Both windows are checked before either is charged: a refused request costs nothing.
        let mut global = self.window.lock().map_err(|_| "quota state poisoned")?;
        if let Some(l) = self.grants.quota.requests_per_minute {
            slide(&mut global, l, "net.quota.requests_per_minute")?;
        }
        if let Some((name, Some(l))) = service {
            let mut sw = self
                .service_windows
                .lock()
                .map_err(|_| "quota state poisoned")?;
            let w = sw.entry(name.to_string()).or_default();
            slide(w, l, &format!("net.services.{name}.requests_per_minute"))?;
            w.push_back(now);
        }
        if self.grants.quota.requests_per_minute.is_some() {
            global.push_back(now);
        }
        Ok(())
    }
}

/// A denial: the rule that decided and what the agent is told.
struct Denied {
    rule: String,
    reason: String,
}

fn denied(rule: impl Into<String>, reason: impl Into<String>) -> Denied {
    Denied {
        rule: rule.into(),
        reason: reason.into(),
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

struct Allowed {
    rule: String,
    dest: Dest,
    /// A granted service (its quota, and any protocol inside a tunnel).
    service: Option<(String, Option<u64>)>,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig) -> Gateway {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in cfg.extra_roots {
            let _ = roots.add(c);
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
            }),
        }
    }

    /// Makes `name` reachable (to agents granted it) at `target`: a service an agent published.
    pub fn publish(&self, name: &str, target: Published) {
        if let Ok(mut p) = self.shared.published.write() {
            p.insert(name.to_string(), target);
        }
    }

    pub fn unpublish(&self, name: &str) {
        if let Ok(mut p) = self.shared.published.write() {
            p.remove(name);
        }
    }

    /// Serves `agent` on `listener` (the socket on the sandbox's loopback) until the listener
    /// fails or the task is aborted. Must run inside a tokio runtime.
    pub async fn serve(&self, listener: std::net::TcpListener, agent: Arc<AgentNet>) {
        let _ = listener.set_nonblocking(true);
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                // EMFILE and friends: back off instead of spinning; the agent retries.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if agent.open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                drop(stream);
                continue;
            }
            agent.open.fetch_add(1, Ordering::Relaxed);
            let (gw, agent) = (self.clone(), agent.clone());
            tokio::spawn(async move {
                gw.connection(stream, &agent).await;
                agent.open.fetch_sub(1, Ordering::Relaxed);
            });
        }
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
        } else {
            agent.count(&ev.rule, |s| s.denials += 1);
        }
        (self.shared.events)(&ev);
    }

    async fn connection(&self, stream: TcpStream, agent: &Arc<AgentNet>) {
        let _ = stream.set_nodelay(true);
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] == 0x05 {
            self.socks5(stream, agent).await;
            return;
        }
        let cache: Arc<tokio::sync::Mutex<Option<Pooled>>> = Arc::default();
        let (gw, ag) = (self.clone(), agent.clone());
        let svc = hyper::service::service_fn(move |req| {
            let (gw, ag, cache) = (gw.clone(), ag.clone(), cache.clone());
            async move { Ok::<_, Infallible>(gw.http(req, &ag, &cache).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), svc)
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
                Some(t) => Published::Host(ServiceTarget::parse(t).map_err(|e| denied(&rule, e))?),
                None => self
                    .shared
                    .published
                    .read()
                    .ok()
                    .and_then(|p| p.get(name).cloned())
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
                service: Some((name.to_string(), g.requests_per_minute)),
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
        let ips = self
            .shared
            .resolver
            .resolve(h)
            .await
            .map_err(|e| denied(&rule, format!("cannot resolve {h}: {e}")))?;
        if ips.is_empty() {
            return Err(denied(&rule, format!("{h} has no address")));
        }
        for ip in &ips {
            if let Some(why) = internal_reason(*ip) {
                if !self.shared.resolver.treat_as_external(*ip) {
                    return Err(denied(
                        &rule,
                        format!(
                            "{h} resolves to {ip} ({why}): internal addresses are reachable only as granted services"
                        ),
                    ));
                }
            }
        }
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
        };
        let decided = self
            .decide(
                agent,
                host,
                port,
                if via == "http" { method } else { None },
                lookup,
            )
            .await
            .and_then(|a| {
                agent
                    .admit(a.service.as_ref().map(|(n, l)| (n.as_str(), *l)))
                    .map(|_| a)
                    .map_err(|r| denied("quota", r))
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
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.connect(req, agent).await;
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

    async fn connect(&self, req: Request<Incoming>, agent: &Arc<AgentNet>) -> Response<Body> {
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
        let upstream = match open(&allowed.dest).await {
            Ok(s) => s,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("aither egress: cannot reach {host}:{port}: {e}"),
                )
            }
        };
        let (gw, agent) = (self.clone(), agent.clone());
        tokio::spawn(async move {
            if let Ok(up) = hyper::upgrade::on(req).await {
                gw.tunnel(
                    TokioIo::new(up),
                    upstream,
                    &agent,
                    &host,
                    port,
                    allowed,
                    "connect",
                )
                .await;
            }
        });
        Response::new(empty())
    }

    /// Carries a tunnel once its first flight passed the checks.
    #[allow(clippy::too_many_arguments)]
    async fn tunnel<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        mut client: C,
        upstream: Stream,
        agent: &Arc<AgentNet>,
        host: &str,
        port: u16,
        allowed: Allowed,
        via: &'static str,
    ) {
        let plain_ok = via == "socks5";
        let first = match first_flight(&mut client, host, allowed.service.is_some(), plain_ok).await
        {
            Ok((b, Flight::Relay)) => b,
            Ok((b, Flight::PlainHttp)) => {
                // The connection opened for a tunnel is not used: requests go through the
                // plain-HTTP path (rules, methods, Host, pooling), one decision each.
                drop(upstream);
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
                        reason: Some(reason),
                    },
                );
                return;
            }
        };
        let mut up = Metered::new(upstream, agent.clone(), allowed.rule.clone());
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
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(client), svc)
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
            let stream = match open(&allowed.dest).await {
                Ok(s) => s,
                Err(e) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("aither egress: cannot reach {host}:{port}: {e}"),
                    )
                }
            };
            let io = Metered::new(stream, agent.clone(), allowed.rule.clone());
            match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    *slot = Some(Pooled { key, sender });
                }
                Err(e) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("aither egress: {host}:{port}: {e}"),
                    )
                }
            }
        }
        let Some(pooled) = slot.as_mut() else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: no upstream");
        };
        let origin = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = origin.parse().unwrap_or_else(|_| Uri::from_static("/"));
        strip_hop_headers(req.headers_mut());
        // Host is always the name that was decided: an agent's own Host header could make a
        // virtual-hosting upstream (a CDN) serve another site (domain fronting).
        if let Ok(v) = HeaderValue::from_str(&authority(&host, port, 80)) {
            req.headers_mut().insert(HOST, v);
        }
        if pooled.sender.ready().await.is_err() {
            *slot = None;
            return text(
                StatusCode::BAD_GATEWAY,
                "aither egress: the upstream closed the connection",
            );
        }
        match pooled.sender.send_request(req).await {
            Ok(mut resp) => {
                strip_hop_headers(resp.headers_mut());
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                *slot = None;
                text(
                    StatusCode::BAD_GATEWAY,
                    &format!("aither egress: {host}:{port}: {e}"),
                )
            }
        }
    }

    /// `GET /NAME/rest` on the gateway itself: the credential route NAME.
    async fn route(&self, mut req: Request<Incoming>, agent: &Arc<AgentNet>) -> Response<Body> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let name = path
            .trim_start_matches('/')
            .split(['/', '?'])
            .next()
            .unwrap_or_default()
            .to_string();
        let Some(route) = agent.grants.routes.iter().find(|r| r.name == name).cloned() else {
            self.emit(
                agent,
                NetEvent {
                    agent: agent.name.clone(),
                    allowed: false,
                    rule: "default-deny".into(),
                    via: "route",
                    host: "gateway".into(),
                    port: 0,
                    method: Some(req.method().to_string()),
                    reason: Some(format!("no net.routes grant {name:?}")),
                },
            );
            return text(
                StatusCode::NOT_FOUND,
                &format!(
                    "aither egress: this is the sandbox's egress gateway; no route {name:?} is granted (set HTTP_PROXY/HTTPS_PROXY to reach allowed hosts)"
                ),
            );
        };
        let rest = &path[1 + name.len()..];
        let Ok(up) = Upstream::parse(&route.upstream) else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: bad route upstream");
        };
        let rule = format!("route:{name}");
        let method = req.method().to_string();
        let ev = |allowed: bool, reason: Option<String>| NetEvent {
            agent: agent.name.clone(),
            allowed,
            rule: rule.clone(),
            via: "route",
            host: up.host.clone(),
            port: up.port,
            method: Some(method.clone()),
            reason,
        };
        let checked = async {
            agent.admit(None).map_err(|r| denied("quota", r))?;
            let ips = self
                .shared
                .resolver
                .resolve(&up.host)
                .await
                .map_err(|e| denied(&rule, format!("cannot resolve {}: {e}", up.host)))?;
            for ip in &ips {
                if let Some(why) = internal_reason(*ip) {
                    if !self.shared.resolver.treat_as_external(*ip) {
                        return Err(denied(
                            &rule,
                            format!("{} resolves to {ip} ({why})", up.host),
                        ));
                    }
                }
            }
            let secret = self
                .shared
                .secrets
                .as_ref()
                .and_then(|s| s.get(&route.secret))
                .ok_or_else(|| {
                    denied(
                        &rule,
                        format!(
                            "secret {:?} is not set on the host (aitherctl secret set)",
                            route.secret
                        ),
                    )
                })?;
            Ok((ips, secret))
        }
        .await;
        let (ips, secret) = match checked {
            Ok(x) => {
                self.emit(agent, ev(true, None));
                x
            }
            Err(d) => {
                let mut e = ev(false, Some(d.reason.clone()));
                e.rule = d.rule.clone();
                self.emit(agent, e);
                return deny_response(&d);
            }
        };
        let addrs: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, up.port))
            .collect();
        let tcp = match open(&Dest::Tcp(addrs)).await {
            Ok(Stream::Tcp(t)) => t,
            Ok(_) => return text(StatusCode::BAD_GATEWAY, "aither egress: bad upstream"),
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("aither egress: cannot reach {}: {e}", up.host),
                )
            }
        };
        let Ok(server_name) = rustls::pki_types::ServerName::try_from(up.host.clone()) else {
            return text(StatusCode::BAD_GATEWAY, "aither egress: bad upstream name");
        };
        let tls = match tokio_rustls::TlsConnector::from(self.shared.tls.clone())
            .connect(
                server_name,
                Metered::new(Stream::Tcp(tcp), agent.clone(), rule.clone()),
            )
            .await
        {
            Ok(t) => t,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("aither egress: TLS to {}: {e}", up.host),
                )
            }
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
                Ok(x) => x,
                Err(e) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("aither egress: {}: {e}", up.host),
                    )
                }
            };
        tokio::spawn(conn);
        let target = format!("{}{}", up.path, if rest.is_empty() { "/" } else { rest });
        *req.uri_mut() = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        strip_hop_headers(req.headers_mut());
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
            Err(e) => text(
                StatusCode::BAD_GATEWAY,
                &format!("aither egress: {}: {e}", up.host),
            ),
        }
    }

    async fn socks5(&self, mut s: TcpStream, agent: &Arc<AgentNet>) {
        let head = tokio::time::timeout(HEAD_TIMEOUT, socks5_request(&mut s)).await;
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
        let upstream = match open(&allowed.dest).await {
            Ok(u) => u,
            Err(_) => {
                let _ = s.write_all(&socks_reply(0x05)).await;
                return;
            }
        };
        if s.write_all(&socks_reply(0x00)).await.is_err() {
            return;
        }
        self.tunnel(s, upstream, agent, &host, port, allowed, "socks5")
            .await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Resolve,
    Skip,
}

struct Pooled {
    key: (String, u16),
    sender: hyper::client::conn::http1::SendRequest<Incoming>,
}

fn authority(host: &str, port: u16, default: u16) -> String {
    if port == default {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
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
    let status = if d.rule == "quota" {
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
async fn socket_in_netns(ns: Arc<OwnedFd>) -> io::Result<OwnedFd> {
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
}

impl Metered {
    fn new(inner: Stream, agent: Arc<AgentNet>, rule: String) -> Metered {
        Metered {
            inner,
            agent,
            rule,
            out: 0,
            inn: 0,
        }
    }

    fn over_quota(&self) -> bool {
        self.agent
            .grants
            .quota
            .bytes
            .is_some_and(|l| self.agent.bytes.load(Ordering::Relaxed) > l)
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
        self.agent.bytes.fetch_add(n, Ordering::Relaxed);
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
            self.agent.bytes.fetch_add(*n as u64, Ordering::Relaxed);
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
        assert!(e.contains("3 per minute"), "{e}");
    }
}
