//! Agent files (`agents/NAME.toml`): what `aitherctl spawn` would otherwise take as flags, kept
//! beside the agent's code. Errors name the file, line, column and field.
//!
//! ```toml
//! policy = "strict"                      # or token_file = "agent.tok"
//! command = ["python3", "agent.py"]
//! workspace = "."                        # relative to this file's directory
//! env = { MODEL = "local" }
//! labels = { team = "search", tier = "batch" }
//! restart = "on-failure"                 # never | on-failure | always
//! backoff = "1s"
//! stop_timeout = "10s"
//! wait_ready = true                      # the agent sends READY (aither-notify --ready)
//! startup_timeout = "30s"
//! watchdog = "30s"                       # heartbeats at least this often
//! [health]
//! cmd = "test -f /tmp/healthy"           # a string runs under sh -c; or an argv list
//! interval = "10s"
//! timeout = "5s"
//! threshold = 3
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::supervise::{to_ms, RestartPolicy, Supervision};
use crate::policy::locate;
use crate::units::HumanDuration;

/// Errors of reading an agent file.
#[derive(Debug, thiserror::Error)]
pub enum AgentFileError {
    #[error("cannot read agent file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: field `{field}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CommandLine {
    Shell(String),
    Argv(Vec<String>),
}

impl CommandLine {
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandLine::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            CommandLine::Argv(v) => v.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub cmd: CommandLine,
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub threshold: Option<u32>,
}

/// One agent file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    pub command: CommandLine,
    #[serde(default)]
    pub workspace: Option<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels (`ps --filter label=KEY=VALUE`); `--label` adds to or overrides them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    #[serde(default)]
    pub backoff: Option<HumanDuration>,
    #[serde(default)]
    pub stop_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub wait_ready: bool,
    #[serde(default)]
    pub startup_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub watchdog: Option<HumanDuration>,
    #[serde(default)]
    pub health: Option<Health>,
    /// `[gpu]`: what to ask the MicroScheduler for, within the token's `gpu` claim.
    #[serde(default)]
    pub gpu: Option<GpuAsk>,
    /// `[bus]`: subjects granted on top of the policy's (`$self` is the agent's name).
    #[serde(default)]
    pub bus: Option<BusAsk>,
    /// Ports published as services for other agents, as `--publish` takes them
    /// (`["model=8000"]`); the flags add to these.
    #[serde(default, deserialize_with = "service_publish_list")]
    pub publish: Vec<(String, u16)>,
    /// Ports published on the host's loopback, as `--publish-host` takes them
    /// (`["127.0.0.1:8080=8000"]`); the flags add to these.
    #[serde(default, deserialize_with = "host_publish_list")]
    pub publish_host: Vec<aither_proto::publish::HostPublish>,
    /// The directory the file is in (relative paths resolve against it).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// `publish = ["NAME=PORT", ...]`, each checked as `spawn --publish` checks it.
fn service_publish_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, u16)>, D::Error> {
    let raw: Vec<String> = Deserialize::deserialize(d)?;
    raw.iter()
        .map(|s| parse_service_publish(s).map_err(serde::de::Error::custom))
        .collect()
}

/// `NAME=PORT`: a service name (as `net.services` names them) and a port of the agent's own
/// loopback.
pub fn parse_service_publish(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: NAME=PORT (model=8000)"))?;
    crate::policy::net_rules::check_name(name).map_err(|e| format!("{s:?}: {e}"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: a port of 1 to 65535"))?;
    Ok((name.to_string(), port))
}

/// `publish_host = ["HOSTADDR:HOSTPORT=AGENTPORT", ...]`, each checked as the flag is.
fn host_publish_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<aither_proto::publish::HostPublish>, D::Error> {
    let raw: Vec<String> = Deserialize::deserialize(d)?;
    raw.iter()
        .map(|s| aither_proto::publish::HostPublish::parse(s).map_err(serde::de::Error::custom))
        .collect()
}

/// `[bus]` of an agent file: `publish` and `subscribe` patterns added to the token aitherd
/// mints (as `aitherctl spawn --bus-publish/--bus-subscribe`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BusAsk {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// `[gpu]` of an agent file (docs/gpu.md); each field narrows the token's claim.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuAsk {
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub vram: Option<crate::units::Size>,
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub exclusive: Option<bool>,
}

impl AgentFile {
    pub fn load(path: &Path) -> Result<AgentFile, AgentFileError> {
        let src = std::fs::read_to_string(path).map_err(|source| AgentFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&src, path)
    }

    pub fn parse(src: &str, path: &Path) -> Result<AgentFile, AgentFileError> {
        let origin = path.display().to_string();
        let mut f: AgentFile = toml::from_str(src).map_err(|e| {
            let (line, column, field) = locate::from_toml_error(src, &e);
            AgentFileError::Invalid {
                path: origin.clone(),
                line,
                column,
                field,
                message: e.message().trim().to_string(),
            }
        })?;
        let fail = |key: &str, message: &str| {
            let (line, column) = locate::key(src, "", key);
            Err(AgentFileError::Invalid {
                path: origin.clone(),
                line,
                column,
                field: key.to_string(),
                message: message.to_string(),
            })
        };
        if f.command.argv().is_empty() || f.command.argv()[0].is_empty() {
            return fail("command", "must name a program");
        }
        if f.policy.is_some() && f.token_file.is_some() {
            return fail("token_file", "give either policy or token_file, not both");
        }
        if let Some(n) = &f.name {
            if let Err(e) = crate::agent_name::AgentName::parse("name", n) {
                return fail("name", &e.to_string());
            }
        }
        f.dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Ok(f)
    }

    /// The supervision settings it asks for, over `base`.
    pub fn supervision(&self, mut s: Supervision) -> Supervision {
        if let Some(r) = self.restart {
            s.restart = r;
        }
        if let Some(b) = self.backoff {
            s.backoff_ms = to_ms(b.0);
        }
        if let Some(t) = self.stop_timeout {
            s.stop_timeout_ms = to_ms(t.0);
        }
        s.wait_ready |= self.wait_ready;
        if let Some(t) = self.startup_timeout {
            s.startup_timeout_ms = Some(to_ms(t.0));
        }
        if let Some(w) = self.watchdog {
            s.watchdog_ms = Some(to_ms(w.0));
        }
        if let Some(h) = &self.health {
            s.health_cmd = Some(h.cmd.argv());
            if let Some(i) = h.interval {
                s.health_interval_ms = to_ms(i.0);
            }
            if let Some(t) = h.timeout {
                s.health_timeout_ms = to_ms(t.0);
            }
            if let Some(n) = h.threshold {
                s.health_threshold = n;
            }
        }
        s
    }

    /// A path of the file resolved against its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_points_at_bad_fields() {
        let src = "policy = \"strict\"\ncommand = \"sleep 5\"\nrestart = \"always\"\nwatchdog = \"2s\"\n[health]\ncmd = [\"true\"]\nthreshold = 2\n";
        let f = AgentFile::parse(src, Path::new("agents/a.toml")).unwrap();
        let s = f.supervision(Supervision::default());
        assert_eq!(s.restart, RestartPolicy::Always);
        assert_eq!(s.watchdog_ms, Some(2000));
        assert_eq!(s.health_cmd, Some(vec!["true".to_string()]));
        assert_eq!(s.health_threshold, 2);
        assert_eq!(f.command.argv(), vec!["/bin/sh", "-c", "sleep 5"]);
        assert_eq!(f.dir, PathBuf::from("agents"));

        let bad = "command = \"x\"\nrestart = \"sometimes\"\n";
        let e = AgentFile::parse(bad, Path::new("agents/b.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agents/b.toml:2:"), "{e}");
        assert!(e.contains("restart"), "{e}");
        let unknown = "command = \"x\"\n\n[health]\ncmd = \"y\"\nperiod = \"1s\"\n";
        let e = AgentFile::parse(unknown, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:5:"), "{e}");
        assert!(e.contains("period"), "{e}");
    }

    #[test]
    fn publish_host_is_checked_as_the_flag_is() {
        let src =
            "command = \"x\"\npublish_host = [\"127.0.0.1:8080=8000\", \"[::1]:9090=9000\"]\n";
        let f = AgentFile::parse(src, Path::new("p.toml")).unwrap();
        let shown: Vec<String> = f.publish_host.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.1:8080=8000", "[::1]:9090=9000"]);
        let bad = "command = \"x\"\npublish_host = [\"0.0.0.0:8080=8000\"]\n";
        let e = AgentFile::parse(bad, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.toml:2:"), "{e}");
        assert!(e.contains("not a loopback address"), "{e}");
    }

    #[test]
    fn service_publish_is_checked_as_the_flag_is() {
        let f = AgentFile::parse(
            "command = \"x\"\npublish = [\"model=8000\"]\n",
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(f.publish, [("model".to_string(), 8000)]);
        for (bad, why) in [
            ("Model=8000", "lower-case"),
            ("model=0", "a port of 1 to 65535"),
            ("model", "NAME=PORT"),
        ] {
            let src = format!("command = \"x\"\npublish = [\"{bad}\"]\n");
            let e = AgentFile::parse(&src, Path::new("p.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("p.toml:2:") && e.contains(why), "{bad}: {e}");
        }
    }
}
