//! `aitherctl stats`: one sample of what each agent uses (docs/daemon.md "stats"), built from
//! what aitherd already keeps. Nothing here reads the kernel or waits: CPU %, memory and tasks
//! are the agent task's last periodic sample (every `stats_interval`, src/daemon/agent.rs,
//! CPU % from the delta of `cpu.stat` `usage_usec` between its last two readings); the egress
//! counters are the gateway's for the run it serves now; the GPU figures are the
//! MicroScheduler's lease and its last VRAM reading.

use serde::{Deserialize, Serialize};

use super::agent::Info;
use super::supervise::State;
use super::Daemon;
use crate::net::gateway::RuleStats;

/// One agent's sample: the `stats` reply holds one per agent, `{"agents": [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    pub name: String,
    /// The uid that owns it (admins see every owner's agents).
    pub owner: u32,
    pub state: State,
    /// CPU time over the last sampling interval, in percent of one CPU (200 %: two CPUs
    /// busy). None while no sandbox runs, while paused, and until the run's second sample.
    pub cpu_percent: Option<f64>,
    /// Memory charged to the sandbox's cgroup (RAM and page cache), bytes; kept while paused.
    pub memory_bytes: Option<u64>,
    /// The cgroup's memory limit, bytes; None: no limit.
    pub memory_limit: Option<u64>,
    /// `memory_bytes` in percent of `memory_limit`, two decimals.
    pub memory_percent: Option<f64>,
    /// Tasks (processes and threads) in the sandbox, as its pids limit counts them (processes
    /// only where the sandbox has no pids controller: a v1 host and no pids limit).
    pub pids: Option<u64>,
    /// The cgroup's pids limit; None: no limit.
    pub pids_limit: Option<u64>,
    /// The egress gateway's counters for the current run, summed over its rules; None when
    /// the gateway serves no run of the agent (no sandbox, or no egress granted).
    pub net: Option<NetStats>,
    /// The agent's GPU lease; None without a GPU claim.
    pub gpu: Option<GpuStats>,
    /// Tokens used on metered services (`api = "openai"`, docs/agents.md); None while the
    /// gateway serves no run of the agent or its token grants no metered service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenStats>,
}

/// An agent's tokens on its metered services, from the gateway's ledgers (kept per agent
/// name and token, across runs and daemon restarts).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenStats {
    /// Tokens over the last 24 h, every metered service together.
    pub day: u64,
    /// Tokens over the last 60 s.
    pub minute: u64,
    /// `minute` / 60: the agent's average rate over the last minute.
    pub per_second: f64,
    /// Per service.
    pub services: Vec<crate::net::gateway::ServiceTokens>,
}

impl TokenStats {
    pub fn of(services: Vec<crate::net::gateway::ServiceTokens>) -> TokenStats {
        let day = services.iter().map(|s| s.day).sum();
        let minute: u64 = services.iter().map(|s| s.minute).sum();
        TokenStats {
            day,
            minute,
            per_second: (minute as f64 / 60.0 * 100.0).round() / 100.0,
            services,
        }
    }
}

/// The egress gateway's counters of one run, all rules together (`inspect` has them per rule).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetStats {
    /// Bytes the agent sent out through the gateway.
    pub bytes_out: u64,
    /// Bytes that came back to it.
    pub bytes_in: u64,
    /// HTTP requests forwarded.
    pub requests: u64,
    /// Connections accepted (tunnels included).
    pub connections: u64,
    /// Requests and connections refused.
    pub denials: u64,
}

impl NetStats {
    /// The sum of per-rule counters.
    pub fn total<'a>(rules: impl IntoIterator<Item = &'a RuleStats>) -> NetStats {
        rules.into_iter().fold(NetStats::default(), |mut t, r| {
            t.bytes_out += r.bytes_out;
            t.bytes_in += r.bytes_in;
            t.requests += r.requests;
            t.connections += r.connections;
            t.denials += r.denials;
            t
        })
    }
}

/// Where an agent's GPU claim stands, and what its lease holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuStats {
    pub state: super::gpu::GpuState,
    /// Queued: its place in the MicroScheduler's queue (1 = next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Granted: the leased devices.
    pub devices: Vec<GpuDeviceStats>,
}

/// One leased GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuDeviceStats {
    /// The device's index on the host.
    pub index: u32,
    pub name: String,
    /// VRAM reserved for the agent on it, MiB.
    pub vram_mb: u64,
    /// VRAM the agent's processes used on it at the MicroScheduler's last reading (every 2 s),
    /// MiB; 0 before the first.
    pub used_mb: u64,
    /// The device's total VRAM, MiB.
    pub total_mb: u64,
    /// A process of the agent on it has use the driver does not report (NVML's "not
    /// available"): `used_mb` counts only the others.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub used_unknown: bool,
    /// The backend lost the device (fell off the bus), with its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

/// Whether a sandbox of the agent is running (not frozen), so that a CPU figure means
/// something.
fn runs(state: State) -> bool {
    state.is_live() && state != State::Paused
}

/// Percent of `part` in `whole`, two decimals (an agent's first 100K of a 512M limit is
/// 0.02 %, not 0).
fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| (part as f64 / whole as f64 * 10_000.0).round() / 100.0)
}

/// The sample of one agent, from its `Info` (the agent task's last sample) and the daemon's
/// gateway and MicroScheduler.
pub fn of(d: &Daemon, i: &Info) -> AgentStats {
    let live = i.state.is_live();
    // Figures of a sandbox that no longer runs are not shown as if current.
    let current = |v: Option<u64>| v.filter(|_| live);
    let memory_bytes = current(i.memory_bytes);
    let memory_limit = current(i.memory_limit);
    AgentStats {
        name: i.name.clone(),
        owner: i.owner,
        state: i.state,
        cpu_percent: i.cpu_percent.filter(|_| runs(i.state)),
        memory_bytes,
        memory_limit,
        memory_percent: memory_bytes
            .zip(memory_limit)
            .and_then(|(b, l)| percent(b, l)),
        pids: current(i.pids),
        pids_limit: current(i.pids_limit),
        net: d.net_totals(&i.name),
        gpu: d.gpu.stats_of(&i.name),
        tokens: d.token_usage(&i.name).map(TokenStats::of),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_two_decimals_and_none_without_a_whole() {
        assert_eq!(percent(1, 3), Some(33.33));
        assert_eq!(percent(100 << 10, 512 << 20), Some(0.02));
        assert_eq!(percent(512 << 20, 512 << 20), Some(100.0));
        assert_eq!(percent(5, 0), None);
    }

    #[test]
    fn only_a_running_unfrozen_sandbox_has_a_cpu_figure() {
        for s in [
            State::Starting,
            State::Running,
            State::Ready,
            State::Unhealthy,
        ] {
            assert!(runs(s), "{s}");
        }
        for s in [
            State::Paused,
            State::Stopped,
            State::Exited,
            State::Failed,
            State::Backoff,
            State::Queued,
            State::Created,
        ] {
            assert!(!runs(s), "{s}");
        }
    }

    #[test]
    fn net_totals_sum_every_rule() {
        let a = RuleStats {
            connections: 1,
            requests: 2,
            bytes_out: 300,
            bytes_in: 4000,
            denials: 0,
        };
        let b = RuleStats {
            connections: 0,
            requests: 1,
            bytes_out: 10,
            bytes_in: 20,
            denials: 3,
        };
        assert_eq!(
            NetStats::total([&a, &b]),
            NetStats {
                bytes_out: 310,
                bytes_in: 4020,
                requests: 3,
                connections: 1,
                denials: 3,
            }
        );
    }
}
