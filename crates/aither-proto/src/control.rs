//! The control socket (`/run/aither/aitherd.sock`): what `aitherctl` (or any client) asks
//! aitherd, and its replies. Each request gets one reply; the follow forms of `logs`, `events`
//! and `bus_sub` get a stream of replies with `more: true` until the last one.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ErrorBody, ErrorCode};

/// What `aitherctl spawn` asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub name: String,
    /// Policy name or absolute path (the client resolves relative paths).
    #[serde(default)]
    pub policy: Option<String>,
    /// A capability token's text; its subject must be `name`.
    #[serde(default)]
    pub token: Option<String>,
    pub argv: Vec<String>,
    /// Absolute path of the workspace (default: the client's working directory).
    #[serde(default)]
    pub workspace: Option<PathBuf>,
    /// The client's working directory (the default workspace).
    pub cwd: PathBuf,
    /// `--env KEY=VALUE`, in order.
    #[serde(default)]
    pub env: Vec<String>,
    /// `--label KEY=VALUE`: the operator's labels (docs/daemon.md "Labels"), shown by
    /// `inspect` and selected by `ps --filter label=…`; checked by aitherd.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The client's environment, for the policy's `pass_env` (only the variables the policy
    /// names reach the spec; the rest is never stored).
    #[serde(default)]
    pub pass_env: Vec<(String, String)>,
    #[serde(default)]
    pub supervision: Supervision,
    /// Narrower limits than the token's (bytes, CPUs, processes).
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub pids: Option<u64>,
    /// Replace an agent of the same name that is not running.
    #[serde(default)]
    pub replace: bool,
    /// Narrower GPU asks than the token's `gpu` claim (`--gpus`, `--gpu-vram`,
    /// `--gpu-priority`, `--gpu-exclusive`/`--gpu-shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_vram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_exclusive: Option<bool>,
    /// Bus subjects granted on top of the policy's (`--bus-publish`, `--bus-subscribe`, an
    /// agent file's `[bus]`): only when aitherd mints the token from a policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bus_publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bus_subscribe: Vec<String>,
    /// Ports of the agent's sandbox published as named services (`--publish NAME=PORT`,
    /// docs/network.md), reachable by agents whose token grants NAME.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<(String, u16)>,
    /// Ports of the agent's sandbox published on the host's loopback (`--publish-host
    /// HOSTADDR:HOSTPORT=AGENTPORT`, docs/network.md): aitherd listens on HOSTADDR:HOSTPORT
    /// while the agent runs and relays each connection to its 127.0.0.1:AGENTPORT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_host: Vec<crate::publish::HostPublish>,
}

/// What `aitherctl exec` asks for: run `argv` inside agent `name`'s running sandbox,
/// confined as the agent (docs/daemon.md "exec"). The frame carries three descriptors
/// (SCM_RIGHTS): the command's stdin, stdout and stderr. Without `tty` each must be a pipe, a
/// regular file or /dev/null; with `tty` a terminal is allowed too, and the command gets a new
/// pty relayed to it, never the caller's terminal. The reply comes when the command ends:
/// `{"exit_code": N}`. Closing the connection kills the command.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub name: String,
    pub argv: Vec<String>,
    /// `--env KEY=VALUE`, in order, on top of the agent's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// `-w DIR`: the working directory inside the sandbox (relative: to the agent's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub tty: bool,
    /// `aitherctl cp`: the command is not the client's but the one aitherd derives from this
    /// (then `argv` is empty), and the operation is audited as `cp` (docs/agents.md "cp").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyOp>,
}

/// What `aitherctl run` asks of aitherd when it is reachable (docs/daemon.md "run"): one
/// command in a new sandbox, in the foreground, with the caller's streams. The frame carries
/// three descriptors (SCM_RIGHTS): stdin, stdout and stderr, each a pipe, a regular file,
/// /dev/null or a terminal (the agent then gets a pty of its own, relayed to it); a fourth,
/// when present, is the workspace the caller opened with their own rights (as spawn's).
///
/// Replies: `{"started": true}` once the launcher runs (a client may then feed stdin), then
/// `{"exit_code": N}` when the agent is done (124 timeout, 125/126/127 Aither's own, 128+N
/// for a signal). While it runs the client may send `RunSignal` frames; closing the
/// connection kills the run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// `--name` (default `run`); ignored with a token (its subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `--policy` (an installed name for a member); none with `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// A capability token's text (`--token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub argv: Vec<String>,
    /// `--workspace`, absolute; none: `cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<PathBuf>,
    /// The caller's working directory.
    pub cwd: PathBuf,
    /// `--env KEY=VALUE`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The caller's environment, for the policy's `pass_env` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<(String, String)>,
    /// `--timeout`, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `--memory`, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// `--workspace-as-owner`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub workspace_as_owner: bool,
}

/// A signal `aitherctl run` received, for the run's launcher (which forwards it to the
/// agent): a frame on the run's connection after the request. Only the signals the launcher
/// forwards are taken (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunSignal {
    pub signal: i32,
}

/// The agent side of `aitherctl cp`, run inside the sandbox with the agent's confinement by
/// the `tar` (or `test`) on the agent's own PATH. Paths are the agent's (relative: to its
/// working directory).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CopyOp {
    /// A tar stream of `path` on stdout: `tar -c -f - --hard-dereference -C DIR ./NAME`, or
    /// with `contents` (`PATH/.`) `-C PATH .`.
    Out { path: PathBuf, contents: bool },
    /// Exit 0 when `path` is a directory (`test -d PATH`).
    IsDir { path: PathBuf },
    /// The tar stream on stdin extracted into the directory `dir` (`tar -x -f - -C DIR`).
    In { dir: PathBuf },
}

/// Which of the agent's standard streams a log record came from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    /// The name in the log file and on the wire: `stdout`, `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

impl std::str::FromStr for LogStream {
    type Err = String;
    fn from_str(s: &str) -> Result<LogStream, String> {
        match s {
            "stdout" => Ok(LogStream::Stdout),
            "stderr" => Ok(LogStream::Stderr),
            _ => Err(format!("{s:?}: expected stdout or stderr")),
        }
    }
}

/// What `Request::LayerOp` does to an agent's layer.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LayerAction {
    Discard,
    Snapshot,
    SnapshotRm,
    Restore,
    /// The owner's aitherctl applied `paths` to the directory (it does the apply itself, as
    /// the owner): aitherd audits and announces it; nothing in the layer changes.
    Applied,
}

/// A fork's memory tiers: copied from NAME into NEW, or NEW starts with none. (No sharing:
/// the memory store keys every entry by its agent's name and each token reaches its own
/// subject's, so two names on one store would need aliasing the store does not have.)
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ForkMemory {
    #[default]
    Copy,
    None,
}

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Spawn(Box<SpawnRequest>),
    Ps,
    /// GPUs, their VRAM and leases (`aitherctl gpu ls`).
    GpuLs,
    /// The MicroScheduler's queue in order (`aitherctl gpu queue`).
    GpuQueue,
    Inspect {
        name: String,
    },
    /// An agent's log (docs/daemon.md "Logs"). Without `records` the replies carry
    /// `{"text": ...}`: the agent's output as it wrote it. With `records`, `{"records": [...]}`:
    /// one object per stored record (`ts`, `stream`, `run`, `text`, `partial`) or run boundary
    /// (`ts`, `run`, `event`, ...).
    Logs {
        name: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        tail: Option<usize>,
        /// Only records from this time on (nanoseconds since the Unix epoch).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ns: Option<u64>,
        /// Only this stream's records.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<LogStream>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        records: bool,
    },
    Stop {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Kill {
        name: String,
        signal: i32,
    },
    Restart {
        name: String,
    },
    /// Freezes every process of a running agent (the cgroup freezer); its health checks and
    /// watchdog wait until `resume`.
    Pause {
        name: String,
    },
    /// Thaws a paused agent; its health checks and watchdog start again from now.
    Resume {
        name: String,
    },
    Rm {
        name: String,
        #[serde(default)]
        force: bool,
        /// Also delete every tier of the agent's memory (kept by default).
        #[serde(default)]
        purge_memory: bool,
    },
    /// A memory operation on `agent`'s memory, as an operator: `request` is a `mem.*` request
    /// as on the agent channel (docs/memory.md), plus the operator-only `mem.export`,
    /// `mem.import` and `mem.clear`.
    Mem {
        agent: String,
        request: serde_json::Value,
    },
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        name: Option<String>,
    },
    /// Publish on the bus as an operator (docs/bus.md). Requests may be pipelined.
    BusPub {
        subject: String,
        data: serde_json::Value,
        #[serde(default)]
        durable: bool,
    },
    /// Subscribe as an operator: a stream of `more: true` replies.
    BusSub {
        pattern: String,
        #[serde(default)]
        durable: Option<String>,
        #[serde(default)]
        from_seq: Option<u64>,
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        queue: Option<usize>,
    },
    /// The durable log's statistics and the live subscriptions.
    BusStreams,
    /// Moves the caller's durable consumer's cursor to `seq` (`owner`: an admin acts on that
    /// uid's consumer; anyone else only on their own).
    BusAck {
        durable: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// Deletes the caller's durable consumer (`owner`: as in `bus_ack`).
    BusConsumerRm {
        durable: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// Stores the caller's secret `name` (`owner`: an admin sets that uid's), replacing a value
    /// it had (a rotation). The value is never logged or echoed.
    SecretSet {
        name: String,
        value: SecretValue,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// The caller's secrets' names, sizes and times (an admin's: everyone's, with owners).
    SecretLs,
    /// Removes the caller's secret `name` (`owner`: as in `secret_set`).
    SecretRm {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// A command in a running agent's sandbox (`aitherctl exec`).
    Exec(ExecRequest),
    /// A foreground run in a new sandbox (`aitherctl run` with aitherd reachable).
    Run(Box<RunRequest>),
    /// One sample of the resource use of agents (`aitherctl stats`): CPU, memory, pids, egress
    /// and GPU lease. `names` empty: every agent the caller may see (as `ps`); else those
    /// agents, in that order, and a name the caller may not see is `not_found` (as `inspect`).
    /// The reply is `{"agents": [...]}`, one object per agent (docs/daemon.md "stats").
    Stats {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        names: Vec<String>,
    },
    /// The audit records the caller may see (`aitherctl audit` for a user who cannot read the
    /// root-only log): an admin's, all; anyone else's, those they asked for or that concern
    /// their agents. The reply is `{"lines": [...]}`, each a stored record's text.
    Audit {
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        agent: Option<String>,
    },
    /// Reads aitherd.toml again and applies what can change live (admins only). The reply is
    /// `{"path", "changed", "restart_required", "errors"}`, each change `{"field", "old",
    /// "new"}`; a bad file is `invalid` with that report as `data`, and nothing changes.
    DaemonReload,
    /// The configuration in force (admins only): `{"path", "file_present", "config",
    /// "sources"}`, `sources` mapping each dotted field to `default`, `file`, `env` or `flag`.
    DaemonConfig,
    /// An agent's layered workspace, for its owner's `aitherctl diff`/`apply`
    /// (docs/workspaces.md): the layer's record (`workspace`, `dev`, `ino`, `owner_uid`,
    /// `owner_gid`, `store_uid`, `store_gid`) and, with the reply (SCM_RIGHTS), a read-only
    /// detached mount of its upper layer, which the caller reads with their own rights.
    LayerOpen {
        name: String,
    },
    /// A change to an agent's layered workspace, done by aitherd for the agent's owner (root's
    /// layer, the owner checked, audited and announced on the bus; docs/workspaces.md):
    /// `discard`, `snapshot` (`tag`, `keep`), `snapshot_rm` (`tag`), `restore` (`tag`), and
    /// `applied` (`paths`: the owner's own apply, reported to be audited and announced). The
    /// reply is the operation's result (a snapshot's record, a restore's copy statistics).
    LayerOp {
        name: String,
        action: LayerAction,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep: Option<u32>,
        /// `applied`: the paths the caller applied (at most 10,000 are kept).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        paths: Vec<String>,
    },
    /// `aitherctl fork NAME NEW`: a new agent NEW made from daemon agent NAME
    /// (docs/workspaces.md "fork"): NAME's layer (or snapshot `from`) copied, NEW spawned
    /// with NAME's policy, workspace and supervision (and `argv` when not empty, else NAME's
    /// command), its memory copied (`memory` = "copy") or not ("none"). A non-admin presents
    /// the workspace directory as a descriptor (SCM_RIGHTS), as for `spawn`.
    Fork {
        name: String,
        new: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        argv: Vec<String>,
        memory: ForkMemory,
        /// A token for NEW (its subject NEW), required when NAME was spawned with a token of
        /// its own: a token binds its agent's name, so NAME's cannot be NEW's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Says which front end the connection serves (docs/mcp.md "Audit"), as its first frame:
    /// aitherd records one `mcp` audit record for the call (`tool`, `agent`; a deny with the
    /// rule when `refused` says why the front end refused it without acting), and every later
    /// record of the connection carries `via`. Answered `{}`.
    Via {
        via: Via,
        tool: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
}

/// A front end that acts for the caller on the control socket, named in the audit records of
/// its connection. A closed set: no text of the client's reaches the audit stream this way.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `aitherctl mcp`, the Model Context Protocol server.
    Mcp,
}

impl Via {
    /// The name in audit records: `mcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Mcp => "mcp",
        }
    }
}

/// A secret's value in a request: shown as `<secret>` by `Debug`, so no log of a request can
/// carry it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// One reply frame (the control socket and the agent channel).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// The request's `id`, echoed (agent channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// More frames follow (the follow forms of logs and events).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply {
            id: None,
            ok: true,
            data: Some(data),
            error: None,
            more: false,
        }
    }

    pub fn chunk(data: serde_json::Value) -> Reply {
        Reply {
            more: true,
            ..Reply::ok(data)
        }
    }

    pub fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            id: None,
            ok: false,
            data: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
            more: false,
        }
    }
}

/// restart = never | on-failure | always.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    #[default]
    OnFailure,
    Always,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<RestartPolicy, String> {
        match s {
            "never" | "no" => Ok(RestartPolicy::Never),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(format!("{s:?}: expected never, on-failure or always")),
        }
    }
}

/// How one agent is supervised. Durations in milliseconds on the wire.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Supervision {
    pub restart: RestartPolicy,
    /// First backoff delay; doubles per consecutive failure up to `backoff_max_ms`.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// More than this many restarts within `burst_window_ms` → Failed.
    pub burst_limit: u32,
    pub burst_window_ms: u64,
    /// Healthy this long → the backoff starts again from `backoff_ms`.
    pub reset_after_ms: u64,
    /// Exit codes that count as success.
    pub success_codes: Vec<i32>,
    /// The agent sends READY on its channel; until then it is Starting.
    pub wait_ready: bool,
    /// READY (or the first passing health check) must come within this, or it is a failure.
    pub startup_timeout_ms: Option<u64>,
    /// Heartbeats must come at least this often once ready, or it is a failure.
    pub watchdog_ms: Option<u64>,
    /// A command run inside the agent's sandbox; exit 0 = healthy.
    pub health_cmd: Option<Vec<String>>,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Consecutive failed checks that make it a failure.
    pub health_threshold: u32,
    /// SIGTERM, then this long before the whole cgroup is killed.
    pub stop_timeout_ms: u64,
}

/// A supervision setting out of range (`Supervision::validate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SupervisionError {
    #[error("health interval must be at least 100ms")]
    HealthInterval,
    #[error("health threshold must be at least 1")]
    HealthThreshold,
    #[error("watchdog must be at least 50ms")]
    Watchdog,
    #[error("the maximum backoff is below the first backoff")]
    Backoff,
    #[error("the health command is empty")]
    EmptyHealthCommand,
}

impl Default for Supervision {
    fn default() -> Supervision {
        Supervision {
            restart: RestartPolicy::OnFailure,
            backoff_ms: 1000,
            backoff_max_ms: 300_000,
            burst_limit: 5,
            burst_window_ms: 600_000,
            reset_after_ms: 600_000,
            success_codes: vec![0],
            wait_ready: false,
            startup_timeout_ms: None,
            watchdog_ms: None,
            health_cmd: None,
            health_interval_ms: 10_000,
            health_timeout_ms: 5_000,
            health_threshold: 3,
            stop_timeout_ms: 10_000,
        }
    }
}

impl Supervision {
    /// Whether the agent has a readiness stage (READY or a health check).
    pub fn needs_readiness(&self) -> bool {
        self.wait_ready || self.health_cmd.is_some()
    }

    pub fn validate(&self) -> Result<(), SupervisionError> {
        if self.health_interval_ms < 100 {
            return Err(SupervisionError::HealthInterval);
        }
        if self.health_threshold == 0 {
            return Err(SupervisionError::HealthThreshold);
        }
        if matches!(self.watchdog_ms, Some(w) if w < 50) {
            return Err(SupervisionError::Watchdog);
        }
        if self.backoff_max_ms < self.backoff_ms {
            return Err(SupervisionError::Backoff);
        }
        if matches!(&self.health_cmd, Some(c) if c.is_empty()) {
            return Err(SupervisionError::EmptyHealthCommand);
        }
        Ok(())
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_millis(self.stop_timeout_ms)
    }
}
