//! `aitherctl stats`: what agents use, live (docs/daemon.md "stats"), as `docker stats` and
//! `podman stats` show it for containers. One `stats` request per sample on one connection;
//! the figures are aitherd's own last sample of each agent, so asking costs aitherd no kernel
//! reads and no waiting.

use std::io::Write;
use std::time::{Duration, Instant};

use aither::daemon::gpu::GpuState;
use aither::daemon::proto::Request;
use aither::daemon::stats::{AgentStats, GpuStats};
use aither::units::Size;
use clap::Args;
use serde::Deserialize;

use crate::daemon_cmd::{client_err, connect, owner_column, reply_data, table};

/// Time between two samples (aitherd samples each agent every 2 s too).
const INTERVAL: Duration = Duration::from_secs(2);

/// Clears a terminal and puts the cursor home, to draw the next sample in place.
const REDRAW: &str = "\x1b[H\x1b[2J";

/// Show agents' resource use, live: CPU, memory, tasks, network and GPU.
///
/// Without NAME: every agent you may see (as in `aitherctl ps`: members their own agents,
/// root and members of aither-admin everyone's, with an OWNER column). With names: those
/// agents, in that order; another user's agent is "no agent named" for a member, as in
/// `inspect`.
///
/// A new sample every 2 s until interrupted (^C). On a terminal the table is redrawn in
/// place; to a pipe or file each sample is printed as a table of its own, after a blank line;
/// with --json each sample is one JSON object per agent, one per line. --no-stream prints
/// one sample and exits.
///
/// Columns:
///   CPU %        CPU time over aitherd's last sampling interval (2 s), in percent of one
///                CPU (200% = two CPUs busy); "-" for an agent that is not running, paused,
///                or has run for less than two samples
///   MEM USAGE / LIMIT, MEM %
///                memory charged to the sandbox's cgroup (RAM and page cache) and its limit
///   PIDS         tasks (processes and threads) and the sandbox's pids limit
///   NET IN / OUT, REQUESTS
///                bytes received and sent through the egress gateway, and the requests it
///                forwarded, in the agent's current run (docs/network.md); "-" without
///                egress
///   GPU          the lease: device:used/reserved VRAM for each device, or queued#N
///   TOKENS/24H, TOK/S
///                tokens the agent used on metered services (a model server granted with
///                `api = "openai"`, docs/agents.md) over the last 24 h, and its tokens per
///                second over the last minute; "-" without a metered service. --json has
///                them per service under `tokens`
///
/// A paused agent keeps its memory and tasks but shows no CPU; a stopped, exited or failed
/// one shows its state only. --json gives exact figures (bytes, MiB for VRAM); the table
/// rounds them (K, M, G: powers of 1024).
///
/// Exit status: 0 done (the sample of --no-stream printed, or the reader of a stream went
/// away, as `| head` does; ^C ends a stream by its signal); 1 aitherd refused (not found, not
/// the caller's); 2 bad usage; 3 aitherd not reachable, or gone while streaming.
///
/// Examples:
///   aitherctl stats                        # every agent, live
///   aitherctl stats --no-stream web db     # one sample of two agents
///   aitherctl stats --json | jq .cpu_percent
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct StatsArgs {
    /// The agents to show [default: every agent you may see].
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Print one sample and exit.
    #[arg(long)]
    no_stream: bool,
    /// Print JSON: one object per agent, one per line.
    #[arg(long)]
    json: bool,
}

/// The `data` of a `stats` reply.
#[derive(Deserialize)]
struct Sample {
    agents: Vec<AgentStats>,
}

pub fn run(a: StatsArgs) -> i32 {
    let mut client = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::Stats {
        names: a.names.clone(),
    };
    let redraw = !a.json && !a.no_stream && crate::escape::stdout_is_terminal();
    let me = nix::unistd::getuid().as_raw();
    let mut first = true;
    loop {
        let began = Instant::now();
        let reply = match client.call(&req) {
            Ok(r) => r,
            Err(e) => return client_err(e),
        };
        let data = match reply_data(reply) {
            Ok(d) => d,
            Err(code) => return code,
        };
        let sample: Sample = match serde_json::from_value(data) {
            Ok(s) => s,
            Err(e) => return client_err(aither::daemon::client::ClientError::BadReply(e)),
        };
        let text = if a.json {
            json_lines(&sample.agents)
        } else {
            let block = stats_table(&sample.agents, me);
            if redraw {
                format!("{REDRAW}{block}")
            } else if first {
                block
            } else {
                format!("\n{block}")
            }
        };
        // A reader that went away (`| head`) ends the stream quietly.
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return 0;
        }
        drop(out);
        if a.no_stream {
            return 0;
        }
        first = false;
        std::thread::sleep(INTERVAL.saturating_sub(began.elapsed()));
    }
}

fn json_lines(agents: &[AgentStats]) -> String {
    agents
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default() + "\n")
        .collect()
}

/// The table of one sample; an OWNER column where the caller sees others' agents (root and
/// admins), as in `ps`.
fn stats_table(agents: &[AgentStats], me: u32) -> String {
    let mut header = vec![
        "NAME",
        "STATE",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "PIDS",
        "NET IN / OUT",
        "REQUESTS",
        "GPU",
        "TOKENS/24H",
        "TOK/S",
    ];
    let mut rows: Vec<Vec<String>> = agents.iter().map(row).collect();
    let owners: Vec<u32> = agents.iter().map(|s| s.owner).collect();
    owner_column(&mut header, &mut rows, &owners, me);
    table(&header, &rows)
}

const NONE: &str = "-";

fn row(s: &AgentStats) -> Vec<String> {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| NONE.into());
    vec![
        s.name.clone(),
        s.state.to_string(),
        or_none(s.cpu_percent.map(|c| format!("{c:.1}%"))),
        or_none(s.memory_bytes.map(|b| {
            let limit = s.memory_limit.map(bytes).unwrap_or_else(|| "-".into());
            format!("{} / {limit}", bytes(b))
        })),
        or_none(s.memory_percent.map(|p| format!("{p:.2}%"))),
        or_none(s.pids.map(|p| {
            let limit = s.pids_limit.map(|l| l.to_string()).unwrap_or("-".into());
            format!("{p} / {limit}")
        })),
        or_none(
            s.net
                .as_ref()
                .map(|n| format!("{} / {}", bytes(n.bytes_in), bytes(n.bytes_out))),
        ),
        or_none(s.net.as_ref().map(|n| n.requests.to_string())),
        or_none(s.gpu.as_ref().map(gpu)),
        or_none(s.tokens.as_ref().map(|t| t.day.to_string())),
        or_none(s.tokens.as_ref().map(|t| format!("{:.1}", t.per_second))),
    ]
}

/// The GPU cell: `0:312M/1G` per leased device (used/reserved), or `queued#N`.
fn gpu(g: &GpuStats) -> String {
    if let Some(p) = g.queue_position {
        return format!("queued#{p}");
    }
    if g.devices.is_empty() {
        return match g.state {
            GpuState::Queued => "queued".into(),
            _ => NONE.into(),
        };
    }
    g.devices
        .iter()
        .map(|d| {
            // Use the driver does not report: `?`, or a lower bound `512M+?`.
            let used = match (d.used_mb, d.used_unknown) {
                (0, true) => "?".to_string(),
                (u, true) => format!("{}+?", bytes(u << 20)),
                (u, false) => bytes(u << 20),
            };
            format!("{}:{used}/{}", d.index, bytes(d.vram_mb << 20))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Bytes for a table cell: exact below 1K and for whole units (`512M`, as `Size` writes
/// sizes), else one decimal below 10 of the unit and whole numbers above (`9.1M`, `37M`).
fn bytes(b: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if b >= 1 << shift {
            if b.is_multiple_of(1 << shift) {
                return Size(b).to_string();
            }
            let v = b as f64 / (1u64 << shift) as f64;
            return if v < 10.0 {
                format!("{:.1}{unit}", v)
            } else {
                format!("{:.0}{unit}", v)
            };
        }
    }
    format!("{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aither::daemon::stats::{GpuDeviceStats, NetStats};
    use aither::daemon::supervise::State;

    fn sample(state: State) -> AgentStats {
        AgentStats {
            name: "web".into(),
            owner: 1000,
            state,
            cpu_percent: Some(98.66),
            memory_bytes: Some(9_543_680),
            memory_limit: Some(512 << 20),
            memory_percent: Some(1.8),
            pids: Some(3),
            pids_limit: Some(128),
            net: Some(NetStats {
                bytes_in: 15_360,
                bytes_out: 1_229,
                requests: 4,
                ..NetStats::default()
            }),
            gpu: Some(GpuStats {
                state: GpuState::Granted,
                queue_position: None,
                devices: vec![GpuDeviceStats {
                    index: 0,
                    name: "sim".into(),
                    vram_mb: 1024,
                    used_mb: 312,
                    total_mb: 8192,
                    used_unknown: false,
                    lost: None,
                }],
            }),
            tokens: Some(aither::daemon::stats::TokenStats {
                day: 12345,
                minute: 150,
                per_second: 2.5,
                services: Vec::new(),
            }),
        }
    }

    #[test]
    fn a_row_shows_usage_against_limits() {
        assert_eq!(
            row(&sample(State::Ready)),
            [
                "web",
                "ready",
                "98.7%",
                "9.1M / 512M",
                "1.80%",
                "3 / 128",
                "15K / 1.2K",
                "4",
                "0:312M/1G",
                "12345",
                "2.5"
            ]
        );
    }

    #[test]
    fn an_agent_without_figures_shows_dashes() {
        let s = AgentStats {
            cpu_percent: None,
            memory_bytes: None,
            memory_limit: None,
            memory_percent: None,
            pids: None,
            pids_limit: None,
            net: None,
            gpu: None,
            tokens: None,
            ..sample(State::Stopped)
        };
        assert_eq!(
            row(&s),
            ["web", "stopped", "-", "-", "-", "-", "-", "-", "-", "-", "-"]
        );
    }

    #[test]
    fn bytes_round_for_a_table() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1K");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(37 << 20 | 5), "37M");
        assert_eq!(bytes(512 << 20), "512M");
        assert_eq!(bytes(3 << 30), "3G");
    }

    #[test]
    fn the_owner_column_appears_for_root_or_anothers_agent() {
        let s = [sample(State::Ready)];
        assert!(!stats_table(&s, 1000).contains("OWNER"));
        assert!(stats_table(&s, 1001).contains("OWNER"));
        assert!(stats_table(&s, 0).contains("OWNER"));
    }
}
