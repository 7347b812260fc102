//! `AgentName`: the one validator of an agent's name (issue 19). A name becomes a cgroup
//! directory (`aither/<name>-<pid>`), a log directory, a bus subject and a token subject, so
//! every entry (spawn, run, agent files, operator memory requests, the CLI) parses it here.

use std::fmt;

/// The longest name: cgroup and log directory names stay short, and `<name>-<pid>` fits.
pub const MAX_LEN: usize = 48;

/// The rule, as every refusal states it.
pub const RULE: &str = "1-48 letters, digits, '-' or '_', not starting with '-'";

/// A valid agent name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(String);

/// A refused name: the field it came in, the name, the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent name {name:?} in {field}: {RULE}")]
pub struct NameError {
    /// Where the name came from (`name`, `agent`, `--name`).
    pub field: &'static str,
    pub name: String,
}

impl AgentName {
    /// Parses `name`, given in `field`.
    pub fn parse(field: &'static str, name: &str) -> Result<AgentName, NameError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !name.starts_with('-');
        if ok {
            Ok(AgentName(name.to_string()))
        } else {
            Err(NameError {
                field,
                name: name.to_string(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AgentName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for AgentName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<AgentName, NameError> {
        AgentName::parse("name", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_every_former_validator_accepted() {
        let long = "a".repeat(MAX_LEN);
        for ok in ["a", "A-1_b", "_x", "0", "agent-7", long.as_str()] {
            assert_eq!(AgentName::parse("name", ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_with_the_field_and_the_rule() {
        let long = "a".repeat(MAX_LEN + 1);
        for bad in [
            "",
            "-a",
            "a.b",
            "a b",
            "a/b",
            "..",
            "a@b",
            "é",
            "a\n",
            long.as_str(),
        ] {
            let e = AgentName::parse("agent", bad).unwrap_err();
            assert_eq!(e.field, "agent");
            assert_eq!(e.name, bad);
            assert_eq!(
                e.to_string(),
                format!("invalid agent name {bad:?} in agent: {RULE}")
            );
        }
    }
}
