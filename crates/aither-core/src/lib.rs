//! aither-core: Aither's mechanisms that need no runtime: policies, capability tokens, the
//! sandbox and its launcher, cgroups and the OCI/Kubernetes export. The daemon and its services
//! (crate `aither`) and the launcher `aither-init` build on it; it depends on neither, and links
//! no async runtime, HTTP, TLS, SQLite or NVML (tests/layers.rs checks this). Modules depend
//! downwards only:
//!
//! ```text
//! policy ──► token ──► (aither::prepare) ──► sandbox::spec ──► sandbox::launch ──► sandbox::{init, mounts, seccomp, landlock, caps, rlimits, userns}
//!                                   │
//!                                   ├──► cgroup::{v1, v2, devices}
//!                                   │
//!                                   └──► export::{oci, k8s} (the same spec for crun, runc, Kubernetes)
//! ```

pub mod cgroup;
pub mod export;
pub mod hostpath;
pub mod logfmt;
pub mod policy;
pub mod sandbox;
pub mod sys;
pub mod testhooks;
pub mod token;
pub mod trace;
pub mod units;

/// Where installed policies live unless `AITHER_POLICY_DIR` says otherwise.
pub const DEFAULT_POLICY_DIR: &str = "/etc/aither/policies";
/// Aither's persistent state (tokens, caches, databases).
pub const STATE_DIR: &str = "/var/lib/aither";
