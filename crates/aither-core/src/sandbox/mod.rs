//! The sandbox: a policy resolved into a `SandboxSpec` (spec.rs), launched by a single-threaded
//! launcher (launch.rs) whose forked pid 1 finishes the setup in a fixed order (init.rs):
//! mounts, rlimits, capabilities, no_new_privs, Landlock, then seccomp last.

pub mod caps;
pub mod channel;
pub mod exec;
pub mod gitguard;
mod init;
pub mod landlock;
pub mod launch;
pub mod layer;
pub mod layer_store;
pub mod mounts;
pub mod netns;
pub mod pool;
pub mod report;
pub mod rlimits;
pub mod seccomp;
pub mod shim;
pub mod spec;
mod stdio;
pub mod userns;
pub mod workspace;

pub use exec::{exec_in, ExecConfig, ExecError};
pub use launch::{prepare, run, run_with, LaunchError, LaunchIo, Outcome, Prepared, Started};
pub use shim::{ShimConfig, ShimError};
pub use spec::{RunOptions, SandboxSpec, SpecError};
