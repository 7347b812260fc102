//! Export: the sandbox a verified token (or a policy) describes, written for other runtimes.
//!
//! The same `SandboxSpec` that `aitherctl run` launches becomes an OCI runtime bundle
//! (`oci.rs`: crun, runc, or any OCI runtime) or a Kubernetes manifest (`k8s.rs`). Both take
//! the seccomp rules from the one profile in `policies/seccomp/` (`seccomp.rs` turns them into
//! the OCI/Docker JSON format), so the three forms deny the same system calls. What a format
//! cannot express is listed by [`not_expressed`] and recorded in the output's annotations;
//! docs/scaling.md explains each gap.

pub mod k8s;
pub mod oci;
pub mod seccomp;

use std::io;
use std::path::PathBuf;

use crate::policy::net_rules::NetGrants;
use crate::sandbox::seccomp::SeccompError;
use crate::sandbox::SandboxSpec;

/// Errors of export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(
        "seccomp profile {profile:?}: {detail} (cannot be expressed in the OCI seccomp format)"
    )]
    SeccompFormat { profile: String, detail: String },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

pub(crate) fn io_err(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ExportError {
    let path = path.into();
    move |source| ExportError::Io { step, path, source }
}

/// Which target an export is for (the gaps differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Oci,
    Kubernetes,
}

/// Protections of the spec that the target format cannot express, each with why. Written
/// into the output's annotations so that nobody mistakes the export for the whole sandbox.
pub fn not_expressed(spec: &SandboxSpec, net: &NetGrants, target: Target) -> Vec<String> {
    let mut v = Vec::new();
    if !(net.egress.is_empty() && net.services.is_empty() && net.routes.is_empty()) {
        let mut what: Vec<String> = Vec::new();
        for r in &net.egress {
            what.push(format!("egress {}", r.hosts.join(",")));
        }
        for s in &net.services {
            what.push(format!("service {}", s.name));
        }
        for r in &net.routes {
            what.push(format!("route {}", r.name));
        }
        v.push(format!(
            "net: the egress gateway's grants ({}) need aitherd; the export has no gateway, so \
             the agent reaches none of them",
            what.join(", ")
        ));
    }
    if spec.landlock {
        v.push(
            "landlock: neither the OCI runtime spec nor Kubernetes has Landlock rules; the \
             filesystem is confined by the mount view and read-only root only, and TCP by the \
             network namespace only"
                .to_string(),
        );
    }
    if spec.seccomp_profile.is_some() {
        v.push(
            "seccomp-newer-syscalls: system calls newer than the profile answer EPERM, not \
             ENOSYS (the OCI format has no rule for unknown numbers)"
                .to_string(),
        );
    }
    if spec.timeout.is_some() && target == Target::Oci {
        v.push("timeout: an OCI bundle has no wall-clock limit; the caller must stop it".into());
    }
    if target == Target::Kubernetes {
        v.push(
            "pids: a Pod cannot set its own pids limit (the kubelet's podPidsLimit applies)".into(),
        );
        v.push(
            "rlimits: Kubernetes has no per-Pod rlimits (the container runtime's defaults apply)"
                .into(),
        );
        if spec.limits.swap == Some(0) {
            v.push("swap: no per-Pod swap limit (nodes without swap, or LimitedSwap)".into());
        }
        v.push(
            "filesystem-view: the image provides /usr, /etc and the rest; the policy's \
             read_only and etc lists are not applied"
                .into(),
        );
        v.push(
            "id-maps: the agent's uid is fixed; host user namespaces need hostUsers: false \
             (UserNamespacesSupport)"
                .into(),
        );
    }
    v
}

#[cfg(test)]
mod tests;
