//! What the token given to `aitherctl mcp --token` lets its client do (docs/mcp.md "Token").
//! The token's claims are read as they are for an agent: its subject is the one agent the
//! client may name, its policy the one it may run and spawn under (with the token itself as
//! the sandbox), its `memory_tiers` the tiers of that agent it may read or write, its
//! `memory_grants` other agents' tiers it may read, its `bus.publish` the subjects it may
//! publish on. A narrower client gets an attenuated token (`aitherctl token attenuate`).
//! Without a token the caller's own rights apply (aitherd's multi-user rules), nothing more.

use crate::policy::bus_subject::{expand_self, Pattern};
use aither_core::token::Claims;

use super::ToolError;

/// The narrowing in force.
#[derive(Debug, Clone)]
pub enum Scope {
    /// No token: whatever the caller may do.
    Caller,
    /// Within these (effective, verified) claims.
    Token(Box<Claims>),
}

/// Read or write, for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Scope {
    /// `agent` (in argument `field`) must be the token's subject.
    pub fn agent(&self, field: &str, agent: &str) -> Result<(), ToolError> {
        match self {
            Scope::Token(c) if c.subject != agent => Err(ToolError::refused(
                field,
                format!(
                    "agent {agent:?}: the token is for agent {:?} only",
                    c.subject
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A policy asked for by name must be the token's.
    pub fn policy(&self, field: &str, policy: Option<&str>) -> Result<(), ToolError> {
        match (self, policy) {
            (Scope::Token(c), Some(p)) if c.policy != p => Err(ToolError::refused(
                field,
                format!("policy {p:?}: the token grants policy {:?} only", c.policy),
            )),
            _ => Ok(()),
        }
    }

    /// Memory `tier` of `agent`: the subject's own tiers as the token grants them, another
    /// agent's by a `memory_grants` entry (read only).
    pub fn memory(&self, agent: &str, tier: &str, access: Access) -> Result<(), ToolError> {
        let Scope::Token(c) = self else {
            return Ok(());
        };
        if agent != c.subject {
            let granted = c
                .memory_grants
                .iter()
                .any(|g| g.owner == agent && g.tier == tier);
            return match (granted, access) {
                (true, Access::Read) => Ok(()),
                (true, Access::Write) => Err(ToolError::refused(
                    "agent",
                    format!("agent {agent:?}: the token grants reading its tier {tier:?}, never writing"),
                )),
                (false, _) => Err(ToolError::refused(
                    "agent",
                    format!(
                        "agent {agent:?}: the token is for agent {:?} (and grants no tier {tier:?} of {agent:?})",
                        c.subject
                    ),
                )),
            };
        }
        let claim = c.memory_tiers.get(tier);
        let ok = match access {
            Access::Read => claim.is_some_and(|t| t.read),
            Access::Write => claim.is_some_and(|t| t.write),
        };
        if ok {
            return Ok(());
        }
        let what = match access {
            Access::Read => "reading",
            Access::Write => "writing",
        };
        Err(ToolError::refused(
            "tier",
            format!("tier {tier:?}: the token does not grant {what} it"),
        ))
    }

    /// Publishing on `subject`: it must match one of the token's `bus.publish` patterns
    /// (`$self` standing for the subject).
    pub fn publish(&self, subject: &str) -> Result<(), ToolError> {
        let Scope::Token(c) = self else {
            return Ok(());
        };
        let allowed = c.bus.publish.iter().any(|p| {
            expand_self("bus.publish", p, &c.subject)
                .ok()
                .and_then(|p| Pattern::parse("bus.publish", &p).ok())
                .is_some_and(|p| p.matches(subject))
        });
        if allowed {
            Ok(())
        } else {
            Err(ToolError::refused(
                "subject",
                format!(
                    "subject {subject:?} matches none of the token's bus.publish patterns {:?}",
                    c.bus.publish
                ),
            ))
        }
    }

    /// Which agents a listing may show.
    pub fn shows(&self, agent: &str) -> bool {
        match self {
            Scope::Caller => true,
            Scope::Token(c) => c.subject == agent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aither_core::token::{MemoryGrant, TierClaim};

    fn claims() -> Claims {
        let policy = crate::policy::Policy::load("strict")
            .expect("strict policy")
            .policy;
        let mut c =
            Claims::from_policy(&policy, "w1", std::time::Duration::from_secs(60)).expect("claims");
        c.memory_tiers.clear();
        c.memory_tiers.insert(
            "working".into(),
            TierClaim {
                read: true,
                write: true,
                quota_bytes: 1,
                quota_entries: 1,
            },
        );
        c.memory_tiers.insert(
            "spirit".into(),
            TierClaim {
                read: true,
                write: false,
                quota_bytes: 1,
                quota_entries: 1,
            },
        );
        c.memory_grants = vec![MemoryGrant {
            owner: "w2".into(),
            tier: "knowledge".into(),
        }];
        c.bus.publish = vec!["agent.$self.>".into()];
        c
    }

    #[test]
    fn a_token_scope_allows_its_subject_policy_tiers_grants_and_subjects_only() {
        let s = Scope::Token(Box::new(claims()));
        assert!(s.agent("agent", "w1").is_ok());
        let e = s.agent("agent", "w2").unwrap_err().to_string();
        assert!(e.contains("`agent`") || e.contains("agent:"), "{e}");
        assert!(e.contains("\"w1\" only"), "{e}");
        assert!(s.policy("policy", Some("strict")).is_ok() && s.policy("policy", None).is_ok());
        assert!(s.policy("policy", Some("permissive")).is_err());
        assert!(s.memory("w1", "working", Access::Write).is_ok());
        assert!(s.memory("w1", "spirit", Access::Read).is_ok());
        assert!(s.memory("w1", "spirit", Access::Write).is_err());
        assert!(s.memory("w1", "active", Access::Read).is_err());
        assert!(s.memory("w2", "knowledge", Access::Read).is_ok());
        assert!(s.memory("w2", "knowledge", Access::Write).is_err());
        assert!(s.memory("w2", "working", Access::Read).is_err());
        assert!(s.publish("agent.w1.out").is_ok());
        assert!(s
            .publish("agent.w2.out")
            .unwrap_err()
            .to_string()
            .contains("subject"));
        assert!(s.shows("w1") && !s.shows("w2"));
        let all = Scope::Caller;
        assert!(all.agent("agent", "x").is_ok() && all.publish("a.b").is_ok());
    }
}
