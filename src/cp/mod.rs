//! `aitherctl cp` (docs/agents.md "Copying files"): the host side of copies between an
//! agent's sandbox and the host. The agent side is a `tar` run inside the sandbox as the agent
//! (daemon/exec.rs `copy_argv`); this side runs in aitherctl with the caller's own privileges,
//! never aitherd's.
//!
//! - [`extract`] writes a stream that came from an agent below a directory the caller opened,
//!   treating it as hostile (the kubectl cp CVEs: CVE-2018-1002100, CVE-2019-1002101,
//!   CVE-2019-11246): absolute names, `..`, hard links are refused; nothing is written through
//!   a link (one on the host, or one the stream made); device nodes and fifos are skipped;
//!   set-id and sticky bits are dropped. Every path is walked from the destination's fd with
//!   [`crate::hostpath`] (no link followed), files are created `O_EXCL` beside their name and
//!   renamed over it.
//! - [`pack`] makes the stream sent to an agent from host files opened the same way (links
//!   inside a copied directory are sent as links, never followed).

pub mod extract;
pub mod pack;
pub mod tar;

use std::path::PathBuf;

use crate::hostpath::HostPathError;

/// Why a copy stopped. Each names the member or the path.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Tar(#[from] tar::TarError),
    #[error(transparent)]
    Host(#[from] HostPathError),
    #[error("{member}: refused: {why}")]
    Refused { member: String, why: &'static str },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl CopyError {
    fn io(path: impl Into<PathBuf>, op: &'static str, e: impl Into<std::io::Error>) -> Self {
        CopyError::Io {
            path: path.into(),
            op,
            source: e.into(),
        }
    }
}

/// A member's name as shown in messages: quoted and escaped (it is the agent's text).
pub fn shown(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}
