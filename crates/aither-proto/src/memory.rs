//! The memory tiers (docs/memory.md), as named in `mem.*` requests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A memory tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Scratch of the current run: cleared when the run ends.
    Working,
    /// Session state with a TTL; survives restarts.
    Active,
    /// Identity and instructions; writing needs a claim (operators write it).
    Spirit,
    /// Nodes and edges (the `mem.graph.*` ops).
    Codegraph,
    /// Long-term facts with full-text search.
    Knowledge,
}

/// A tier name that is none of the five.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a tier (working, active, spirit, codegraph, knowledge)")]
pub struct UnknownTier(pub String);

impl Tier {
    pub const ALL: [Tier; 5] = [
        Tier::Working,
        Tier::Active,
        Tier::Spirit,
        Tier::Codegraph,
        Tier::Knowledge,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Working => "working",
            Tier::Active => "active",
            Tier::Spirit => "spirit",
            Tier::Codegraph => "codegraph",
            Tier::Knowledge => "knowledge",
        }
    }

    /// Whether the tier holds keys and values (codegraph holds nodes and edges).
    pub fn is_kv(self) -> bool {
        self != Tier::Codegraph
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = UnknownTier;

    fn from_str(s: &str) -> Result<Tier, UnknownTier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTier(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_round_trip_by_name() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert_eq!(
            "cold".parse::<Tier>().unwrap_err().to_string(),
            "\"cold\" is not a tier (working, active, spirit, codegraph, knowledge)"
        );
    }
}
