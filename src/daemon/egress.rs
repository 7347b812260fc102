//! The daemon's egress gateway (docs/network.md): one `net::Gateway` shared by every agent,
//! serving each run's listening socket (bound by its shim inside the sandbox's network
//! namespace, taken from the shim with pidfd_getfd). Every decision is an audit record and an
//! event (`net.allowed` / `net.denied` on the agent, and `aither.net.allowed|denied` on the
//! bus); the counters per rule are in `aitherctl inspect` under `net`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde_json::json;

use super::{Daemon, Shared};
use crate::net::gateway::{QuotaSnapshot, QuotaState};
use crate::net::{self, AgentNet, Gateway, GatewayConfig, NetEvent, NetGrants};

/// Stops serving an agent's socket when its run ends.
pub struct Serving {
    task: tokio::task::JoinHandle<()>,
    name: String,
    token: String,
    quota: Arc<QuotaState>,
    d: Shared,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
        // The quota state as the run leaves it (the next run, or the next daemon, goes on
        // from there), and the run's denials still being summarised.
        persist_quota(&self.d, &self.name, &self.token, &self.quota);
        self.d.gateway().flush_summaries_now(Some(&self.name));
        let agent = self
            .d
            .net_agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        // The run's last usage window of its metered services (docs/agents.md).
        if let Some(a) = agent {
            self.d.gateway().flush_usage(&a, true);
        }
    }
}

fn persist_quota(d: &Shared, name: &str, token: &str, q: &QuotaState) {
    q.take_dirty();
    d.store.put_net_quota(
        name,
        token,
        &serde_json::to_value(q.snapshot()).unwrap_or_default(),
    );
}

/// How often a serving run's quota state is written while it changes.
const QUOTA_PERSIST: std::time::Duration = std::time::Duration::from_secs(1);

/// The quota state of agent `name` under token `token`: the one its previous runs charged
/// (in memory), else the stored one (a previous daemon's), else a fresh one.
fn quota_for(d: &Shared, name: &str, token: &str) -> Arc<QuotaState> {
    let key = (name.to_string(), token.to_string());
    let mut map = d.net_quotas.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(q) = map.get(&key) {
        return q.clone();
    }
    let stored = d
        .store
        .reader()
        .and_then(|c| crate::daemon::store::load_net_quota(&c, d.store.path(), name, token));
    let q = match stored {
        Ok(Some(v)) => match serde_json::from_value::<QuotaSnapshot>(v) {
            Ok(s) => Arc::new(QuotaState::restore(&s)),
            Err(e) => {
                // Fail closed would block the agent for good; a fresh state is logged loudly.
                tracing::error!(agent = name, error = %e, "stored egress quota state unreadable; starting afresh");
                Arc::default()
            }
        },
        Ok(None) => Arc::default(),
        Err(e) => {
            tracing::error!(agent = name, error = %e, "cannot read the stored egress quota state");
            Arc::default()
        }
    };
    map.insert(key, q.clone());
    q
}

impl Daemon {
    /// The shared gateway, built on first use (with the default egress settings when aitherd
    /// did not set its configuration first: `init_gateway`).
    pub fn gateway(self: &Arc<Self>) -> &Gateway {
        self.net
            .get_or_init(|| self.build_gateway(net::config::Egress::default()))
    }

    /// Builds the gateway with the operator's egress settings (aitherd's `--config` file);
    /// false if it was already built.
    pub fn init_gateway(self: &Arc<Self>, egress: net::config::Egress) -> bool {
        let gw = self.build_gateway(egress);
        self.net.set(gw).is_ok()
    }

    fn build_gateway(self: &Arc<Self>, egress: net::config::Egress) -> Gateway {
        let weak = Arc::downgrade(self);
        Gateway::new(GatewayConfig {
            resolver: Box::new(net::SystemResolver),
            events: Arc::new(move |ev: &NetEvent| {
                if let Some(d) = weak.upgrade() {
                    d.net_event(ev);
                }
            }),
            secrets: Some(Arc::new(self.secrets())),
            egress,
        })
    }

    /// The secret store (`<state dir>/secrets`): everyone's, one namespace per owner.
    pub fn secrets(&self) -> net::secrets::SecretStore {
        net::secrets::SecretStore::new(self.state_dir.join("secrets"))
    }

    fn net_event(&self, ev: &NetEvent) {
        self.audit.record(net::inprocess::audit_entry(ev));
        let data = serde_json::to_value(ev).unwrap_or_default();
        self.bus.publish_system(ev.subject(), &data);
        let kind = if ev.usage.is_some() {
            "net.usage"
        } else if ev.allowed {
            "net.allowed"
        } else {
            "net.denied"
        };
        self.emit(Some(&ev.agent), kind, data);
    }

    /// An agent's egress counters, all rules together, for `stats`; None while the gateway
    /// serves no run of it.
    pub fn net_totals(&self, name: &str) -> Option<super::stats::NetStats> {
        let agents = self.net_agents.lock().unwrap_or_else(|e| e.into_inner());
        let a = agents.get(name)?;
        Some(super::stats::NetStats::total(a.stats().values()))
    }

    /// The tokens an agent used per metered service (`api = "openai"`), for `stats` and the
    /// metrics; None while the gateway serves no run of it or it has no metered service.
    pub fn token_usage(&self, name: &str) -> Option<Vec<net::gateway::ServiceTokens>> {
        let agents = self.net_agents.lock().unwrap_or_else(|e| e.into_inner());
        let a = agents.get(name)?;
        if !a.grants.services.iter().any(|s| s.metered()) {
            return None;
        }
        Some(a.token_usage())
    }

    /// Every served agent's token usage (the metrics).
    pub fn token_usages(&self) -> Vec<(String, Vec<net::gateway::ServiceTokens>)> {
        let agents = self.net_agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .iter()
            .filter(|(_, a)| a.grants.services.iter().any(|s| s.metered()))
            .map(|(n, a)| (n.clone(), a.token_usage()))
            .collect()
    }

    /// An agent's egress counters per rule, for `inspect`.
    pub fn net_stats(&self, name: &str) -> Option<serde_json::Value> {
        let agents = self.net_agents.lock().unwrap_or_else(|e| e.into_inner());
        let a = agents.get(name)?;
        Some(json!({
            "grants": a.grants,
            "rules": a.stats(),
            "tokens": a.token_usage(),
            "connections": a.open_connections(),
            "descriptors": a.descriptors(),
        }))
    }
}

/// Withdraws an agent's published services when its run ends.
pub struct PublishedBy {
    agent: String,
    owner: u32,
    names: Vec<String>,
    d: Shared,
}

impl Drop for PublishedBy {
    fn drop(&mut self) {
        for n in &self.names {
            self.d.gateway().unpublish(self.owner, &self.agent, n);
            self.d
                .emit(Some(&self.agent), "net.unpublished", json!({"service": n}));
        }
    }
}

/// Publishes `ports` of the running sandbox whose network namespace is `netns` (the
/// descriptor the launcher opened before the agent existed) as named services.
pub fn publish(
    d: &Shared,
    name: &str,
    owner: u32,
    ports: &[(String, u16)],
    netns: Option<Arc<OwnedFd>>,
) -> Option<PublishedBy> {
    if ports.is_empty() {
        return None;
    }
    let Some(ns) = netns else {
        tracing::error!(
            agent = name,
            "cannot publish services: no descriptor of the sandbox's network namespace"
        );
        return None;
    };
    let gw = d.gateway();
    let mut names = Vec::with_capacity(ports.len());
    for (service, port) in ports {
        // Checked at spawn too; a name another agent of the owner took since is not taken
        // over (the first publisher keeps it), and this run serves without it.
        match gw.publish(
            owner,
            name,
            service,
            net::gateway::Published::Netns(ns.clone(), *port),
        ) {
            Ok(()) => {
                names.push(service.clone());
                d.emit(
                    Some(name),
                    "net.published",
                    json!({"service": service, "port": port}),
                );
            }
            Err(e) => {
                tracing::error!(agent = name, "cannot publish: {e}");
                d.emit(
                    Some(name),
                    "net.publish_refused",
                    json!({"service": service, "port": port, "reason": e.to_string()}),
                );
            }
        }
    }
    Some(PublishedBy {
        agent: name.to_string(),
        owner,
        names,
        d: d.clone(),
    })
}

/// Serves `listener` (the run's gateway socket) for agent `name` of uid `owner` (whose
/// secrets its routes use) with `grants` under the token whose id is `token` until the
/// returned value is dropped. The quotas charge the state kept for (name, token) across runs
/// and daemon restarts.
pub fn serve(
    d: &Shared,
    name: &str,
    owner: u32,
    token: &str,
    grants: NetGrants,
    listener: OwnedFd,
) -> Serving {
    let quota = quota_for(d, name, token);
    let agent = AgentNet::owned(name, owner, grants, quota.clone());
    d.net_agents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), agent.clone());
    let gw = d.gateway().clone();
    let (dd, n, t, q) = (
        d.clone(),
        name.to_string(),
        token.to_string(),
        quota.clone(),
    );
    let task = tokio::spawn(async move {
        let persist = async {
            let mut tick = tokio::time::interval(QUOTA_PERSIST);
            loop {
                tick.tick().await;
                if q.take_dirty() {
                    persist_quota(&dd, &n, &t, &q);
                }
            }
        };
        tokio::select! {
            _ = gw.serve(std::net::TcpListener::from(listener), agent) => {}
            _ = persist => {}
        }
    });
    Serving {
        task,
        name: name.to_string(),
        token: token.to_string(),
        quota,
        d: d.clone(),
    }
}
