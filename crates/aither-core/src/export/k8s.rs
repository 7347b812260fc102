//! A Kubernetes manifest for the sandbox: a `List` of the Pod, a NetworkPolicy that isolates it
//! (unless the policy asks for the host network) and a ConfigMap carrying the seccomp profile,
//! plus the profile itself for the kubelet's seccomp directory.
//!
//! The Pod runs as the policy's non-root uid and gid with `runAsNonRoot`,
//! `allowPrivilegeEscalation: false` (no_new_privs), every capability dropped, a read-only root
//! filesystem, the seccomp profile as a `Localhost` profile, Guaranteed resources (requests =
//! limits, with `nvidia.com/gpu` from the token's GPU claim), an emptyDir workspace, memory
//! emptyDirs for /tmp and /dev/shm, no service-account token and no service links. What
//! Kubernetes cannot express is listed in the `aither.dev/not-expressed` annotation and in
//! docs/scaling.md.

use serde_json::{json, Value};

use super::{not_expressed, ExportError, Target};
use crate::policy::net_rules::NetGrants;
use crate::policy::{NetworkMode, WorkspaceAccess};
use crate::sandbox::SandboxSpec;
use crate::token::GpuClaim;

/// Where the workspace emptyDir is mounted in the Pod.
pub const WORKSPACE_MOUNT: &str = "/workspace";

/// What the command line adds for a manifest.
#[derive(Clone, Debug)]
pub struct K8sOptions {
    /// Pod name (a DNS-1123 label).
    pub name: String,
    pub image: String,
    pub namespace: Option<String>,
    /// RuntimeClass the Pod asks for (e.g. one whose handler is crun; see docs/scaling.md).
    pub runtime_class: Option<String>,
    /// The token the spec came from (an annotation only).
    pub token_id: Option<String>,
    /// The token's `net` grants (a Pod has no egress gateway: listed as not expressed).
    pub net: NetGrants,
}

/// A manifest and the seccomp profile it refers to.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// A `v1/List` of the Pod, the NetworkPolicy (when isolated) and the profile's ConfigMap.
    pub list: Value,
    /// The profile: its path below the kubelet's seccomp root (`localhostProfile`) and text.
    pub seccomp: Option<(String, Value)>,
}

fn check_label(what: &'static str, s: &str) -> Result<(), ExportError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ExportError::Invalid {
            what,
            reason: format!(
                "{s:?} must be a DNS-1123 label: 1 to 63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit"
            ),
        })
    }
}

/// Millicores of a CFS quota (at least 1m).
fn millicores(quota_us: u64, period_us: u64) -> u64 {
    ((quota_us * 1000 + period_us / 2) / period_us.max(1)).max(1)
}

/// The localhost profile's path below /var/lib/kubelet/seccomp: named after the profile and
/// its content, so that an edited profile never replaces one a running Pod uses.
fn profile_path(profile: &str, text: &Value) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(text.to_string().as_bytes());
    let short: String = d.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("aither/{profile}-{short}.json")
}

/// The container's resource limits (also its requests).
fn resource_limits(spec: &SandboxSpec, gpu: &GpuClaim) -> Value {
    let mut limits = json!({});
    if let Some(m) = spec.limits.memory {
        limits["memory"] = json!(m.to_string());
    }
    if let Some(c) = spec.limits.cpu {
        limits["cpu"] = json!(format!("{}m", millicores(c.quota_us, c.period_us)));
    }
    if gpu.count > 0 {
        // A MIG claim is the device plugin's MIG resource ("mixed" strategy).
        let resource = match &gpu.mig_profile {
            Some(p) => format!("nvidia.com/mig-{p}"),
            None => "nvidia.com/gpu".into(),
        };
        limits[resource] = json!(gpu.count.to_string());
    }
    limits
}

/// The Pod's metadata: its name, namespace, labels and annotations.
fn pod_metadata(spec: &SandboxSpec, gpu: &GpuClaim, opts: &K8sOptions) -> Value {
    let labels = json!({
        "app.kubernetes.io/managed-by": "aither",
        "aither.dev/agent": opts.name,
        "aither.dev/policy": spec.policy,
    });
    let mut annotations = json!({
        "aither.dev/not-expressed": not_expressed(spec, &opts.net, Target::Kubernetes).join("; "),
    });
    if let Some(t) = &opts.token_id {
        annotations["aither.dev/token-id"] = json!(t);
    }
    if let Some(w) = &spec.warning {
        annotations["aither.dev/warning"] = json!(w);
    }
    if gpu.count > 0 && gpu.vram_mb > 0 {
        annotations["aither.dev/gpu-vram-mb"] = json!(gpu.vram_mb.to_string());
    }
    let mut metadata = json!({"name": opts.name, "labels": labels, "annotations": annotations});
    if let Some(ns) = &opts.namespace {
        metadata["namespace"] = json!(ns);
    }
    metadata
}

/// The manifest for `spec`. `gpu` comes from the token's claims.
pub fn manifest(
    spec: &SandboxSpec,
    gpu: &GpuClaim,
    opts: &K8sOptions,
) -> Result<Manifest, ExportError> {
    check_label("--name", &opts.name)?;
    if let Some(ns) = &opts.namespace {
        check_label("--namespace", ns)?;
    }
    if opts.image.is_empty() || opts.image.chars().any(char::is_whitespace) {
        return Err(ExportError::Invalid {
            what: "--image",
            reason: format!("{:?} is not an image reference", opts.image),
        });
    }
    let seccomp = match &spec.seccomp_profile {
        Some(p) => {
            let text = super::seccomp::oci_profile(p)?;
            Some((profile_path(p, &text), text))
        }
        None => None,
    };
    let seccomp_profile = match &seccomp {
        Some((path, _)) => json!({"type": "Localhost", "localhostProfile": path}),
        // A policy without seccomp (permissive) still gets the runtime's default filter.
        None => json!({"type": "RuntimeDefault"}),
    };
    let limits = resource_limits(spec, gpu);
    let metadata = pod_metadata(spec, gpu, opts);
    let env: Vec<Value> = spec
        .env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    let read_only_ws = spec
        .workspace
        .as_ref()
        .is_some_and(|w| w.access == WorkspaceAccess::ReadOnly);
    let mut mounts = vec![
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "shm", "mountPath": "/dev/shm"}),
    ];
    let mut volumes = vec![
        json!({"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": spec.mounts.tmp_size.to_string()}}),
        json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.mounts.dev_shm_size.to_string()}}),
    ];
    if spec.workspace.is_some() {
        mounts.push(
            json!({"name": "workspace", "mountPath": WORKSPACE_MOUNT, "readOnly": read_only_ws}),
        );
        volumes.push(json!({"name": "workspace", "emptyDir": {}}));
    }
    let container = json!({
        "name": "agent",
        "image": opts.image,
        "command": spec.argv,
        "env": env,
        "workingDir": if spec.workspace.is_some() { WORKSPACE_MOUNT } else { "/tmp" },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": spec.uid,
            "runAsGroup": spec.gid,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp_profile,
            "procMount": "Default",
        },
        "resources": {"limits": limits, "requests": limits},
        "volumeMounts": mounts,
    });
    let host_network = spec.network == NetworkMode::Host;
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "hostNetwork": host_network,
        "hostPID": false,
        "hostIPC": !spec.new_ipc_ns,
        // A user namespace per Pod where the cluster supports it (UserNamespacesSupport).
        "hostUsers": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": spec.uid,
            "runAsGroup": spec.gid,
            "fsGroup": spec.gid,
            "seccompProfile": seccomp_profile,
        },
        "containers": [container],
        "volumes": volumes,
    });
    // The policy's hostname when Kubernetes accepts it (a DNS-1123 label), else the Pod name.
    if spec.new_uts_ns && check_label("hostname", &spec.hostname).is_ok() {
        pod_spec["hostname"] = json!(spec.hostname);
    }
    if let Some(t) = spec.timeout {
        pod_spec["activeDeadlineSeconds"] = json!(t.as_secs().max(1));
    }
    if let Some(rc) = &opts.runtime_class {
        pod_spec["runtimeClassName"] = json!(rc);
    }
    let mut items = vec![json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": pod_spec,
    })];
    if !host_network {
        // No ingress and no egress at all: the sandbox's network namespace has only loopback
        // (strict: not even TCP on it), which a Pod keeps whatever the policy.
        let mut md = json!({"name": format!("{}-isolate", opts.name), "labels": {"app.kubernetes.io/managed-by": "aither"}});
        if let Some(ns) = &opts.namespace {
            md["namespace"] = json!(ns);
        }
        items.push(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": md,
            "spec": {
                "podSelector": {"matchLabels": {"aither.dev/agent": opts.name}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": [],
            },
        }));
    }
    if let Some((path, text)) = &seccomp {
        let file = path.rsplit('/').next().unwrap_or(path);
        let mut md = json!({"name": format!("{}-seccomp", opts.name), "labels": {"app.kubernetes.io/managed-by": "aither"},
                            "annotations": {"aither.dev/kubelet-seccomp-path": path}});
        if let Some(ns) = &opts.namespace {
            md["namespace"] = json!(ns);
        }
        items.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": md,
            "data": {file: serde_json::to_string_pretty(text).unwrap_or_default()},
        }));
    }
    Ok(Manifest {
        list: json!({"apiVersion": "v1", "kind": "List", "items": items}),
        seccomp,
    })
}
