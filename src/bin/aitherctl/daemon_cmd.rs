//! The commands that talk to aitherd: spawn, ps, inspect, stop, kill, restart, pause,
//! resume, rm, events.
//!
//! Exit status: 0 done; 1 aitherd refused or failed the request (not found, conflict, launch
//! failed); 2 bad usage; 3 aitherd is not running or not reachable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aither::agent_name::AgentName;
use aither::daemon;
use aither::daemon::agent::Info;
use aither::daemon::agentfile::AgentFile;
use aither::daemon::client::{Client, ClientError};
use aither::daemon::proto::{Reply, Request, SpawnRequest};
use aither::daemon::store::Event;
use aither::daemon::supervise::{RestartPolicy, Supervision};
use aither::units::to_ms;
use aither::units::Size;
use aither_proto::publish::HostPublish;
use clap::Args;

pub const EXIT_REFUSED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;

pub fn connect() -> Result<Client, i32> {
    Client::connect(&daemon::socket_path()).map_err(|e| {
        eprintln!("aither: {e}");
        EXIT_UNREACHABLE
    })
}

pub fn call(req: &Request) -> Result<serde_json::Value, i32> {
    let mut c = connect()?;
    let r = c.call(req).map_err(client_err)?;
    reply_data(r)
}

pub fn client_err(e: ClientError) -> i32 {
    eprintln!("aither: {e}");
    EXIT_UNREACHABLE
}

pub fn reply_data(r: Reply) -> Result<serde_json::Value, i32> {
    if r.ok {
        Ok(r.data.unwrap_or_default())
    } else {
        let e = r.error.unwrap_or(aither::daemon::proto::ErrorBody {
            code: aither::daemon::proto::ErrorCode::Internal,
            message: "no reason given".into(),
        });
        eprintln!("aither: error: {} ({})", e.message, e.code);
        Err(EXIT_REFUSED)
    }
}

pub fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Start a supervised agent under aitherd.
///
/// The sandbox is built exactly as for `aitherctl run`, from a capability token: `--token`, or
/// one minted by aitherd from `--policy` (default strict) for the agent's name. The agent's
/// stdout and stderr go to size-rotated log files (`aitherctl logs`). It gets a channel to
/// aitherd on fd 3 (AITHER_FD=3) for READY, heartbeats and pain signals (docs/protocol.md;
/// `aither-notify` from a shell).
///
/// Without a command, the agent file agents/NAME.toml (or -f FILE) gives the command, policy
/// and supervision settings; flags override the file.
///
/// Restart policy (docs/daemon.md): on a failure (exit code other than 0, a signal we did not
/// send, OOM kill, watchdog miss, no READY within the startup timeout, failed health checks)
/// the agent restarts after min(backoff·2^(n-1), 5m) ±10 %; more than 5 restarts in 10 minutes
/// and it is marked failed. 10 minutes healthy resets the backoff.
///
/// Examples:
///   aitherctl spawn --policy strict my-agent -- python3 agent.py
///   aitherctl spawn my-agent                     # from agents/my-agent.toml
///   aitherctl spawn --restart always --watchdog 30s bot -- ./bot.sh
///   aitherctl spawn --health-cmd 'test -f /tmp/ok' --health-interval 5s web -- ./serve
///   aitherctl spawn --publish-host 127.0.0.1:8080=8000 model -- python3 serve.py --port 8000
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct SpawnArgs {
    /// The agent's name (default: the agent file's name or file stem).
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Policy name or path [default: strict, or the agent file's].
    #[arg(long, short = 'p', value_name = "NAME|PATH", conflicts_with = "token")]
    policy: Option<String>,
    /// Capability token (its text, a file, or - for stdin); its subject must be NAME.
    #[arg(long, value_name = "TOKEN|FILE|-")]
    token: Option<String>,
    /// Agent file [default: agents/NAME.toml when no command is given].
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Directory mounted read-write at the same path (default: the current directory).
    #[arg(long, short = 'w', value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Set an environment variable inside (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Attach a label (repeatable): `inspect` shows it and `ps --filter label=KEY=VALUE`
    /// selects by it. Kubernetes' syntax: KEY is an optional DNS-subdomain prefix and '/',
    /// then 1-63 letters, digits, '-', '_' or '.'; VALUE at most 63 of those (or empty).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Memory limit (e.g. 256M), at most the token's.
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    memory: Option<Size>,
    /// CPU limit in CPUs (e.g. 0.5), at most the token's.
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Publish port PORT of the agent's own loopback as service NAME (repeatable): agents whose
    /// token grants `net.services` NAME reach it as http://NAME.aither.internal
    /// (docs/network.md). The agent may bind PORT even under a `none` network; an agent file
    /// says `publish = ["NAME=PORT"]` (the flags add to it).
    #[arg(long = "publish", value_name = "NAME=PORT", value_parser = parse_publish)]
    publish: Vec<(String, u16)>,
    /// Publish the agent's port AGENTPORT on the host's loopback at HOSTADDR:HOSTPORT
    /// (repeatable)
    ///
    /// Podman's `-p 127.0.0.1:8080:8000`, in Aither's spelling. aitherd listens there while the
    /// agent runs, across its restarts, and relays each connection to 127.0.0.1:AGENTPORT
    /// inside the sandbox; `stop` and `rm` close it. HOSTADDR must be a loopback address
    /// (127.0.0.0/8, or [::1] for IPv6): nothing else is ever published. A HOSTPORT below
    /// 1024 needs root; one in use is a spawn error. The agent may bind AGENTPORT even under
    /// a `none` network (strict), and nothing else; the policy may forbid publishing
    /// (`[network] publish_host = false`). At most 64 connections per agent are relayed at
    /// once, more are closed at once. `ps` shows a PORTS column, `inspect` the counters.
    /// Agent file: `publish_host = ["127.0.0.1:8080=8000"]` (the flags add to it).
    /// Example: --publish-host 127.0.0.1:8080=8000, then `curl http://127.0.0.1:8080/`.
    #[arg(long = "publish-host", value_name = "HOSTADDR:HOSTPORT=AGENTPORT", value_parser = parse_publish_host, verbatim_doc_comment)]
    publish_host: Vec<HostPublish>,
    /// Maximum number of processes and threads, at most the token's.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// GPUs to lease through the MicroScheduler (at most the token's gpu claim; 0: none).
    /// The agent waits in `aitherctl gpu queue` (state `queued`) until they are free.
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// VRAM reserved on each leased GPU, e.g. 8G (at most the claim's).
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    gpu_vram: Option<Size>,
    /// GPU priority class (at most the claim's): higher goes first and may preempt
    /// strictly lower classes.
    #[arg(long, value_name = "N")]
    gpu_priority: Option<u32>,
    /// Whole GPUs, shared with no other agent (the claim must allow it).
    #[arg(long, conflicts_with = "gpu_shared")]
    gpu_exclusive: bool,
    /// Shared GPUs even where the claim allows exclusive ones.
    #[arg(long)]
    gpu_shared: bool,
    /// Also let the agent publish on PATTERN (NATS-style, `$self` = its name), on top of the
    /// policy's [bus]; repeatable. Only with --policy (a --token says what it grants).
    #[arg(long = "bus-publish", value_name = "PATTERN")]
    bus_publish: Vec<String>,
    /// Also let the agent subscribe to PATTERN; repeatable (see --bus-publish).
    #[arg(long = "bus-subscribe", value_name = "PATTERN")]
    bus_subscribe: Vec<String>,
    /// never | on-failure | always [default: on-failure].
    #[arg(long, value_name = "POLICY")]
    restart: Option<RestartPolicy>,
    /// First restart delay; doubles per consecutive failure (0 restarts at once) [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    backoff: Option<Duration>,
    /// Time between SIGTERM and killing the whole sandbox on stop [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    stop_timeout: Option<Duration>,
    /// The agent reports readiness (READY on its channel); until then it is "starting".
    #[arg(long)]
    wait_ready: bool,
    /// READY (or a passing health check) must come within this, or it is a failure.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    startup_timeout: Option<Duration>,
    /// Heartbeats must arrive at least this often, or the agent is restarted.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    watchdog: Option<Duration>,
    /// Health check run inside the agent's sandbox with sh -c; exit 0 = healthy.
    #[arg(long, value_name = "CMD")]
    health_cmd: Option<String>,
    /// Time between health checks [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    health_interval: Option<Duration>,
    /// Time a health check may take [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    health_timeout: Option<Duration>,
    /// Consecutive failed checks that restart the agent [default: 3].
    #[arg(long, value_name = "N")]
    health_threshold: Option<u32>,
    /// Replace an agent of the same name that is not running.
    #[arg(long)]
    replace: bool,
    /// Print the agent as JSON.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn build_spawn(a: &SpawnArgs) -> anyhow::Result<SpawnRequest> {
    let cwd = std::env::current_dir()?;
    let file = spawn_file(a)?;
    let name = a
        .name
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.name.clone()))
        .or_else(|| {
            a.file
                .as_ref()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    AgentName::parse("name", &name)?;
    let sup = spawn_supervision(a, file.as_ref())?;
    let argv = if a.command.is_empty() {
        file.as_ref().map(|f| f.command.argv()).unwrap_or_default()
    } else {
        a.command.clone()
    };
    let token = match (&a.token, file.as_ref().and_then(|f| f.token_file.clone())) {
        (Some(t), _) => Some(crate::token_cmd::read_token_arg(t)?.encode()),
        (None, Some(p)) => {
            let p = file.as_ref().map(|f| f.resolve(&p)).unwrap_or(p);
            Some(crate::token_cmd::read_token_arg(&p.display().to_string())?.encode())
        }
        _ => None,
    };
    // A policy path in the agent file is relative to the file's directory, like its
    // workspace and token_file; one given as a flag is relative to the current directory.
    let policy = match (&a.policy, file.as_ref()) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => f.policy.clone().map(|p| {
            if p.contains('/') || p.ends_with(".toml") {
                f.resolve(Path::new(&p)).display().to_string()
            } else {
                p
            }
        }),
        (None, None) => None,
    }
    .map(|p| {
        // A path is resolved here: aitherd's working directory is not ours.
        if p.contains('/') || p.ends_with(".toml") {
            std::fs::canonicalize(&p)
                .map(|c| c.display().to_string())
                .unwrap_or(p)
        } else {
            p
        }
    });
    let workspace = match (
        &a.workspace,
        file.as_ref().and_then(|f| f.workspace.clone()),
    ) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(w)) => file.as_ref().map(|f| f.resolve(&w)),
        _ => None,
    }
    // Absolute, lexically only: aitherd opens it without following links and refuses a path
    // that is not the real one (a link planted in a workspace must not redirect a mount).
    .map(|w| if w.is_absolute() { w } else { cwd.join(w) });
    let mut env: Vec<String> = file
        .as_ref()
        .map(|f| f.env.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    env.extend(a.env.iter().cloned());
    let mut labels = file.as_ref().map(|f| f.labels.clone()).unwrap_or_default();
    labels.extend(a.labels.iter().cloned());
    Ok(SpawnRequest {
        name,
        policy,
        token,
        argv,
        workspace,
        cwd,
        env,
        labels,
        pass_env: std::env::vars().collect(),
        supervision: sup,
        memory: a.memory.map(|m| m.0),
        cpus: a.cpus,
        pids: a.pids,
        replace: a.replace,
        gpus: a
            .gpus
            .or_else(|| file.as_ref().and_then(|f| f.gpu.as_ref()?.count)),
        gpu_vram_mb: a
            .gpu_vram
            .or_else(|| file.as_ref().and_then(|f| f.gpu.as_ref()?.vram))
            .map(|s| s.0 >> 20),
        gpu_priority: a
            .gpu_priority
            .or_else(|| file.as_ref().and_then(|f| f.gpu.as_ref()?.priority)),
        gpu_exclusive: if a.gpu_exclusive {
            Some(true)
        } else if a.gpu_shared {
            Some(false)
        } else {
            file.as_ref().and_then(|f| f.gpu.as_ref()?.exclusive)
        },
        bus_publish: file
            .as_ref()
            .and_then(|f| f.bus.as_ref())
            .map(|b| b.publish.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(a.bus_publish.iter().cloned())
            .collect(),
        bus_subscribe: file
            .as_ref()
            .and_then(|f| f.bus.as_ref())
            .map(|b| b.subscribe.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(a.bus_subscribe.iter().cloned())
            .collect(),
        publish: file
            .as_ref()
            .map(|f| f.publish.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(a.publish.iter().cloned())
            .collect(),
        publish_host: file
            .as_ref()
            .map(|f| f.publish_host.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(a.publish_host.iter().copied())
            .collect(),
    })
}

/// `spawn`'s agent file: `-f FILE`, or agents/NAME.toml when no command is given.
fn spawn_file(a: &SpawnArgs) -> anyhow::Result<Option<AgentFile>> {
    let file = match (&a.file, a.command.is_empty(), &a.name) {
        (Some(f), _, _) => Some(AgentFile::load(f)?),
        (None, true, Some(n)) => {
            let p = Path::new("agents").join(format!("{n}.toml"));
            if !p.exists() {
                anyhow::bail!(
                    "no command given and no agent file {} (give `-- CMD ...` or -f FILE)",
                    p.display()
                );
            }
            Some(AgentFile::load(&p)?)
        }
        (None, true, None) => {
            anyhow::bail!("give a NAME and a command (`-- CMD ...`), or an agent file (-f FILE)")
        }
        (None, false, None) => anyhow::bail!("give the agent a NAME"),
        (None, false, Some(_)) => None,
    };
    Ok(file)
}

/// `spawn`'s supervision: the agent file's, then the flags over it.
fn spawn_supervision(a: &SpawnArgs, file: Option<&AgentFile>) -> anyhow::Result<Supervision> {
    let mut sup = Supervision::default();
    if let Some(f) = file {
        sup = f.supervision(sup);
    }
    if let Some(r) = a.restart {
        sup.restart = r;
    }
    if let Some(b) = a.backoff {
        sup.backoff_ms = to_ms(b);
    }
    if let Some(t) = a.stop_timeout {
        sup.stop_timeout_ms = to_ms(t);
    }
    sup.wait_ready |= a.wait_ready;
    if let Some(t) = a.startup_timeout {
        sup.startup_timeout_ms = Some(to_ms(t));
    }
    if let Some(w) = a.watchdog {
        sup.watchdog_ms = Some(to_ms(w));
    }
    if let Some(h) = &a.health_cmd {
        sup.health_cmd = Some(vec!["/bin/sh".into(), "-c".into(), h.clone()]);
    }
    if let Some(i) = a.health_interval {
        sup.health_interval_ms = to_ms(i);
    }
    if let Some(t) = a.health_timeout {
        sup.health_timeout_ms = to_ms(t);
    }
    if let Some(n) = a.health_threshold {
        sup.health_threshold = n;
    }
    sup.validate()?;
    Ok(sup)
}

/// clap value parser for `--label KEY=VALUE`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    aither::labels::parse(s).map_err(|e| e.to_string())
}

/// clap value parser for `--publish-host HOSTADDR:HOSTPORT=AGENTPORT`.
fn parse_publish_host(s: &str) -> Result<HostPublish, String> {
    HostPublish::parse(s).map_err(|e| e.to_string())
}

fn parse_publish(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PORT"))?;
    aither::net::rules::check_name(name).map_err(|e| e.to_string())?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: PORT must be 1 to 65535"))?;
    Ok((name.to_string(), port))
}

/// Opens the workspace with the caller's own rights (aitherd checks this descriptor, so it
/// never reaches a directory the caller could not). An explicit `-w` that cannot be opened is
/// an error here; the default (the current directory) is sent when it can be opened, and
/// aitherd decides whether the policy needs one.
pub(crate) fn open_workspace(
    req: &SpawnRequest,
    explicit: bool,
) -> anyhow::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = req.workspace.as_ref().unwrap_or(&req.cwd);
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if explicit => Err(anyhow::anyhow!("workspace {}: {e}", path.display())),
        Err(_) => Ok(None),
    }
}

pub fn spawn(a: SpawnArgs) -> i32 {
    let req = match build_spawn(&a) {
        Ok(r) => r,
        Err(e) => {
            crate::print_error(&e);
            return EXIT_USAGE;
        }
    };
    let ws = match open_workspace(&req, req.workspace.is_some()) {
        Ok(f) => f,
        Err(e) => {
            crate::print_error(&e);
            return EXIT_REFUSED;
        }
    };
    let fds: Vec<std::os::fd::BorrowedFd<'_>> = ws.iter().map(std::os::fd::AsFd::as_fd).collect();
    let reply = connect().and_then(|mut c| {
        c.call_with_fds(&Request::Spawn(Box::new(req)), &fds)
            .map_err(client_err)
            .and_then(reply_data)
    });
    match reply {
        Ok(v) => {
            if a.json {
                print_json(&v);
            } else if let Ok(i) = serde_json::from_value::<Info>(v) {
                println!(
                    "{}: {} (pid {}, policy {}, logs: aitherctl logs {})",
                    i.name,
                    i.state,
                    i.pid1.map(|p| p.to_string()).unwrap_or("-".into()),
                    i.policy,
                    i.name
                );
            }
            0
        }
        Err(code) => code,
    }
}

/// List agents: name, state, pid, uptime, restarts, CPU, memory, GPU.
#[derive(Args)]
pub struct PsArgs {
    /// Print JSON (every field of every agent).
    #[arg(long)]
    json: bool,
    /// Only the agents that match (repeatable): name=TEXT (the name contains TEXT),
    /// state=STATE (running, ready, paused, backoff, failed, stopped, exited, queued, …),
    /// label=KEY or label=KEY=VALUE, owner=USER|UID. Filters of one kind match any of their
    /// values; different kinds, and every label filter, must all match (as podman ps).
    #[arg(long = "filter", value_name = "KIND=VALUE", value_parser = parse_filter)]
    filters: Vec<PsFilter>,
}

/// One `ps --filter`.
#[derive(Clone, Debug, PartialEq)]
enum PsFilter {
    Name(String),
    State(daemon::supervise::State),
    Label(String, Option<String>),
    Owner(u32),
}

/// clap value parser for `ps --filter KIND=VALUE`.
fn parse_filter(s: &str) -> Result<PsFilter, String> {
    let Some((kind, value)) = s.split_once('=') else {
        return Err(format!(
            "{s:?}: write KIND=VALUE (name, state, label, owner)"
        ));
    };
    match kind {
        "name" => Ok(PsFilter::Name(value.into())),
        "state" => serde_json::from_value(serde_json::Value::String(value.into()))
            .map(PsFilter::State)
            .map_err(|_| {
                format!("unknown state {value:?} (created, queued, starting, running, ready, unhealthy, paused, exited, backoff, failed, stopped)")
            }),
        "label" => {
            let (k, v) = match value.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (value, None),
            };
            if !aither::labels::valid_key(k) {
                return Err(format!("invalid label key {k:?}"));
            }
            Ok(PsFilter::Label(k.into(), v))
        }
        "owner" => value
            .parse()
            .ok()
            .or_else(|| daemon::users::uid_of(value))
            .map(PsFilter::Owner)
            .ok_or_else(|| format!("no user {value:?}")),
        _ => Err(format!("unknown filter {kind:?} (name, state, label, owner)")),
    }
}

/// Whether `i` passes every kind of filter given.
fn matches(i: &Info, filters: &[PsFilter]) -> bool {
    let any = |f: &dyn Fn(&PsFilter) -> Option<bool>| {
        let hits: Vec<bool> = filters.iter().filter_map(f).collect();
        hits.is_empty() || hits.contains(&true)
    };
    any(&|f| match f {
        PsFilter::Name(n) => Some(i.name.contains(n.as_str())),
        _ => None,
    }) && any(&|f| match f {
        PsFilter::State(s) => Some(i.state == *s),
        _ => None,
    }) && any(&|f| match f {
        PsFilter::Owner(o) => Some(i.owner == *o),
        _ => None,
    }) && filters.iter().all(|f| match f {
        PsFilter::Label(k, v) => i
            .labels
            .get(k)
            .is_some_and(|have| v.as_ref().is_none_or(|want| want == have)),
        _ => true,
    })
}

fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn ps(a: PsArgs) -> i32 {
    let v = match call(&Request::Ps) {
        Ok(v) => v,
        Err(c) => return c,
    };
    let list: Vec<Info> = serde_json::from_value(v.clone()).unwrap_or_default();
    let list: Vec<Info> = list
        .into_iter()
        .filter(|i| matches(i, &a.filters))
        .collect();
    if a.json {
        // Every field aitherd sent, of the agents that matched.
        let keep: std::collections::HashSet<&str> = list.iter().map(|i| i.name.as_str()).collect();
        let all = v.as_array().cloned().unwrap_or_default();
        let shown: Vec<serde_json::Value> = all
            .into_iter()
            .filter(|x| x["name"].as_str().is_some_and(|n| keep.contains(n)))
            .collect();
        print_json(&serde_json::Value::Array(shown));
        return 0;
    }
    let now = aither::units::now_ms();
    let rows: Vec<[String; 8]> = list
        .iter()
        .map(|i| {
            let live = i.state.is_live();
            [
                i.name.clone(),
                i.state.to_string(),
                i.pid1
                    .filter(|_| live)
                    .map(|p| p.to_string())
                    .unwrap_or("-".into()),
                i.started_ms
                    .filter(|_| live)
                    .map(|s| human_age(now.saturating_sub(s)))
                    .unwrap_or("-".into()),
                i.restarts.to_string(),
                i.cpu_percent
                    .filter(|_| live)
                    .map(|c| format!("{c:.1}%"))
                    .unwrap_or("-".into()),
                i.memory_bytes
                    .filter(|_| live)
                    .map(|m| Size(m).to_string())
                    .unwrap_or("-".into()),
                i.gpu.clone().unwrap_or("-".into()),
            ]
        })
        .collect();
    let mut rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    let mut header = vec![
        "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEMORY", "GPU",
    ];
    let me = nix::unistd::getuid().as_raw();
    // Published host ports, docker's way (`127.0.0.1:8080->8000`), when any agent has some.
    if list.iter().any(|i| !i.publish_host.is_empty()) {
        header.push("PORTS");
        for (r, i) in rows.iter_mut().zip(&list) {
            r.push(ports_cell(&i.publish_host));
        }
    }
    let owners: Vec<u32> = list.iter().map(|i| i.owner).collect();
    owner_column(&mut header, &mut rows, &owners, me);
    print_table(&header, &rows);
    0
}

/// `ps`'s PORTS cell: each `HOST:PORT=AGENTPORT` as `HOST:PORT->AGENTPORT`, or `-`.
fn ports_cell(published: &[String]) -> String {
    if published.is_empty() {
        return "-".into();
    }
    published
        .iter()
        .map(|p| p.replacen('=', "->", 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// Only root and admins see agents that are not theirs: then a table says whose each row is,
/// in an OWNER column after the name (`owners[i]` of row i).
pub fn owner_column(header: &mut Vec<&str>, rows: &mut [Vec<String>], owners: &[u32], me: u32) {
    if me == 0 || owners.iter().any(|o| *o != me) {
        header.insert(1, "OWNER");
        for (r, o) in rows.iter_mut().zip(owners) {
            r.insert(1, user_name(*o));
        }
    }
}

/// A uid as its user name from /etc/passwd, else the number.
pub fn user_name(uid: u32) -> String {
    daemon::users::user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// Prints a table: columns padded to their widest cell, two spaces apart, the last one as is.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let _ = std::io::stdout()
        .lock()
        .write_all(table(header, rows).as_bytes());
}

/// The text of `print_table`, each line ended by a newline.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    // Cells may hold text an agent chose (names, states, reasons): never raw on a terminal.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| crate::escape::field(c).into_owned())
                .collect()
        })
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s
    };
    let mut out = line(header.to_vec()) + "\n";
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out
}

/// Show everything aitherd knows about an agent (JSON).
#[derive(Args)]
pub struct InspectArgs {
    name: String,
    /// Print every field as JSON (what a pipe gets anyway).
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> i32 {
    match call(&Request::Inspect { name: a.name }) {
        // A person at a terminal gets the summary; programs (a pipe, --json) get everything.
        Ok(v) if !a.json && crate::escape::stdout_is_terminal() => {
            let _ = std::io::stdout()
                .lock()
                .write_all(inspect_summary(&v).as_bytes());
            0
        }
        Ok(v) => {
            print_json(&v);
            0
        }
        Err(c) => c,
    }
}

/// `inspect` for a person: what `systemctl status` would say of the agent. Text the agent
/// chose (its status line, argv) is escaped.
fn inspect_summary(v: &serde_json::Value) -> String {
    let Ok(i) = serde_json::from_value::<Info>(v.clone()) else {
        return serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    };
    let esc = |s: &str| crate::escape::field(s).into_owned();
    let now = aither::units::now_ms();
    let ago = |ms: u64| human_age(now.saturating_sub(ms));
    let live = i.state.is_live();
    let mut out = format!("{} ({}) - {}\n", esc(&i.name), user_name(i.owner), i.state);
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<12} {v}\n"));
    line(
        "Policy:",
        format!("{}  (token {})", esc(&i.policy), i.token_id),
    );
    line("Command:", esc(&i.argv.join(" ")));
    if let Some(w) = &i.workspace {
        line("Workspace:", esc(&w.display().to_string()));
    }
    if let Some(q) = v["layer"]["quota"].as_u64() {
        // A quota'd layer: its filesystem's use while mounted, else what its image takes.
        let used = v["layer"]["fs_used"]
            .as_u64()
            .or_else(|| v["layer"]["disk_used"].as_u64())
            .unwrap_or(0);
        line(
            "Layer disk:",
            format!(
                "{} of {} quota",
                aither::units::Size(used),
                aither::units::Size(q)
            ),
        );
    }
    if !i.labels.is_empty() {
        let l: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line("Labels:", l.join(" "));
    }
    if live {
        let pids = format!(
            "{} (pid 1 {}, shim {})",
            i.agent_pid.map_or("-".into(), |p| p.to_string()),
            i.pid1.map_or("-".into(), |p| p.to_string()),
            i.shim_pid.map_or("-".into(), |p| p.to_string())
        );
        line("PID:", pids);
    }
    if let Some(c) = &i.cgroup {
        line("Cgroup:", esc(c));
    }
    let started = match i.started_ms.filter(|_| live) {
        Some(t) => format!("{} ago", ago(t)),
        None => "-".into(),
    };
    line("Up:", format!("{started}; restarts {}", i.restarts));
    if let Some(e) = &i.last_exit {
        line("Last exit:", esc(e));
    }
    if let Some(t) = i
        .next_start_ms
        .filter(|_| i.state == daemon::supervise::State::Backoff)
    {
        line(
            "Next start:",
            format!("in {}", human_age(t.saturating_sub(now))),
        );
    }
    let mut health = Vec::new();
    if i.supervision.wait_ready {
        health.push(
            if i.ready {
                "ready"
            } else {
                "waiting for READY"
            }
            .to_string(),
        );
    }
    if let Some(h) = i.last_heartbeat_ms {
        health.push(format!("last heartbeat {} ago", ago(h)));
    }
    if i.health_failures > 0 {
        health.push(format!("{} failed checks", i.health_failures));
    }
    if !health.is_empty() {
        line("Health:", health.join("; "));
    }
    if let Some(st) = &i.status_text {
        line("Status:", esc(st));
    }
    if live {
        let mem = match (i.memory_bytes, i.memory_limit) {
            (Some(m), Some(l)) => format!("{} / {}", Size(m), Size(l)),
            (Some(m), None) => Size(m).to_string(),
            _ => "-".into(),
        };
        let pids = match (i.pids, i.pids_limit) {
            (Some(p), Some(l)) => format!("{p} / {l}"),
            (Some(p), None) => p.to_string(),
            _ => "-".into(),
        };
        let cpu = i.cpu_percent.map_or("-".into(), |c| format!("{c:.1}%"));
        line(
            "Resources:",
            format!(
                "CPU {cpu}, memory {mem}, tasks {pids}, OOM kills {}",
                i.oom_kills
            ),
        );
    }
    if let Some(g) = &i.gpu {
        line("GPU:", esc(g));
    }
    if let Some(rules) = v["net"]["rules"].as_object() {
        let (req, den) = rules.values().fold((0, 0), |(r, d), x| {
            (
                r + x["requests"].as_u64().unwrap_or(0),
                d + x["denials"].as_u64().unwrap_or(0),
            )
        });
        line(
            "Egress:",
            format!("{req} requests, {den} denials ({} rules)", rules.len()),
        );
    }
    let s = &i.supervision;
    let ms = |v: u64| aither::units::format_duration(Duration::from_millis(v));
    line(
        "Restart:",
        format!(
            "{} (backoff {} up to {}; stop timeout {})",
            serde_json::to_value(s.restart)
                .ok()
                .and_then(|r| r.as_str().map(str::to_string))
                .unwrap_or_default(),
            ms(s.backoff_ms),
            ms(s.backoff_max_ms),
            ms(s.stop_timeout_ms)
        ),
    );
    line("Logs:", format!("aitherctl logs {}", esc(&i.name)));
    out.push_str(&format!(
        "Everything (enforcement report, daemon usage, egress per rule): aitherctl inspect --json {}\n",
        esc(&i.name)
    ));
    out
}

/// Stop agents: SIGTERM, then after the timeout every process of the sandbox is killed. A
/// stopped agent stays stopped (no restart) until `aitherctl restart`. A paused agent is
/// thawed first, so that it can act on the SIGTERM.
///
/// Each NAME is stopped in turn and its result printed on a line of its own; the exit status
/// is 1 when any of them failed (not found, not the caller's), 0 when all were stopped.
#[derive(Args)]
pub struct StopArgs {
    /// The agents to stop.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Time between SIGTERM and the kill [default: the agent's stop timeout, 10s].
    #[arg(long, short = 't', value_name = "DURATION", value_parser = crate::parse_duration)]
    timeout: Option<Duration>,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// Send a signal to agents' main processes. SIGKILL kills the whole sandbox (a paused one
/// too); a signal sent this way never counts as a failure. To a paused agent any other signal
/// waits, pending, until `aitherctl resume`.
///
/// Each NAME gets the signal in turn, its result on a line of its own; the exit status is 1
/// when any failed.
#[derive(Args)]
pub struct KillArgs {
    /// The agents to signal.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Signal name or number [default: SIGKILL].
    #[arg(long, short = 's', value_name = "SIGNAL", default_value = "KILL")]
    signal: String,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// Restart agents: stop each (SIGTERM, grace, kill) and start it again; a failed or stopped
/// agent starts again with a fresh restart budget.
///
/// Each NAME in turn, its result on a line of its own; the exit status is 1 when any failed.
#[derive(Args)]
pub struct RestartArgs {
    /// The agents to restart.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// Remove agents that are not running (--force stops them first), with their logs.
///
/// Each NAME in turn, its result on a line of its own; the exit status is 1 when any failed.
#[derive(Args)]
pub struct RmArgs {
    /// The agents to remove.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Stop it first if it runs.
    #[arg(long, short = 'f')]
    force: bool,
    /// Also delete the agent's memory, every tier (kept by default, for an agent of the same
    /// name spawned later).
    #[arg(long)]
    purge_memory: bool,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// Pause running agents: every process of each sandbox is frozen by the cgroup freezer
/// (cgroup v2 `cgroup.freeze`; v1 the `freezer` hierarchy) and stays where it is, memory and
/// open files kept, until `aitherctl resume`.
///
/// A paused agent shows as `paused` in `ps` and `inspect`. Its health checks and heartbeat
/// watchdog are suspended (a frozen agent cannot answer, and that is neither a failure nor a
/// reason to restart it) and start again from the moment it is resumed. Its memory and pids
/// stay charged to its limits. `stop`, `restart` and `rm --force` work on a paused agent: it
/// is thawed, then stopped as usual. `kill -s KILL` kills it frozen; another signal waits,
/// pending, until the resume.
///
/// Each NAME in turn, its result on a line of its own. Pausing a paused agent is refused.
///
/// Exit status: 0 every agent paused; 1 any refused or failed: not found, not the caller's,
/// not running (stopped, exited, in backoff, queued: `conflict`), being stopped, or the host
/// has no cgroup freezer (`unsupported`: v1 without the freezer hierarchy; `aitherctl doctor`
/// shows it); 3 aitherd not reachable.
#[derive(Args)]
pub struct PauseArgs {
    /// The agents to pause.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// Resume paused agents: thaw every process of each sandbox. The agent's health checks and
/// watchdog start again from now (the paused time is not held against it), and its state goes
/// back to what it was before the pause.
///
/// Each NAME in turn, its result on a line of its own. Exit status: 0 every agent resumed; 1
/// any refused or failed (not found, not the caller's, not paused); 3 aitherd not reachable.
#[derive(Args)]
pub struct ResumeArgs {
    /// The agents to resume.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    /// Print each reply as JSON.
    #[arg(long)]
    json: bool,
}

/// One request per name, in order; each name's result printed (errors name the agent). The
/// exit status is the first failure's (unreachable stops the loop: the rest would fail the
/// same way), 0 when every one succeeded.
fn each<F>(names: &[String], mut one: F) -> i32
where
    F: FnMut(&str) -> i32,
{
    let mut status = 0;
    for name in names {
        let code = one(name);
        if code == EXIT_UNREACHABLE {
            return code;
        }
        if status == 0 {
            status = code;
        }
    }
    status
}

/// Calls `req` for `name`; a refusal is printed with the name it concerns.
fn call_named(name: &str, req: &Request) -> Result<serde_json::Value, i32> {
    let mut c = connect()?;
    let r = c.call(req).map_err(client_err)?;
    if r.ok {
        return Ok(r.data.unwrap_or_default());
    }
    let e = r.error.unwrap_or(aither::daemon::proto::ErrorBody {
        code: aither::daemon::proto::ErrorCode::Internal,
        message: "no reason given".into(),
    });
    // aitherd's messages mostly name the agent already; a bare one gets the name in front.
    if e.message.contains(name) {
        eprintln!("aither: error: {} ({})", e.message, e.code);
    } else {
        eprintln!("aither: error: {name}: {} ({})", e.message, e.code);
    }
    Err(EXIT_REFUSED)
}

fn act(name: &str, req: Request, json: bool, what: &str) -> i32 {
    match call_named(name, &req) {
        Ok(v) => {
            if json {
                print_json(&v);
            } else {
                let state = v
                    .get("state")
                    .and_then(|s| s.as_str())
                    .unwrap_or(if what == "removed" { "removed" } else { "" });
                println!(
                    "{}: {what}{}",
                    v.get("name").and_then(|n| n.as_str()).unwrap_or(name),
                    if state.is_empty() || state == what {
                        String::new()
                    } else {
                        format!(" (now {state})")
                    }
                );
            }
            0
        }
        Err(c) => c,
    }
}

pub fn stop(a: StopArgs) -> i32 {
    each(&a.names, |name| {
        act(
            name,
            Request::Stop {
                name: name.to_string(),
                timeout_ms: a.timeout.map(to_ms),
            },
            a.json,
            "stopped",
        )
    })
}

pub fn kill(a: KillArgs) -> i32 {
    let signal = match daemon::parse_signal(&a.signal) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aither: error: {e}");
            return EXIT_USAGE;
        }
    };
    each(&a.names, |name| {
        // The state right after the signal is not news (the agent has not reacted yet): the
        // reply's state is left out of the line (issue 20: "signalled (now ready)").
        match call_named(
            name,
            &Request::Kill {
                name: name.to_string(),
                signal,
            },
        ) {
            Ok(v) if a.json => {
                print_json(&v);
                0
            }
            Ok(v) => {
                println!(
                    "{}: sent {}",
                    v.get("name").and_then(|n| n.as_str()).unwrap_or(name),
                    daemon::signal_name(signal)
                );
                0
            }
            Err(c) => c,
        }
    })
}

pub fn restart(a: RestartArgs) -> i32 {
    each(&a.names, |name| {
        act(
            name,
            Request::Restart {
                name: name.to_string(),
            },
            a.json,
            "restarting",
        )
    })
}

pub fn rm(a: RmArgs) -> i32 {
    each(&a.names, |name| {
        act(
            name,
            Request::Rm {
                name: name.to_string(),
                force: a.force,
                purge_memory: a.purge_memory,
            },
            a.json,
            "removed",
        )
    })
}

pub fn pause(a: PauseArgs) -> i32 {
    each(&a.names, |name| {
        act(
            name,
            Request::Pause {
                name: name.to_string(),
            },
            a.json,
            "paused",
        )
    })
}

pub fn resume(a: ResumeArgs) -> i32 {
    each(&a.names, |name| {
        act(
            name,
            Request::Resume {
                name: name.to_string(),
            },
            a.json,
            "resumed",
        )
    })
}

/// Print aitherd's events: state changes, exits, restarts, health results, pain signals.
#[derive(Args)]
pub struct EventsArgs {
    /// Keep printing new events until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only events since this long ago (e.g. 10m) [default: all kept; with -f: none].
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// Only this agent's events.
    #[arg(long, value_name = "NAME")]
    agent: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn print_event(e: &Event, json: bool) -> bool {
    let mut out = std::io::stdout().lock();
    let r = if json {
        writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default())
    } else {
        let ts = aither::token::format_time(e.ts_ms / 1000);
        writeln!(
            out,
            "{}.{:03}Z  {:<16}  {:<14}  {}",
            ts.trim_end_matches('Z'),
            e.ts_ms % 1000,
            e.name.as_deref().unwrap_or("-"),
            e.kind,
            e.data
        )
    };
    r.is_ok() && out.flush().is_ok()
}

pub fn events(a: EventsArgs) -> i32 {
    let since_ms = a
        .since
        .map(|d| aither::units::now_ms().saturating_sub(to_ms(d)));
    let req = Request::Events {
        follow: a.follow,
        since_ms: if a.follow {
            since_ms
        } else {
            since_ms.or(Some(0))
        },
        name: a.agent.clone(),
    };
    if !a.follow {
        return match call(&req) {
            Ok(v) => {
                let list: Vec<Event> = serde_json::from_value(v).unwrap_or_default();
                for e in &list {
                    if !print_event(e, a.json) {
                        break;
                    }
                }
                0
            }
            Err(c) => c,
        };
    }
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut status = 0;
    let res = c.stream(&req, |r| {
        if !r.ok {
            let _ = reply_data(r.clone());
            status = EXIT_REFUSED;
            return false;
        }
        match r
            .data
            .clone()
            .and_then(|d| serde_json::from_value::<Event>(d).ok())
        {
            Some(e) => print_event(&e, a.json),
            None => true,
        }
    });
    if let Err(e) = res {
        return client_err(e);
    }
    status
}
