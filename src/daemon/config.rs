//! aitherd's configuration file (issue 20): `/etc/aither/aitherd.toml`, or `aitherd --config
//! PATH`. One typed document with a table per part (`[daemon]`, `[metrics]`, `[gpu]`,
//! `[limits]`, `[retention]`, `[users]`, `[egress]`, `[pool]`); an unknown table or field is an error
//! naming the file, the line and the field.
//!
//! Precedence: built-in defaults < the file < the environment variables that already existed
//! (`AITHER_BUS_MAX_BYTES`, `AITHER_BUS_MAX_AGE_S`, `AITHER_GPU_POLL_MS`) < command-line flags
//! (`--metrics`, `--group`, `--admin-group`). Every value's source is kept for
//! `aitherctl daemon config --json`.
//!
//! The file is opened once, following no symbolic link anywhere in its path, and the opened fd
//! must be a regular file owned by root and not writable by group or others (docs/daemon.md
//! "Configuration file"; docs/security-model.md "The host side").
//!
//! [`reload`] (SIGHUP, `aitherctl daemon reload`) reads the file again: what can change live
//! is applied ([`LIVE`]: limits, retention, per-user limits, the metrics listener, the GPU poll
//! interval), what cannot is reported as needing a restart and keeps its running value, and a
//! bad file changes nothing.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::users::UsersConfig;
use crate::hostpath::{self, HostPathError, Kind};
use crate::net::config::EgressConfig;
use crate::units::{HumanDuration, Size};

/// The configuration file read when no `--config` is given (absent: every default).
pub const DEFAULT_PATH: &str = "/etc/aither/aitherd.toml";
/// The largest configuration file read.
const MAX_FILE: u64 = 1 << 20;

/// Prefixes of the fields that a reload applies; every other field needs a restart.
pub const LIVE: &[&str] = &[
    "limits.",
    "retention.",
    "users.",
    "metrics.listen",
    "gpu.poll_ms",
];

/// Errors of the configuration file and of the flags that override it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0}")]
    Open(#[source] HostPathError),
    #[error(
        "configuration file {path}: owned by uid {uid}; it must be owned by root (chown root:root)"
    )]
    Owner { path: PathBuf, uid: u32 },
    #[error(
        "configuration file {path}: mode {mode:04o} lets group or others write it; it must not \
         (chmod go-w)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("configuration file {path}: is {found}, expected a regular file")]
    NotFile { path: PathBuf, found: Kind },
    #[error("configuration file {path}: larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("configuration file {path}: reading: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}, column {column}: field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    #[error("{path}: line {line}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    #[error("field `{field}` (set in the environment, not in {path}): {message}")]
    InvalidEnv {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{flag} {value:?}: {message}")]
    Override {
        flag: &'static str,
        value: String,
        message: String,
    },
}

/// Where the metrics are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    /// A Unix socket (0660 root:aither, else 0600), the default.
    Unix(PathBuf),
    /// A TCP address; no authentication, so loopback or a private network only.
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if s == "off" {
            return Ok(Listen::Off);
        }
        if let Some(p) = s.strip_prefix("unix:") {
            let p = Path::new(p);
            if !p.is_absolute() {
                return Err(
                    "a unix socket path must be absolute (unix:/run/aither/metrics.sock)".into(),
                );
            }
            return Ok(Listen::Unix(p.to_path_buf()));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            "expected \"off\", \"unix:/ABSOLUTE/PATH\" or an IP address and port (127.0.0.1:9464)"
                .into()
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[daemon]`: who may use the control socket (needs a restart).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSection {
    /// Members may use the socket (each acts on their own agents only).
    pub group: String,
    /// Members act on every user's agents, as root does.
    pub admin_group: String,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            group: super::identity::MEMBER_GROUP.into(),
            admin_group: super::identity::ADMIN_GROUP.into(),
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// None in the file: `unix:` + `metrics.sock` beside the control socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Listen>,
}

/// The GPU backends aitherd.toml may name. The simulated backend is not one of them: it is
/// declared only in gpus.toml (`AITHER_GPUS` in debug builds) and refused by release builds.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GpuBackend {
    Nvml,
    None,
}

/// `[gpu]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSection {
    /// Unset: gpus.toml decides (NVML without one). Set: wins over gpus.toml's `backend`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<GpuBackend>,
    /// How often the scheduler ages its queue and reads VRAM use, in milliseconds.
    pub poll_ms: u64,
    /// Where NVIDIA's management library is (absolute path): for hosts whose driver lives
    /// outside the loader's search path. Unset: `libnvidia-ml.so` through the loader, and only
    /// when the host shows a driver. Needs a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvml_library: Option<PathBuf>,
}

impl Default for GpuSection {
    fn default() -> Self {
        GpuSection {
            backend: None,
            poll_ms: 2000,
            nvml_library: None,
        }
    }
}

/// `[limits]`: what aitherd accepts and spends per agent (docs/daemon.md "Bounds"). Applied
/// live: a new agent (or a new run's budget) gets the values in force.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Agents held at once, all users together, in any state (None: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_agents: Option<usize>,
    /// Channel requests per second an agent may make, sustained, and in a burst.
    pub request_rate: f64,
    pub request_burst: f64,
    /// Event-writing requests (`pain`, `status`) per second, and in a burst.
    pub event_rate: f64,
    pub event_burst: f64,
    /// Bytes of durable bus publishes per second, and in a burst.
    pub durable_rate: Size,
    pub durable_burst: Size,
    /// aitherd CPU seconds per second an agent's requests may use, and in a burst.
    pub cpu_rate: f64,
    pub cpu_burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        use super::budget as b;
        Limits {
            max_agents: None,
            request_rate: b::REQUEST_RATE,
            request_burst: b::REQUEST_BURST,
            event_rate: b::EVENT_RATE,
            event_burst: b::EVENT_BURST,
            durable_rate: Size(b::DURABLE_RATE as u64),
            durable_burst: Size(b::DURABLE_BURST as u64),
            cpu_rate: b::CPU_RATE,
            cpu_burst: b::CPU_BURST,
        }
    }
}

/// `[retention]`: how much of its own records aitherd keeps. Applied live.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// The bus's durable log (bus.db): the oldest messages go past either limit.
    pub bus_max_bytes: Size,
    pub bus_max_age: HumanDuration,
    /// The audit log rotates at this size and keeps this many rotated files.
    pub audit_rotate_bytes: Size,
    pub audit_keep: u32,
    /// Each agent's log (agent.log) rotates at this size, keeping this many rotated files
    /// (from the agent's next run on).
    pub agent_log_max_bytes: Size,
    pub agent_log_keep: u32,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            bus_max_bytes: Size(256 << 20),
            bus_max_age: HumanDuration(Duration::from_secs(7 * 86_400)),
            audit_rotate_bytes: Size(crate::audit::ROTATE_BYTES),
            audit_keep: crate::audit::KEEP,
            agent_log_max_bytes: Size(super::shim::LOG_MAX_BYTES),
            agent_log_keep: super::shim::LOG_KEEP,
        }
    }
}

/// `[pool]`: prepared sandboxes for the runs aitherd serves (warm start, daemon/pool.rs).
/// Needs a restart.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Prepared sandboxes kept per shape (a policy with the run's options); 0 turns the
    /// pool off.
    pub size: usize,
    /// Shapes kept at once; a new one replaces the least recently used.
    pub max_shapes: usize,
    /// All prepared sandboxes together, measured as their processes' PSS once ready.
    pub memory_budget: Size,
    /// A shape not run for this long gives its prepared sandboxes back.
    pub idle: HumanDuration,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            size: 2,
            max_shapes: 4,
            memory_budget: Size(64 << 20),
            idle: HumanDuration(Duration::from_secs(300)),
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonSection,
    pub metrics: MetricsSection,
    pub gpu: GpuSection,
    pub limits: Limits,
    pub retention: RetentionSection,
    pub users: UsersConfig,
    pub egress: EgressConfig,
    pub pool: PoolSection,
}

/// What the command line says (each None: not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub metrics: Option<Listen>,
    pub group: Option<String>,
    pub admin_group: Option<String>,
}

/// Where each value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// How to read the configuration again: the file, whether it must exist, the flags, and the
/// control socket (the default metrics socket is beside it).
#[derive(Clone, Debug)]
pub struct Spec {
    pub path: PathBuf,
    /// Given with `--config`: it must exist. The default path may be absent.
    pub explicit: bool,
    pub overrides: Overrides,
    pub socket: PathBuf,
}

/// A configuration read and resolved: every value set, each with its source.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    /// Dotted field → source, for the fields not from the defaults.
    pub sources: BTreeMap<String, Source>,
    /// Whether the file was there.
    pub file_present: bool,
}

impl Spec {
    /// Reads the file (if any), applies the environment and the flags, fills the defaults
    /// that depend on the socket, and checks every value.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let text = read_secure(&self.path, self.explicit)?;
        let file_present = text.is_some();
        let text = text.unwrap_or_default();
        let mut config = parse(&self.path, &text)?;
        let mut sources = BTreeMap::new();
        if let Ok(table) = text.parse::<toml::Table>() {
            leaves("", &Value::from(table_json(&table)), &mut |k, _| {
                sources.insert(k.to_string(), Source::File);
            });
        }
        self.apply_env(&mut config, &mut sources)?;
        self.apply_flags(&mut config, &mut sources);
        if config.metrics.listen.is_none() {
            config.metrics.listen = Some(Listen::Unix(default_metrics_socket(&self.socket)));
        }
        validate(&self.path, &text, &config)?;
        Ok(Loaded {
            config,
            sources,
            file_present,
        })
    }

    fn apply_env(
        &self,
        c: &mut Config,
        sources: &mut BTreeMap<String, Source>,
    ) -> Result<(), ConfigError> {
        let num = |k: &'static str| -> Result<Option<u64>, ConfigError> {
            match std::env::var(k) {
                Ok(v) => v.parse().map(Some).map_err(|_| ConfigError::Override {
                    flag: k,
                    value: v,
                    message: "expected a whole number".into(),
                }),
                Err(_) => Ok(None),
            }
        };
        if let Some(n) = num("AITHER_BUS_MAX_BYTES")? {
            c.retention.bus_max_bytes = Size(n);
            sources.insert("retention.bus_max_bytes".into(), Source::Env);
        }
        if let Some(n) = num("AITHER_BUS_MAX_AGE_S")? {
            c.retention.bus_max_age = HumanDuration(Duration::from_secs(n));
            sources.insert("retention.bus_max_age".into(), Source::Env);
        }
        if let Some(n) = num("AITHER_GPU_POLL_MS")? {
            c.gpu.poll_ms = n;
            sources.insert("gpu.poll_ms".into(), Source::Env);
        }
        Ok(())
    }

    fn apply_flags(&self, c: &mut Config, sources: &mut BTreeMap<String, Source>) {
        let o = &self.overrides;
        if let Some(l) = &o.metrics {
            c.metrics.listen = Some(l.clone());
            sources.insert("metrics.listen".into(), Source::Flag);
        }
        if let Some(g) = &o.group {
            c.daemon.group = g.clone();
            sources.insert("daemon.group".into(), Source::Flag);
        }
        if let Some(g) = &o.admin_group {
            c.daemon.admin_group = g.clone();
            sources.insert("daemon.admin_group".into(), Source::Flag);
        }
    }
}

impl Loaded {
    /// The effective configuration and each value's source, for `aitherctl daemon config`.
    pub fn show(&self, spec: &Spec) -> Value {
        let config = serde_json::to_value(&self.config).unwrap_or_default();
        let mut sources = serde_json::Map::new();
        leaves("", &config, &mut |k, _| {
            let s = self.sources.get(k).copied().unwrap_or(Source::Default);
            sources.insert(k.to_string(), json!(s));
        });
        json!({
            "path": spec.path,
            "file_present": self.file_present,
            "config": config,
            "sources": sources,
        })
    }
}

/// The metrics socket when none is configured: beside the control socket, `metrics.sock` for
/// `aitherd.sock` (/run/aither/metrics.sock by default), `NAME-metrics.sock` for `NAME.sock`,
/// so that two daemons with their own sockets in one directory do not share it.
pub fn default_metrics_socket(control: &Path) -> PathBuf {
    let dir = control.parent().unwrap_or(Path::new("/run/aither"));
    let name = control
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("aitherd.sock");
    match name.strip_suffix(".sock").unwrap_or(name) {
        "aitherd" => dir.join("metrics.sock"),
        stem => dir.join(format!("{stem}-metrics.sock")),
    }
}

/// Opens the file once, following no link anywhere in its path, checks the fd (a regular
/// file, owned by root, not writable by group or others) and reads it. `Ok(None)`: absent and
/// not required.
pub fn read_secure(path: &Path, required: bool) -> Result<Option<String>, ConfigError> {
    let fd = match hostpath::open_nofollow(
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if !required && e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(ConfigError::Open(e)),
    };
    let meta =
        hostpath::check_fd(std::os::fd::AsFd::as_fd(&fd)).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
    if meta.kind != Kind::File {
        return Err(ConfigError::NotFile {
            path: path.into(),
            found: meta.kind,
        });
    }
    if meta.uid != 0 {
        return Err(ConfigError::Owner {
            path: path.into(),
            uid: meta.uid,
        });
    }
    if meta.mode & 0o022 != 0 {
        return Err(ConfigError::Mode {
            path: path.into(),
            mode: meta.mode,
        });
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
    if text.len() as u64 > MAX_FILE {
        return Err(ConfigError::TooLarge { path: path.into() });
    }
    Ok(Some(text))
}

/// Parses the text, naming line, column and field on an error.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, column, field) = crate::policy::locate::from_toml_error(text, &e);
        ConfigError::Parse {
            path: path.into(),
            line,
            column,
            field,
            message: e.message().to_string(),
        }
    })
}

/// Checks the values serde cannot: positive rates, sane sizes and counts, the per-user limits.
fn validate(path: &Path, text: &str, c: &Config) -> Result<(), ConfigError> {
    let bad = |table: &str, key: &str, message: &str| {
        let (line, _) = crate::policy::locate::key(text, table, key);
        let in_file = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .is_some_and(|(k, _)| k.trim().trim_matches('"') == key);
        if in_file {
            ConfigError::Invalid {
                path: path.into(),
                line,
                field: format!("{table}.{key}"),
                message: message.into(),
            }
        } else {
            // Not in the file: only the environment sets a value that can be out of range.
            ConfigError::InvalidEnv {
                path: path.into(),
                field: format!("{table}.{key}"),
                message: message.into(),
            }
        }
    };
    let l = &c.limits;
    for (k, v, min) in [
        ("request_rate", l.request_rate, 0.0),
        ("event_rate", l.event_rate, 0.0),
        ("cpu_rate", l.cpu_rate, 0.0),
        ("cpu_burst", l.cpu_burst, 0.0),
        (
            "request_burst",
            l.request_burst,
            super::budget::QUERY_COST - 1e-9,
        ),
        ("event_burst", l.event_burst, 1.0 - 1e-9),
    ] {
        if !v.is_finite() || v <= min {
            let m = if min > 0.0 {
                format!("must be at least {}", min.ceil())
            } else {
                "must be more than 0".to_string()
            };
            return Err(bad("limits", k, &m));
        }
    }
    if l.max_agents == Some(0) {
        return Err(bad(
            "limits",
            "max_agents",
            "must be at least 1 (leave it out for no cap)",
        ));
    }
    if l.durable_rate.0 == 0 {
        return Err(bad("limits", "durable_rate", "must be more than 0"));
    }
    if l.durable_burst.0 < crate::bus::MAX_DATA as u64 {
        return Err(bad(
            "limits",
            "durable_burst",
            "must be at least 32K (the largest message)",
        ));
    }
    let r = &c.retention;
    for (k, v, min) in [
        ("bus_max_bytes", r.bus_max_bytes.0, 1 << 20),
        ("audit_rotate_bytes", r.audit_rotate_bytes.0, 64 << 10),
        ("agent_log_max_bytes", r.agent_log_max_bytes.0, 64 << 10),
    ] {
        if v < min {
            return Err(bad(
                "retention",
                k,
                &format!("must be at least {}", Size(min)),
            ));
        }
    }
    if r.bus_max_age.0 < Duration::from_secs(1) {
        return Err(bad("retention", "bus_max_age", "must be at least 1s"));
    }
    for (k, v) in [
        ("audit_keep", r.audit_keep),
        ("agent_log_keep", r.agent_log_keep),
    ] {
        if !(1..=100).contains(&v) {
            return Err(bad("retention", k, "must be between 1 and 100"));
        }
    }
    if c.pool.size > 64 {
        return Err(bad("pool", "size", "must be at most 64"));
    }
    if c.pool.max_shapes > 64 {
        return Err(bad("pool", "max_shapes", "must be at most 64"));
    }
    if c.pool.idle.0 < Duration::from_secs(1) {
        return Err(bad("pool", "idle", "must be at least 1s"));
    }
    if c.gpu.poll_ms < 10 {
        return Err(bad("gpu", "poll_ms", "must be at least 10"));
    }
    if c.gpu
        .nvml_library
        .as_ref()
        .is_some_and(|p| !p.is_absolute())
    {
        return Err(bad("gpu", "nvml_library", "must be an absolute path"));
    }
    UsersConfig::check(&c.users).map_err(|super::users::BadCpus(who)| {
        let table = if who == "default" {
            "users.default".to_string()
        } else {
            format!("users.user.{who}")
        };
        bad(&table, "cpus", "must be more than 0")
    })?;
    if c.egress.idle_timeout_s == Some(0) {
        return Err(bad("egress", "idle_timeout_s", "must be at least 1"));
    }
    if c.egress.max_descriptors.is_some_and(|n| n < 32) {
        return Err(bad("egress", "max_descriptors", "must be at least 32"));
    }
    Ok(())
}

/// A TOML table as JSON (dates as strings).
fn table_json(t: &toml::Table) -> serde_json::Map<String, Value> {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

/// Calls `f` with the dotted path of every leaf of `v` (arrays are leaves, empty tables are
/// skipped).
pub fn leaves(prefix: &str, v: &Value, f: &mut dyn FnMut(&str, &Value)) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&p, v, f);
            }
        }
        // An empty table (`[users]` with no user) has no field to name.
        Value::Object(_) => {}
        _ => f(prefix, v),
    }
}

/// One field that differs between two configurations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

/// The fields that differ between `old` and `new` (a field absent on one side is null).
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let flat = |c: &Config| {
        let mut m = BTreeMap::new();
        leaves(
            "",
            &serde_json::to_value(c).unwrap_or_default(),
            &mut |k, v| {
                m.insert(k.to_string(), v.clone());
            },
        );
        m
    };
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| Change {
            field: k.clone(),
            old: a.get(k).cloned().unwrap_or(Value::Null),
            new: b.get(k).cloned().unwrap_or(Value::Null),
        })
        .collect()
}

/// Whether a reload applies `field`.
pub fn is_live(field: &str) -> bool {
    LIVE.iter()
        .any(|p| field.starts_with(p) || field == p.trim_end_matches('.'))
}

/// `new` with the fields that need a restart put back to `running`'s values: what runs after
/// a reload.
pub fn keep_restart_fields(running: &Config, mut new: Config) -> Config {
    new.daemon = running.daemon.clone();
    new.gpu.backend = running.gpu.backend;
    new.gpu.nvml_library = running.gpu.nvml_library.clone();
    new.egress = running.egress.clone();
    new
}

/// The configuration in force and how to read it again.
pub struct Live {
    pub spec: Spec,
    current: std::sync::RwLock<std::sync::Arc<Loaded>>,
    /// One reload at a time (SIGHUP and `daemon reload` may race).
    pub reloading: std::sync::Mutex<()>,
}

impl Live {
    pub fn new(spec: Spec, loaded: Loaded) -> Live {
        Live {
            spec,
            current: std::sync::RwLock::new(std::sync::Arc::new(loaded)),
            reloading: std::sync::Mutex::new(()),
        }
    }

    /// The configuration in force (a snapshot: a reload does not change it under the caller).
    pub fn get(&self) -> std::sync::Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `loaded` in force.
    pub fn set(&self, loaded: Loaded) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(loaded);
    }
}

/// What a reload did, for the reply, the log and the audit stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadReport {
    pub path: PathBuf,
    /// Applied now.
    pub changed: Vec<Change>,
    /// In the file, not applied: they take effect at the next start.
    pub restart_required: Vec<Change>,
    /// Why nothing was applied (the file is bad); empty on success.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/aither/aitherd.toml")
    }

    #[test]
    fn every_default_is_valid_and_an_empty_file_is_the_defaults() {
        let c = parse(p(), "").unwrap();
        assert_eq!(c, Config::default());
        validate(p(), "", &c).unwrap();
    }

    #[test]
    fn a_bad_field_names_line_column_and_field() {
        let e = parse(p(), "[limits]\nmax_agents = 2\nmax_agnts = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("limits.max_agnts") && e.contains("aitherd.toml"),
            "{e}"
        );
        let e = parse(p(), "[limits]\nrequest_rate = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("limits.request_rate"),
            "{e}"
        );
        let e = parse(p(), "[limitz]\n").unwrap_err().to_string();
        assert!(e.contains("limitz"), "{e}");
        // The shipped file's [pool] block, uncommented, is the defaults; a size out of range
        // names its line and field.
        let text = "[pool]\nsize = 2\nmax_shapes = 4\nmemory_budget = \"64M\"\nidle = \"5m\"\n";
        let c = parse(p(), text).unwrap();
        assert_eq!(c.pool, PoolSection::default());
        let text = "[pool]\nsize = 65\n";
        let e = validate(p(), text, &parse(p(), text).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("pool.size"), "{e}");
        let text = "[retention]\naudit_keep = 0\n";
        let e = validate(p(), text, &parse(p(), text).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("retention.audit_keep"),
            "{e}"
        );
    }

    #[test]
    fn the_nvml_library_is_an_absolute_path() {
        let text = "[gpu]\nnvml_library = \"lib/libnvidia-ml.so.1\"\n";
        let e = validate(p(), text, &parse(p(), text).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpu.nvml_library") && e.contains("absolute"),
            "{e}"
        );
        let text = "[gpu]\nnvml_library = \"/opt/nvidia/libnvidia-ml.so.1\"\n";
        let c = parse(p(), text).unwrap();
        validate(p(), text, &c).unwrap();
        assert_eq!(
            c.gpu.nvml_library.as_deref(),
            Some(Path::new("/opt/nvidia/libnvidia-ml.so.1"))
        );
    }

    #[test]
    fn the_simulated_gpu_backend_cannot_be_named_here() {
        let e = parse(p(), "[gpu]\nbackend = \"simulated\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu.backend"), "{e}");
        assert_eq!(
            parse(p(), "[gpu]\nbackend = \"none\"\n")
                .unwrap()
                .gpu
                .backend,
            Some(GpuBackend::None)
        );
    }

    #[test]
    fn the_installed_file_parses_and_shows_the_real_defaults() {
        let shipped = include_str!("../../scripts/aitherd.toml");
        assert_eq!(parse(p(), shipped).unwrap(), Config::default());
        // `#[table]` and `#key = value` lines are the defaults: uncommented, they change
        // nothing (but the metrics socket, whose default depends on the control socket's).
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.starts_with(|c: char| c.is_ascii_lowercase()) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(p(), &uncommented).unwrap();
        validate(p(), &uncommented, &c).unwrap();
        let mut expected = Config::default();
        expected.metrics.listen = Some(Listen::Unix(default_metrics_socket(Path::new(
            crate::daemon::DEFAULT_SOCKET,
        ))));
        assert_eq!(c, expected);
        // Every field of the sections with defaults is shown.
        let shown = serde_json::to_value(&c).unwrap();
        let mut n = 0;
        leaves("", &shown, &mut |k, _| {
            if !k.starts_with("users") && !k.starts_with("egress") {
                n += 1;
            }
        });
        let listed = uncommented
            .lines()
            .filter(|l| l.contains(" = ") && !l.starts_with('#'))
            .count();
        assert_eq!(n, listed, "{uncommented}");
    }

    #[test]
    fn listen_forms() {
        assert_eq!("off".parse::<Listen>().unwrap(), Listen::Off);
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/x.sock".into())
        );
        assert!(matches!(
            "127.0.0.1:9464".parse::<Listen>(),
            Ok(Listen::Tcp(_))
        ));
        assert!("unix:rel.sock".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().is_err());
        assert_eq!(
            default_metrics_socket(Path::new("/run/aither/aitherd.sock")),
            Path::new("/run/aither/metrics.sock")
        );
        assert_eq!(
            default_metrics_socket(Path::new("/run/aither/other.sock")),
            Path::new("/run/aither/other-metrics.sock")
        );
    }

    #[test]
    fn a_diff_sorts_live_fields_from_restart_ones() {
        let old = Config::default();
        let mut new = old.clone();
        new.limits.max_agents = Some(3);
        new.gpu.backend = Some(GpuBackend::None);
        let d = diff(&old, &new);
        let fields: Vec<&str> = d.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["gpu.backend", "limits.max_agents"]);
        assert!(is_live("limits.max_agents") && is_live("metrics.listen"));
        assert!(!is_live("gpu.backend") && !is_live("egress.ca_file"));
        let kept = keep_restart_fields(&old, new);
        assert_eq!(kept.gpu.backend, None);
        assert_eq!(kept.limits.max_agents, Some(3));
    }

    #[test]
    fn the_file_must_be_roots_and_not_group_writable_and_no_link() {
        use std::os::unix::fs::PermissionsExt;
        if nix::unistd::geteuid().as_raw() != 0 {
            return; // the owner check needs root to create a root-owned file
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("aitherd.toml");
        std::fs::write(&f, "[limits]\nmax_agents = 2\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secure(&f, true).unwrap().is_some());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = read_secure(&f, true).unwrap_err().to_string();
        assert!(e.contains("0664") && e.contains("go-w"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
        assert!(read_secure(&f, true)
            .unwrap_err()
            .to_string()
            .contains("uid 65534"));
        std::os::unix::fs::chown(&f, Some(0), None).unwrap();
        let l = d.path().join("link.toml");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(read_secure(&l, true)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        let missing = d.path().join("none.toml");
        assert!(read_secure(&missing, false).unwrap().is_none());
        assert!(read_secure(&missing, true).is_err());
    }
}
