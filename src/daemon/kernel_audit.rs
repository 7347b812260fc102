//! The kernel's denials in the audit stream: a thread reads the audit log's multicast group
//! (src/audit/kernel.rs) and records each Landlock or seccomp denial of one of our agents as a
//! `kernel_denial` entry (actor `kernel`) and event, joined by the denied process's cgroup or
//! the Landlock domain's creator. Denials of other processes are not ours and are ignored.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::Daemon;
use crate::audit::kernel::{Denial, Joiner, Reader};
use crate::audit::{Entry, Verdict};

/// Starts the reader thread (nothing happens while the host's audit is off).
pub fn start(d: Arc<Daemon>) {
    let reader = match Reader::open() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "kernel audit records unavailable (no audit netlink socket)");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("aither-kaudit".into())
        .spawn(move || run(d, reader));
}

fn run(d: Arc<Daemon>, mut reader: Reader) {
    let mut joiner = Joiner::default();
    let mut domains: HashMap<String, String> = HashMap::new();
    loop {
        let records = match reader.read() {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "kernel audit reader stopped");
                return;
            }
        };
        for r in records {
            for den in joiner.push(r) {
                if let Some(agent) = agent_of(&d, &den, &mut domains) {
                    record(&d, &agent, &den);
                }
            }
        }
    }
}

/// The agent whose sandbox holds `pid`: its cgroup is `aither/<name>-<shim pid>`.
fn agent_by_pid(d: &Daemon, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let ids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("/aither/"))
        .filter_map(|l| l.rsplit('/').next())
        .collect();
    let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
    agents.iter().find_map(|(name, h)| {
        let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
        i.cgroup
            .as_deref()
            .filter(|c| ids.contains(c))
            .map(|_| name.clone())
    })
}

fn agent_of(d: &Daemon, den: &Denial, domains: &mut HashMap<String, String>) -> Option<String> {
    let found = den
        .pid
        .and_then(|p| agent_by_pid(d, p))
        .or_else(|| den.domain_pid.and_then(|p| agent_by_pid(d, p)))
        .or_else(|| den.domain.as_ref().and_then(|dm| domains.get(dm).cloned()))?;
    if let Some(dm) = &den.domain {
        if domains.len() > 10_000 {
            domains.clear();
        }
        domains.insert(dm.clone(), found.clone());
    }
    Some(found)
}

fn record(d: &Daemon, agent: &str, den: &Denial) {
    let data = serde_json::to_value(den).unwrap_or_default();
    d.audit.record(
        Entry::new(
            "kernel_denial",
            Verdict::Deny,
            format!("{}: {} {}", den.layer, den.rule, den.detail),
        )
        .agent(agent)
        .actor("kernel")
        .data(data.clone()),
    );
    d.emit(Some(agent), "kernel_denial", json!(data));
}
