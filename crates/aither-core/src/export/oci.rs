//! An OCI runtime bundle (`config.json` + `rootfs/`) with the sandbox's protections: the same
//! namespaces, a user namespace mapping the agent to an unprivileged host id, the curated
//! mount view (read-only host system directories, a generated /etc, private /tmp, /dev/shm,
//! /proc and /dev, the workspace id-mapped at its host path), the seccomp profile, cgroup
//! limits, device rules, rlimits, no capabilities, no_new_privs, masked and read-only /proc
//! paths, a read-only root.
//!
//! Without `--rootfs` the bundle's `rootfs/` is built like the sandbox's tmpfs root: stub
//! directories, the host's symbolic links (/lib → usr/lib) and a curated /etc; the host paths
//! of the policy's `read_only` list are bound over it by the runtime. With `--rootfs` an image
//! provides the system and /etc, and only the runtime mounts and the workspace are added
//! (missing mountpoints are created in the image, see `mountpoints`).

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{io_err, not_expressed, ExportError, Target};
use crate::hostpath::{self, HostPathError};
use crate::policy::net_rules::NetGrants;
use crate::sandbox::mounts::generated_etc;
use crate::sandbox::SandboxSpec;

/// Host ids handed to exported bundles: container root → `base`, the agent → `base + 1`.
/// Above the range `aitherctl run` uses (0x70000000–0x707FFFFF), so a bundle's agent is never
/// a local sandbox's.
pub const EXPORT_ID_BASE: u32 = 0x7080_0000;
/// Slots (pairs of ids) in the export range.
pub const EXPORT_SLOTS: u32 = 0x4_0000;

/// The default host id pair for a container name: a stable slot in the export range.
pub fn default_host_id(name: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(name.as_bytes());
    let slot = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) % EXPORT_SLOTS;
    EXPORT_ID_BASE + 2 * slot
}

/// What the command line adds to the spec for a bundle.
#[derive(Clone, Debug)]
pub struct OciOptions {
    /// An image's root filesystem; None: build `rootfs/` in the bundle from the host view.
    pub rootfs: Option<PathBuf>,
    /// Container root maps to this host id, the agent to the next one.
    pub host_id: u32,
    /// cgroupsPath, relative to each hierarchy (`/aither/<name>` keeps it in our subtree).
    pub cgroups_path: String,
    /// The token the spec came from (an annotation only).
    pub token_id: Option<String>,
    /// The token's `net` grants: a bundle has no egress gateway, so they are listed among
    /// what it cannot express.
    pub net: NetGrants,
}

/// Entries of the host /etc larger than this are bound rather than copied (as the sandbox).
const ETC_COPY_MAX: u64 = 256 * 1024;

/// Device nodes the agent may use: null, zero, full, random, urandom, tty, ptmx, its ptys.
const DEVICE_ALLOW: &[(&str, i64, Option<i64>)] = &[
    ("c", 1, Some(3)),
    ("c", 1, Some(5)),
    ("c", 1, Some(7)),
    ("c", 1, Some(8)),
    ("c", 1, Some(9)),
    ("c", 5, Some(0)),
    ("c", 5, Some(2)),
    ("c", 136, None),
];

/// /proc entries hidden (bound over with /dev/null or an empty tmpfs), as Docker does.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// /proc entries made read-only: the sandbox's own list plus /proc/fs.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn bind(dst: &Path, src: &Path, rw: bool, extra: &[&str]) -> Value {
    let mut o = vec!["rbind", if rw { "rw" } else { "ro" }, "nosuid", "nodev"];
    o.extend_from_slice(extra);
    json!({"destination": dst, "type": "bind", "source": src, "options": o})
}

/// Container root → `host_id`, the agent's id → `host_id + 1` (the agent's id is never 0: the
/// policy refuses it, so the two lines never overlap). No other id exists in the container.
fn id_maps(host_id: u32, agent: u32) -> Value {
    json!([
        {"containerID": 0, "hostID": host_id, "size": 1},
        {"containerID": agent, "hostID": host_id + 1, "size": 1},
    ])
}

/// The host paths the sandbox binds read-only: the policy's list, or every top-level entry
/// of the host but /proc, /dev and /tmp (fresh instances) when it asks for "/" (permissive),
/// as the sandbox does.
fn read_only_paths(spec: &SandboxSpec) -> Result<Vec<PathBuf>, ExportError> {
    let mut out = Vec::new();
    for p in &spec.mounts.read_only {
        if p == Path::new("/") {
            let rd = fs::read_dir("/").map_err(io_err("list", "/"))?;
            let mut names: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| !matches!(e.file_name().to_str(), Some("proc" | "dev" | "tmp")))
                .map(|e| Path::new("/").join(e.file_name()))
                .collect();
            names.sort();
            out.extend(names);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The mount list, in order: pseudo filesystems, read-only host paths, /etc directories,
/// /tmp, then the workspace last so that no other mount can cover it.
fn mounts(
    spec: &SandboxSpec,
    own_rootfs: bool,
    host_id: u32,
    workspace_owner: Option<(u32, u32)>,
) -> Result<Vec<Value>, ExportError> {
    let noexec: &[&str] = if spec.mounts.exec_workspace {
        &[]
    } else {
        &["noexec"]
    };
    let mut m = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"]}),
        // A private devpts instance; no gid= option: the tty group is not mapped.
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}", spec.mounts.dev_shm_size)]}),
    ];
    if own_rootfs {
        for p in read_only_paths(spec)? {
            match fs::symlink_metadata(&p) {
                Ok(meta) if !meta.file_type().is_symlink() => {
                    m.push(bind(&p, &p, false, &[]));
                }
                _ => {} // links are recreated in rootfs/, absent paths skipped
            }
        }
        for e in &spec.mounts.etc {
            let host = Path::new("/etc").join(e);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => m.push(bind(&host, &host, false, &[])),
                Ok(meta) if meta.is_file() && meta.len() > ETC_COPY_MAX => {
                    m.push(bind(&host, &host, false, &[]))
                }
                _ => {}
            }
        }
    }
    let mut tmp = vec![
        "nosuid".to_string(),
        "nodev".into(),
        "mode=1777".into(),
        format!("size={}", spec.mounts.tmp_size),
    ];
    tmp.extend(noexec.iter().map(|s| s.to_string()));
    m.push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmp}));
    if let Some(ws) = &spec.workspace {
        let rw = ws.access == crate::policy::WorkspaceAccess::ReadWrite;
        let mut w = bind(&ws.path, &ws.path, rw, noexec);
        if let Some((ouid, ogid)) = workspace_owner {
            // An id-mapped mount, as the sandbox's: the owner's files look like the agent's,
            // and what the agent creates lands on disk as the owner's (crun ≥ 1.8; runc
            // before 1.2 ignores these fields and binds the workspace as it is).
            let map =
                |owner: u32| json!([{"containerID": owner, "hostID": host_id + 1, "size": 1}]);
            w["uidMappings"] = map(ouid);
            w["gidMappings"] = map(ogid);
        }
        // The git files the host runs, as the sandbox protects them (src/sandbox/gitguard.rs):
        // .git bound onto itself (not renamable), then its command-naming entries read-only,
        // with the workspace's id maps.
        let git = ws.path.join(".git");
        let protect = rw && spec.mounts.workspace_git == crate::policy::WorkspaceGit::ReadOnly;
        let git_meta = fs::symlink_metadata(&git).ok().filter(|_| protect);
        m.push(w.clone());
        let with_maps = |mut b: Value| {
            for k in ["uidMappings", "gidMappings"] {
                if !w[k].is_null() {
                    b[k] = w[k].clone();
                }
            }
            b
        };
        let refuse_link = |p: &Path| ExportError::Invalid {
            what: "workspace",
            reason: format!(
                "{} is a symbolic link; with workspace_git = \"read-only\" the git files that \
                 name commands must be plain files or directories",
                p.display()
            ),
        };
        match git_meta {
            Some(md) if md.file_type().is_symlink() => return Err(refuse_link(&git)),
            Some(md) if md.is_file() => m.push(with_maps(bind(&git, &git, false, noexec))),
            Some(md) if md.is_dir() => {
                m.push(with_maps(bind(&git, &git, true, noexec)));
                for name in crate::sandbox::gitguard::READ_ONLY_ENTRIES {
                    let p = git.join(name);
                    match fs::symlink_metadata(&p) {
                        Ok(md) if md.file_type().is_symlink() => return Err(refuse_link(&p)),
                        Ok(_) => m.push(with_maps(bind(&p, &p, false, noexec))),
                        Err(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

/// The hard limit of `resource` in this process (None: unlimited or unreadable).
fn current_hard(resource: libc::__rlimit_resource_t) -> Option<u64> {
    // SAFETY: zeroed rlimit is a valid out-parameter.
    let mut cur: libc::rlimit = unsafe { std::mem::zeroed() };
    // Raw: nix's getrlimit takes its Resource enum, and this table holds libc's numbers.
    // SAFETY: getrlimit writes into `cur`.
    let ok = unsafe { libc::getrlimit(resource, &mut cur) } == 0;
    (ok && cur.rlim_max != libc::RLIM_INFINITY).then_some(cur.rlim_max)
}

/// soft = hard = the policy's value, or this process's hard limit when that is lower, as the
/// sandbox does (`sandbox::rlimits`): the policy's number is a ceiling, and runtimes set
/// rlimits inside the user namespace, where raising a hard limit fails.
fn rlimits(spec: &SandboxSpec) -> Vec<Value> {
    let r = [
        (
            "RLIMIT_NOFILE",
            libc::RLIMIT_NOFILE,
            Some(spec.rlimit_nofile),
        ),
        ("RLIMIT_CORE", libc::RLIMIT_CORE, Some(spec.rlimit_core)),
        ("RLIMIT_NPROC", libc::RLIMIT_NPROC, spec.rlimit_nproc),
        ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE, spec.rlimit_fsize),
    ];
    r.into_iter()
        .filter_map(|(name, res, v)| {
            let v = v?;
            let v = current_hard(res).map_or(v, |h| v.min(h));
            Some(json!({"type": name, "hard": v, "soft": v}))
        })
        .collect()
}

fn resources(spec: &SandboxSpec) -> Value {
    let mut devices = vec![json!({"allow": false, "access": "rwm"})];
    for (ty, major, minor) in DEVICE_ALLOW {
        let mut d = json!({"allow": true, "type": ty, "major": major, "access": "rwm"});
        if let Some(mi) = minor {
            d["minor"] = json!(mi);
        }
        devices.push(d);
    }
    let mut r = json!({"devices": devices});
    if let Some(mem) = spec.limits.memory {
        r["memory"] = json!({"limit": mem});
        if let Some(swap) = spec.limits.swap {
            // OCI's memory.swap is memory + swap together.
            r["memory"]["swap"] = json!(mem + swap);
        }
    }
    if let Some(cpu) = spec.limits.cpu {
        r["cpu"] = json!({"quota": cpu.quota_us, "period": cpu.period_us});
    }
    if let Some(pids) = spec.limits.pids {
        r["pids"] = json!({"limit": pids});
    }
    r
}

/// The `config.json` of a bundle for `spec`. `workspace_owner`: the uid and gid owning the
/// workspace on disk, for the id-mapped workspace mount (None: bound without id-mapping).
pub fn config(
    spec: &SandboxSpec,
    opts: &OciOptions,
    workspace_owner: Option<(u32, u32)>,
) -> Result<Value, ExportError> {
    if spec
        .workspace
        .as_ref()
        .is_some_and(|w| w.access == crate::policy::WorkspaceAccess::Layered)
    {
        // Refused rather than widened to a read-write bind: an OCI bundle has no layer owned
        // by Aither to put the agent's writes in (docs/workspaces.md).
        return Err(ExportError::Invalid {
            what: "workspace",
            reason: format!(
                "policy {}: `workspace = \"layered\"` cannot be exported to an OCI bundle (no upper layer outside the runtime); export a policy with `workspace = \"read-write\"` or \"read-only\"",
                spec.policy
            ),
        });
    }
    if opts.host_id == 0 || opts.host_id.checked_add(1).is_none() {
        return Err(ExportError::Invalid {
            what: "--host-id",
            reason: "must be a non-zero id below 2^32-1".into(),
        });
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    for (on, ty) in [
        (spec.new_net_ns, "network"),
        (spec.new_ipc_ns, "ipc"),
        (spec.new_uts_ns, "uts"),
        (spec.new_cgroup_ns, "cgroup"),
    ] {
        if on {
            namespaces.push(json!({"type": ty}));
        }
    }
    let caps: Vec<String> = Vec::new();
    let mut linux = json!({
        "namespaces": namespaces,
        "uidMappings": id_maps(opts.host_id, spec.uid),
        "gidMappings": id_maps(opts.host_id, spec.gid),
        "resources": resources(spec),
        "cgroupsPath": opts.cgroups_path,
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    if let Some(p) = &spec.seccomp_profile {
        linux["seccomp"] = super::seccomp::oci_profile(p)?;
    }
    let mut annotations = json!({
        "org.aither.policy": spec.policy,
        "org.aither.agent": spec.name,
        "org.aither.not-expressed": not_expressed(spec, &opts.net, Target::Oci).join("; "),
    });
    if let Some(t) = &opts.token_id {
        annotations["org.aither.token-id"] = json!(t);
    }
    if let Some(w) = &spec.warning {
        annotations["org.aither.warning"] = json!(w);
    }
    let mut cfg = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": spec.uid, "gid": spec.gid, "additionalGids": [], "umask": 0o022},
            "args": spec.argv,
            "env": spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "inheritable": caps,
                "permitted": caps, "ambient": caps,
            },
            "rlimits": rlimits(spec),
            "noNewPrivileges": true,
        },
        "root": {"path": opts.rootfs.clone().unwrap_or_else(|| PathBuf::from("rootfs")), "readonly": true},
        "mounts": mounts(spec, opts.rootfs.is_none(), opts.host_id, workspace_owner)?,
        "linux": linux,
        "annotations": annotations,
    });
    if spec.new_uts_ns {
        cfg["hostname"] = json!(spec.hostname);
    }
    Ok(cfg)
}

/// The bundle's directories and files, created through the bundle directory's fd: every
/// parent is opened without following links and every file is new (O_EXCL | O_NOFOLLOW), so a
/// link raced into the bundle (or planted in an image) is refused, never followed
/// (src/hostpath.rs).
struct At<'a> {
    fd: BorrowedFd<'a>,
    /// Shown in errors.
    shown: &'a Path,
}

impl At<'_> {
    fn herr(&self, step: &'static str, rel: &Path) -> impl FnOnce(HostPathError) -> ExportError {
        io_err(step, self.shown.join(rel)).compose()
    }
    fn mkdir(&self, rel: &Path) -> Result<OwnedFd, ExportError> {
        hostpath::mkdirs_at(self.fd, rel, 0o755).map_err(self.herr("mkdir", rel))
    }
    /// The parent directory of `rel` (created) and its last name.
    fn parent<'r>(&self, rel: &'r Path) -> Result<(OwnedFd, &'r OsStr), ExportError> {
        let name = rel.file_name().ok_or_else(|| {
            io_err("create", self.shown.join(rel))(io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        let parent = self.mkdir(rel.parent().unwrap_or(Path::new("")))?;
        Ok((parent, name))
    }
    fn symlink(&self, rel: &Path, target: &Path) -> Result<(), ExportError> {
        let (dir, name) = self.parent(rel)?;
        rustix::fs::symlinkat(target, &dir, name)
            .map_err(|e| io_err("symlink", self.shown.join(rel))(e.into()))
    }
    fn write(&self, rel: &Path, bytes: &[u8]) -> Result<(), ExportError> {
        let (dir, name) = self.parent(rel)?;
        let fd = hostpath::create_file_excl_at(dir.as_fd(), name, 0o644)
            .map_err(self.herr("create", rel))?;
        fs::File::from(fd)
            .write_all(bytes)
            .map_err(io_err("write", self.shown.join(rel)))
    }
}

/// `io_err` for a [`HostPathError`] (its message kept as the source).
trait Compose {
    fn compose(self) -> impl FnOnce(HostPathError) -> ExportError;
}

impl<F: FnOnce(io::Error) -> ExportError> Compose for F {
    fn compose(self) -> impl FnOnce(HostPathError) -> ExportError {
        move |e| self(io::Error::other(e))
    }
}

/// Builds `rootfs/` like the sandbox's root: stubs for the read-only host paths (bound by the
/// runtime), the host's symbolic links recreated, the curated /etc (small files copied,
/// directories and large files bound by the runtime, identity files generated), and the
/// mountpoints of /proc, /dev, /tmp and the workspace.
fn build_rootfs(spec: &SandboxSpec, root: &At<'_>) -> Result<(), ExportError> {
    let inside = |p: &Path| p.strip_prefix("/").unwrap_or(p).to_path_buf();
    for p in read_only_paths(spec)? {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        let at = inside(&p);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&p).map_err(io_err("readlink", &p))?;
            root.symlink(&at, &target)?;
        } else if meta.is_dir() {
            root.mkdir(&at)?;
        } else {
            root.write(&at, b"")?;
        }
    }
    let etc = Path::new("etc");
    let etc_fd = root.mkdir(etc)?;
    let etc_at = At {
        fd: etc_fd.as_fd(),
        shown: &root.shown.join(etc),
    };
    for e in &spec.mounts.etc {
        let host = Path::new("/etc").join(e);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        let at = Path::new(e);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host).map_err(io_err("readlink", &host))?;
            etc_at.symlink(at, &target)?;
        } else if meta.is_dir() {
            etc_at.mkdir(at)?;
        } else if meta.len() <= ETC_COPY_MAX {
            let bytes = fs::read(&host).map_err(io_err("read", &host))?;
            etc_at.write(at, &bytes)?;
        } else {
            etc_at.write(at, b"")?;
        }
    }
    for (name, text) in generated_etc(spec) {
        etc_at.write(Path::new(name), text.as_bytes())?;
    }
    for d in ["proc", "dev"] {
        root.mkdir(Path::new(d))?;
    }
    // runc gives a tmpfs the mode of the directory it covers: /tmp must be 1777 here too.
    let tmp = root.mkdir(Path::new("tmp"))?;
    rustix::fs::fchmod(&tmp, rustix::fs::Mode::from_raw_mode(0o1777))
        .map_err(|e| io_err("chmod", root.shown.join("tmp"))(e.into()))?;
    if let Some(ws) = &spec.workspace {
        root.mkdir(&inside(&ws.path))?;
    }
    Ok(())
}

/// Creates the mountpoints an image lacks (the workspace's host path, most often). The
/// runtime would try, but as the container's root, an unprivileged host id that cannot write
/// into an image owned by host root; mounts inside /dev live on its tmpfs and need none.
fn mountpoints(config: &Value, image: &Path) -> Result<(), ExportError> {
    let fd = hostpath::open_dir_nofollow(image).map_err(io_err("open", image).compose())?;
    let at = At {
        fd: fd.as_fd(),
        shown: image,
    };
    let empty = Vec::new();
    for m in config["mounts"].as_array().unwrap_or(&empty) {
        let Some(dst) = m["destination"].as_str() else {
            continue;
        };
        if dst.starts_with("/dev/") {
            continue;
        }
        at.mkdir(Path::new(dst.trim_start_matches('/')))?;
    }
    Ok(())
}

/// A bundle written to disk.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub config: Value,
}

/// Writes `dir/config.json` (and `dir/rootfs/` unless `opts.rootfs` is given). `dir` must be
/// empty or absent: an export never overwrites another bundle.
pub fn write_bundle(
    dir: &Path,
    spec: &SandboxSpec,
    opts: &OciOptions,
) -> Result<Bundle, ExportError> {
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .next()
            .is_none();
        if !empty {
            return Err(ExportError::Invalid {
                what: "--out",
                reason: format!("{} is not empty; an export never overwrites", dir.display()),
            });
        }
    }
    if let Some(r) = &opts.rootfs {
        if !r.is_dir() {
            return Err(ExportError::Invalid {
                what: "--rootfs",
                reason: format!("{} is not a directory", r.display()),
            });
        }
    }
    let owner = match &spec.workspace {
        Some(ws) => {
            // Opened once without following links and checked as the launcher does (not a
            // system directory; a member's own); the owner and the git files are read
            // through that descriptor.
            let opened = crate::sandbox::workspace::open_checked(&ws.path, ws.owner.map(|o| o.uid))
                .map_err(|e| io_err("open the workspace", &ws.path)(io::Error::other(e)))?;
            // A .git without hooks gets an empty one, so that the read-only bind has a place.
            if ws.access == crate::policy::WorkspaceAccess::ReadWrite
                && spec.mounts.workspace_git == crate::policy::WorkspaceGit::ReadOnly
            {
                crate::sandbox::gitguard::prepare_on_host(opened.fd.as_fd(), &ws.path).map_err(
                    |e| io_err("prepare the git files of", &ws.path)(io::Error::other(e)),
                )?;
            }
            Some(match ws.owner {
                Some(o) => (o.uid, o.gid),
                None => (opened.id.uid, opened.id.gid),
            })
        }
        None => None,
    };
    let config = config(spec, opts, owner)?;
    // New, or empty and ours; no link on the way (a planted `out -> /root` is refused, and
    // nothing is chmodded through it).
    let dfd = hostpath::empty_dir(dir).map_err(io_err("create", dir).compose())?;
    // The container's root (an unprivileged host id) must traverse the bundle and its rootfs.
    let open = rustix::fs::Mode::from_raw_mode(0o755);
    rustix::fs::fchmod(&dfd, open).map_err(|e| io_err("chmod", dir)(e.into()))?;
    let bundle = At {
        fd: dfd.as_fd(),
        shown: dir,
    };
    match &opts.rootfs {
        None => {
            let root = bundle.mkdir(Path::new("rootfs"))?;
            rustix::fs::fchmod(&root, open)
                .map_err(|e| io_err("chmod", dir.join("rootfs"))(e.into()))?;
            let shown = dir.join("rootfs");
            build_rootfs(
                spec,
                &At {
                    fd: root.as_fd(),
                    shown: &shown,
                },
            )?;
        }
        Some(image) => mountpoints(&config, image)?,
    }
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    bundle.write(Path::new("config.json"), text.as_bytes())?;
    Ok(Bundle {
        dir: dir.to_path_buf(),
        config,
    })
}
