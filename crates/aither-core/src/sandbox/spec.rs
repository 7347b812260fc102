//! The resolved sandbox: one `SandboxSpec` derived, with no side effects, from a policy and the
//! command line. Command-line flags may only narrow what the policy grants.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::{CpuQuota, Limits};
use crate::policy::{Layer, NetworkMode, Policy, Protection, WorkspaceAccess};
use crate::units::{format_duration, Size};

/// Errors of spec derivation: a widening flag, a bad workspace, a bad command.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("--{flag} {asked} exceeds what policy {policy:?} grants ({granted}): flags may only narrow a policy")]
    Widening {
        flag: &'static str,
        asked: String,
        granted: String,
        policy: String,
    },
    #[error("--{flag}: {reason}")]
    BadValue { flag: &'static str, reason: String },
    /// The workspace check (sandbox::workspace) refused it; its message names the path.
    #[error("{0}")]
    WorkspaceRefused(String),
    #[error("no command given: usage is `aitherctl run --policy NAME -- CMD [ARGS...]`")]
    NoCommand,
    #[error("--env {0:?}: expected KEY=VALUE")]
    BadEnv(String),
}

/// What the command line asks for on top of a policy.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub name: Option<String>,
    pub workspace: Option<PathBuf>,
    pub env: Vec<String>,
    pub timeout: Option<Duration>,
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub argv: Vec<String>,
}

/// The mount view of the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MountPlan {
    /// Host paths bound read-only at the same place ("/" = the whole host, permissive only).
    pub read_only: Vec<PathBuf>,
    /// Entries of the host /etc placed in the curated /etc.
    pub etc: Vec<String>,
    pub tmp_size: u64,
    pub dev_shm_size: u64,
    pub exec_workspace: bool,
    /// Whether the workspace's command-naming git files are read-only (src/sandbox/gitguard.rs).
    #[serde(default)]
    pub workspace_git: crate::policy::WorkspaceGit,
}

/// A host device node placed in the sandbox's /dev (a GPU of a lease, or a GPU control node).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeviceNode {
    /// The node on the host.
    pub host: PathBuf,
    /// Its name under the sandbox's /dev (e.g. `nvidia0`, `nvidia-caps/nvidia-cap1`).
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Workspace {
    pub path: PathBuf,
    pub access: WorkspaceAccess,
    /// The caller the workspace is mounted for (a non-admin `spawn`): the directory must be
    /// theirs, and the agent's files land as this uid:gid. None (root or an admin): as the
    /// directory's owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<WorkspaceOwner>,
    /// The directory checked at launch preparation, by identity: the launcher refuses a
    /// different one at the path (a rename or replacement since; a restart after one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<DirIdentity>,
    /// Where the filesystem has no id-mapped mounts, run the agent as the workspace's owner
    /// (never root) instead of refusing (`--workspace-as-owner`, docs/kernels.md).
    #[serde(default)]
    pub as_owner: bool,
    /// Set by the launcher when that fallback was taken: a plain bind, its flags set inside.
    #[serde(default)]
    pub plain: bool,
    /// A layered workspace's own directory (`<state>/layers/<name>`: `upper`, `work`, the
    /// record of its lower directory), root's 0700 (docs/workspaces.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<PathBuf>,
    /// The layer's disk quota in bytes (policy `resources.workspace_disk`): its `upper` and
    /// `work` live in an ext4 image of this size. None: plain directories, no quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_quota: Option<u64>,
}

/// A directory's identity: (st_dev, st_ino).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// The host identity an agent's workspace files land as (issue 18: never a directory owner
/// the caller is not).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceOwner {
    pub uid: u32,
    pub gid: u32,
}

/// Everything the launcher needs, and nothing it must look up elsewhere.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SandboxSpec {
    pub name: String,
    pub policy: String,
    pub warning: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub workspace: Option<Workspace>,
    pub mounts: MountPlan,
    pub network: NetworkMode,
    pub new_net_ns: bool,
    pub new_ipc_ns: bool,
    pub new_uts_ns: bool,
    pub new_cgroup_ns: bool,
    pub hostname: String,
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
    pub rlimit_nofile: u64,
    pub rlimit_core: u64,
    pub rlimit_nproc: Option<u64>,
    pub rlimit_fsize: Option<u64>,
    pub landlock: bool,
    pub seccomp_profile: Option<String>,
    pub timeout: Option<Duration>,
    pub best_effort: Vec<Protection>,
    /// Protections that other layers stand in for when the kernel lacks them (the policy's
    /// `[compensated]`).
    #[serde(default)]
    pub compensated: BTreeMap<Protection, Vec<Layer>>,
    /// Collect the enforcement report (pid 1 reads its /proc after confinement: ≈ 0.1 ms).
    #[serde(default)]
    pub report: bool,
    /// Extra device nodes (GPU leases). Non-empty means device rules in the cgroup
    /// (`limits.devices`) allow exactly the base /dev set and these.
    #[serde(default)]
    pub devices: Vec<DeviceNode>,
    /// The egress gateway's port on the sandbox's loopback (`net::attach`): the launcher binds
    /// it inside the sandbox's network namespace and hands the socket to the gateway; Landlock
    /// lets the agent connect to it. None: no egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_port: Option<u16>,
    /// Ports of the sandbox's own loopback published on the host (`spawn --publish-host`):
    /// under a Landlock-confined `none` network the agent may bind these (and nothing else).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_ports: Vec<u16>,
}

fn narrow<T: PartialOrd + Copy + ToString>(
    flag: &'static str,
    asked: Option<T>,
    granted: T,
    policy: &str,
) -> Result<T, SpecError> {
    match asked {
        Some(a) if a > granted => Err(SpecError::Widening {
            flag,
            asked: a.to_string(),
            granted: granted.to_string(),
            policy: policy.into(),
        }),
        Some(a) => Ok(a),
        None => Ok(granted),
    }
}

/// Makes a name safe for cgroup directories and hostnames.
pub fn sanitize_name(n: &str) -> String {
    let s: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if s.is_empty() {
        "agent".into()
    } else {
        s
    }
}

/// A layered workspace's layer: named after the agent, one layer per agent name.
fn layer_of(access: WorkspaceAccess, opts: &RunOptions) -> Option<PathBuf> {
    (access == WorkspaceAccess::Layered).then(|| {
        super::layer::layer_path(
            &crate::token::state_dir(),
            &sanitize_name(opts.name.as_deref().unwrap_or("run")),
        )
    })
}

impl SandboxSpec {
    /// The digest of everything a prepared sandbox (`launch::prepare`) has already built into
    /// itself: every field but the caller-dependent ones, which are applied at
    /// `Prepared::finish` (docs/architecture.md, "Warm start"): `name` (the agent's name; the
    /// cgroup keeps the template's), `hostname` (set in the UTS namespace and /etc at finish),
    /// `argv`, `env`, `cwd` (pid 1 resolves and execs them at finish), `workspace` (mounted at
    /// finish), `timeout` (the launcher's supervise loop) and `report`. Two specs with the
    /// same key get the same namespaces, limits, mounts, identities, rlimits, Landlock rights
    /// and seccomp filter. Hex SHA-256 of the canonical JSON of the rest.
    pub fn prepared_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut rest = self.clone();
        rest.name = String::new();
        rest.hostname = String::new();
        rest.argv = Vec::new();
        rest.env = Vec::new();
        rest.cwd = PathBuf::new();
        rest.workspace = None;
        rest.timeout = None;
        rest.report = false;
        // serde_json of a struct is its fields in declaration order (maps here are BTreeMaps):
        // the same spec gives the same bytes.
        let bytes = serde_json::to_vec(&rest).unwrap_or_default();
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Derives the spec. `caller_env` supplies `pass_env` values; `cwd` is the default workspace.
    pub fn derive(
        policy: &Policy,
        opts: &RunOptions,
        caller_env: &dyn Fn(&str) -> Option<String>,
        cwd: &Path,
    ) -> Result<SandboxSpec, SpecError> {
        if opts.argv.is_empty() {
            return Err(SpecError::NoCommand);
        }
        let pname = policy.name.as_str();
        let memory = narrow("memory", opts.memory, policy.resources.memory, pname)?;
        if memory.0 < (4 << 20) {
            return Err(SpecError::BadValue {
                flag: "memory",
                reason: "must be at least 4M".into(),
            });
        }
        let cpus = narrow("cpus", opts.cpus, policy.resources.cpus, pname)?;
        if !(cpus.is_finite() && cpus >= 0.01) {
            return Err(SpecError::BadValue {
                flag: "cpus",
                reason: "must be at least 0.01".into(),
            });
        }
        let pids = narrow("pids", opts.pids, policy.resources.pids, pname)?;
        if pids < 2 {
            return Err(SpecError::BadValue {
                flag: "pids",
                reason: "must be at least 2 (the reaper and the agent)".into(),
            });
        }
        let timeout = match (opts.timeout, policy.process.timeout.map(|t| t.0)) {
            (Some(a), Some(g)) if a > g => {
                return Err(SpecError::Widening {
                    flag: "timeout",
                    asked: format_duration(a),
                    granted: format_duration(g),
                    policy: pname.into(),
                })
            }
            (Some(d), _) if d.is_zero() => {
                return Err(SpecError::BadValue {
                    flag: "timeout",
                    reason: "must be more than 0".into(),
                })
            }
            (a, g) => a.or(g),
        };

        let workspace = match policy.filesystem.workspace {
            WorkspaceAccess::None => None,
            access => {
                let raw = opts.workspace.clone().unwrap_or_else(|| cwd.to_path_buf());
                // Relative to the caller's directory, lexically (no side effects here): the
                // path must be written as the real one (no '.', '..'); `prepare` and the
                // launcher open it without following links and check the descriptor
                // (sandbox::workspace).
                let path = if raw.is_absolute() {
                    raw
                } else {
                    cwd.join(raw)
                };
                super::workspace::check_lexical(&path)
                    .map_err(|e| SpecError::WorkspaceRefused(e.to_string()))?;
                Some(Workspace {
                    path,
                    access,
                    owner: None,
                    pinned: None,
                    as_owner: false,
                    plain: false,
                    layer: layer_of(access, opts),
                    layer_quota: (access == WorkspaceAccess::Layered)
                        .then_some(policy.resources.workspace_disk.map(|s| s.0))
                        .flatten(),
                })
            }
        };
        let cwd = workspace
            .as_ref()
            .map(|w| w.path.clone())
            .unwrap_or_else(|| PathBuf::from("/tmp"));

        let mut env: Vec<(String, String)> = policy
            .process
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let set = |k: &str, v: String, env: &mut Vec<(String, String)>| {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v));
        };
        for k in &policy.process.pass_env {
            if let Some(v) = caller_env(k) {
                set(k, v, &mut env);
            }
        }
        for kv in &opts.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| SpecError::BadEnv(kv.clone()))?;
            if k.is_empty() || k.contains('\0') || v.contains('\0') {
                return Err(SpecError::BadEnv(kv.clone()));
            }
            set(k, v.to_string(), &mut env);
        }
        let name = sanitize_name(opts.name.as_deref().unwrap_or("run"));
        set("AITHER_AGENT", name.clone(), &mut env);
        set("AITHER_POLICY", policy.name.clone(), &mut env);

        let swap = policy.resources.swap.map(|s| s.0);
        Ok(SandboxSpec {
            name,
            policy: policy.name.clone(),
            warning: policy.warning.clone(),
            argv: opts.argv.clone(),
            env,
            cwd,
            workspace,
            mounts: MountPlan {
                read_only: policy
                    .filesystem
                    .read_only
                    .iter()
                    .map(PathBuf::from)
                    .collect(),
                etc: policy.filesystem.etc.clone(),
                tmp_size: policy.filesystem.tmp_size.0,
                dev_shm_size: policy.filesystem.dev_shm_size.0,
                exec_workspace: policy.filesystem.exec_workspace,
                workspace_git: policy.filesystem.workspace_git,
            },
            network: policy.network.mode,
            new_net_ns: policy.namespaces.net,
            new_ipc_ns: policy.namespaces.ipc,
            new_uts_ns: policy.namespaces.uts,
            new_cgroup_ns: policy.namespaces.cgroup,
            hostname: policy.process.hostname.clone(),
            uid: policy.process.uid,
            gid: policy.process.gid,
            limits: Limits {
                memory: Some(memory.0),
                swap,
                cpu: Some(CpuQuota::from_cpus(cpus)),
                pids: Some(pids),
                devices: None,
            },
            rlimit_nofile: policy.rlimits.nofile,
            rlimit_core: policy.rlimits.core,
            rlimit_nproc: policy.rlimits.nproc,
            rlimit_fsize: policy.rlimits.fsize.map(|s| s.0),
            landlock: policy.landlock.enabled,
            seccomp_profile: (policy.seccomp.profile != "none")
                .then(|| policy.seccomp.profile.clone()),
            timeout,
            best_effort: policy.best_effort.clone(),
            compensated: policy.compensated.clone(),
            report: false,
            devices: Vec::new(),
            egress_port: None,
            publish_ports: Vec::new(),
        })
    }

    /// Grants device nodes (a GPU lease): binds them into /dev and sets the cgroup's device
    /// rules to the base set plus these nodes, read and write (no mknod). `visible` is the
    /// value of NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES (UUIDs of the leased GPUs; a
    /// convenience for CUDA, never a boundary: the device rules are).
    pub fn grant_devices(
        &mut self,
        nodes: &[PathBuf],
        visible: &str,
    ) -> Result<(), crate::cgroup::devices::NodeError> {
        let named: Vec<(PathBuf, String)> = nodes
            .iter()
            .map(|n| {
                let name = n
                    .strip_prefix("/dev")
                    .ok()
                    .filter(|p| p.components().count() > 0)
                    .map(|p| p.to_string_lossy().into_owned())
                    .or_else(|| n.file_name().map(|f| f.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "gpu".into());
                (n.clone(), name)
            })
            .collect();
        self.grant_named_devices(&named, visible)
    }

    /// [`SandboxSpec::grant_devices`] with each node's name under the sandbox's /dev given
    /// (`nvidia-caps/nvidia-cap12`).
    pub fn grant_named_devices(
        &mut self,
        nodes: &[(PathBuf, String)],
        visible: &str,
    ) -> Result<(), crate::cgroup::devices::NodeError> {
        let mut rules = crate::cgroup::devices::base_rules();
        for (n, name) in nodes {
            // The name is a path below the sandbox's /dev: nothing that leaves it.
            let p = std::path::Path::new(name);
            if name.is_empty()
                || !p
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(crate::cgroup::devices::NodeError {
                    path: n.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("device name {name:?} is not a path below /dev"),
                    ),
                });
            }
            let (block, major, minor) =
                crate::cgroup::devices::node_numbers(n).map_err(|source| {
                    crate::cgroup::devices::NodeError {
                        path: n.clone(),
                        source,
                    }
                })?;
            rules.push(crate::cgroup::devices::DeviceRule {
                block,
                major,
                minor: Some(minor),
                access: "rw".into(),
            });
            self.devices.push(DeviceNode {
                host: n.clone(),
                name: name.clone(),
            });
        }
        self.limits.devices = Some(rules);
        for k in ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
            self.env.retain(|(ek, _)| ek != k);
            self.env.push((k.into(), visible.into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BUILTIN_POLICIES;

    fn strict() -> Policy {
        Policy::parse(BUILTIN_POLICIES[0].1, "strict").unwrap()
    }

    fn opts() -> RunOptions {
        RunOptions {
            argv: vec!["/bin/true".into()],
            ..Default::default()
        }
    }

    fn derive(o: &RunOptions) -> Result<SandboxSpec, SpecError> {
        let ws = tempfile::tempdir().unwrap();
        let env = |k: &str| (k == "TERM").then(|| "xterm".to_string());
        SandboxSpec::derive(&strict(), o, &env, ws.path())
    }

    #[test]
    fn prepared_key_ignores_exactly_the_caller_dependent_fields() {
        let base =
            SandboxSpec::derive(&strict(), &opts(), &|_| None, Path::new("/var/tmp")).unwrap();
        let key = base.prepared_key();
        assert_eq!(key.len(), 64, "hex SHA-256");
        let mut caller = base.clone();
        caller.name = "other".into();
        caller.hostname = "other".into();
        caller.argv = vec!["sh".into(), "-c".into(), "x".into()];
        caller.env = vec![("A".into(), "b".into())];
        caller.cwd = "/tmp".into();
        caller.workspace = None;
        caller.timeout = Some(Duration::from_secs(3));
        caller.report = !caller.report;
        assert_eq!(caller.prepared_key(), key, "caller-dependent fields only");
        let changed: [fn(&mut SandboxSpec); 6] = [
            |s| s.rlimit_nofile += 1,
            |s| s.uid += 1,
            |s| s.landlock = !s.landlock,
            |s| s.seccomp_profile = None,
            |s| s.new_net_ns = !s.new_net_ns,
            |s| s.mounts.tmp_size += 1,
        ];
        for (i, change) in changed.iter().enumerate() {
            let mut s = base.clone();
            change(&mut s);
            assert_ne!(
                s.prepared_key(),
                key,
                "change {i} is built into the sandbox"
            );
        }
    }

    #[test]
    fn strict_resolves_to_its_limits() {
        let s = derive(&opts()).unwrap();
        assert_eq!(s.limits.memory, Some(512 << 20));
        assert_eq!(s.limits.swap, Some(0));
        assert_eq!(
            s.limits.cpu,
            Some(CpuQuota {
                quota_us: 100_000,
                period_us: 100_000
            })
        );
        assert_eq!(s.limits.pids, Some(128));
        assert!(s.landlock && s.new_net_ns && s.seccomp_profile.as_deref() == Some("agent"));
        assert_eq!(s.network, NetworkMode::None);
        assert!(s.env.contains(&("TERM".into(), "xterm".into())));
        assert!(s.env.iter().any(|(k, _)| k == "PATH"));
        assert_eq!(s.cwd, s.workspace.as_ref().unwrap().path);
    }

    #[test]
    fn flags_narrow() {
        let s = derive(&RunOptions {
            memory: Some(Size(64 << 20)),
            cpus: Some(0.5),
            pids: Some(16),
            ..opts()
        })
        .unwrap();
        assert_eq!(s.limits.memory, Some(64 << 20));
        assert_eq!(s.limits.cpu.unwrap().quota_us, 50_000);
        assert_eq!(s.limits.pids, Some(16));
    }

    #[test]
    fn widening_flags_are_refused_by_name() {
        for (o, flag) in [
            (
                RunOptions {
                    memory: Some(Size(1 << 30)),
                    ..opts()
                },
                "memory",
            ),
            (
                RunOptions {
                    cpus: Some(2.0),
                    ..opts()
                },
                "cpus",
            ),
            (
                RunOptions {
                    pids: Some(1000),
                    ..opts()
                },
                "pids",
            ),
        ] {
            match derive(&o) {
                Err(SpecError::Widening { flag: f, .. }) => assert_eq!(f, flag),
                other => panic!("{flag}: {other:?}"),
            }
        }
        let ci = Policy::parse(
            BUILTIN_POLICIES.iter().find(|p| p.0 == "ci").unwrap().1,
            "ci",
        )
        .unwrap();
        let ws = tempfile::tempdir().unwrap();
        let e = SandboxSpec::derive(
            &ci,
            &RunOptions {
                timeout: Some(Duration::from_secs(7200)),
                ..opts()
            },
            &|_| None,
            ws.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--timeout 2h exceeds"), "{e}");
        let s = SandboxSpec::derive(&ci, &opts(), &|_| None, ws.path()).unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(1800)));
    }

    #[test]
    fn workspaces_not_written_as_their_real_path_are_refused() {
        for p in ["relative/../x", "/var/./tmp", "/a//b"] {
            let e = derive(&RunOptions {
                workspace: Some(p.into()),
                ..opts()
            })
            .unwrap_err();
            assert!(matches!(e, SpecError::WorkspaceRefused(_)), "{p}: {e:?}");
        }
    }

    #[test]
    fn env_is_built_from_nothing() {
        let s = derive(&RunOptions {
            env: vec!["A=1".into(), "PATH=/x".into()],
            ..opts()
        })
        .unwrap();
        assert!(s.env.contains(&("A".into(), "1".into())));
        assert_eq!(s.env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(s.env.contains(&("PATH".into(), "/x".into())));
        assert!(!s.env.iter().any(|(k, _)| k == "HOSTNAME" || k == "USER"));
        assert_eq!(
            derive(&RunOptions {
                env: vec!["novalue".into()],
                ..opts()
            })
            .unwrap_err(),
            SpecError::BadEnv("novalue".into())
        );
    }
}
