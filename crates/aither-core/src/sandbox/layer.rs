//! Layered workspaces (policy `workspace = "layered"`, docs/workspaces.md): the user's
//! directory is the read-only lower layer of an overlay, and the agent writes into an upper
//! layer of its own, `<state>/layers/<name>/upper`, which reaches the user's directory only
//! through `aitherctl apply`.
//!
//! The launcher (host root, before the clone) builds the overlay from descriptors it holds:
//! the workspace opened once without following links and checked (sandbox::workspace), cloned
//! and id-mapped exactly as a read-write workspace is (owner → the agent's host id), and the
//! layer directory (root's, 0700) cloned and id-mapped with the store ids → the agent's host
//! id and root → root (overlayfs does its own work, whiteouts and copy-up, as the mounter,
//! whose id must be mapped in the upper layer's mount). Both reach `fsconfig` as
//! `/proc/self/fd/N` paths, so no name the agent could have changed is looked up. The overlay
//! is `userxattr` (its opaque-directory marks are `user.overlay.*`, readable by the owner
//! whose `aitherctl diff` reads the layer), with `redirect_dir=nofollow`, `metacopy=off` and
//! `index=off`: the upper layer is a plain tree of whole files, whiteouts (0/0 character
//! devices) and opaque directories, nothing else to interpret. A directory of the lower layer
//! renamed inside is EXDEV, and `mv` copies it (what overlayfs does without redirects).
//!
//! Where overlayfs refuses (a kernel before 5.19, which has no id-mapped layers; a state
//! directory on a filesystem that cannot hold an upper layer: overlayfs, NFS, 9p…), the launch
//! is refused with the kernel's answer and what to do; there is no fallback that would give
//! the agent the directory itself (docs/workspaces.md, "Where overlay cannot be used").

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::workspace::OpenedWorkspace;
use crate::hostpath::{self, HostPathError};

/// The directory of all layers, below the state directory.
pub const LAYERS: &str = "layers";
/// The agent's writes.
pub const UPPER: &str = "upper";
/// overlayfs's work directory (root's, same filesystem as `upper`).
pub const WORK: &str = "work";
/// Which directory the layer belongs to (root's 0600 JSON).
pub const RECORD: &str = "layer.json";
/// The on-disk owner of a root-owned workspace's upper layer: the upper layer's mount maps
/// root to root for overlayfs itself, so the owner's files need an id of their own there.
/// Below the sandboxes' ids and far above any user's; nothing runs as it.
pub const ROOT_STORE_ID: u32 = super::userns::UID_BASE - 2;

/// Why a layered workspace could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Host(#[from] HostPathError),
    #[error("layer {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer {path}: it holds the changes to {recorded} (device {dev}, inode {ino}), not to {workspace}; apply or discard them first (`aitherctl diff`, `apply`, `discard`), or give the agent another name")]
    OtherWorkspace {
        path: PathBuf,
        recorded: PathBuf,
        dev: u64,
        ino: u64,
        workspace: PathBuf,
    },
    #[error("layer {path}: {what}; refused (docs/workspaces.md)")]
    Unexpected { path: PathBuf, what: String },
    #[error("layered workspace {workspace}: overlayfs refused the layers ({op}: {source}). The lower directory's filesystem must take id-mapped mounts and the upper layer's ({upper}) must hold xattrs and whiteouts (ext4, xfs, btrfs, tmpfs; not overlayfs, NFS or 9p), on a kernel ≥ 5.19 (id-mapped overlay layers). Aither has no fallback that gives the agent the directory itself: use a policy with `workspace = \"read-write\"` or move the state directory (docs/workspaces.md)")]
    Overlay {
        workspace: PathBuf,
        upper: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    fn io(path: &Path, op: &'static str, e: impl Into<io::Error>) -> Self {
        LayerError::Io {
            path: path.into(),
            op,
            source: e.into(),
        }
    }
}

/// What a layer belongs to, recorded when it is made and checked at every launch: changes
/// to one directory never land over another one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    /// The workspace (the lower layer) as written in the spec.
    pub workspace: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// Who the agent's files belong to in the workspace (its owner, or the member).
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The ids the upper layer's files have on disk.
    pub store_uid: u32,
    pub store_gid: u32,
}

/// `<state>/layers/<name>`.
pub fn layer_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(LAYERS).join(name)
}

/// The on-disk ids of the upper layer's files for a workspace owned by `uid:gid`: the owner's,
/// except root's (mapped to root for overlayfs), which get [`ROOT_STORE_ID`].
pub fn store_ids(uid: u32, gid: u32) -> (u32, u32) {
    let s = |id: u32| if id == 0 { ROOT_STORE_ID } else { id };
    (s(uid), s(gid))
}

/// Opens the layer directory `layer` (`<state>/layers/<name>`), creating it and `layers`
/// root-owned 0700 when `create`; no link is followed anywhere on the path and an existing
/// directory must be root's (narrowed to 0700 if wider).
pub fn open_layer_dir(layer: &Path, create: bool) -> Result<OwnedFd, LayerError> {
    let parent = layer.parent().ok_or_else(|| LayerError::Unexpected {
        path: layer.into(),
        what: "no parent directory".into(),
    })?;
    let name = layer.file_name().ok_or_else(|| LayerError::Unexpected {
        path: layer.into(),
        what: "names no directory".into(),
    })?;
    if !create {
        let fd = hostpath::open_dir_nofollow(layer)?;
        let m = hostpath::check_fd(fd.as_fd()).map_err(|e| LayerError::io(layer, "fstat", e))?;
        m.expect_kind(layer, hostpath::Kind::Dir)?
            .expect_owner(layer, 0)?
            .expect_mode_within(layer, 0o700)?;
        return Ok(fd);
    }
    if let Some(state) = parent.parent() {
        // The state directory itself (a test's AITHER_STATE_DIR may be new).
        if hostpath::open_dir_nofollow(state).is_err() {
            hostpath::private_dir(state)?;
        }
    }
    let layers = hostpath::private_dir(parent)?;
    Ok(hostpath::private_dir_at(layers.as_fd(), name, layer)?)
}

/// Reads the layer's record, if it has one: a regular root-owned file, never through a link.
pub fn read_record(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
) -> Result<Option<LayerRecord>, LayerError> {
    let shown = layer.join(RECORD);
    let fd = match hostpath::open_at_nofollow(
        layer_fd,
        Path::new(RECORD),
        OFlags::RDONLY | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        r => r?,
    };
    let m = hostpath::check_fd(fd.as_fd()).map_err(|e| LayerError::io(&shown, "fstat", e))?;
    m.expect_kind(&shown, hostpath::Kind::File)?
        .expect_owner(&shown, 0)?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| LayerError::io(&shown, "reading", e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LayerError::Unexpected {
            path: shown,
            what: format!("not a layer record: {e}"),
        })
}

/// Makes (or checks) the layer's directories for the workspace `lower` whose agent files land
/// as `owner`: the record (refusing a layer of another directory), `upper` (the store ids,
/// the lower root's permission bits without set-id or sticky) and `work` (root's 0700).
/// Returns the layer directory's descriptor and its record.
pub fn prepare_dirs(
    layer: &Path,
    lower: &OpenedWorkspace,
    owner: (u32, u32),
) -> Result<(OwnedFd, LayerRecord), LayerError> {
    let fd = open_layer_dir(layer, true)?;
    let (store_uid, store_gid) = store_ids(owner.0, owner.1);
    let want = LayerRecord {
        workspace: lower.path.clone(),
        dev: lower.id.dev,
        ino: lower.id.ino,
        owner_uid: owner.0,
        owner_gid: owner.1,
        store_uid,
        store_gid,
    };
    match read_record(fd.as_fd(), layer)? {
        Some(r) if (r.dev, r.ino) != (want.dev, want.ino) || r.owner_uid != owner.0 => {
            return Err(LayerError::OtherWorkspace {
                path: layer.into(),
                recorded: r.workspace,
                dev: r.dev,
                ino: r.ino,
                workspace: want.workspace,
            })
        }
        Some(r) => {
            // Same directory and owner: the store ids follow from the owner.
            if (r.store_uid, r.store_gid) != (store_uid, store_gid) {
                return Err(LayerError::Unexpected {
                    path: layer.into(),
                    what: "its record names other store ids".into(),
                });
            }
        }
        None => {
            let text = serde_json::to_vec_pretty(&want).expect("a record serialises");
            hostpath::replace_file_at(fd.as_fd(), OsStr::new(RECORD), &text, 0o600)?;
        }
    }
    let upper_path = layer.join(UPPER);
    let lower_mode = super::workspace::fstat(lower.fd.as_fd())
        .map_err(|e| LayerError::io(&lower.path, "fstat", e))?
        .st_mode
        & 0o777;
    let made = match rustix::fs::mkdirat(&fd, UPPER, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(LayerError::io(&upper_path, "creating", e)),
    };
    let upper = hostpath::open_at_nofollow(
        fd.as_fd(),
        Path::new(UPPER),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )?;
    if made {
        rustix::fs::fchown(
            &upper,
            Some(rustix::fs::Uid::from_raw(store_uid)),
            Some(rustix::fs::Gid::from_raw(store_gid)),
        )
        .map_err(|e| LayerError::io(&upper_path, "fchown", e))?;
        rustix::fs::fchmod(&upper, Mode::from_raw_mode(lower_mode))
            .map_err(|e| LayerError::io(&upper_path, "fchmod", e))?;
    }
    let m =
        hostpath::check_fd(upper.as_fd()).map_err(|e| LayerError::io(&upper_path, "fstat", e))?;
    m.expect_kind(&upper_path, hostpath::Kind::Dir)?
        .expect_owner(&upper_path, store_uid)?;
    hostpath::private_dir_at(fd.as_fd(), OsStr::new(WORK), &layer.join(WORK))?;
    Ok((fd, want))
}

/// A detached, non-recursive clone of the mount at `fd`, id-mapped through `userns`, with
/// `attrs` (MOUNT_ATTR_*).
fn idmapped_clone(
    fd: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    attrs: u64,
    recursive: bool,
) -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let clone = rustix::mount::open_tree(fd, c"", flags)?;
    crate::sys::mount_setattr(
        clone.as_raw_fd(),
        Path::new(""),
        recursive,
        crate::sys::MOUNT_ATTR_IDMAP | attrs,
        0,
        Some(userns),
    )?;
    Ok(clone)
}

/// Builds the overlay for a layered workspace: a detached mount (nosuid, nodev, and noexec
/// unless `exec`), to be attached in the sandbox as a workspace mount is. `owner` is who the
/// agent's files land as; `agent_host_id` the agent's host uid and gid. The returned helper is
/// the lower layer's id-map namespace's (reaped when dropped, as a workspace's is).
pub fn mount_layered(
    layer: &Path,
    lower: &OpenedWorkspace,
    owner: (u32, u32),
    agent_host_id: u32,
    exec: bool,
) -> Result<(OwnedFd, super::userns::IdmapHelper), LayerError> {
    use crate::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    let (layer_fd, record) = prepare_dirs(layer, lower, owner)?;
    let overlay_err = |op: &'static str| {
        let workspace = lower.path.clone();
        let upper = layer.join(UPPER);
        move |e: io::Error| LayerError::Overlay {
            workspace,
            upper,
            op,
            source: e,
        }
    };
    // The lower layer: the workspace as a read-write workspace would be mounted (owner →
    // agent), read-only.
    let (lower_ns, helper) = super::userns::idmap_userns(owner.0, owner.1, agent_host_id)
        .map_err(overlay_err("id-map namespace"))?;
    let lower_mnt = idmapped_clone(
        lower.fd.as_fd(),
        lower_ns.as_fd(),
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        true,
    )
    .map_err(overlay_err("id-mapping the lower directory"))?;
    // The upper layer: store ids → agent, root → root (overlayfs's own work as the mounter).
    let a = agent_host_id;
    let (upper_ns, upper_helper) = super::userns::idmap_userns_maps(
        &format!("{} {a} 1\n0 0 1\n", record.store_uid),
        &format!("{} {a} 1\n0 0 1\n", record.store_gid),
    )
    .map_err(overlay_err("id-map namespace"))?;
    let layer_mnt = idmapped_clone(
        layer_fd.as_fd(),
        upper_ns.as_fd(),
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        false,
    )
    .map_err(overlay_err("id-mapping the layer directory"))?;
    drop(upper_helper);
    let fs = rustix::mount::fsopen("overlay", rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| overlay_err("fsopen")(e.into()))?;
    let set = |k: &str, v: &str| {
        rustix::mount::fsconfig_set_string(&fs, k, v).map_err(|e| {
            overlay_err("fsconfig")(io::Error::new(
                io::Error::from(e).kind(),
                format!("{k}={v}: {e}"),
            ))
        })
    };
    // Paths through our own descriptors: nothing is looked up by a name an agent could change.
    set(
        "lowerdir",
        &format!("/proc/self/fd/{}", lower_mnt.as_raw_fd()),
    )?;
    set(
        "upperdir",
        &format!("/proc/self/fd/{}/{UPPER}", layer_mnt.as_raw_fd()),
    )?;
    set(
        "workdir",
        &format!("/proc/self/fd/{}/{WORK}", layer_mnt.as_raw_fd()),
    )?;
    rustix::mount::fsconfig_set_flag(&fs, "userxattr")
        .map_err(|e| overlay_err("fsconfig userxattr")(e.into()))?;
    set("redirect_dir", "nofollow")?;
    set("metacopy", "off")?;
    set("index", "off")?;
    rustix::mount::fsconfig_create(&fs)
        .map_err(|e| overlay_err("creating the overlay")(e.into()))?;
    let mut attrs = rustix::mount::MountAttrFlags::MOUNT_ATTR_NOSUID
        | rustix::mount::MountAttrFlags::MOUNT_ATTR_NODEV;
    if !exec {
        attrs |= rustix::mount::MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    let _ = MOUNT_ATTR_NOEXEC;
    let mnt = rustix::mount::fsmount(&fs, rustix::mount::FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| overlay_err("fsmount")(e.into()))?;
    Ok((mnt, helper))
}

/// Removes everything in the layer `layer` (the agent must not be running): the upper and work
/// directories and the record, leaving an empty layer directory, which the next launch fills
/// again from the workspace. Nothing is followed: entries are removed beneath their parent's
/// descriptor.
pub fn discard(layer: &Path) -> Result<(), LayerError> {
    let fd = match open_layer_dir(layer, false) {
        Err(LayerError::Host(e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        r => r?,
    };
    for name in [UPPER, WORK] {
        remove_tree_at(fd.as_fd(), OsStr::new(name), &layer.join(name))?;
    }
    match rustix::fs::unlinkat(&fd, RECORD, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(LayerError::io(&layer.join(RECORD), "removing", e)),
    }
}

/// Removes `name` in `dir` and, for a directory, all below it, beneath descriptors only (a
/// link is removed, never followed). Depth-bounded by the kernel's path limits.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<(), LayerError> {
    use rustix::fs::AtFlags;
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(LayerError::io(shown, "removing", e)),
    }
    let sub = match rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(f) => f,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(LayerError::io(shown, "opening", e)),
    };
    let names: Vec<std::ffi::OsString> = {
        let mut d =
            rustix::fs::Dir::read_from(&sub).map_err(|e| LayerError::io(shown, "reading", e))?;
        let mut v = Vec::new();
        while let Some(e) = d.read() {
            let e = e.map_err(|e| LayerError::io(shown, "reading", e))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                v.push(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(n).to_os_string());
            }
        }
        v
    };
    for n in names {
        remove_tree_at(sub.as_fd(), &n, &shown.join(&n))?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(LayerError::io(shown, "removing", e)),
    }
}

/// Removes the layer directory itself (an agent removed with `aitherctl rm`).
pub fn remove(layer: &Path) -> Result<(), LayerError> {
    discard(layer)?;
    let (Some(parent), Some(name)) = (layer.parent(), layer.file_name()) else {
        return Ok(());
    };
    let pfd = match hostpath::open_dir_nofollow(parent) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        r => r?,
    };
    remove_tree_at(pfd.as_fd(), name, layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_owned_workspaces_store_as_the_reserved_id_and_others_as_themselves() {
        assert_eq!(store_ids(1000, 1000), (1000, 1000));
        assert_eq!(store_ids(0, 0), (ROOT_STORE_ID, ROOT_STORE_ID));
        assert_eq!(store_ids(1000, 0), (1000, ROOT_STORE_ID));
        assert!(ROOT_STORE_ID < super::super::userns::UID_BASE);
    }
}
