//! Aither: an operating-system layer for AI agents.
//!
//! The library holds every mechanism; the binaries in `src/bin/` and `runtime/` are thin edges.
//! Modules depend downwards only:
//!
//! ```text
//! policy ──► token ──► prepare (run, spawn, export: one path) ──► sandbox::spec ──► sandbox::launch ──► sandbox::{init, mounts, seccomp, landlock, caps, rlimits, userns}
//!                                   │
//!                                   ├──► cgroup::{v1, v2}
//!                                   │
//!                                   └──► export::{oci, k8s} (the same spec for crun, runc, Kubernetes)
//! ```

pub mod agent_name;
pub mod audit;
pub mod bus;
pub mod cgroup;
pub mod daemon;
pub mod doctor;
pub mod export;
pub mod gpu;
pub mod hostpath;
pub mod memory;
pub mod net;
pub mod policy;
pub mod prepare;
pub mod sandbox;
pub mod sys;
pub mod testhooks;
pub mod token;
pub mod units;

/// Where installed policies live unless `AITHER_POLICY_DIR` says otherwise.
pub const DEFAULT_POLICY_DIR: &str = "/etc/aither/policies";
/// Aither's persistent state (tokens, caches, databases).
pub const STATE_DIR: &str = "/var/lib/aither";
