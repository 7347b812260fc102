//! Where GPUs come from: NVML on real hosts, a declared set of simulated devices elsewhere.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::GpuError;
use crate::cgroup::devices::node_numbers;

/// One GPU.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub total_mb: u64,
    /// The device node a lease exposes in the sandbox's /dev (e.g. /dev/nvidia0).
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
}

/// VRAM one process (or, for the simulation, one agent) uses on one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessUsage {
    pub device: u32,
    pub pid: Option<u32>,
    pub agent: Option<String>,
    pub used_mb: u64,
}

/// A source of GPUs and their per-process VRAM use.
pub trait GpuBackend: Send + Sync {
    /// "nvml", "simulated" or "none".
    fn kind(&self) -> &'static str;
    fn devices(&self) -> Vec<GpuDevice>;
    /// Current per-process use (re-read on every call).
    fn usage(&self) -> Result<Vec<ProcessUsage>, GpuError>;
    /// Nodes every GPU sandbox also needs (nvidiactl, nvidia-uvm, nvidia-uvm-tools,
    /// nvidia-modeset), those present on this host.
    fn control_nodes(&self) -> Vec<PathBuf>;
}

/// No GPUs (no driver, no simulation).
pub struct NoGpus;

impl GpuBackend for NoGpus {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn devices(&self) -> Vec<GpuDevice> {
        vec![]
    }
    fn usage(&self) -> Result<Vec<ProcessUsage>, GpuError> {
        Ok(vec![])
    }
    fn control_nodes(&self) -> Vec<PathBuf> {
        vec![]
    }
}

/// A simulated device as declared in gpus.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDevice {
    pub uuid: String,
    #[serde(default = "sim_name")]
    pub name: String,
    pub total_mb: u64,
    /// An existing character device node that stands in for the GPU's node.
    pub node: PathBuf,
}

fn sim_name() -> String {
    "Simulated GPU".into()
}

/// Simulated use, re-read from the file on every poll so that a test (or a user trying the
/// scheduler) can change it while agents run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimUsage {
    pub device: u32,
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub used_mb: u64,
}

/// The simulated backend: devices and usage from a TOML file.
pub struct Simulated {
    path: PathBuf,
    devices: Vec<GpuDevice>,
    control: Vec<PathBuf>,
}

impl Simulated {
    pub fn new(
        path: &Path,
        declared: &[SimDevice],
        control: &[PathBuf],
    ) -> Result<Simulated, GpuError> {
        let mut devices = Vec::new();
        for (i, d) in declared.iter().enumerate() {
            let (block, major, minor) = node_numbers(&d.node).map_err(|source| GpuError::Node {
                path: d.node.clone(),
                source,
            })?;
            if block {
                return Err(GpuError::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "device[{i}].node: {} is a block device; a GPU node is a character device",
                        d.node.display()
                    ),
                });
            }
            devices.push(GpuDevice {
                index: i as u32,
                uuid: d.uuid.clone(),
                name: d.name.clone(),
                total_mb: d.total_mb,
                node: d.node.clone(),
                major,
                minor,
            });
        }
        for c in control {
            node_numbers(c).map_err(|source| GpuError::Node {
                path: c.clone(),
                source,
            })?;
        }
        Ok(Simulated {
            path: path.to_path_buf(),
            devices,
            control: control.to_vec(),
        })
    }
}

impl GpuBackend for Simulated {
    fn kind(&self) -> &'static str {
        "simulated"
    }
    fn devices(&self) -> Vec<GpuDevice> {
        self.devices.clone()
    }
    fn usage(&self) -> Result<Vec<ProcessUsage>, GpuError> {
        let cfg = super::GpuConfig::parse_file(&self.path)?;
        Ok(cfg
            .usage
            .into_iter()
            .map(|u| ProcessUsage {
                device: u.device,
                pid: u.pid,
                agent: u.agent,
                used_mb: u.used_mb,
            })
            .collect())
    }
    fn control_nodes(&self) -> Vec<PathBuf> {
        self.control.clone()
    }
}

/// NVIDIA's management library, loaded at run time (nvml-wrapper uses libloading): a host
/// without the driver gets an init error, which [`open_nvml`] turns into "no GPUs".
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
    devices: Vec<GpuDevice>,
}

/// Why NVML offers no GPUs (the reason `gpu ls` and the daemon's log show).
#[derive(Debug, thiserror::Error)]
pub enum NvmlUnavailable {
    #[error("no NVIDIA driver (/proc/driver/nvidia/version absent)")]
    NoDriver,
    #[error(
        "this aitherd is statically linked and cannot load libnvidia-ml; \
         install.sh builds a dynamic aitherd when it finds an NVIDIA driver"
    )]
    StaticBinary,
    #[error("NVML: {0}")]
    Nvml(#[source] nvml_wrapper::error::NvmlError),
    #[error("NVML device {index}: {source}")]
    Device {
        index: u32,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("{}: {source}", node.display())]
    Node {
        node: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// NVML's devices, or why there are none.
pub fn open_nvml() -> Result<Nvml, NvmlUnavailable> {
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
    if !driver && !std::path::Path::new("/dev/nvidia0").exists() {
        return Err(NvmlUnavailable::NoDriver);
    }
    if cfg!(target_feature = "crt-static") {
        // dlopen from a static glibc binary would load a second libc beside ours.
        return Err(NvmlUnavailable::StaticBinary);
    }
    let nvml = nvml_wrapper::Nvml::init().map_err(NvmlUnavailable::Nvml)?;
    let n = nvml.device_count().map_err(NvmlUnavailable::Nvml)?;
    let mut devices = Vec::new();
    for i in 0..n {
        let device = |source| NvmlUnavailable::Device { index: i, source };
        let d = nvml.device_by_index(i).map_err(device)?;
        let minor = d.minor_number().map_err(device)?;
        let total = d.memory_info().map_err(device)?.total;
        let node = PathBuf::from(format!("/dev/nvidia{minor}"));
        let (_, major, minor) = node_numbers(&node).map_err(|source| NvmlUnavailable::Node {
            node: node.clone(),
            source,
        })?;
        devices.push(GpuDevice {
            index: i,
            uuid: d.uuid().unwrap_or_default(),
            name: d.name().unwrap_or_default(),
            total_mb: total / (1024 * 1024),
            node,
            major,
            minor,
        });
    }
    Ok(Nvml { nvml, devices })
}

impl GpuBackend for Nvml {
    fn kind(&self) -> &'static str {
        "nvml"
    }
    fn devices(&self) -> Vec<GpuDevice> {
        self.devices.clone()
    }
    fn usage(&self) -> Result<Vec<ProcessUsage>, GpuError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let mut out = Vec::new();
        for d in &self.devices {
            let dev = self
                .nvml
                .device_by_index(d.index)
                .map_err(|e| GpuError::Backend(format!("NVML device {}: {e}", d.index)))?;
            let procs = dev
                .running_compute_processes()
                .map_err(|e| GpuError::Backend(format!("NVML device {}: {e}", d.index)))?;
            for p in procs {
                let used = match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b / (1024 * 1024),
                    UsedGpuMemory::Unavailable => 0,
                };
                out.push(ProcessUsage {
                    device: d.index,
                    pid: Some(p.pid),
                    agent: None,
                    used_mb: used,
                });
            }
        }
        Ok(out)
    }
    fn control_nodes(&self) -> Vec<PathBuf> {
        [
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia-modeset",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
    }
}
