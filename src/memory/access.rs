//! Who may do what: a token's `memory_tiers` (its own memory) and `memory_grants` (read access
//! to another agent's tier) turned into allow/deny decisions and quotas.

use super::{MemoryError, Tier};
use crate::token::Claims;

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub enum Actor<'a> {
    /// An agent on its channel, with the effective claims of its verified token.
    Agent { name: &'a str, claims: &'a Claims },
    /// An operator on the control socket (root or group aither): any agent's memory, every
    /// tier, no quota (the operator is the authority the quotas come from).
    Operator,
}

/// The limits a write must stay within.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub entries: u64,
}

impl Actor<'_> {
    /// Whether this actor may read `tier` of `owner`'s memory.
    pub fn may_read(&self, owner: &str, tier: Tier) -> Result<(), MemoryError> {
        let Actor::Agent { name, claims } = *self else {
            return Ok(());
        };
        if owner == name {
            return match claims.memory_tiers.get(tier.as_str()) {
                Some(c) if c.read => Ok(()),
                Some(_) => Err(MemoryError::Denied(format!(
                    "the token of {name:?} does not allow reading tier {tier} (claim memory_tiers.{tier}.read is false)"
                ))),
                None => Err(no_tier(name, tier)),
            };
        }
        let granted = claims
            .memory_grants
            .iter()
            .any(|g| g.owner == owner && g.tier == tier.as_str());
        if granted {
            Ok(())
        } else {
            Err(MemoryError::Denied(format!(
                "the token of {name:?} holds no grant to read tier {tier} of agent {owner:?} (claim memory_grants: {{owner: {owner:?}, tier: \"{tier}\"}})"
            )))
        }
    }

    /// Whether this actor may write `tier` of `owner`'s memory; the quota that applies (None:
    /// an operator, unlimited).
    pub fn may_write(&self, owner: &str, tier: Tier) -> Result<Option<Quota>, MemoryError> {
        let Actor::Agent { name, claims } = *self else {
            return Ok(None);
        };
        if owner != name {
            return Err(MemoryError::Denied(format!(
                "agent {name:?} may not write the memory of agent {owner:?} (grants give read access only)"
            )));
        }
        match claims.memory_tiers.get(tier.as_str()) {
            Some(c) if c.write => Ok(Some(Quota {
                bytes: c.quota_bytes,
                entries: c.quota_entries,
            })),
            Some(_) => Err(MemoryError::Denied(format!(
                "the token of {name:?} does not allow writing tier {tier} (claim memory_tiers.{tier}.write is false{})",
                if tier == Tier::Spirit {
                    "; operators write spirit with `aitherctl mem put --tier spirit`"
                } else {
                    ""
                }
            ))),
            None => Err(no_tier(name, tier)),
        }
    }

    /// Whether this actor may delete: deleting is writing, without a quota.
    pub fn may_delete(&self, owner: &str, tier: Tier) -> Result<(), MemoryError> {
        self.may_write(owner, tier).map(|_| ())
    }

    /// Operator-only operations (export, import, clear).
    pub fn operator_only(&self, what: &str) -> Result<(), MemoryError> {
        match self {
            Actor::Operator => Ok(()),
            Actor::Agent { name, .. } => Err(MemoryError::Denied(format!(
                "{what} is for operators on the control socket, not agent {name:?}"
            ))),
        }
    }
}

fn no_tier(name: &str, tier: Tier) -> MemoryError {
    MemoryError::Denied(format!(
        "the token of {name:?} grants no access to memory tier {tier} (no claim memory_tiers.{tier}; mint the token from a policy with a [memory.{tier}] table)"
    ))
}
