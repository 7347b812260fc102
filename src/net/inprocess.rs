//! The gateway of `aitherctl run`: in the launcher's own process, on a thread of its own that
//! starts only after the sandbox has been cloned (the launcher forks the sandbox, so it must be
//! single-threaded until then).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use super::config::Egress;
use super::gateway::{AgentNet, Gateway, GatewayConfig, NetEvent, SecretSource};
use super::resolve::{Resolve, SystemResolver};
use super::rules::NetGrants;
use super::secrets::SecretStore;
use crate::audit::{Entry, Verdict};

/// Errors of preparing the in-process gateway.
#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    #[error("egress configuration: {0}")]
    Config(#[from] super::config::ConfigError),
}

/// Everything checked before the launch; `start` only spawns.
pub struct InProcessGateway {
    agent: Arc<AgentNet>,
    resolver: Box<dyn Resolve>,
    egress: Egress,
    secrets: Arc<dyn SecretSource>,
}

/// The audit record of one decision (`kind` "net", the rule that decided).
pub fn audit_entry(ev: &NetEvent) -> Entry {
    Entry::new(
        "net",
        if ev.allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        ev.rule.clone(),
    )
    .agent(&ev.agent)
    .data(serde_json::to_value(ev).unwrap_or_default())
}

impl InProcessGateway {
    /// `config`: the configuration file (`aitherctl run --config`; `explicit` when given on
    /// the command line, else the default path, which may be absent).
    pub fn prepare(
        name: &str,
        grants: NetGrants,
        config: &std::path::Path,
        explicit: bool,
    ) -> Result<InProcessGateway, InProcessError> {
        Ok(InProcessGateway {
            // The caller's own secrets (root's for root); `root:NAME` names root's.
            agent: AgentNet::owned(
                name,
                rustix::process::geteuid().as_raw(),
                grants,
                Arc::default(),
            ),
            resolver: Box::new(SystemResolver),
            egress: Egress::load(config, explicit)?,
            secrets: Arc::new(SecretStore::default_location()),
        })
    }

    /// The agent's counters (shared with the running gateway).
    pub fn agent(&self) -> Arc<AgentNet> {
        self.agent.clone()
    }

    /// Starts the gateway thread serving `listener` (the socket inside the sandbox) and the
    /// thread that writes its decisions to the audit log; `Running::finish` stops both once the
    /// sandbox has ended, with every decision written.
    pub fn start(self, listener: OwnedFd) -> Running {
        let (tx, writer) =
            crate::audit::Sink::spawn(crate::audit::log_path(), "aither-egress-audit");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = std::thread::Builder::new()
            .name("aither-egress".into())
            .spawn(move || {
                let tx = Mutex::new(tx);
                let gw = Gateway::new(GatewayConfig {
                    resolver: self.resolver,
                    events: Arc::new(move |ev: &NetEvent| {
                        if let Ok(tx) = tx.lock() {
                            tx.record(audit_entry(ev));
                        }
                    }),
                    secrets: Some(self.secrets),
                    egress: self.egress,
                });
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("aither: egress gateway cannot start: {e}");
                        return;
                    }
                };
                let agent = self.agent.clone();
                rt.block_on(async {
                    tokio::select! {
                        _ = gw.serve(std::net::TcpListener::from(listener), self.agent) => {}
                        _ = stopped => {}
                    }
                });
                // Denials still being summarised are recorded before the writer drains.
                gw.flush_summaries_now(None);
                gw.flush_usage(&agent, true);
                // Dropping the runtime ends every connection task, and with the gateway the
                // last sender of decisions: the writer then drains and ends.
                drop(rt);
                drop(gw);
            });
        if let Err(e) = &gateway {
            eprintln!("aither: egress gateway cannot start: {e}");
        }
        Running {
            stop: Some(stop),
            gateway: gateway.ok(),
            writer,
        }
    }
}

/// The running in-process gateway.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    gateway: Option<std::thread::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops the gateway and waits until every decision is in the audit log.
    pub fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(g) = self.gateway.take() {
            let _ = g.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
