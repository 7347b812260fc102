//! Per-user limits (issue 18): the `[users]` table of aitherd's configuration file
//! (/etc/aither/aitherd.toml, `aitherd --config PATH`; the file is read and checked whole by
//! daemon/config.rs, and a reload changes the table for new spawns). Root and admins are not
//! limited.
//!
//! ```toml
//! [users.default]          # every member of group aither
//! agents = 10              # agents held at once (any state)
//! memory = "8G"            # sum of their agents' memory limits
//! cpus = 4.0               # sum of their agents' CPU quotas
//! gpu_priority = 2         # highest GPU priority class they may ask for
//!
//! [users.user.alice]       # one user by name (replaces the default for them)
//! agents = 20
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::Size;

/// Errors of the `[users]` table.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: table `users`: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: field `users.{who}.cpus`: must be more than 0")]
    Cpus { path: PathBuf, who: String },
}

/// One user's limits; None: unlimited.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_priority: Option<u32>,
}

/// The `[users]` table.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    #[serde(default)]
    pub default: UserLimits,
    /// By user name.
    #[serde(default)]
    pub user: BTreeMap<String, UserLimits>,
}

/// The file as this module reads it: only `[users]`.
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    users: UsersConfig,
}

impl UsersConfig {
    /// Parses `[users]` of a file's text (aitherd reads the whole file through
    /// daemon/config.rs; this is the table on its own, for its tests).
    pub fn parse(text: &str, path: &Path) -> Result<UsersConfig, UsersError> {
        let f: File = toml::from_str(text).map_err(|e| UsersError::Parse {
            path: path.into(),
            source: Box::new(e),
        })?;
        let c = f.users;
        Self::check(&c).map_err(|BadCpus(who)| UsersError::Cpus {
            path: path.into(),
            who,
        })?;
        Ok(c)
    }

    /// Checks the values serde cannot: every `cpus` more than 0.
    pub fn check(c: &UsersConfig) -> Result<(), BadCpus> {
        for (who, l) in std::iter::once(("default", &c.default))
            .chain(c.user.iter().map(|(k, v)| (k.as_str(), v)))
        {
            if l.cpus.is_some_and(|x| x.is_nan() || x <= 0.0) {
                return Err(BadCpus(who.to_string()));
            }
        }
        Ok(())
    }

    /// The limits of the user `name` (their own entry, else the default).
    pub fn limits_of(&self, name: Option<&str>) -> &UserLimits {
        name.and_then(|n| self.user.get(n)).unwrap_or(&self.default)
    }
}

/// The user (or "default") whose `cpus` is not more than 0.
#[derive(Debug, thiserror::Error)]
#[error("{0}: cpus must be more than 0")]
pub struct BadCpus(pub String);

/// What one user holds now, and what a new agent adds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub agents: usize,
    pub memory: u64,
    /// CPUs (quota / period).
    pub cpus: f64,
}

/// A new agent over one of its owner's per-user limits (aitherd.toml `[users]`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "per-user limit: you hold {held} agents, the most allowed is {max} (aitherd.toml [users])"
    )]
    Agents { held: usize, max: usize },
    #[error("per-user limit: an agent without a memory limit cannot be counted against your memory cap (use --memory)")]
    MemoryUncounted,
    #[error("per-user limit: your agents' memory would be {would}, the most allowed is {max} (aitherd.toml [users])")]
    Memory { would: Size, max: Size },
    #[error("per-user limit: an agent without a CPU quota cannot be counted against your CPU cap (use --cpus)")]
    CpusUncounted,
    #[error("per-user limit: your agents' CPUs would be {would:.2}, the most allowed is {max} (aitherd.toml [users])")]
    Cpus { would: f64, max: f64 },
    #[error("per-user limit: GPU priority {asked} is above your cap {max} (aitherd.toml [users]; ask with --gpu-priority)")]
    GpuPriority { asked: u32, max: u32 },
}

/// Checks a new agent against a user's limits. `memory`/`cpus` of the new agent are its
/// limits (an agent without one cannot be counted against a cap, so it is refused under one).
pub fn check(
    l: &UserLimits,
    held: Usage,
    memory: Option<u64>,
    cpus: Option<f64>,
    gpu_priority: Option<u32>,
) -> Result<(), LimitError> {
    if let Some(max) = l.agents {
        if held.agents + 1 > max {
            return Err(LimitError::Agents {
                held: held.agents,
                max,
            });
        }
    }
    if let Some(max) = l.memory {
        let m = memory.ok_or(LimitError::MemoryUncounted)?;
        if held.memory + m > max.0 {
            return Err(LimitError::Memory {
                would: Size(held.memory + m),
                max,
            });
        }
    }
    if let Some(max) = l.cpus {
        let c = cpus.ok_or(LimitError::CpusUncounted)?;
        if held.cpus + c > max + 1e-9 {
            return Err(LimitError::Cpus {
                would: held.cpus + c,
                max,
            });
        }
    }
    if let (Some(max), Some(p)) = (l.gpu_priority, gpu_priority) {
        if p > max {
            return Err(LimitError::GpuPriority { asked: p, max });
        }
    }
    Ok(())
}

/// A uid's user name in /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

/// A user name's uid in /etc/passwd.
pub fn uid_of(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_table_is_read_and_other_tables_are_left_alone() {
        let c = UsersConfig::parse(
            r#"
[egress]
idle_timeout_s = 30
[users.default]
agents = 2
memory = "1G"
cpus = 1.5
gpu_priority = 1
[users.user.alice]
agents = 5
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.limits_of(Some("bob")).agents, Some(2));
        assert_eq!(c.limits_of(Some("alice")).agents, Some(5));
        assert_eq!(c.limits_of(Some("alice")).memory, None);
        let e =
            UsersConfig::parse("[users.default]\nagentz = 1\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("t.toml"), "{e}");
        assert!(UsersConfig::parse("[users.default]\ncpus = 0\n", Path::new("t")).is_err());
    }

    #[test]
    fn each_cap_refuses_what_goes_over_it() {
        let l = UserLimits {
            agents: Some(2),
            memory: Some(Size(1 << 30)),
            cpus: Some(1.0),
            gpu_priority: Some(1),
        };
        let held = Usage {
            agents: 1,
            memory: 512 << 20,
            cpus: 0.5,
        };
        check(&l, held, Some(512 << 20), Some(0.5), Some(1)).unwrap();
        let full = Usage { agents: 2, ..held };
        assert!(check(&l, full, Some(1), Some(0.1), None)
            .unwrap_err()
            .to_string()
            .contains("2 agents"));
        assert!(check(&l, held, Some(600 << 20), Some(0.1), None).is_err());
        assert!(check(&l, held, None, Some(0.1), None).is_err());
        assert!(check(&l, held, Some(1), Some(0.6), None).is_err());
        assert!(check(&l, held, Some(1), Some(0.1), Some(2)).is_err());
    }
}
