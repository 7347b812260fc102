//! GPUs: where they come from ([`backend`]), who gets them ([`scheduler`]) and how access is
//! enforced ([`devices`]). The daemon's side (queue, leases, persistence, preemption, eviction)
//! is src/daemon/gpu.rs.
//!
//! Configuration: `AITHER_GPUS=path` or /etc/aither/gpus.toml; without a file, NVML (no driver:
//! no GPUs, never a crash). docs/gpu.md.

pub mod backend;
pub use crate::cgroup::devices;
pub mod scheduler;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use backend::{GpuBackend, GpuDevice, NoGpus, ProcessUsage};
pub use devices::DeviceRule;
pub use scheduler::{Config as SchedulerConfig, Lease, Request, Scheduler, SchedulerAction};

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/aither/gpus.toml";

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("GPU device node {path}: {source}")]
    Node {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GPU backend: {0}")]
    Backend(String),
}

impl From<devices::NodeError> for GpuError {
    fn from(e: devices::NodeError) -> GpuError {
        GpuError::Node {
            path: e.path,
            source: e.source,
        }
    }
}

/// Which backend gpus.toml asks for.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    #[default]
    Nvml,
    Simulated,
    None,
}

/// gpus.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Simulated devices (`[[device]]`).
    #[serde(default)]
    pub device: Vec<backend::SimDevice>,
    /// Simulated control nodes every GPU sandbox gets (stand-ins for nvidiactl, nvidia-uvm).
    #[serde(default)]
    pub control_nodes: Vec<PathBuf>,
    /// Simulated per-agent or per-pid use (`[[usage]]`), re-read at every poll.
    #[serde(default)]
    pub usage: Vec<backend::SimUsage>,
    /// Host directories with driver libraries and tools, bound read-only into GPU sandboxes
    /// (those that exist; /usr is already in every policy's read-only view).
    #[serde(default)]
    pub driver_paths: Vec<PathBuf>,
}

impl GpuConfig {
    /// The file named by `AITHER_GPUS`, else /etc/aither/gpus.toml if present.
    pub fn path() -> Option<PathBuf> {
        match crate::testhooks::var_os("AITHER_GPUS") {
            Some(p) => Some(PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(DEFAULT_CONFIG);
                p.exists().then_some(p)
            }
        }
    }

    pub fn parse_file(path: &Path) -> Result<GpuConfig, GpuError> {
        let text = std::fs::read_to_string(path).map_err(|e| GpuError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses, with errors naming line, column and field.
    pub fn parse(path: &Path, text: &str) -> Result<GpuConfig, GpuError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let (line, col) = e
                .span()
                .map(|s| crate::policy::locate::line_col(text, s.start))
                .unwrap_or((0, 0));
            GpuError::Config {
                path: path.to_path_buf(),
                msg: format!("line {line}, column {col}: {}", e.message()),
            }
        })
    }
}

/// The backend and scheduler configuration of this host. A broken configuration file is an
/// error (the daemon refuses to start rather than run without the GPUs the operator declared);
/// NVML without a driver is "no GPUs" with the reason.
///
/// `backend`: aitherd.toml's `gpu.backend` when set there, which wins over gpus.toml's (it can
/// only name `nvml` or `none`, never the simulated backend). `nvml_library`: aitherd.toml's
/// `gpu.nvml_library`, where NVML is loaded from.
pub fn load(backend: Option<BackendKind>, nvml_library: Option<&Path>) -> Result<Loaded, GpuError> {
    let Some(path) = GpuConfig::path() else {
        return Ok(match backend {
            Some(BackendKind::None) => (
                Box::new(NoGpus),
                GpuConfig::default(),
                Some("aitherd.toml: gpu.backend = \"none\"".into()),
            ),
            _ => nvml_or_none(GpuConfig::default(), nvml_library),
        });
    };
    let mut cfg = GpuConfig::parse_file(&path)?;
    if let Some(b) = backend {
        cfg.backend = b;
    }
    match cfg.backend {
        BackendKind::Simulated if !crate::testhooks::ENABLED => Err(GpuError::Config {
            path,
            msg: "backend = \"simulated\" is a test backend (its device and control nodes are \
                  plain host paths), compiled out of release builds"
                .into(),
        }),
        BackendKind::Simulated => {
            let b = backend::Simulated::new(&path, &cfg.device, &cfg.control_nodes)?;
            Ok((Box::new(b), cfg, None))
        }
        BackendKind::None => Ok((Box::new(NoGpus), cfg, Some("backend = \"none\"".into()))),
        BackendKind::Nvml => {
            if !cfg.device.is_empty() {
                return Err(GpuError::Config {
                    path,
                    msg: "[[device]] entries need backend = \"simulated\"".into(),
                });
            }
            Ok(nvml_or_none(cfg, nvml_library))
        }
    }
}

/// The backend, the configuration, and why there are no GPUs (when there are none).
pub type Loaded = (Box<dyn GpuBackend>, GpuConfig, Option<String>);

fn nvml_or_none(cfg: GpuConfig, library: Option<&Path>) -> Loaded {
    match backend::open_nvml(library) {
        Ok(n) => (Box::new(n), cfg, None),
        Err(why) => (Box::new(NoGpus), cfg, Some(why.to_string())),
    }
}
