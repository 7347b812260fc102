//! Landlock: filesystem rules over the sandbox's own view, TCP bind/connect (ABI ≥ 4), device
//! ioctls (ABI ≥ 5), abstract unix sockets and signals scoped to the sandbox (ABI ≥ 6).
//!
//! What the policy requires is checked against the kernel's ABI before anything is created
//! (`plan`); a missing feature refuses to start unless the policy lists it as best-effort.
//! The ruleset is then built with `CompatLevel::HardRequirement` so the crate can never
//! silently enforce less than the plan says.

use std::collections::BTreeMap;
use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use serde::{Deserialize, Serialize};

use super::spec::SandboxSpec;
use crate::policy::{Layer, NetworkMode, Protection, WorkspaceAccess};

/// Errors of Landlock planning and enforcement.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("policy {policy:?} requires {what}, which needs Landlock ABI {needed}, but this kernel {has}; upgrade the kernel (or boot with lsm=...,landlock), or let other layers stand in for it with [compensated] {protection} = [...] (docs/security-model.md), or allow it with best_effort = [\"{protection}\"]")]
    Unsupported {
        policy: String,
        what: &'static str,
        needed: u8,
        has: String,
        protection: Protection,
    },
    #[error("Landlock rule for {path}: {detail}")]
    Rule { path: PathBuf, detail: String },
    #[error("Landlock ruleset: {0}")]
    Ruleset(String),
    #[error("Landlock was not fully enforced ({0:?})")]
    NotEnforced(String),
}

/// The Landlock ABI of the running kernel (0 = unavailable).
pub fn kernel_abi() -> u8 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // Raw: nix and rustix have no landlock_create_ruleset, and the landlock crate keeps its
    // version query private (LandlockStatus::current).
    // SAFETY: the version query takes a null attribute pointer and size 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        0
    } else {
        r.min(255) as u8
    }
}

/// What will be enforced, decided before launch.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// The ABI the ruleset is built for (0 = no Landlock).
    pub abi: u8,
    pub fs: bool,
    pub tcp: bool,
    pub ioctl_dev: bool,
    pub scopes: bool,
    /// Protections skipped as best-effort.
    pub skipped: Vec<Protection>,
    /// Protections the kernel lacks and the policy lets other layers stand in for.
    #[serde(default)]
    pub compensated: Vec<Compensation>,
    /// Ask the kernel to log the agent's denials (ABI ≥ 7). Logging is no protection: it is
    /// requested only where the kernel has it, so it can never change what is enforced.
    #[serde(default)]
    pub log: bool,
}

/// A Landlock feature this kernel lacks, and the layers standing in for it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Compensation {
    pub protection: Protection,
    /// What the feature is ("TCP bind/connect rules").
    pub what: String,
    /// The Landlock ABI it needs.
    pub needed: u8,
    pub layers: Vec<Layer>,
}

impl std::fmt::Display for Compensation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<String> = self.layers.iter().map(|l| l.to_string()).collect();
        write!(
            f,
            "{} (Landlock {}, ABI ≥ {}): stood in for by {}",
            self.protection,
            self.what,
            self.needed,
            layers.join(" + ")
        )
    }
}

fn to_abi(v: u8) -> ABI {
    match v {
        0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        _ => ABI::V6,
    }
}

/// Decides what Landlock will enforce for `spec` on a kernel with ABI `kernel`.
pub fn plan(spec: &SandboxSpec, kernel: u8) -> Result<Plan, LandlockError> {
    plan_for(
        &spec.policy,
        spec.landlock,
        spec.network,
        &spec.best_effort,
        &spec.compensated,
        kernel,
    )
}

/// `plan` from the policy's fields alone (what `aitherctl doctor` checks without a spec).
pub fn plan_for(
    policy: &str,
    landlock: bool,
    network: NetworkMode,
    best_effort: &[Protection],
    compensated: &BTreeMap<Protection, Vec<Layer>>,
    kernel: u8,
) -> Result<Plan, LandlockError> {
    if !landlock {
        return Ok(Plan::default());
    }
    let has = if kernel == 0 {
        "has no Landlock".to_string()
    } else {
        format!("has ABI {kernel}")
    };
    let mut p = Plan {
        abi: kernel.min(6),
        ..Plan::default()
    };
    let need = |what: &'static str,
                needed: u8,
                protection: Protection,
                p: &mut Plan|
     -> Result<bool, LandlockError> {
        if kernel >= needed {
            return Ok(true);
        }
        if best_effort.contains(&protection) {
            p.skipped.push(protection);
            return Ok(false);
        }
        // The policy's validation made sure the layers are exactly the defence map's and are
        // on in this policy; they are enforced whatever the kernel (never compensated).
        if let Some(layers) = compensated.get(&protection) {
            p.compensated.push(Compensation {
                protection,
                what: what.to_string(),
                needed,
                layers: layers.clone(),
            });
            return Ok(false);
        }
        Err(LandlockError::Unsupported {
            policy: policy.to_string(),
            what,
            needed,
            has: has.clone(),
            protection,
        })
    };
    // ABI 3 brings truncate control; below it a read-only file could still be truncated.
    p.fs = need("filesystem rules", 3, Protection::Landlock, &mut p)?;
    p.tcp = network == NetworkMode::None
        && need("TCP bind/connect rules", 4, Protection::LandlockNet, &mut p)?;
    // Device ioctl rules are part of the filesystem ruleset: when a stand-in replaces that
    // (below ABI 3) they are missing too, and need their own; when the policy skipped the
    // filesystem rules as best-effort, it skipped these with them.
    let fs_covered = p.fs
        || p.compensated
            .iter()
            .any(|c| c.protection == Protection::Landlock);
    p.ioctl_dev =
        fs_covered && need("device ioctl rules", 5, Protection::LandlockIoctl, &mut p)? && p.fs;
    p.scopes = need(
        "abstract-socket and signal scoping",
        6,
        Protection::LandlockScope,
        &mut p,
    )?;
    if !(p.fs || p.tcp || p.scopes) {
        p.abi = 0;
    }
    // Decided from the kernel's ABI alone, never from the policy: a kernel without the log
    // flags (every one before 6.15) must enforce exactly what one with them does.
    p.log = p.abi > 0 && kernel >= 7;
    Ok(p)
}

/// Builds and enforces the ruleset on the calling thread. Runs in the sandbox's pid 1 after the
/// mount view is final (rules name paths of that view) and after no_new_privs.
pub fn enforce(spec: &SandboxSpec, plan: &Plan) -> Result<RulesetStatus, LandlockError> {
    if plan.abi == 0 {
        return Ok(RulesetStatus::NotEnforced);
    }
    let abi = to_abi(plan.abi);
    let rs_err = |e: landlock::RulesetError| LandlockError::Ruleset(e.to_string());
    let mut handled_fs = AccessFs::from_all(abi);
    if !plan.ioctl_dev {
        handled_fs.remove(AccessFs::IoctlDev);
    }
    let mut rs = Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    if plan.fs {
        rs = rs.handle_access(handled_fs).map_err(rs_err)?;
    }
    if plan.tcp {
        // Handled with no rule: every TCP bind and connect is denied.
        rs = rs
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(rs_err)?;
    }
    if plan.scopes {
        rs = rs
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(rs_err)?;
    }
    let mut created = rs.create().map_err(rs_err)?;
    if let (true, Some(port)) = (plan.tcp, spec.egress_port) {
        // The one TCP connect allowed under a `none` network: the egress gateway's socket on
        // the sandbox's own loopback (docs/network.md).
        created = created
            .add_rule(landlock::NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(rs_err)?;
    }
    if plan.tcp {
        // The only binds allowed under a `none` network: the ports the operator published on
        // the host (`spawn --publish-host`), on the sandbox's own loopback.
        for port in &spec.publish_ports {
            created = created
                .add_rule(landlock::NetPort::new(*port, AccessNet::BindTcp))
                .map_err(rs_err)?;
        }
    }
    if plan.fs {
        let read = AccessFs::from_read(abi) & handled_fs;
        let read_noexec = read & !AccessFs::Execute;
        let all = handled_fs;
        let write_exec = if spec.mounts.exec_workspace {
            all
        } else {
            all & !AccessFs::Execute
        };
        let dev =
            (AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::ReadDir | AccessFs::IoctlDev)
                & handled_fs;
        let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
        // Listing directories of the view is harmless (it is all curated); reading files,
        // writing and executing are granted per subtree below.
        rules.push(("/".into(), handled_fs & AccessFs::ReadDir));
        for p in &spec.mounts.read_only {
            rules.push((p.clone(), read));
        }
        rules.push(("/etc".into(), read_noexec));
        // WriteFile and Truncate on /proc: `echo x > /proc/self/comm` (what pthread_setname_np
        // does for another thread) opens with O_TRUNC; what a file there accepts is the
        // kernel's business (tunables are read-only mounts, owned by an unmapped root).
        rules.push((
            "/proc".into(),
            read_noexec | (handled_fs & (AccessFs::WriteFile | AccessFs::Truncate)),
        ));
        rules.push(("/dev".into(), dev));
        rules.push(("/dev/shm".into(), all & !AccessFs::Execute));
        rules.push(("/tmp".into(), write_exec));
        if let Some(ws) = &spec.workspace {
            let access = if matches!(
                ws.access,
                WorkspaceAccess::ReadWrite | WorkspaceAccess::Layered
            ) {
                write_exec
            } else if spec.mounts.exec_workspace {
                read
            } else {
                read_noexec
            };
            rules.push((ws.path.clone(), access));
        }
        for (path, access) in rules {
            let fd = match PathFd::new(&path) {
                Ok(fd) => fd,
                // A read-only entry absent on this host (e.g. /lib32) is simply not in the view.
                Err(_) if !path.exists() => continue,
                Err(e) => {
                    return Err(LandlockError::Rule {
                        path,
                        detail: e.to_string(),
                    })
                }
            };
            created = created
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| LandlockError::Rule {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
        }
    }
    // Denials of the agent (a new executable after pid 1's execve) reach the kernel's audit
    // log when the kernel has it (ABI 7) and audit is on: aitherd joins them to the agent
    // (docs/audit.md). Logging is no protection, so it must not decide enforcement: the flag
    // is only requested where the plan saw ABI ≥ 7. Requesting it best-effort on an older
    // kernel turned the whole ruleset's status into PartiallyEnforced (issue 27), so every
    // policy refused on 6.12 and below.
    if plan.log {
        created = created.log_new_exec(true).map_err(rs_err)?;
    }
    let status = created.restrict_self().map_err(rs_err)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced(format!("{:?}", status.ruleset)));
    }
    Ok(status.ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, BUILTIN_POLICIES};
    use crate::sandbox::spec::RunOptions;

    fn spec(name: &str, best_effort: &[Protection]) -> SandboxSpec {
        let src = BUILTIN_POLICIES.iter().find(|(n, _)| *n == name).unwrap().1;
        let mut p = Policy::parse(src, name).unwrap();
        p.best_effort = best_effort.to_vec();
        let ws = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            argv: vec!["true".into()],
            ..Default::default()
        };
        SandboxSpec::derive(&p, &opts, &|_| None, ws.path()).unwrap()
    }

    #[test]
    fn strict_on_a_full_kernel_enforces_everything() {
        let p = plan(&spec("strict", &[]), 7).unwrap();
        assert_eq!(
            (p.abi, p.fs, p.tcp, p.ioctl_dev, p.scopes),
            (6, true, true, true, true)
        );
        assert!(p.skipped.is_empty());
        assert!(p.log);
    }

    #[test]
    fn logging_is_asked_for_only_where_the_kernel_has_it() {
        // ABI 6 (Debian 13's 6.12): everything strict needs is there, and no log flag is
        // requested, so the ruleset can report FullyEnforced.
        let p = plan(&spec("strict", &[]), 6).unwrap();
        assert_eq!(
            (p.abi, p.fs, p.tcp, p.ioctl_dev, p.scopes, p.log),
            (6, true, true, true, true, false)
        );
        assert!(plan(&spec("strict", &[]), 7).unwrap().log);
        assert!(!plan(&spec("permissive", &[]), 7).unwrap().log);
    }

    #[test]
    fn strict_lets_the_named_layers_stand_in_and_says_which() {
        use crate::policy::Layer;
        // Debian 12's 6.1 (ABI 2): no Landlock at all, four stand-ins.
        let p = plan(&spec("strict", &[]), 2).unwrap();
        assert_eq!(
            (p.abi, p.fs, p.tcp, p.ioctl_dev, p.scopes),
            (0, false, false, false, false)
        );
        let got: Vec<(Protection, Vec<Layer>)> = p
            .compensated
            .iter()
            .map(|c| (c.protection, c.layers.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Protection::Landlock, vec![Layer::ReadOnlyView]),
                (Protection::LandlockNet, vec![Layer::NetNamespace]),
                (
                    Protection::LandlockIoctl,
                    vec![Layer::MinimalDev, Layer::OwnPty, Layer::SeccompIoctl]
                ),
                (
                    Protection::LandlockScope,
                    vec![Layer::NetNamespace, Layer::PidNamespace]
                ),
            ]
        );
        assert!(p.skipped.is_empty());
        assert_eq!(
            p.compensated[1].to_string(),
            "landlock-net (Landlock TCP bind/connect rules, ABI ≥ 4): stood in for by net-namespace"
        );
        // ABI 5: only scoping is stood in for; everything the kernel has is enforced.
        let p = plan(&spec("strict", &[]), 5).unwrap();
        assert_eq!(
            (p.abi, p.fs, p.tcp, p.ioctl_dev, p.scopes),
            (5, true, true, true, false)
        );
        assert_eq!(p.compensated.len(), 1);
        assert_eq!(p.compensated[0].protection, Protection::LandlockScope);
        // ABI 6: nothing to stand in for.
        assert!(plan(&spec("strict", &[]), 6)
            .unwrap()
            .compensated
            .is_empty());
    }

    #[test]
    fn a_missing_feature_refuses_and_names_it() {
        for (kernel, protection, needed) in [
            (0, "\"landlock\"", 3),
            (3, "\"landlock-net\"", 4),
            (4, "\"landlock-ioctl\"", 5),
            (5, "\"landlock-scope\"", 6),
        ] {
            let e = plan(&spec("strict-full", &[]), kernel)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(protection) && e.contains(&format!("ABI {needed}")),
                "kernel {kernel}: {e}"
            );
        }
    }

    #[test]
    fn best_effort_skips_only_what_it_names_and_reports_it() {
        let p = plan(&spec("strict-full", &[Protection::LandlockScope]), 5).unwrap();
        assert!(p.fs && p.tcp && !p.scopes);
        assert_eq!(p.skipped, vec![Protection::LandlockScope]);
        assert!(
            plan(&spec("strict-full", &[Protection::LandlockScope]), 3).is_err(),
            "TCP is still required"
        );
    }

    #[test]
    fn standard_does_not_handle_tcp_and_permissive_has_no_landlock() {
        let p = plan(&spec("standard", &[]), 6).unwrap();
        assert!(p.fs && !p.tcp && p.scopes);
        assert_eq!(plan(&spec("permissive", &[]), 0).unwrap(), Plan::default());
    }
}
