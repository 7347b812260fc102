//! Ports of an agent published on the host's loopback (`aitherctl spawn --publish-host
//! HOSTADDR:HOSTPORT=AGENTPORT`, docs/network.md): aitherd listens on HOSTADDR:HOSTPORT and,
//! per accepted connection, connects to 127.0.0.1:AGENTPORT inside the agent's network
//! namespace and relays bytes both ways.
//!
//! The host side (docs/security-model.md): the namespace is the descriptor the launcher
//! opened before the agent existed (the shim's fd 101, taken with pidfd_getfd), never a
//! `/proc/PID` path looked up later, and each connecting socket is created in it on a
//! short-lived thread of its own (a socket stays in the namespace it was made in). Nothing the
//! agent says steers where aitherd listens or connects: both come from the spawn request.
//!
//! Bounds, per agent (all its published ports together): at most [`MAX_CONNECTIONS`] relayed
//! connections (more are accepted and closed at once, counted as `refused`); each holds two
//! fixed [`RELAY_BUFFER`] buffers and two sockets whose kernel buffers are pinned at
//! [`SOCKET_BUFFER`] (no autotuning). An agent that accepts and never reads thus costs aitherd
//! at most `MAX_CONNECTIONS × (2 × RELAY_BUFFER + 2 × 2 × SOCKET_BUFFER)` (the kernel doubles
//! what is set), whatever the host's clients send; a connection with no byte either way for
//! [`IDLE_TIMEOUT`] is closed, so such an agent cannot hold its slots for good either.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aither_proto::publish::HostPublish;
use nix::sys::socket::{setsockopt, sockopt};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Shared;

use super::budget::Usage;
pub use super::budget::{
    HOST_RELAY_BUFFER as RELAY_BUFFER, HOST_RELAY_CONNECTIONS as MAX_CONNECTIONS,
    HOST_RELAY_IDLE as IDLE_TIMEOUT, HOST_RELAY_SOCKET_BUFFER as SOCKET_BUFFER,
};

/// Why a port cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("--publish-host {spec}: {addr} is already in use on the host; pick another HOSTPORT (`ss -ltnp 'sport = :{port}'` shows who holds it)", port = addr.port())]
    InUse { spec: HostPublish, addr: SocketAddr },
    #[error("--publish-host {spec}: cannot listen on {addr}: {source}")]
    Bind {
        spec: HostPublish,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Counters of one published port (`inspect`); the agent's totals are also in its
/// `daemon_usage` (`host_relays`, `host_relay_bytes`).
#[derive(Debug, Default, Serialize)]
pub struct PortStats {
    /// The form given to `--publish-host`.
    pub publish: String,
    /// Connections relayed now.
    pub active: u64,
    /// Connections relayed since the listener opened.
    pub accepted: u64,
    /// Connections closed at once: over the agent's limit, or no run to reach.
    pub refused: u64,
    /// Connections whose connect inside the sandbox failed (nothing listening).
    pub failed: u64,
    /// Bytes host → agent and agent → host, of connections that ended.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Default)]
struct Counters {
    active: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// What the listeners of one agent share: the run they reach and their counters.
pub struct PortsState {
    ports: Vec<(HostPublish, Counters)>,
    /// The current run's network namespace; None between runs (connections are refused).
    target: Mutex<Option<Arc<OwnedFd>>>,
    slots: Arc<Semaphore>,
    /// What aitherd spends for the agent (`inspect`'s `daemon_usage`), charged here too.
    usage: Arc<Usage>,
}

impl PortsState {
    /// Connections from now on reach the run whose namespace is `ns` (None: no run).
    pub fn set_target(&self, ns: Option<Arc<OwnedFd>>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = ns;
    }

    fn target(&self) -> Option<Arc<OwnedFd>> {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Each port's counters, for `inspect`.
    pub fn stats(&self) -> Vec<PortStats> {
        self.ports
            .iter()
            .map(|(p, c)| PortStats {
                publish: p.to_string(),
                active: c.active.load(Ordering::Relaxed),
                accepted: c.accepted.load(Ordering::Relaxed),
                refused: c.refused.load(Ordering::Relaxed),
                failed: c.failed.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// An agent's listeners on the host; dropping it closes them (and the relays in progress).
pub struct HostPorts {
    state: Arc<PortsState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    name: String,
    d: Shared,
}

impl HostPorts {
    pub fn state(&self) -> &Arc<PortsState> {
        &self.state
    }

    /// Closes the listeners and returns once they are closed (dropping only asks the runtime
    /// to): a `stop` or `rm` that returns has freed the host ports for the next user.
    pub async fn close(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            // An aborted task's future, and its listener with it, is dropped when this
            // returns.
            let _ = t.await;
        }
    }
}

impl Drop for HostPorts {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Only this agent's entry: a new spawn of the same name may have put its own.
        let mut map = self.d.host_ports.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.name)
            .is_some_and(|s| Arc::ptr_eq(s, &self.state))
        {
            map.remove(&self.name);
        }
        drop(map);
        for (p, _) in &self.state.ports {
            self.d.emit(
                Some(&self.name),
                "net.host_unpublished",
                json!({"publish": p.to_string()}),
            );
        }
    }
}

/// Listens on every host address of `list` for agent `name`. All or nothing: one address
/// that cannot be bound closes the others. Must run inside the tokio runtime.
pub fn open(d: &Shared, name: &str, list: &[HostPublish]) -> Result<HostPorts, PublishError> {
    let mut listeners = Vec::with_capacity(list.len());
    for p in list {
        let l = StdListener::bind(p.host).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                PublishError::InUse {
                    spec: *p,
                    addr: p.host,
                }
            } else {
                PublishError::Bind {
                    spec: *p,
                    addr: p.host,
                    source,
                }
            }
        })?;
        let bind_err = |source| PublishError::Bind {
            spec: *p,
            addr: p.host,
            source,
        };
        // Inherited by every accepted socket: its receive buffer stays this small.
        setsockopt(&l, sockopt::RcvBuf, &SOCKET_BUFFER)
            .map_err(|e| bind_err(io::Error::from(e)))?;
        l.set_nonblocking(true).map_err(bind_err)?;
        listeners.push(TcpListener::from_std(l).map_err(bind_err)?);
    }
    let state = Arc::new(PortsState {
        ports: list.iter().map(|p| (*p, Counters::default())).collect(),
        target: Mutex::new(None),
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        usage: d.usage_of(name),
    });
    let tasks = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| tokio::spawn(accept_loop(state.clone(), i, l)))
        .collect();
    d.host_ports
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), state.clone());
    for p in list {
        d.emit(
            Some(name),
            "net.host_published",
            json!({"publish": p.to_string(), "host": p.host.to_string(), "agent_port": p.agent_port}),
        );
    }
    Ok(HostPorts {
        state,
        tasks,
        name: name.to_string(),
        d: d.clone(),
    })
}

/// Whether `fd` is a network namespace (NS_GET_NSTYPE): a descriptor taken from a shim by
/// number is checked before anything is created in it.
pub fn is_netns(fd: &OwnedFd) -> bool {
    // NS_GET_NSTYPE = _IO(0xb7, 0x3) (linux/nsfs.h).
    nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);
    // SAFETY: an ioctl without an argument on a descriptor we own.
    let t = unsafe { ns_get_nstype(fd.as_raw_fd()) };
    t == Ok(libc::CLONE_NEWNET)
}

async fn accept_loop(state: Arc<PortsState>, i: usize, listener: TcpListener) {
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors or memory: wait a moment rather than spin on the error.
                tracing::warn!(error = %e, "accepting on a published port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let counters = &state.ports[i].1;
        let (Ok(permit), Some(ns)) = (state.slots.clone().try_acquire_owned(), state.target())
        else {
            // Over the agent's limit, or between runs: closed at once, nothing buffered.
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(conn);
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.active.fetch_add(1, Ordering::Relaxed);
        state.usage.add(&state.usage.host_relays, 1);
        let st = state.clone();
        tokio::spawn(async move {
            relay(&st, i, conn, ns).await;
            st.ports[i].1.active.fetch_sub(1, Ordering::Relaxed);
            st.usage.host_relays.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Connects to 127.0.0.1:AGENTPORT in `ns` and relays until either side closes.
async fn relay(state: &PortsState, i: usize, conn: TcpStream, ns: Arc<OwnedFd>) {
    let (spec, counters) = &state.ports[i];
    let inner = match connect_in(ns, spec.agent_port).await {
        Ok(s) => s,
        Err(_) => {
            // Nothing listening inside (yet): the client sees the connection closed.
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = conn.set_nodelay(true);
    let _ = inner.set_nodelay(true);
    let last = Arc::new(AtomicU64::new(mono_ms()));
    let mut host = Touching {
        inner: conn,
        last: last.clone(),
        read: 0,
    };
    let mut agent = Touching {
        inner,
        last: last.clone(),
        read: 0,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut host, &mut agent, RELAY_BUFFER, RELAY_BUFFER) => {}
        // A side that neither reads nor writes (an agent that never reads, a client gone
        // without a word behind a full window) would hold its slot for good.
        _ = idle(&last, IDLE_TIMEOUT) => {}
    }
    // What was read from each side, however the relay ended.
    counters.bytes_in.fetch_add(host.read, Ordering::Relaxed);
    counters.bytes_out.fetch_add(agent.read, Ordering::Relaxed);
    state
        .usage
        .add(&state.usage.host_relay_bytes, host.read + agent.read);
}

/// Milliseconds since the first call (the clock of the idle timeout).
fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Returns once `last` (a `mono_ms` time) is `limit` old.
async fn idle(last: &AtomicU64, limit: Duration) {
    loop {
        let since = Duration::from_millis(mono_ms().saturating_sub(last.load(Ordering::Relaxed)));
        if since >= limit {
            return;
        }
        tokio::time::sleep(limit - since).await;
    }
}

/// One side of a relay: marks the time of every byte read or written.
struct Touching<S> {
    inner: S,
    last: Arc<AtomicU64>,
    /// Bytes read from this side.
    read: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.last.store(mono_ms(), Ordering::Relaxed);
            self.read += n as u64;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.store(mono_ms(), Ordering::Relaxed);
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

async fn connect_in(ns: Arc<OwnedFd>, port: u16) -> io::Result<TcpStream> {
    let fd = crate::net::gateway::socket_in_netns(ns).await?;
    // Its send buffer stays small: an agent that never reads holds at most this much here.
    setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
    tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}
