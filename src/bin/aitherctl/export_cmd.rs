//! `aitherctl export`: the sandbox of a policy or token as an OCI bundle or a Kubernetes
//! manifest (library: `aither::export`).

use std::path::PathBuf;
use std::time::Duration;

use aither::audit::{Entry, Verdict};
use aither::export::k8s::{self, K8sOptions};
use aither::export::oci::{self, OciOptions};
use aither::prepare::{
    prepare, Authority, Egress, HostAuthority, LaunchRequest, OneLaunch, PrepareError,
    PreparedLaunch, Principal, Source as PSource, WorkspaceKind,
};
use aither::sandbox::RunOptions;
use aither::token::{self, TokenError};
use anyhow::Context;
use clap::{Args, Subcommand};

/// Export a policy's or token's sandbox for another runtime: an OCI bundle or Kubernetes.
///
/// The sandbox is derived exactly as `aitherctl run` derives it: from the verified claims of
/// `--token`, or of a token minted (and verified) on the spot from `--policy`. The export
/// carries the same namespaces, id maps, mount view, seccomp system-call set, limits, device
/// rules, rlimits, no capabilities and no_new_privs as far as the format can express them;
/// what it cannot (Landlock above all) is named in the output's annotations and in
/// docs/scaling.md.
///
/// Exit status: 0 written; 1 refused (token refused, bad policy, output exists); 2 usage.
#[derive(Subcommand)]
pub enum ExportCmd {
    Oci(OciArgs),
    K8s(K8sArgs),
}

#[derive(Args)]
struct Source {
    /// Policy name (installed or built-in) or path to a policy file.
    #[arg(
        long,
        short = 'p',
        value_name = "NAME|PATH",
        conflicts_with = "token",
        required_unless_present = "token"
    )]
    policy: Option<String>,
    /// Capability token: its text, a file holding it, or - for stdin. Verified with this
    /// host's key and revocation list, as `aitherctl run --token` does.
    #[arg(long, value_name = "TOKEN|FILE|-")]
    token: Option<String>,
    /// Verify --token with this public key (a file, or the key as hex or base64url) instead
    /// of this host's: exporting, on a build host, a token minted by another (docs/scaling.md).
    /// This host's revocation list still applies.
    #[arg(long, value_name = "FILE|KEY", requires = "token")]
    pubkey: Option<String>,
    /// Set an environment variable inside (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Memory limit (e.g. 256M), at most the claims'.
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    memory: Option<aither::units::Size>,
    /// CPU limit in CPUs (e.g. 0.5), at most the claims'.
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Maximum number of processes and threads, at most the claims'.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
}

/// Write an OCI runtime bundle (config.json and rootfs/) that crun or runc can run.
///
/// Without --rootfs, rootfs/ is built like the sandbox's own root: stubs for the policy's
/// read-only host directories (bound by the runtime), the host's symbolic links, a curated
/// /etc (no shadow, generated passwd/group/hosts). With --rootfs DIR, an image's root
/// filesystem is used instead and only the runtime mounts and the workspace are added (the
/// mountpoints the image lacks, such as the workspace's path, are created in it: the
/// container's root, an unprivileged host id, could not).
/// The workspace (default: the current directory) is bound read-write at its host path,
/// id-mapped to the agent (crun; runc before 1.2 binds it without id-mapping).
///
/// The container's root maps to host id --host-id and the agent to the next id; the default
/// is a stable pair for the name in 0x70800000-0x7087FFFF. cgroupsPath is /aither/NAME.
///
/// Examples:
///   aitherctl export oci --policy strict --out /srv/bundles/job1 -- python3 agent.py
///   crun run --bundle /srv/bundles/job1 job1
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct OciArgs {
    #[command(flatten)]
    source: Source,
    /// The bundle directory (created; must be empty or absent).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// An image's root filesystem instead of the host view.
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Directory bound read-write at the same path (default: current directory).
    #[arg(long, short = 'w', value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Agent name (AITHER_AGENT, cgroupsPath /aither/NAME); with --token, the token's subject.
    #[arg(long, value_name = "NAME", conflicts_with = "token")]
    name: Option<String>,
    /// Host id of the container's root; the agent gets the next one.
    #[arg(long, value_name = "ID")]
    host_id: Option<u32>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Print a Kubernetes manifest (JSON, a v1 List) for the sandbox: the Pod, a NetworkPolicy
/// isolating it and a ConfigMap holding its seccomp profile.
///
/// The Pod runs as the policy's non-root uid with runAsNonRoot, allowPrivilegeEscalation
/// false, every capability dropped, a read-only root filesystem and the seccomp profile as a
/// Localhost profile; requests = limits (memory, cpu, and nvidia.com/gpu from the token's GPU
/// claim); an emptyDir workspace at /workspace and memory emptyDirs for /tmp and /dev/shm.
/// The profile must be on every node at /var/lib/kubelet/seccomp/LOCALHOST_PROFILE: --out
/// DIR writes it there, relative to DIR, beside manifest.json (see docs/scaling.md).
///
/// Examples:
///   aitherctl export k8s --policy ci --name job1 --image debian:12 -- make test | kubectl apply -f -
///   aitherctl export k8s --token agent.tok --name agent --image my/agent:1 --out k8s/ -- python3 agent.py
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct K8sArgs {
    #[command(flatten)]
    source: Source,
    /// Pod name (a DNS-1123 label).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Container image.
    #[arg(long, value_name = "IMAGE")]
    image: String,
    /// Kubernetes namespace of the objects.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// RuntimeClass the Pod asks for.
    #[arg(long, value_name = "CLASS")]
    runtime_class: Option<String>,
    /// Write DIR/manifest.json and DIR/seccomp/LOCALHOST_PROFILE instead of printing the manifest.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(c: ExportCmd) -> i32 {
    let (kind, r) = match c {
        ExportCmd::Oci(a) => ("export_oci", export_oci(a)),
        ExportCmd::K8s(a) => ("export_k8s", export_k8s(a)),
    };
    match r {
        Ok(done) => {
            aither::audit::record_unsynced(
                Entry::new(
                    kind,
                    Verdict::Allow,
                    format!("policy {} via a verified token", done.policy),
                )
                .agent(&done.agent)
                .actor(crate::token_cmd::actor())
                .data(done.data),
            );
            0
        }
        Err(e) => {
            aither::audit::record_unsynced(
                Entry::new(kind, Verdict::Deny, format!("{e:#}")).actor(crate::token_cmd::actor()),
            );
            match e.downcast_ref::<TokenError>() {
                Some(t) if t.is_refusal() => eprintln!("aither: token refused: {t}"),
                _ => crate::print_error(&e),
            }
            1
        }
    }
}

/// What an export wrote, for the audit record.
struct Done {
    policy: String,
    agent: String,
    data: serde_json::Value,
}

/// Verifies `--token`, or mints a short-lived token from `--policy` and verifies it, and
/// derives the spec: the one launch path of `run` and `spawn` (`aither::prepare`), so an
/// export never holds more than a run would. `workspace` is a host directory (a bundle binds
/// it: checked, and inside the token's `workspace_root`) or a placeholder (a Pod's emptyDir).
fn prepared(
    src: &Source,
    name: Option<&str>,
    workspace: Option<PathBuf>,
    kind: WorkspaceKind,
    argv: &[String],
) -> anyhow::Result<PreparedLaunch> {
    let state = token::state_dir();
    let text;
    let (source, auth): (PSource<'_>, Box<dyn Authority>) = match &src.token {
        Some(arg) => {
            text = crate::token_cmd::read_token_arg(arg)?.encode();
            let auth = match &src.pubkey {
                Some(k) => HostAuthority::verify_only(token::parse_public_key(k)?, &state)?,
                None => HostAuthority::load(&state)?,
            };
            (PSource::Token(&text), Box::new(auth))
        }
        None => (
            PSource::Policy(src.policy.as_deref().unwrap_or("strict")),
            Box::new(OneLaunch::new()),
        ),
    };
    let cwd = std::env::current_dir()?;
    let env = |k: &str| std::env::var(k).ok();
    let req = LaunchRequest {
        name: match &src.token {
            Some(_) => None,
            None => Some(name.unwrap_or("agent")),
        },
        source,
        ttl: Duration::from_secs(token::RUN_TOKEN_TTL_SECS),
        bus_publish: &[],
        bus_subscribe: &[],
        opts: RunOptions {
            name: None,
            workspace,
            env: src.env.clone(),
            timeout: None,
            memory: src.memory,
            cpus: src.cpus,
            pids: src.pids,
            argv: argv.to_vec(),
        },
        cwd: &cwd,
        env: &env,
        workspace: kind,
        egress: Egress::NoGateway,
    };
    let p = prepare(&req, &Principal::current(), auth.as_ref()).map_err(|e| match e {
        PrepareError::Token(t) => anyhow::Error::new(t),
        e => anyhow::Error::new(e),
    })?;
    if let Some(w) = &p.spec.warning {
        eprintln!("aither: WARNING: {w}");
    }
    Ok(p)
}

fn export_oci(a: OciArgs) -> anyhow::Result<Done> {
    let p = prepared(
        &a.source,
        a.name.as_deref(),
        a.workspace.clone(),
        WorkspaceKind::Host,
        &a.command,
    )?;
    let (spec, v) = (p.spec, p.verified);
    let opts = OciOptions {
        rootfs: a
            .rootfs
            .as_ref()
            .map(std::fs::canonicalize)
            .transpose()
            .context("--rootfs")?,
        host_id: a
            .host_id
            .unwrap_or_else(|| oci::default_host_id(&spec.name)),
        cgroups_path: format!("/aither/{}", spec.name),
        token_id: a.source.token.is_some().then(|| v.id().to_string()),
        net: v.effective().net.clone(),
    };
    let b = oci::write_bundle(&a.out, &spec, &opts)?;
    let gpu = &v.effective().gpu;
    if gpu.count > 0 {
        eprintln!(
            "aither: note: the token grants {} GPU(s); a bundle gets none (its device rules deny \
             every GPU node: which GPU is aitherd's decision on the node)",
            gpu.count
        );
    }
    if !opts.net.egress.is_empty() || !opts.net.services.is_empty() || !opts.net.routes.is_empty() {
        eprintln!(
            "aither: note: the token's [net] grants (egress, services, routes) are not in the \
             bundle: it has no egress gateway (listed in the org.aither.not-expressed annotation)"
        );
    }
    eprintln!(
        "aither: wrote OCI bundle {} (policy {}, agent host id {}); run it with {}",
        b.dir.display(),
        spec.policy,
        opts.host_id + 1,
        run_hint(&b.dir, &spec.name)
    );
    Ok(Done {
        policy: spec.policy.clone(),
        agent: spec.name.clone(),
        data: serde_json::json!({"argv": spec.argv, "out": b.dir, "token_id": a.source.token.is_some().then(|| v.id())}),
    })
}

/// The command that runs the bundle on this host. On a hybrid cgroup host (v1 controllers and
/// a cgroup2 at /sys/fs/cgroup/unified) crun 1.8 takes the mounted cgroup2 for a unified host
/// and fails to place the container, so the hint unmounts it in a private mount namespace
/// (invisible to the host) first; runc works as is there.
fn run_hint(dir: &std::path::Path, name: &str) -> String {
    let dir = dir.display();
    let hybrid = aither::cgroup::detect(std::path::Path::new("/sys/fs/cgroup")).ok()
        == Some(aither::cgroup::CgroupMode::Hybrid);
    if hybrid {
        format!(
            "`unshare --mount --propagation private sh -c 'umount /sys/fs/cgroup/unified && \
             crun run --bundle {dir} {name}'` (a hybrid cgroup host: crun fails while the \
             cgroup2 at /sys/fs/cgroup/unified is mounted), or `runc run --bundle {dir} {name}`"
        )
    } else {
        format!("`crun run --bundle {dir} {name}`")
    }
}

fn export_k8s(a: K8sArgs) -> anyhow::Result<Done> {
    // The Pod's workspace is an emptyDir: no host directory is involved, so the spec is derived
    // with a placeholder, and the token's workspace_root does not apply.
    let p = prepared(
        &a.source,
        Some(&a.name),
        Some(std::env::temp_dir()),
        WorkspaceKind::Placeholder,
        &a.command,
    )?;
    let (spec, v) = (p.spec, p.verified);
    let opts = K8sOptions {
        name: a.name.clone(),
        image: a.image.clone(),
        namespace: a.namespace.clone(),
        runtime_class: a.runtime_class.clone(),
        token_id: a.source.token.is_some().then(|| v.id().to_string()),
        net: v.effective().net.clone(),
    };
    let m = k8s::manifest(&spec, &v.effective().gpu, &opts)?;
    let text = serde_json::to_string_pretty(&m.list)? + "\n";
    match &a.out {
        None => print!("{text}"),
        Some(dir) => {
            // Through fds, never following a link (crates/aither-core/src/hostpath.rs): the directory made or
            // opened component by component, each file replaced by rename inside it.
            use aither::hostpath;
            use std::os::fd::AsFd;
            let abs = hostpath::normalise(dir)?;
            let root = hostpath::open_dir_nofollow(std::path::Path::new("/"))?;
            let d = hostpath::mkdirs_at(root.as_fd(), abs.strip_prefix("/")?, 0o755)?;
            let path = dir.join("manifest.json");
            hostpath::replace_file_at(d.as_fd(), "manifest.json".as_ref(), text.as_bytes(), 0o644)
                .with_context(|| format!("write {}", path.display()))?;
            if let Some((rel, profile)) = &m.seccomp {
                let p = dir.join("seccomp").join(rel);
                let at = std::path::Path::new("seccomp").join(rel);
                let name = at.file_name().context("empty seccomp profile name")?;
                let sd = hostpath::mkdirs_at(d.as_fd(), at.parent().unwrap_or(&at), 0o755)?;
                let body = serde_json::to_string_pretty(profile)? + "\n";
                hostpath::replace_file_at(sd.as_fd(), name, body.as_bytes(), 0o644)
                    .with_context(|| format!("write {}", p.display()))?;
                eprintln!(
                    "aither: wrote {} and {} (copy it to /var/lib/kubelet/seccomp/{rel} on every node)",
                    path.display(),
                    p.display()
                );
            } else {
                eprintln!("aither: wrote {}", path.display());
            }
        }
    }
    Ok(Done {
        policy: spec.policy.clone(),
        agent: a.name.clone(),
        data: serde_json::json!({"argv": spec.argv, "image": a.image, "token_id": a.source.token.is_some().then(|| v.id())}),
    })
}
