//! The agent's GPU lease (`gpu.lease` on the agent channel, docs/protocol.md).

use serde::{Deserialize, Serialize};

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

/// One leased GPU as the agent sees it. Unknown fields are ignored, missing ones default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeasedDevice {
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
    pub devices: Vec<LeasedDevice>,
    /// The value for `CUDA_VISIBLE_DEVICES`: a convenience, not a boundary (the sandbox has
    /// only the leased device nodes).
    pub visible_devices: String,
    /// The lease's priority class (granted leases only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Whether the devices are the agent's alone (granted leases only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,
}
