//! Aither's wire contract, defined once (docs/protocol.md).
//!
//! - [`frame`]: the length-prefixed JSON frame codec and its limits (control socket and agent
//!   channel);
//! - [`control`]: the control socket's [`Request`] (tagged on `op`) and [`Reply`];
//! - [`agent`]: the agent channel's (fd 3) requests and pushes;
//! - [`ErrorCode`]: every reply error code, serialised as today's strings;
//! - [`Tier`], the GPU lease ([`LeasedDevice`], [`GpuLease`]), and the launcher's
//!   [`ShimEvent`] and [`ExitRecord`].
//!
//! aitherd, aitherctl, aither-init and the Rust SDK use these types; the Python SDK
//! (runtime/python) is tested against the same fixtures (`fixtures/`, one file per message
//! kind). This crate depends on serde, serde_json and thiserror only.

pub mod agent;
pub mod control;
mod error;
pub mod frame;
pub mod gpu;
pub mod memory;
pub mod publish;
pub mod shim;

pub use agent::{AgentFrame, AgentRequest, BusMessage, Push, Severity, UnknownSeverity};
pub use control::{
    CopyOp, ExecRequest, LogStream, Reply, Request, RestartPolicy, RunRequest, RunSignal,
    SecretValue, SpawnRequest, Supervision, SupervisionError, Via,
};
pub use error::{ErrorBody, ErrorCode};
pub use frame::{FrameError, MAX_FRAME, MAX_REPLY};
pub use gpu::{GpuLease, GpuState, LeasedDevice};
pub use memory::{Tier, UnknownTier};
pub use shim::{ExitRecord, ShimEvent};
