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
    /// A MIG instance (a partition of a GPU in MIG mode) rather than a whole GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<MigInstance>,
    /// Further nodes a lease of it binds into /dev and allows in the device rules, with their
    /// names under /dev: a MIG instance's nvidia-caps access nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_nodes: Vec<(PathBuf, String)>,
}

/// Where a MIG instance is: its GPU, its GPU and compute instance, and its profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigInstance {
    /// The NVML index of the GPU it partitions.
    pub parent: u32,
    pub gpu_instance: u32,
    pub compute_instance: u32,
    /// NVIDIA's profile name, `<GPU slices>g.<memory GB>gb` (e.g. `1g.10gb`): what a claim's
    /// `mig_profile` names.
    pub profile: String,
}

/// VRAM one process (or, for the simulation, one agent) uses on one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessUsage {
    pub device: u32,
    pub pid: Option<u32>,
    pub agent: Option<String>,
    /// None: the driver does not know (NVML's `NVML_VALUE_NOT_AVAILABLE`, e.g. without
    /// per-process accounting): unknown, never 0 (docs/gpu.md "What the scheduler guarantees").
    pub used_mb: Option<u64>,
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
    /// Devices the last [`GpuBackend::usage`] could not read (fell off the bus, lost), with
    /// the driver's reason.
    fn lost(&self) -> Vec<(u32, String)> {
        vec![]
    }
    /// Where the driver's library was loaded from (NVML), for `gpu ls` and doctor.
    fn library(&self) -> Option<String> {
        None
    }
    /// The name a host node gets under the sandbox's /dev: its path below /dev (so
    /// /dev/nvidia-caps/nvidia-cap12 stays there), else its file name.
    fn dev_name(&self, node: &Path) -> String {
        dev_name(node, Path::new("/dev"))
    }
}

/// `node`'s path below `dev`, else its file name.
pub fn dev_name(node: &Path, dev: &Path) -> String {
    node.strip_prefix(dev)
        .ok()
        .filter(|p| p.components().count() > 0)
        .map(|p| p.to_string_lossy().into_owned())
        .or_else(|| node.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "gpu".into())
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

/// NVIDIA's fixed character major: /dev/nvidia0.., nvidiactl (255), nvidia-modeset (254).
pub const NVIDIA_MAJOR: u32 = 195;
/// DRM's major: /dev/dri/card*, /dev/dri/renderD*.
pub const DRM_MAJOR: u32 = 226;

/// Whether `major` is a GPU driver's: NVIDIA's or DRM's fixed one, or one the kernel gave
/// nvidia-uvm or nvidia-caps (dynamic, from /proc/devices).
pub fn is_gpu_node(major: u32) -> bool {
    major == NVIDIA_MAJOR
        || major == DRM_MAJOR
        || dynamic_majors(&std::fs::read_to_string("/proc/devices").unwrap_or_default())
            .contains(&major)
}

/// The character majors /proc/devices gives the NVIDIA drivers with dynamic numbers.
fn dynamic_majors(proc_devices: &str) -> Vec<u32> {
    named_majors(
        proc_devices,
        &["nvidia-uvm", "nvidia-caps", "nvidia-caps-imex-channels"],
    )
}

/// The character majors /proc/devices gives the drivers named.
fn named_majors(proc_devices: &str, names: &[&str]) -> Vec<u32> {
    proc_devices
        .lines()
        .take_while(|l| !l.starts_with("Block devices"))
        .filter_map(|l| {
            let (n, name) = l.trim().split_once(' ')?;
            names.contains(&name.trim()).then(|| n.parse().ok())?
        })
        .collect()
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
            if block || !is_gpu_node(major) {
                return Err(GpuError::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "device[{i}].node: {} is {} {major}:{minor}; a GPU node is a character \
                         device of NVIDIA's major {NVIDIA_MAJOR}, nvidia-caps' or a DRM render \
                         node's ({DRM_MAJOR})",
                        d.node.display(),
                        if block {
                            "block device"
                        } else {
                            "character device"
                        }
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
                mig: None,
                extra_nodes: vec![],
            });
        }
        for c in control {
            let (block, major, minor) = node_numbers(c).map_err(|source| GpuError::Node {
                path: c.clone(),
                source,
            })?;
            if block || !is_gpu_node(major) {
                return Err(GpuError::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "control_nodes: {} is {major}:{minor}, not a GPU driver node (NVIDIA's \
                         major {NVIDIA_MAJOR}, nvidia-uvm's, nvidia-caps' or DRM's {DRM_MAJOR})",
                        c.display()
                    ),
                });
            }
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
                used_mb: Some(u.used_mb),
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
    /// Where the driver's files are read (dev/, proc/devices,
    /// proc/driver/nvidia-caps/mig-minors): `/` (`AITHER_GPU_ROOT` in debug builds, for the
    /// mock library's stand-in nodes).
    root: PathBuf,
    /// NVML's index of each whole GPU of [`Nvml::devices`] (MIG instances are not read).
    whole: Vec<u32>,
    library: String,
    lost: std::sync::Mutex<Vec<(u32, String)>>,
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
    #[error(
        "gpu.nvml_library {}: {why}; aitherd loads only a root-owned library that group and \
         others cannot write",
        path.display()
    )]
    Library { path: PathBuf, why: String },
    #[error("NVML ({library}): {source}")]
    Nvml {
        library: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
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
    #[error("NVML device {index}: MIG: {why}")]
    Mig { index: u32, why: String },
    #[error("{}: {major}:{minor} is not an NVIDIA GPU node (major {NVIDIA_MAJOR})", node.display())]
    NotGpuNode {
        node: PathBuf,
        major: u32,
        minor: u32,
    },
}

/// nvml.h's NVML_DEVICE_MIG_ENABLE: a current MIG mode of "enabled".
const NVML_DEVICE_MIG_ENABLE: u32 = 1;

/// The library name the loader resolves when aitherd.toml names none.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so";

/// Checks an operator-named library before it is loaded into this root process: a regular
/// file (links followed: drivers install libnvidia-ml.so.1 as a link), owned by root, not
/// writable by group or others.
fn check_library(path: &Path) -> Result<(), NvmlUnavailable> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| NvmlUnavailable::Library {
        path: path.to_path_buf(),
        why,
    };
    let m = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !m.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if m.uid() != 0 {
        return Err(bad(format!("owned by uid {}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(bad(format!("mode {:04o}", m.mode() & 0o7777)));
    }
    Ok(())
}

/// NVML's devices, or why there are none. `library`: aitherd.toml's `gpu.nvml_library`; set,
/// it is loaded whatever the host shows (the operator said where the driver is); unset,
/// `libnvidia-ml.so` is tried only on a host that shows a driver.
pub fn open_nvml(library: Option<&Path>) -> Result<Nvml, NvmlUnavailable> {
    let root = crate::testhooks::var_os("AITHER_GPU_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    let dev_dir = root.join("dev");
    match library {
        Some(p) => check_library(p)?,
        None => {
            let driver = root.join("proc/driver/nvidia/version").exists();
            if !driver && !dev_dir.join("nvidia0").exists() {
                return Err(NvmlUnavailable::NoDriver);
            }
        }
    }
    if cfg!(target_feature = "crt-static") {
        // dlopen from a static glibc binary would load a second libc beside ours.
        return Err(NvmlUnavailable::StaticBinary);
    }
    let name = library
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| DEFAULT_LIBRARY.into());
    let nvml_err = |source| NvmlUnavailable::Nvml {
        library: name.clone(),
        source,
    };
    let nvml = match library {
        Some(p) => nvml_wrapper::Nvml::builder()
            .lib_path(p.as_os_str())
            .init()
            .map_err(nvml_err)?,
        None => nvml_wrapper::Nvml::init().map_err(nvml_err)?,
    };
    let n = nvml.device_count().map_err(nvml_err)?;
    let mut devices = Vec::new();
    let mut whole = Vec::new();
    let mut migs = Vec::new();
    for i in 0..n {
        let device = |source| NvmlUnavailable::Device { index: i, source };
        let d = nvml.device_by_index(i).map_err(device)?;
        let minor = d.minor_number().map_err(device)?;
        let total = d.memory_info().map_err(device)?.total;
        let node = dev_dir.join(format!("nvidia{minor}"));
        let (block, major, minor) =
            node_numbers(&node).map_err(|source| NvmlUnavailable::Node {
                node: node.clone(),
                source,
            })?;
        if block || major != NVIDIA_MAJOR {
            return Err(NvmlUnavailable::NotGpuNode { node, major, minor });
        }
        let gpu = GpuDevice {
            index: i,
            uuid: d.uuid().unwrap_or_default(),
            name: d.name().unwrap_or_default(),
            total_mb: total / (1024 * 1024),
            node,
            major,
            minor,
            mig: None,
            extra_nodes: vec![],
        };
        // A GPU in MIG mode is used through its instances only (CUDA sees no whole GPU).
        let mig_on = d
            .mig_mode()
            .map(|m| m.current == NVML_DEVICE_MIG_ENABLE)
            .unwrap_or(false);
        if mig_on {
            migs.extend(mig_instances(&nvml, &d, &gpu, &root)?);
        } else {
            whole.push(i);
            devices.push(gpu);
        }
    }
    // MIG instances are numbered after the whole GPUs, so that a whole GPU keeps NVML's index.
    for (k, mut m) in migs.into_iter().enumerate() {
        m.index = n + k as u32;
        devices.push(m);
    }
    Ok(Nvml {
        nvml,
        devices,
        root,
        whole,
        library: name,
        lost: Default::default(),
    })
}

/// The MIG instances of a GPU in MIG mode: each with its GPU's node and the nvidia-caps access
/// nodes of its GPU instance and compute instance (/proc/driver/nvidia-caps/mig-minors names
/// their minors, /proc/devices nvidia-caps' major), which a lease binds and allows.
fn mig_instances(
    nvml: &nvml_wrapper::Nvml,
    d: &nvml_wrapper::Device<'_>,
    gpu: &GpuDevice,
    root: &Path,
) -> Result<Vec<GpuDevice>, NvmlUnavailable> {
    let device = |source| NvmlUnavailable::Device {
        index: gpu.index,
        source,
    };
    let minors_file = root.join("proc/driver/nvidia-caps/mig-minors");
    let minors = std::fs::read_to_string(&minors_file).map_err(|source| NvmlUnavailable::Node {
        node: minors_file.clone(),
        source,
    })?;
    let caps_major = named_majors(
        &std::fs::read_to_string(root.join("proc/devices")).unwrap_or_default(),
        &["nvidia-caps"],
    );
    let cap = |key: String| -> Result<(PathBuf, String), NvmlUnavailable> {
        let minor = minors
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{key} "))?
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
            .ok_or_else(|| NvmlUnavailable::Mig {
                index: gpu.index,
                why: format!("{key} is not in {}", minors_file.display()),
            })?;
        let name = format!("nvidia-caps/nvidia-cap{minor}");
        let node = root.join("dev").join(&name);
        let (block, major, _) = node_numbers(&node).map_err(|source| NvmlUnavailable::Node {
            node: node.clone(),
            source,
        })?;
        if block || !caps_major.contains(&major) {
            return Err(NvmlUnavailable::Mig {
                index: gpu.index,
                why: format!("{} is not an nvidia-caps node", node.display()),
            });
        }
        Ok((node, name))
    };
    let sys = nvml.lib();
    let max = d.mig_device_count().map_err(device)?;
    let mut out = Vec::new();
    for k in 0..max {
        let m = match d.mig_device_by_index(k) {
            Ok(m) => m,
            Err(nvml_wrapper::error::NvmlError::NotFound) => continue,
            Err(e) => return Err(device(e)),
        };
        // nvml-wrapper has no call for the instance ids: the symbols, resolved like its own
        // (a missing one is an error, not a panic).
        macro_rules! instance_id {
            ($sym:ident) => {{
                let f = sys.$sym.as_ref().map_err(|e| NvmlUnavailable::Mig {
                    index: gpu.index,
                    why: format!("{}: {e}", stringify!($sym)),
                })?;
                let mut v: std::os::raw::c_uint = 0;
                // SAFETY: a symbol of the loaded NVML with its C signature, called on a live
                // handle of that library, writing one c_uint of ours.
                let rc = unsafe { f(m.handle(), &mut v) };
                if rc != 0 {
                    return Err(NvmlUnavailable::Mig {
                        index: gpu.index,
                        why: format!("MIG device {k}: {}: NVML error {rc}", stringify!($sym)),
                    });
                }
                v
            }};
        }
        let gi = instance_id!(nvmlDeviceGetGpuInstanceId);
        let ci = instance_id!(nvmlDeviceGetComputeInstanceId);
        let total_mb = m.memory_info().map_err(device)?.total / (1024 * 1024);
        let slices = m.attributes().map_err(device)?.gpu_instance_slice_count;
        let profile = format!("{slices}g.{}gb", total_mb.div_ceil(1024));
        let g = gpu.minor;
        let extra = vec![
            cap(format!("gpu{g}/gi{gi}/access"))?,
            cap(format!("gpu{g}/gi{gi}/ci{ci}/access"))?,
        ];
        out.push(GpuDevice {
            index: 0,
            uuid: m.uuid().map_err(device)?,
            name: format!("{} MIG {profile}", gpu.name),
            total_mb,
            node: gpu.node.clone(),
            major: gpu.major,
            minor: gpu.minor,
            mig: Some(MigInstance {
                parent: gpu.index,
                gpu_instance: gi,
                compute_instance: ci,
                profile,
            }),
            extra_nodes: extra,
        });
    }
    Ok(out)
}

impl GpuBackend for Nvml {
    fn kind(&self) -> &'static str {
        "nvml"
    }
    fn devices(&self) -> Vec<GpuDevice> {
        self.devices.clone()
    }
    /// Per-process use on every device that answers; a device that does not (fell off the
    /// bus) is recorded in [`GpuBackend::lost`] and the others are still read.
    fn usage(&self) -> Result<Vec<ProcessUsage>, GpuError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let mut out = Vec::new();
        let mut lost = Vec::new();
        // MIG instances are not read: their memory is partitioned by the hardware, so an
        // agent cannot use more than its instance holds.
        for d in self
            .devices
            .iter()
            .filter(|d| self.whole.contains(&d.index))
        {
            let procs = self
                .nvml
                .device_by_index(d.index)
                .and_then(|dev| dev.running_compute_processes());
            let procs = match procs {
                Ok(p) => p,
                Err(e) => {
                    lost.push((d.index, format!("NVML device {}: {e}", d.index)));
                    continue;
                }
            };
            for p in procs {
                out.push(ProcessUsage {
                    device: d.index,
                    pid: Some(p.pid),
                    agent: None,
                    used_mb: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b / (1024 * 1024)),
                        UsedGpuMemory::Unavailable => None,
                    },
                });
            }
        }
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = lost;
        Ok(out)
    }
    fn control_nodes(&self) -> Vec<PathBuf> {
        [
            "nvidiactl",
            "nvidia-uvm",
            "nvidia-uvm-tools",
            "nvidia-modeset",
        ]
        .iter()
        .map(|n| self.root.join("dev").join(n))
        .filter(|p| p.exists())
        .collect()
    }
    fn dev_name(&self, node: &Path) -> String {
        dev_name(node, &self.root.join("dev"))
    }
    fn lost(&self) -> Vec<(u32, String)> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn library(&self) -> Option<String> {
        Some(self.library.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_majors_are_the_nvidia_drivers_character_majors() {
        let text = "Character devices:\n  1 mem\n195 nvidia\n235 nvidia-uvm\n236 nvidia-caps\n\
                    \nBlock devices:\n  8 sd\n237 nvidia-caps\n";
        assert_eq!(dynamic_majors(text), [235, 236]);
    }
}
