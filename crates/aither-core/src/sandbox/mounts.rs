//! The sandbox's filesystem view, built inside its own mount namespace by its pid 1:
//! a tmpfs root, read-only binds of the system directories, a curated /etc, the workspace
//! (id-mapped, read-write) at its host path, a private /tmp, a new /proc and a minimal /dev.
//! Nothing here can reach the host's mount table: propagation is made private first.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::spec::SandboxSpec;
use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// Where the new root is assembled before pivot_root (any directory of the host; the tmpfs
/// covers it only inside this mount namespace).
const STAGING: &str = "/tmp";
const OLD_ROOT: &str = "/.oldroot";

/// Device nodes bound from the host's /dev (as bubblewrap's --dev).
const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Which mount step failed, on what.
#[derive(Debug, thiserror::Error)]
#[error("{step} {path}: {source}")]
pub struct MountError {
    pub step: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> MountError {
    let path = path.into();
    move |source| MountError { step, path, source }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn mkdir_p(p: &Path, mode: u32) -> Result<(), MountError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .map_err(err("mkdir", p))
}

fn touch(p: &Path) -> Result<(), MountError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(p)
        .map(drop)
        .map_err(err("create", p))
}

fn tmpfs(target: &Path, opts: &str, flags: libc::c_ulong) -> Result<(), MountError> {
    let o = c(opts);
    sys::mount(Some(c"tmpfs"), target, Some(c"tmpfs"), flags, Some(&o))
        .map_err(err("mount tmpfs on", target))
}

/// Binds `src` (a host path under the old root) at `dst`, recursively, then makes the whole
/// subtree read-only, nosuid, nodev with mount_setattr (which leaves the locked atime flags of
/// the host's mounts alone, unlike a remount).
fn bind_ro(src: &Path, dst: &Path) -> Result<(), MountError> {
    let s = sys::cstr(src).map_err(err("bind", src))?;
    sys::mount(Some(&s), dst, None, libc::MS_BIND | libc::MS_REC, None)
        .map_err(err("bind", dst))?;
    set_read_only(dst, true).map_err(err("make read-only", dst))
}

/// Makes the mount at `path` (and, when `recursive`, every mount under it) read-only, nosuid
/// and nodev: mount_setattr where the kernel has it (5.12), which leaves the locked atime flags
/// of the host's mounts alone; before 5.12 (Debian 11's 5.10) one bind remount per mount, as
/// bubblewrap does, each keeping the flags the mount already has (statvfs), since a remount
/// in a user namespace may not clear a flag the kernel locked.
fn set_read_only(path: &Path, recursive: bool) -> io::Result<()> {
    match sys::mount_setattr(
        libc::AT_FDCWD,
        path,
        recursive,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        0,
        None,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => remount_read_only(path, recursive),
        r => r,
    }
}

/// The pre-5.12 path of `set_read_only`: `path` itself, then each mount below it in
/// /proc/self/mountinfo order (parents before children).
fn remount_read_only(path: &Path, recursive: bool) -> io::Result<()> {
    let mut targets = vec![path.to_path_buf()];
    if recursive {
        // The view's own /proc is mounted after the read-only binds: until then the host's,
        // under the old root, shows this process's mount table all the same.
        let info = match fs::read_to_string("/proc/self/mountinfo") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::read_to_string(format!("{OLD_ROOT}/proc/self/mountinfo"))?
            }
            r => r?,
        };
        for mp in mountinfo_points(&info) {
            if mp != path && mp.starts_with(path) && !targets.contains(&mp) {
                targets.push(mp);
            }
        }
    }
    for t in targets {
        let keep = statvfs_flags(&t)?;
        let flags = libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | keep;
        // A bind remount takes no source, type or data.
        if let Err(e) = sys::mount(None, &t, None, flags, None) {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "bind remount of {} read-only (no mount_setattr before 5.12): {e}",
                    t.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The mount flags a mount already has, as MS_* bits (kept across a bind remount).
fn statvfs_flags(p: &Path) -> io::Result<libc::c_ulong> {
    let c = sys::cstr(p)?;
    let f = nix::sys::statvfs::statvfs(c.as_c_str())?.flags().bits();
    let mut ms = 0;
    for (st_bit, ms_bit) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_SYNCHRONOUS, libc::MS_SYNCHRONOUS),
    ] {
        if f & st_bit != 0 {
            ms |= ms_bit;
        }
    }
    Ok(ms)
}

/// Mount points (field 5) of /proc/self/mountinfo text, octal escapes (`\040`) decoded.
fn mountinfo_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|raw| {
            let b = raw.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\'
                    && i + 3 < b.len()
                    && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
                {
                    out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                    i += 4;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
        .collect()
}

/// Places host path `host` (under the old root) at `inside`: symlinks are recreated, files and
/// directories bound read-only. Absent paths are skipped (e.g. /lib32 on most hosts).
fn place_read_only(old: &Path, inside: &Path) -> Result<(), MountError> {
    let host = old.join(inside.strip_prefix("/").unwrap_or(inside));
    let Ok(meta) = fs::symlink_metadata(&host) else {
        return Ok(());
    };
    if let Some(parent) = inside.parent() {
        mkdir_p(parent, 0o755)?;
    }
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&host).map_err(err("readlink", &host))?;
        return symlink(&target, inside).map_err(err("symlink", inside));
    }
    if meta.is_dir() {
        mkdir_p(inside, 0o755)?;
    } else {
        touch(inside)?;
    }
    bind_ro(&host, inside)
}

/// The generated identity files of the curated /etc (also written into exported OCI bundles).
pub fn generated_etc(spec: &SandboxSpec) -> [(&'static str, String); 4] {
    let (u, g, h) = (spec.uid, spec.gid, &spec.hostname);
    [
        ("passwd", format!("root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:{u}:{g}:Aither agent:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")),
        ("group", format!("root:x:0:\nagent:x:{g}:\nnogroup:x:65534:\n")),
        ("hostname", format!("{h}\n")),
        ("hosts", format!("127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback\n")),
    ]
}

/// A prepared /etc view (see `prepare_etc`).
#[derive(Clone, Debug)]
pub struct EtcSkeleton {
    /// The cached skeleton directory on the host.
    pub path: PathBuf,
    /// Its entries that are directories on the host, bound live over their mountpoints.
    pub dirs: Vec<String>,
}

/// Directory of prepared /etc views.
pub fn etc_cache_dir() -> PathBuf {
    crate::testhooks::var_os("AITHER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/aither"))
        .join("etc")
}

/// Prepares (once, in the launcher) a skeleton of the curated /etc: small files copied,
/// symlinks recreated, identity files generated, and empty mountpoints for directories, which
/// stay live read-only binds. Its name is a digest of the policy's list and of each host
/// entry's inode, size, mtime and ctime, so an edited host file yields a new skeleton. Binding
/// one skeleton costs one mount instead of ~20 copies (≈1.4 ms per launch, measured here).
/// Returns None when the cache cannot be written: then /etc is assembled per launch.
pub fn prepare_etc(spec: &SandboxSpec) -> Option<EtcSkeleton> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    if spec.mounts.etc.is_empty() && spec.mounts.read_only.iter().any(|p| p == Path::new("/")) {
        return None;
    }
    let mut h = Sha256::new();
    for (name, text) in generated_etc(spec) {
        h.update(name.as_bytes());
        h.update(text.as_bytes());
    }
    // The entries that stay live binds, from the same lstat as the digest (so pid 1 needs no
    // lookup of its own: the skeleton with this digest has a mountpoint for each).
    let mut dirs = Vec::new();
    for e in &spec.mounts.etc {
        h.update(e.as_bytes());
        if let Ok(m) = fs::symlink_metadata(Path::new("/etc").join(e)) {
            if m.is_dir() {
                dirs.push(e.clone());
            }
            for v in [
                m.ino(),
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                m.ctime() as u64,
                m.ctime_nsec() as u64,
                m.mode() as u64,
            ] {
                h.update(v.to_le_bytes());
            }
        }
    }
    let key: String = h
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = etc_cache_dir();
    // Its skeletons become every sandbox's /etc: only a cache of root's that nobody else can
    // write is used (0755 at most: pid 1, an unprivileged host uid, binds from it; checked
    // through its fd, src/hostpath.rs); otherwise /etc is assembled per launch.
    crate::hostpath::owned_cache_dir(&dir, 0o755).ok()?;
    let target = dir.join(&key);
    let found = |path: PathBuf| Some(EtcSkeleton { path, dirs });
    if target.is_dir() {
        return found(target);
    }
    let tmp = dir.join(format!(".{key}.{}", std::process::id()));
    let build = || -> io::Result<()> {
        fs::create_dir_all(&tmp)?;
        for e in &spec.mounts.etc {
            let host = Path::new("/etc").join(e);
            let inside = tmp.join(e);
            let Ok(meta) = fs::symlink_metadata(&host) else {
                continue;
            };
            if let Some(parent) = inside.parent() {
                fs::create_dir_all(parent)?;
            }
            if meta.file_type().is_symlink() {
                symlink(fs::read_link(&host)?, &inside)?;
            } else if meta.is_dir() {
                fs::create_dir_all(&inside)?;
            } else {
                fs::copy(&host, &inside)?;
            }
        }
        for (name, text) in generated_etc(spec) {
            fs::write(tmp.join(name), text)?;
        }
        fs::rename(&tmp, &target)
    };
    match build() {
        Ok(()) => found(target),
        Err(_) if target.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            found(target)
        }
        Err(_) => {
            let _ = fs::remove_dir_all(&tmp);
            None
        }
    }
}

/// Binds a prepared skeleton at /etc, then its directory entries live from the host, then
/// makes the whole /etc read-only in one recursive mount_setattr.
fn bind_etc_skeleton(old: &Path, skeleton: &EtcSkeleton) -> Result<(), MountError> {
    let etc = Path::new("/etc");
    mkdir_p(etc, 0o755)?;
    let skel = &skeleton.path;
    let src = old.join(skel.strip_prefix("/").unwrap_or(skel));
    let s = sys::cstr(&src).map_err(err("bind", &src))?;
    sys::mount(Some(&s), etc, None, libc::MS_BIND, None).map_err(err("bind", etc))?;
    // The launcher found these to be directories (and the skeleton holds a mountpoint for
    // each); one that vanished since is skipped, as a missing entry is at preparation.
    for e in &skeleton.dirs {
        let host = old.join("etc").join(e);
        let inside = etc.join(e);
        let hs = sys::cstr(&host).map_err(err("bind", &host))?;
        match sys::mount(Some(&hs), &inside, None, libc::MS_BIND | libc::MS_REC, None) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r.map_err(err("bind", &inside))?,
        }
    }
    set_read_only(etc, true).map_err(err("make read-only", etc))
}

/// The curated /etc assembled per launch (when no skeleton could be cached): listed host
/// entries (small files copied, directories bound read-only, symlinks recreated) and generated
/// identity files. Never shadow, gshadow, ssh host keys.
fn build_etc(spec: &SandboxSpec, old: &Path) -> Result<(), MountError> {
    let etc = Path::new("/etc");
    mkdir_p(etc, 0o755)?;
    for e in &spec.mounts.etc {
        let host = old.join("etc").join(e);
        let inside = etc.join(e);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if let Some(parent) = inside.parent() {
            mkdir_p(parent, 0o755)?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host).map_err(err("readlink", &host))?;
            symlink(&target, &inside).map_err(err("symlink", &inside))?;
        } else if meta.is_dir() {
            mkdir_p(&inside, 0o755)?;
            bind_ro(&host, &inside)?;
        } else if meta.len() <= 256 * 1024 {
            fs::copy(&host, &inside).map_err(err("copy", &inside))?;
        } else {
            touch(&inside)?;
            bind_ro(&host, &inside)?;
        }
    }
    for (name, text) in generated_etc(spec) {
        fs::write(etc.join(name), text).map_err(err("write", etc.join(name)))?;
    }
    Ok(())
}

fn build_dev(spec: &SandboxSpec, old: &Path) -> Result<(), MountError> {
    let dev = Path::new("/dev");
    mkdir_p(dev, 0o755)?;
    tmpfs(
        dev,
        "size=64k,mode=0755,nr_inodes=64",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    for n in DEV_NODES {
        let host = old.join("dev").join(n);
        let inside = dev.join(n);
        touch(&inside)?;
        let s = sys::cstr(&host).map_err(err("bind", &host))?;
        // Device nodes cannot be created inside a user namespace; bind the host's. A node the
        // host lacks (ENOENT from the bind; no lookup beforehand) is left out.
        match sys::mount(Some(&s), &inside, None, libc::MS_BIND, None) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                fs::remove_file(&inside).map_err(err("remove", &inside))?;
            }
            r => r.map_err(err("bind", &inside))?,
        }
    }
    // Leased GPU nodes: bound like the base nodes; the cgroup's device rules (set before the
    // sandbox was born in it) are what allow opening them.
    for d in &spec.devices {
        let host = old.join(d.host.strip_prefix("/").unwrap_or(&d.host));
        let inside = dev.join(&d.name);
        if let Some(parent) = inside.parent() {
            mkdir_p(parent, 0o755)?;
        }
        touch(&inside)?;
        let s = sys::cstr(&host).map_err(err("bind", &host))?;
        sys::mount(Some(&s), &inside, None, libc::MS_BIND, None).map_err(err("bind", &inside))?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts, 0o755)?;
    // A private devpts instance: the agent sees only its own ptys.
    sys::mount(
        Some(c"devpts"),
        &pts,
        Some(c"devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(err("mount devpts on", &pts))?;
    symlink("pts/ptmx", dev.join("ptmx")).map_err(err("symlink", dev.join("ptmx")))?;
    let shm = dev.join("shm");
    mkdir_p(&shm, 0o755)?;
    tmpfs(
        &shm,
        &format!("size={},mode=1777", spec.mounts.dev_shm_size),
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).map_err(err("symlink", dev.join(name)))?;
    }
    Ok(())
}

fn build_proc() -> Result<(), MountError> {
    let proc = Path::new("/proc");
    mkdir_p(proc, 0o555)?;
    // A new proc for the new pid namespace: host processes are invisible.
    sys::mount(
        Some(c"proc"),
        proc,
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(err("mount proc on", proc))?;
    // Kernel tunables stay read-only even where a file's mode would allow a write.
    // Each is bound onto itself, then made read-only; one the kernel lacks (ENOENT from the
    // bind, no lookup beforehand) is left alone.
    for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
        let p = Path::new(p);
        let s = sys::cstr(p).map_err(err("bind", p))?;
        match sys::mount(Some(&s), p, None, libc::MS_BIND | libc::MS_REC, None) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            r => r.map_err(err("bind", p))?,
        }
        set_read_only(p, true).map_err(err("make read-only", p))?;
    }
    Ok(())
}

/// Builds the view and pivots into it, all but the workspace (see `finish`), and starts
/// detaching the host's root (see `OldRoot`): this runs while the launcher is still preparing
/// the cgroup and the workspace mount.
pub fn build_view(
    spec: &SandboxSpec,
    etc_skeleton: Option<&EtcSkeleton>,
) -> Result<OldRoot, MountError> {
    // Private propagation first: without it every mount below would propagate to the host's
    // shared mounts (the host's mount table must stay as it was).
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(err("make private", "/"))?;
    let staging = Path::new(STAGING);
    tmpfs(
        staging,
        "size=4m,mode=0755,nr_inodes=4096",
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    std::env::set_current_dir(staging).map_err(err("chdir", staging))?;
    let old_rel = &OLD_ROOT[1..];
    mkdir_p(Path::new(old_rel), 0o700)?;
    // pivot_root rather than chroot: the old root must be detachable, and chroot can be
    // escaped by a process holding CAP_SYS_CHROOT in its namespace.
    sys::pivot_root(Path::new("."), Path::new(old_rel)).map_err(err("pivot_root into", staging))?;
    std::env::set_current_dir("/").map_err(err("chdir", "/"))?;
    let old = Path::new(OLD_ROOT);

    for p in &spec.mounts.read_only {
        if p == Path::new("/") {
            // The whole host, read-only (permissive): every top-level entry but the pseudo
            // filesystems and /tmp, which get fresh instances below.
            let entries = fs::read_dir(old).map_err(err("list", old))?;
            for e in entries.flatten() {
                let name = e.file_name();
                if matches!(name.to_str(), Some("proc" | "dev" | "tmp" | ".oldroot")) {
                    continue;
                }
                place_read_only(old, &Path::new("/").join(&name))?;
            }
        } else {
            place_read_only(old, p)?;
        }
    }
    if let Some(skel) = etc_skeleton {
        bind_etc_skeleton(old, skel)?;
    } else if !spec.mounts.etc.is_empty()
        || !spec.mounts.read_only.iter().any(|p| p == Path::new("/"))
    {
        build_etc(spec, old)?;
    }
    let tmp = Path::new("/tmp");
    mkdir_p(tmp, 0o1777)?;
    let exec = if spec.mounts.exec_workspace {
        0
    } else {
        libc::MS_NOEXEC
    };
    tmpfs(
        tmp,
        &format!("size={},mode=1777", spec.mounts.tmp_size),
        libc::MS_NOSUID | libc::MS_NODEV | exec,
    )?;
    build_proc()?;
    build_dev(spec, old)?;
    // The stubs leading to the workspace, while the root is still writable.
    if let Some(ws) = &spec.workspace {
        mkdir_p(&ws.path, 0o755)?;
    }
    // Nothing more is bound from the host's root (the workspace arrives as a detached mount,
    // not by path): detach it, in a helper thread (see `OldRoot`).
    Ok(OldRoot::detach())
}

/// The host's root at /.oldroot, being detached. umount2(MNT_DETACH) unhooks the mounts at
/// once but then waits for an RCU grace period before it returns (namespace_unlock: ≈0.6 ms
/// here), so a helper thread makes the call while pid 1 waits for the launcher's descriptors
/// anyway; `release` joins it before anything of the agent is set up.
pub struct OldRoot {
    detaching: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl OldRoot {
    fn detach() -> OldRoot {
        let detach = || sys::umount2(Path::new(OLD_ROOT), libc::MNT_DETACH);
        let detaching = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(detach)
            .ok();
        OldRoot { detaching }
    }

    /// Waits for the detach (joining the helper: pid 1 is single-threaded again, as moving
    /// it into its v1 cgroups through `tasks` and the per-thread Landlock and seccomp need),
    /// removes the mountpoint and makes the root read-only. From here on nothing of the host
    /// is reachable by path.
    pub fn release(self) -> Result<(), MountError> {
        self.release_writable()?;
        root_read_only()
    }

    /// `release` without the read-only root: a prepared sandbox (`launch::prepare`) still
    /// creates the workspace's stub directories and the hostname files at its finish, then
    /// calls `root_read_only` before anything of the agent exists.
    pub fn release_writable(self) -> Result<(), MountError> {
        let old = Path::new(OLD_ROOT);
        let detached = match self.detaching {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the detaching thread panicked"))),
            // No thread to be had: detach here.
            None => sys::umount2(old, libc::MNT_DETACH),
        };
        detached.map_err(err("detach old root", old))?;
        fs::remove_dir(old).map_err(err("rmdir", old))
    }
}

/// The root tmpfs itself becomes read-only, after its last mountpoint was made (not
/// recursive: /tmp, /dev, /dev/shm and the workspace stay as mounted): the agent writes only
/// where it was given room.
pub fn root_read_only() -> Result<(), MountError> {
    set_read_only(Path::new("/"), false).map_err(err("make read-only", "/"))
}

/// A prepared sandbox's finish, before `finish`: the stub directories leading to the final
/// spec's workspace (the template had none), on the still-writable root.
pub fn workspace_stub(spec: &SandboxSpec) -> Result<(), MountError> {
    match &spec.workspace {
        Some(ws) => mkdir_p(&ws.path, 0o755),
        None => Ok(()),
    }
}

/// A prepared sandbox's finish, when the final hostname differs from the template's: the
/// generated /etc/hostname and /etc/hosts of the final spec, each bound read-only over the
/// template's (the files are written on the still-writable root and unlinked once bound, so
/// nothing but the two binds remains). Only files the view has are replaced.
pub fn replace_hostname_files(spec: &SandboxSpec) -> Result<(), MountError> {
    for (name, text) in generated_etc(spec) {
        if !matches!(name, "hostname" | "hosts") {
            continue;
        }
        let target = Path::new("/etc").join(name);
        if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let src = PathBuf::from(format!("/.aither-{name}"));
        fs::write(&src, text).map_err(err("write", &src))?;
        let c_src = sys::cstr(&src).map_err(err("bind", &src))?;
        sys::mount(Some(&c_src), &target, None, libc::MS_BIND, None)
            .map_err(err("bind", &target))?;
        fs::remove_file(&src).map_err(err("unlink", &src))?;
        set_read_only(&target, false).map_err(err("make read-only", &target))?;
    }
    Ok(())
}

/// Attaches the workspace (`workspace`: the detached, id-mapped mount the launcher prepared)
/// and enters the working directory.
pub fn finish(spec: &SandboxSpec, workspace: Option<&OwnedFd>) -> Result<(), MountError> {
    // The workspace goes last so that no earlier mount (e.g. /tmp for a workspace under /tmp)
    // can cover it.
    if let (Some(ws), Some(fd)) = (&spec.workspace, workspace) {
        sys::move_mount_fd(fd.as_fd(), &ws.path).map_err(err("attach workspace at", &ws.path))?;
        if ws.plain {
            // Not id-mapped (the --workspace-as-owner fallback): mount_setattr may not exist
            // (before 5.12), so the flags come from a bind remount, made here before the
            // agent exists. Only adding flags: nothing can be cleared from inside.
            let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
            if ws.access == crate::policy::WorkspaceAccess::ReadOnly {
                flags |= libc::MS_RDONLY;
            }
            if !spec.mounts.exec_workspace {
                flags |= libc::MS_NOEXEC;
            }
            // A remount takes no source, type or data.
            sys::mount(None, &ws.path, None, flags, None)
                .map_err(err("set the workspace's mount flags on", &ws.path))?;
        }
        // Before anything of the agent runs: the git files the host runs are read-only.
        if ws.access == crate::policy::WorkspaceAccess::ReadWrite
            && spec.mounts.workspace_git == crate::policy::WorkspaceGit::ReadOnly
        {
            super::gitguard::protect(&ws.path)
                .map_err(|e| err("protect the git files of", &ws.path)(io::Error::other(e)))?;
        }
    }
    std::env::set_current_dir(&spec.cwd).map_err(err("chdir", &spec.cwd))
}

/// Prepares the detached workspace mount in the launcher (host root): a recursive bind of the
/// workspace, id-mapped so that the agent's host id acts as the directory's owner, nosuid,
/// nodev, and read-only or noexec as the policy says. Only host root can id-map a mount of a
/// host filesystem, so this cannot happen inside the sandbox. The helper that made the id-map
/// namespace comes back with it, to be reaped once the launch no longer waits.
pub fn prepare_workspace(
    spec: &SandboxSpec,
    agent_host_id: u32,
) -> io::Result<Option<(OwnedFd, super::userns::IdmapHelper)>> {
    prepare_workspace_presented(spec, agent_host_id, None)
}

/// `prepare_workspace`, with the directory the caller opened themselves (a prepared
/// sandbox's finish: aitherd passes it on): the directory opened here must be that one
/// (`workspace::check_presented`: same identity, a real open), or the launch is refused.
pub fn prepare_workspace_presented(
    spec: &SandboxSpec,
    agent_host_id: u32,
    presented: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<Option<(OwnedFd, super::userns::IdmapHelper)>> {
    let Some(ws) = &spec.workspace else {
        return Ok(None);
    };
    // Resolved once, without following links; checked and cloned from the same descriptor
    // (a link or rename planted by an earlier agent cannot redirect it).
    let opened = super::workspace::open_checked(&ws.path, ws.owner.map(|o| o.uid))
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    if let Some(fd) = presented {
        super::workspace::check_presented(&opened, fd)
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    }
    if ws.pinned.is_some_and(|p| p != opened.id.identity()) {
        let e = super::workspace::WorkspaceError::Replaced {
            path: ws.path.clone(),
        };
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            e.to_string(),
        ));
    }
    if ws.access == crate::policy::WorkspaceAccess::ReadWrite
        && spec.mounts.workspace_git == crate::policy::WorkspaceGit::ReadOnly
    {
        super::gitguard::prepare_on_host(opened.fd.as_fd(), &ws.path).map_err(io::Error::other)?;
    }
    // The agent's files land as the caller (checked above to own the directory), or, for
    // root and admins, as the directory's owner.
    let (uid, gid) = match ws.owner {
        Some(o) => (o.uid, o.gid),
        None => (opened.id.uid, opened.id.gid),
    };
    if ws.access == crate::policy::WorkspaceAccess::Layered {
        // The directory as the overlay's read-only lower layer, the agent's writes in its own
        // layer (sandbox::layer): nothing the agent writes reaches the directory, so its git
        // files need no read-only binds (they reach it only through `aitherctl apply`).
        let layer = ws.layer.as_deref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a layered workspace without a layer directory in the spec",
            )
        })?;
        let (fd, helper) = super::layer::mount_layered(
            layer,
            &opened,
            (uid, gid),
            agent_host_id,
            spec.mounts.exec_workspace,
            ws.layer_quota,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
        return Ok(Some((fd, helper)));
    }
    let (userns, helper) = super::userns::idmap_userns(uid, gid, agent_host_id)?;
    let fd = super::workspace::clone_tree(&opened).map_err(|e| io::Error::other(e.to_string()))?;
    let mut set = sys::MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if ws.access == crate::policy::WorkspaceAccess::ReadOnly {
        set |= MOUNT_ATTR_RDONLY;
    }
    if !spec.mounts.exec_workspace {
        set |= sys::MOUNT_ATTR_NOEXEC;
    }
    sys::mount_setattr(std::os::fd::AsRawFd::as_raw_fd(&fd), Path::new(""), true, set, 0, Some(userns.as_fd())).map_err(|e| {
        io::Error::new(e.kind(), format!("id-mapping the workspace mount failed ({e}); the filesystem must support id-mapped mounts (ext4, xfs, btrfs, tmpfs ≥ 6.3, kernel ≥ 5.12), or run with --workspace-as-owner to run the agent as the workspace's (non-root) owner instead (docs/kernels.md)"))
    })?;
    Ok(Some((fd, helper)))
}

/// The workspace prepared before the clone, when `--workspace-as-owner` asked for the fallback
/// (it changes the agent's host ids, which are written right after the clone).
pub enum EarlyWorkspace {
    /// The filesystem takes id-mapped mounts after all: the usual mount, only made earlier.
    IdMapped(OwnedFd, super::userns::IdmapHelper),
    /// It does not: a plain bind of the workspace alone, and the agent runs as its owner.
    AsOwner { fd: OwnedFd, uid: u32, gid: u32 },
}

/// The fallback for a workspace without id-mapped mounts (docs/kernels.md): the agent runs as
/// the directory's owner instead of its own host uid, so that it can write its workspace with
/// nothing chowned. Only when asked for (`Workspace::as_owner`), and never as root or a system
/// account: a workspace owned by a uid or gid below 1000, or by a sandbox's id, is refused. The id-mapped mount is tried
/// first; only "this filesystem or kernel cannot id-map" (EINVAL, ENOSYS, EOPNOTSUPP) falls
/// back. The directory is opened once without following links; what is checked is what is
/// mounted. Submounts under it are not carried in (nothing could make them nosuid before
/// 5.12).
pub fn prepare_workspace_early(
    spec: &SandboxSpec,
    agent_host_id: u32,
) -> io::Result<Option<EarlyWorkspace>> {
    let Some(ws) = spec.workspace.as_ref().filter(|w| w.as_owner) else {
        return Ok(None);
    };
    if ws.access == crate::policy::WorkspaceAccess::Layered {
        // No fallback for a layered workspace: a plain bind would be the directory itself.
        return prepare_workspace(spec, agent_host_id)
            .map(|w| w.map(|(fd, helper)| EarlyWorkspace::IdMapped(fd, helper)));
    }
    match prepare_workspace(spec, agent_host_id) {
        Ok(Some((fd, helper))) => return Ok(Some(EarlyWorkspace::IdMapped(fd, helper))),
        Ok(None) => return Ok(None),
        Err(e)
            if !matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            return Err(e)
        }
        Err(_) => {}
    }
    // The same rule as the id-mapped path: opened once without following a link in any
    // component, checked as that descriptor (not a system directory; a member's own), and
    // that descriptor is what gets mounted.
    let opened = super::workspace::open_checked(&ws.path, ws.owner.map(|o| o.uid))
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    let dir = opened.fd;
    let (uid, gid) = (opened.id.uid, opened.id.gid);
    let base = super::userns::UID_BASE;
    // Below 1000 (login.defs' UID_MIN/GID_MIN): root and the system accounts and groups
    // (disk, docker, adm…), whose rights no agent may borrow.
    if uid < 1000 || gid < 1000 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("workspace {}: its filesystem has no id-mapped mounts, and it is owned by uid {uid} gid {gid}: running the agent as its owner would give it {} rights, which Aither never does; chown it to an unprivileged user (uid and gid ≥ 1000), or use a filesystem with id-mapped mounts (docs/kernels.md)", ws.path.display(), if uid == 0 || gid == 0 { "host root's" } else { "a system account's" }),
        ));
    }
    if uid >= base || gid >= base {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "workspace {}: owned by uid {uid} gid {gid}, ids Aither gives sandboxes; refused",
                ws.path.display()
            ),
        ));
    }
    // rustix: nix 0.30 has no open_tree. A detached copy of that mount (not recursive: only
    // the workspace itself).
    use rustix::mount::OpenTreeFlags;
    let fd = rustix::mount::open_tree(
        &dir,
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )?;
    Ok(Some(EarlyWorkspace::AsOwner { fd, uid, gid }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_decode_escapes_and_keep_order() {
        let info = "22 1 0:21 / / rw - tmpfs tmpfs rw\n\
                    23 22 8:1 /usr /usr ro,nosuid - ext4 /dev/sda1 rw\n\
                    24 23 0:30 / /usr/my\\040dir rw - tmpfs t rw\n";
        assert_eq!(
            mountinfo_points(info),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/usr"),
                PathBuf::from("/usr/my dir")
            ]
        );
    }
}
