//! The operator's egress settings: the `[egress]` table of aitherd's configuration file
//! (`/etc/aither/aitherd.toml`, `aitherd --config PATH`; `aitherctl run --config PATH` reads
//! the same file for its in-process gateway). docs/network.md.
//!
//! ```toml
//! [egress]
//! ca_file = "/etc/aither/internal-ca.pem"   # extra trust anchors for route upstreams (PEM)
//! idle_timeout_s = 300                       # a tunnel or connection idle this long is closed
//! max_descriptors = 4096                     # the gateway's descriptors, all agents together
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// The configuration file read when no `--config` is given (absent: every default).
pub const DEFAULT_CONFIG: &str = "/etc/aither/aitherd.toml";
/// A connection or tunnel with no byte either way for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The system's CA bundle, first one present (Debian/Ubuntu, Fedora/RHEL, SUSE, Alpine).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Errors of the configuration file and the trust anchors it names.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: field `egress.ca_file` ({ca}): {source}")]
    CaFile {
        path: PathBuf,
        ca: PathBuf,
        #[source]
        source: PemError,
    },
    #[error("{path}: field `egress.idle_timeout_s`: must be at least 1")]
    Idle { path: PathBuf },
    #[error("{path}: field `egress.max_descriptors`: must be at least 32")]
    Descriptors { path: PathBuf },
}

/// Why a PEM bundle gives no certificates.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{0}")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("no PEM certificate in the file")]
    Empty,
}

/// aitherd's configuration file; only `[egress]` is read by the egress code, other tables
/// belong to others.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub egress: EgressConfig,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// PEM certificates trusted for route upstreams, besides the system store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Descriptors the gateway may hold, all agents together [default: half the process's
    /// soft RLIMIT_NOFILE]; one agent gets an eighth of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_descriptors: Option<usize>,
}

/// The egress settings, checked: everything the gateway needs from the operator.
#[derive(Clone, Debug)]
pub struct Egress {
    pub roots: Vec<CertificateDer<'static>>,
    pub idle_timeout: Duration,
    /// None: half of RLIMIT_NOFILE.
    pub max_descriptors: Option<usize>,
}

impl Egress {
    /// Loads `path` (`explicit`: given on the command line, so it must exist; else the
    /// default, which may be absent) and the trust anchors.
    pub fn load(path: &Path, explicit: bool) -> Result<Egress, ConfigError> {
        let cfg = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::from_section(&cfg.egress, path)
    }

    /// The settings of an `[egress]` table already read from `path` (aitherd reads the file
    /// once, daemon/config.rs), with the trust anchors it names.
    pub fn from_section(egress: &EgressConfig, path: &Path) -> Result<Egress, ConfigError> {
        let mut roots = system_roots();
        if let Some(ca) = &egress.ca_file {
            let extra = pem_certs(ca).map_err(|source| ConfigError::CaFile {
                path: path.to_path_buf(),
                ca: ca.clone(),
                source,
            })?;
            roots.extend(extra);
        }
        let idle_timeout = match egress.idle_timeout_s {
            Some(0) => {
                return Err(ConfigError::Idle {
                    path: path.to_path_buf(),
                })
            }
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_IDLE_TIMEOUT,
        };
        if egress.max_descriptors.is_some_and(|n| n < 32) {
            return Err(ConfigError::Descriptors {
                path: path.to_path_buf(),
            });
        }
        Ok(Egress {
            roots,
            idle_timeout,
            max_descriptors: egress.max_descriptors,
        })
    }
}

impl Default for Egress {
    fn default() -> Self {
        Egress {
            roots: system_roots(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_descriptors: None,
        }
    }
}

fn pem_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(PemError::Pem)?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// The host's system trust store (the first bundle present); the bundled web roots when the
/// host has none.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    for b in SYSTEM_BUNDLES {
        if let Ok(c) = pem_certs(Path::new(b)) {
            return c;
        }
    }
    tracing::warn!(
        "no system CA bundle found; route upstreams are checked against the bundled web roots"
    );
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_config_names_the_file_and_field() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("aitherd.toml");
        std::fs::write(&p, "[egress]\nca_file = \"/nonexistent.pem\"\n").unwrap();
        let e = Egress::load(&p, true).unwrap_err().to_string();
        assert!(
            e.contains("egress.ca_file") && e.contains("aitherd.toml"),
            "{e}"
        );
        std::fs::write(&p, "[egress]\nca_flie = \"x\"\n").unwrap();
        let e = Egress::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("ca_flie"), "{e}");
        // The default path may be absent; an explicit one may not.
        let missing = d.path().join("none.toml");
        assert!(Egress::load(&missing, false).is_ok());
        assert!(Egress::load(&missing, true).is_err());
    }
}
