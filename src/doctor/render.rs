//! The doctor's report: the host facts and one verdict per installed policy, as text or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::{verdict, HostFacts, PolicyVerdict, Probe, DEFAULT_POLICY};
use crate::policy::{LoadedPolicy, PolicyError};

/// One installed policy: its verdict, or why it could not be loaded.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyEntry {
    pub name: String,
    /// A file path, "built-in", or null for a file that failed to load.
    pub source: Option<String>,
    pub valid: bool,
    /// Why the policy file is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub verdict: Option<PolicyVerdict>,
}

/// Everything `aitherctl doctor` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub host: HostFacts,
    pub policies: Vec<PolicyEntry>,
    pub default_policy: String,
    /// Whether the default policy can run here (doctor's exit status is 0 exactly then).
    pub default_runnable: bool,
}

impl Report {
    /// Verdicts for every policy of `list` (as `Policy::list` returns them).
    pub fn build(
        host: HostFacts,
        list: Vec<(String, Result<LoadedPolicy, PolicyError>)>,
    ) -> Report {
        let policies: Vec<PolicyEntry> = list
            .into_iter()
            .map(|(name, r)| match r {
                Ok(lp) => PolicyEntry {
                    name,
                    source: Some(lp.source),
                    valid: true,
                    error: None,
                    verdict: Some(verdict(&lp.policy, &host)),
                },
                Err(e) => PolicyEntry {
                    name,
                    source: None,
                    valid: false,
                    error: Some(e.to_string()),
                    verdict: None,
                },
            })
            .collect();
        let default_runnable = policies
            .iter()
            .any(|p| p.name == DEFAULT_POLICY && p.verdict.as_ref().is_some_and(|v| v.runnable));
        Report {
            host,
            policies,
            default_policy: DEFAULT_POLICY.to_string(),
            default_runnable,
        }
    }

    /// 0 when the default policy can run here, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.default_runnable {
            0
        } else {
            1
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The human report: the host, then one line per policy with what is missing and the fix.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "Host");
        host_kernel_rows(&mut o, &self.host);
        host_resource_rows(&mut o, &self.host);
        self.policy_lines(&mut o);
        let _ = writeln!(o);
        if self.default_runnable {
            let _ = writeln!(
                o,
                "The default policy, {}, can run here.",
                self.default_policy
            );
        } else {
            let _ = writeln!(
                o,
                "The default policy, {}, cannot run here (exit status 1).",
                self.default_policy
            );
        }
        o
    }

    /// `to_text`: the policies, one line each with what is missing and the fix.
    fn policy_lines(&self, o: &mut String) {
        let _ = writeln!(o);
        let _ = writeln!(o, "Policies");
        for p in &self.policies {
            let default = if p.name == self.default_policy {
                " (default)"
            } else {
                ""
            };
            let src = p.source.as_deref().unwrap_or("-");
            match (&p.verdict, &p.error) {
                (Some(v), _)
                    if v.runnable
                        && v.best_effort_skipped.is_empty()
                        && v.compensated.is_empty() =>
                {
                    let _ = writeln!(o, "  {:<12} OK{default}  [{src}]", p.name);
                }
                (Some(v), _) if v.runnable && v.best_effort_skipped.is_empty() => {
                    let _ = writeln!(
                        o,
                        "  {:<12} OK, with stand-in layers for what this kernel lacks{default}  [{src}]",
                        p.name
                    );
                }
                (Some(v), _) if v.runnable => {
                    let _ = writeln!(
                        o,
                        "  {:<12} OK, with best-effort protections skipped{default}  [{src}]",
                        p.name
                    );
                }
                (Some(_), _) => {
                    let _ = writeln!(o, "  {:<12} CANNOT RUN{default}  [{src}]", p.name);
                }
                (None, e) => {
                    let _ = writeln!(
                        o,
                        "  {:<12} INVALID: {}",
                        p.name,
                        e.as_deref().unwrap_or("unknown error")
                    );
                }
            }
            if let Some(v) = &p.verdict {
                for m in &v.missing {
                    let _ = writeln!(o, "      missing: {}", m.what);
                    if !m.fix.is_empty() {
                        let _ = writeln!(o, "          fix: {}", m.fix);
                    }
                }
                for c in &v.compensated {
                    let _ = writeln!(o, "      stand-in: {c}");
                }
                for m in &v.best_effort_skipped {
                    let _ = writeln!(o, "      skipped (best-effort): {}", m.what);
                    if !m.fix.is_empty() {
                        let _ = writeln!(o, "          fix: {}", m.fix);
                    }
                }
            }
        }
    }
}

/// `Report::to_text`: the kernel, privileges, container and the protections it offers.
fn host_kernel_rows(o: &mut String, h: &HostFacts) {
    let mut row = |k: &str, v: String| {
        let _ = writeln!(o, "  {k:<16} {v}");
    };
    if h.root != std::path::Path::new("/") {
        row(
            "root",
            format!(
                "{} (a fake root{})",
                h.root.display(),
                h.overrides
                    .as_ref()
                    .map(|p| format!("; system-call facts from {}", p.display()))
                    .unwrap_or_default()
            ),
        );
    }
    row("kernel", opt(&h.kernel));
    row(
        "privileges",
        if h.euid == 0 {
            "root".into()
        } else {
            format!("uid {} — not root: `aitherctl run` needs root (aitherd runs as root); probes below ran unprivileged", h.euid)
        },
    );
    row(
        "container",
        match &h.container.kind {
            Some(k) => format!("{k} ({})", h.container.evidence.join("; ")),
            None if h.container.evidence.is_empty() => "none detected".into(),
            None => format!("none ({})", h.container.evidence.join("; ")),
        },
    );
    if let Some(ci) = &h.container.ci {
        row("ci", ci.clone());
    }
    let u = &h.userns;
    row(
        "user namespaces",
        format!(
            "{}; user.max_user_namespaces {}, kernel.unprivileged_userns_clone {}, kernel.apparmor_restrict_unprivileged_userns {} (the last two restrict non-root users only)",
            probe(&u.create),
            opt(&u.max_user_namespaces),
            sysctl(u.unprivileged_userns_clone),
            sysctl(u.apparmor_restrict_unprivileged_userns)
        ),
    );
    row(
        "landlock",
        format!(
            "{}; active LSMs: {}",
            match h.landlock.abi {
                None => "ABI unknown".to_string(),
                Some(0) => "not available (ABI 0)".to_string(),
                Some(n) => format!("ABI {n}"),
            },
            h.landlock
                .lsm
                .clone()
                .unwrap_or_else(|| "unknown (no /sys/kernel/security/lsm)".into())
        ),
    );
    row(
        "seccomp",
        format!(
            "filters {}; this process: {}",
            opt_bool(h.seccomp.filter),
            match h.seccomp.mode {
                Some(0) => "unfiltered".to_string(),
                Some(2) => "already filtered (filters stack)".to_string(),
                Some(m) => format!("mode {m}"),
                None => "unknown".to_string(),
            }
        ),
    );
}

/// `Report::to_text`: the cgroup, the system calls and the GPUs.
fn host_resource_rows(o: &mut String, h: &HostFacts) {
    let mut row = |k: &str, v: String| {
        let _ = writeln!(o, "  {k:<16} {v}");
    };
    let c = &h.cgroup;
    row(
        "cgroup",
        format!(
            "{} at {}; controllers: {}",
            c.mode
                .map(|m| format!("{m:?}").to_lowercase())
                .unwrap_or_else(|| "none".into()),
            c.root.display(),
            if c.controllers.is_empty() {
                "none".into()
            } else {
                c.controllers.join(" ")
            }
        ),
    );
    row(
        "  subtree",
        c.subtree
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
    row("  writable", probe(&c.writable));
    row("  delegated", probe(&c.delegated));
    row("  no swap", probe(&c.swap_control));
    row("  freezer", probe(&c.freezer));
    if let Some(p) = &c.placement {
        row(
            "  placement",
            match p {
                crate::cgroup::delegate::Placement::Delegated { base } => {
                    format!("delegated: below {} (systemd Delegate=yes)", base.display())
                }
                crate::cgroup::delegate::Placement::Scopes { slice, reason } => {
                    format!("transient scopes: each launcher in a scope of its own with Delegate=yes below {} ({reason})", slice.display())
                }
                crate::cgroup::delegate::Placement::TopLevel { reason } => {
                    format!("top-level subtree ({reason}); aitherd started by its unit (Delegate=yes, systemd >= 251, pure v2) uses its own cgroup")
                }
            },
        );
    }
    row("clone3", probe(&h.clone3));
    row("pidfd_open", probe(&h.pidfd_open));
    row("bpf devices", probe(&h.bpf_cgroup_device));
    row("kernel audit", probe(&h.kernel_audit));
    row(
        "gpus",
        match &h.gpu.nvidia_driver {
            _ if h.gpu.simulated.is_some() => {
                let (n, f) = h.gpu.simulated.clone().unwrap_or_default();
                format!("{n} simulated (declared in {f}; docs/gpu.md)")
            }
            None if h.gpu.devices.is_empty() => "none (no NVIDIA driver)".into(),
            d => format!(
                "NVIDIA driver {}; devices: {}; NVML: {}",
                d.clone().unwrap_or_else(|| "not loaded".into()),
                if h.gpu.devices.is_empty() {
                    "none".into()
                } else {
                    h.gpu.devices.join(" ")
                },
                h.gpu
                    .nvml_library
                    .clone()
                    .unwrap_or_else(|| "library not found".into())
            ),
        },
    );
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn opt_bool(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "unknown".into(),
    }
}

/// A 0/1 sysctl; absent on kernels without the patch that adds it.
fn sysctl(v: Option<bool>) -> String {
    match v {
        Some(true) => "1".into(),
        Some(false) => "0".into(),
        None => "absent".into(),
    }
}

fn probe(p: &Probe) -> String {
    let head = opt_bool(p.ok);
    match &p.detail {
        Some(d) => format!("{head}: {d}"),
        None => head,
    }
}
