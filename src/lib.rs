//! Aither: an operating-system layer for AI agents.
//!
//! This crate is the daemon and its services (agents, bus, memory, egress, GPUs, audit,
//! doctor) over [`aither_core`], which holds the mechanisms that need no runtime (policy,
//! token, sandbox, cgroup, export). The core modules are re-exported here at their old paths
//! (`aither::sandbox`, `aither::policy`, ...). The binaries in `src/bin/` and `runtime/` are
//! thin edges. docs/architecture.md draws the crates and what each may depend on.

pub use aither_core::{
    cgroup, export, hostpath, logfmt, policy, sandbox, sys, testhooks, trace, units,
    DEFAULT_POLICY_DIR, STATE_DIR,
};

pub mod agent_name;
pub mod audit;
pub mod bus;
pub mod cp;
pub mod daemon;
pub mod doctor;
pub mod gpu;
pub mod labels;
pub mod layer;
pub mod mcp;
pub mod memory;
pub mod net;
pub mod prepare;
pub mod revocations;
pub mod token;
