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

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::SdkError;

/// Where the agent's GPU request stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuState {
    /// The token has no GPU claim.
    #[default]
    None,
    /// Waiting for the scheduler.
    Queued,
    /// Devices are leased.
    Granted,
}

/// One leased GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuDevice {
    /// The device's index on the host.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// VRAM reserved for this agent, MiB.
    pub vram_mb: u64,
    /// The device's total VRAM, MiB.
    pub total_mb: u64,
    /// Its device node in the sandbox (`/dev/nvidia0`).
    pub node: String,
}

/// The `data` of a `gpu.lease` reply. Unknown fields are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuLease {
    pub granted: bool,
    pub state: GpuState,
    pub devices: Vec<GpuDevice>,
    /// The value for `CUDA_VISIBLE_DEVICES`: a convenience, not a boundary (the sandbox has
    /// only the leased device nodes).
    pub visible_devices: String,
}

impl GpuLease {
    pub(crate) fn from_reply(mut reply: Value) -> Result<GpuLease, SdkError> {
        let data = reply
            .get_mut("data")
            .map(Value::take)
            .ok_or_else(|| SdkError::BadReply("gpu.lease replied without data".into()))?;
        serde_json::from_value(data)
            .map_err(|e| SdkError::BadReply(format!("gpu.lease reply: {e}")))
    }
}
