//! The agent's GPU lease (`gpu.lease`, docs/protocol.md): what the MicroScheduler granted it.
//!
//! ```no_run
//! # fn main() -> Result<(), aither_sdk::SdkError> {
//! use aither_sdk::{Channel, GpuState, SdkError};
//! let ch = Channel::from_env()?;
//! match ch.gpu_lease() {
//!     Ok(lease) if lease.state == GpuState::Granted => {
//!         for d in &lease.devices {
//!             println!("GPU {} ({}): {} of {} MiB at {}", d.index, d.name, d.vram_mb, d.total_mb, d.node);
//!         }
//!     }
//!     Ok(lease) => println!("no GPU yet: {:?}", lease.state),
//!     Err(SdkError::GpuUnavailable(_)) => println!("this aitherd has no GPU service"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```

use serde_json::Value;

pub use aither_proto::gpu::{GpuLease, GpuState, LeasedDevice as GpuDevice};

use crate::SdkError;

/// The `data` of a `gpu.lease` reply.
pub(crate) fn lease_from_reply(mut reply: Value) -> Result<GpuLease, SdkError> {
    let data = reply
        .get_mut("data")
        .map(Value::take)
        .ok_or_else(|| SdkError::BadReply("gpu.lease replied without data".into()))?;
    serde_json::from_value(data).map_err(|e| SdkError::BadReply(format!("gpu.lease reply: {e}")))
}
