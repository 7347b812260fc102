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

use super::layer_store::{create_image, image_of, mount_image, remove_image};
pub use super::layer_store::{
    image_usage, open_store, peek_store, Store, Use, IMAGE, MAX_QUOTA, MIN_QUOTA,
};
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
    pub(crate) fn io(path: &Path, op: &'static str, e: impl Into<io::Error>) -> Self {
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
    let (fd, want) = prepare_record(layer, lower, owner)?;
    make_upper(fd.as_fd(), layer, lower, &want)?;
    Ok((fd, want))
}

/// The layer directory (made if new) and its record, checked against `lower` and `owner` or
/// written.
pub fn prepare_record(
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
    Ok((fd, want))
}

/// Makes (or checks) `upper` and `work` in `store` (the layer directory, or its image's root).
fn make_upper(
    store: BorrowedFd<'_>,
    layer: &Path,
    lower: &OpenedWorkspace,
    record: &LayerRecord,
) -> Result<(), LayerError> {
    let (store_uid, store_gid) = (record.store_uid, record.store_gid);
    let upper_path = layer.join(UPPER);
    let lower_mode = super::workspace::fstat(lower.fd.as_fd())
        .map_err(|e| LayerError::io(&lower.path, "fstat", e))?
        .st_mode
        & 0o777;
    let made = match rustix::fs::mkdirat(store, UPPER, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(LayerError::io(&upper_path, "creating", e)),
    };
    let upper = hostpath::open_at_nofollow(
        store,
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
    hostpath::private_dir_at(store, OsStr::new(WORK), &layer.join(WORK))?;
    Ok(())
}

/// The store a launch writes into (the caller holds the layer's lock): with a quota, the
/// layer's image, made now if the layer is new; the image of an earlier quota'd run even
/// without one (it keeps its bound); else the layer directory. An image larger than the quota,
/// or a layer without an image under a quota, is refused: the agent never holds more than the
/// token allows.
fn launch_store(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
    quota: Option<u64>,
) -> Result<Store, LayerError> {
    if let Some(q) = quota {
        if !(MIN_QUOTA..=MAX_QUOTA).contains(&q) {
            return Err(LayerError::Unexpected {
                path: layer.into(),
                what: format!("a disk quota of {q} bytes: it must be between 8M and 16T"),
            });
        }
    }
    match (image_of(layer_fd, layer)?, quota) {
        (Some((_, size)), Some(q)) if size > q => Err(LayerError::Unexpected {
            path: layer.join(IMAGE),
            what: format!(
                "the layer's image holds {size} bytes, more than this agent's disk quota ({q}); apply or discard its changes first"
            ),
        }),
        (Some((image, size)), _) => mount_image(layer_fd, layer, image.as_fd(), size, Use::WriteLocked),
        (None, None) => open_store(layer_fd, layer, Use::WriteLocked),
        (None, Some(q)) => {
            if rustix::fs::statat(layer_fd, UPPER, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                return Err(LayerError::Unexpected {
                    path: layer.into(),
                    what: "it holds changes made without a disk quota; apply or discard them first (`aitherctl diff`, `apply`, `discard`)".into(),
                });
            }
            let (image, size) = create_image(layer_fd, layer, q)?;
            mount_image(layer_fd, layer, image.as_fd(), size, Use::WriteLocked)
        }
    }
}

/// Takes the layer's lock (flock on its directory, exclusive, not waiting): held by the
/// launcher for as long as its sandbox runs, and by `discard` and `restore`, so two overlays
/// never share one upper layer (overlayfs without `index` only warns, and the result is
/// undefined) and a layer is never emptied under a running sandbox.
pub fn lock(layer_fd: BorrowedFd<'_>, layer: &Path) -> Result<OwnedFd, LayerError> {
    let fd = rustix::fs::openat(
        layer_fd,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io(layer, "opening", e))?;
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LayerError::Unexpected {
            path: layer.into(),
            what: "in use: a sandbox of this name is running on it (or a discard or restore is under way)".into(),
        }),
        Err(e) => Err(LayerError::io(layer, "locking", e)),
    }
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
    quota: Option<u64>,
) -> Result<(OwnedFd, super::userns::IdmapHelper), LayerError> {
    use crate::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    let (layer_fd, record) = prepare_record(layer, lower, owner)?;
    // Locked before the store is chosen: the image is attached (and a new one made) by one
    // launcher at a time, and never while a discard or restore empties the layer.
    let held = lock(layer_fd.as_fd(), layer)?;
    let store = launch_store(layer_fd.as_fd(), layer, quota)?;
    make_upper(store.dir.as_fd(), layer, lower, &record)?;
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
    let layer_mnt = match &store.mount {
        // The image's own detached mount, fresh from fsmount: id-mapped in place.
        Some(m) => {
            crate::sys::mount_setattr(
                m.as_raw_fd(),
                Path::new(""),
                false,
                crate::sys::MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                MOUNT_ATTR_NOEXEC,
                Some(upper_ns.as_fd()),
            )
            .map_err(overlay_err("id-mapping the layer's image"))?;
            m.try_clone()
                .map_err(overlay_err("duplicating the image's mount"))?
        }
        None => idmapped_clone(
            layer_fd.as_fd(),
            upper_ns.as_fd(),
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            false,
        )
        .map_err(overlay_err("id-mapping the layer directory"))?,
    };
    drop(upper_helper);
    // Built in a child in a private mount namespace of its own, where the two detached layer
    // mounts are attached first: overlayfs clones its layers with clone_private_mount(), which
    // before Linux 6.15 refuses a mount outside the caller's namespace ("failed to clone
    // upperpath"), and a detached mount is in none. Nothing of it is visible on the host, and
    // the namespace ends with the child; the overlay keeps its own clones of the layers.
    let mnt = overlay_in_private_ns(lower_mnt.as_fd(), layer_mnt.as_fd(), exec)
        .map_err(|(op, e)| overlay_err(op)(e))?;
    // The overlay holds its layers now: the image's mount, its loop device and the launcher's
    // descriptors of them can go (the filesystem stays until the overlay does).
    drop(store);
    Ok((mnt, helper.holding(held)))
}

/// The steps of building the overlay, as named in its refusal.
const OVERLAY_STEPS: [&str; 6] = [
    "a private mount namespace",
    "attaching the layers there",
    "fsopen",
    "fsconfig",
    "creating the overlay",
    "fsmount",
];

/// The overlay of `lower` (read-only, id-mapped) and `layer`'s `upper`/`work`, as a detached
/// mount (nosuid, nodev, noexec unless `exec`): built by a forked child that attaches both
/// layer mounts in a private mount namespace of its own first, and sends the overlay back over
/// a socket pair. On failure, the step (from [`OVERLAY_STEPS`]) and its error.
fn overlay_in_private_ns(
    lower: BorrowedFd<'_>,
    layer: BorrowedFd<'_>,
    exec: bool,
) -> Result<OwnedFd, (&'static str, io::Error)> {
    use nix::sys::socket::{
        recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
        SockFlag, SockType,
    };
    let sys = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
    let (parent, child) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| (OVERLAY_STEPS[0], sys(e)))?;
    // SAFETY: the launcher is single-threaded here (and a test's other threads hold no lock
    // the child takes: it only makes system calls and formats short strings); the child never
    // returns, it ends in _exit.
    match unsafe { nix::unistd::fork() }.map_err(|e| (OVERLAY_STEPS[0], sys(e)))? {
        nix::unistd::ForkResult::Child => {
            drop(parent);
            let (step, errno, fd) = match build_overlay(lower, layer, exec) {
                Ok(fd) => (0u8, 0i32, Some(fd)),
                Err((step, e)) => (step as u8, e.raw_os_error().unwrap_or(libc::EIO), None),
            };
            let mut msg = [0u8; 5];
            msg[0] = step;
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            let raw: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let _ = sendmsg::<()>(
                child.as_raw_fd(),
                &[io::IoSlice::new(&msg)],
                if raw.is_empty() { &[] } else { &cmsg },
                MsgFlags::empty(),
                None,
            );
            // Raw: nix has no _exit; the launcher's atexit handlers must not run in this copy.
            // SAFETY: ends this forked child at once; nothing of it runs after.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child: pid } => {
            drop(child);
            let mut msg = [0u8; 5];
            let mut space = nix::cmsg_space!([i32; 1]);
            let got = {
                let mut iov = [io::IoSliceMut::new(&mut msg)];
                recvmsg::<()>(
                    parent.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map(|r| {
                    let fds: Vec<OwnedFd> = r
                        .cmsgs()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| match c {
                            ControlMessageOwned::ScmRights(v) => Some(v),
                            _ => None,
                        })
                        .flatten()
                        // SAFETY: received with SCM_RIGHTS: new descriptors of this process.
                        .map(|f| unsafe { std::os::fd::FromRawFd::from_raw_fd(f) })
                        .collect();
                    (r.bytes, fds)
                })
            };
            let _ = nix::sys::wait::waitpid(pid, None);
            let (n, mut fds) = got.map_err(|e| (OVERLAY_STEPS[0], sys(e)))?;
            if n != msg.len() {
                return Err((
                    OVERLAY_STEPS[0],
                    io::Error::other("the overlay's builder ended without an answer"),
                ));
            }
            let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
            match (errno, fds.pop()) {
                (0, Some(fd)) => Ok(fd),
                (0, None) => Err((
                    OVERLAY_STEPS[5],
                    io::Error::other("no overlay descriptor came back"),
                )),
                (e, _) => Err((
                    OVERLAY_STEPS[usize::from(msg[0]).min(OVERLAY_STEPS.len() - 1)],
                    io::Error::from_raw_os_error(e),
                )),
            }
        }
    }
}

/// In the builder child: a private mount namespace, both layer mounts attached in it, then the
/// overlay through paths of our own descriptors (nothing looked up by a name an agent could
/// change). The error's step indexes [`OVERLAY_STEPS`].
fn build_overlay(
    lower: BorrowedFd<'_>,
    layer: BorrowedFd<'_>,
    exec: bool,
) -> Result<OwnedFd, (usize, io::Error)> {
    use nix::mount::MsFlags;
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let sys =
        |step: usize| move |e: nix::errno::Errno| (step, io::Error::from_raw_os_error(e as i32));
    let rx = |step: usize| move |e: rustix::io::Errno| (step, io::Error::from(e));
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(sys(0))?;
    // Private first: nothing attached below may propagate to the host's namespace.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys(0))?;
    // Any directory of this namespace serves: both are stacked on it and reached through
    // their descriptors only.
    let target = if Path::new("/tmp").is_dir() {
        "/tmp"
    } else {
        "/"
    };
    for m in [lower, layer] {
        rustix::mount::move_mount(
            m,
            c"",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(rx(1))?;
    }
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(rx(2))?;
    let set = |k: &str, v: &str| rustix::mount::fsconfig_set_string(&fs, k, v).map_err(rx(3));
    set("lowerdir", &format!("/proc/self/fd/{}", lower.as_raw_fd()))?;
    set(
        "upperdir",
        &format!("/proc/self/fd/{}/{UPPER}", layer.as_raw_fd()),
    )?;
    set(
        "workdir",
        &format!("/proc/self/fd/{}/{WORK}", layer.as_raw_fd()),
    )?;
    rustix::mount::fsconfig_set_flag(&fs, "userxattr").map_err(rx(3))?;
    set("redirect_dir", "nofollow")?;
    set("metacopy", "off")?;
    set("index", "off")?;
    rustix::mount::fsconfig_create(&fs).map_err(rx(4))?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    if !exec {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(rx(5))
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
    let _held = lock(fd.as_fd(), layer)?;
    for name in [UPPER, WORK] {
        remove_tree_at(fd.as_fd(), OsStr::new(name), &layer.join(name))?;
    }
    remove_image(fd.as_fd(), layer)?;
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
    if let Ok(fd) = open_layer_dir(layer, false) {
        remove_tree_at(fd.as_fd(), OsStr::new(SNAPSHOTS), &layer.join(SNAPSHOTS))?;
    }
    let (Some(parent), Some(name)) = (layer.parent(), layer.file_name()) else {
        return Ok(());
    };
    let pfd = match hostpath::open_dir_nofollow(parent) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        r => r?,
    };
    remove_tree_at(pfd.as_fd(), name, layer)
}

/// The snapshots of a layer, below the layer directory.
pub const SNAPSHOTS: &str = "snapshots";
/// A snapshot's description, beside its `upper` copy.
pub const SNAPSHOT_META: &str = "snapshot.json";

/// What a copy of an upper layer cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries made (directories, files, links, whiteouts).
    pub entries: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files shared with the source by FICLONE (reflink); the rest were copied.
    pub reflinked: u64,
    pub copied: u64,
}

/// A snapshot of an agent's upper layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub tag: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Milliseconds since the Unix epoch (the order of snapshots taken within a second).
    #[serde(default)]
    pub created_ms: u64,
    /// How long the copy took, in milliseconds (the agent frozen meanwhile, when running).
    pub copy_ms: u64,
    /// Whether the agent was frozen while it was taken.
    #[serde(default)]
    pub frozen: bool,
    pub stats: CopyStats,
}

/// A tag: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_tag(tag: &str) -> Result<(), LayerError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LayerError::Unexpected {
            path: PathBuf::from(tag),
            what: "a snapshot tag is 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'".into(),
        })
    }
}

fn list_names(dir: BorrowedFd<'_>, shown: &Path) -> Result<Vec<std::ffi::OsString>, LayerError> {
    let d = rustix::fs::openat(
        dir,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io(shown, "opening", e))?;
    let mut it = rustix::fs::Dir::read_from(&d).map_err(|e| LayerError::io(shown, "reading", e))?;
    let mut v = Vec::new();
    while let Some(e) = it.read() {
        let e = e.map_err(|e| LayerError::io(shown, "reading", e))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            v.push(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(n).to_os_string());
        }
    }
    v.sort();
    Ok(v)
}

/// Copies the tree `src` (a directory descriptor) into the new directory `name` of `dst`,
/// entry by entry, following no link: directories, regular files (FICLONE where the
/// filesystem shares extents, else a copy), symbolic links, fifos and overlayfs whiteouts
/// (0/0 character devices), with their owners, modes, modification times and the
/// `user.overlay.opaque` mark. Other devices and sockets are not copied.
pub fn copy_tree(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    stats: &mut CopyStats,
) -> Result<(), LayerError> {
    copy_dir(src, dst, name, shown, stats, 0)
}

fn copy_meta(
    dst: BorrowedFd<'_>,
    name: &OsStr,
    st: &rustix::fs::Stat,
    shown: &Path,
) -> Result<(), LayerError> {
    use rustix::fs::{AtFlags, Gid, Timespec, Timestamps, Uid};
    rustix::fs::chownat(
        dst,
        name,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| LayerError::io(shown, "chown", e))?;
    let t = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::utimensat(dst, name, &t, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| LayerError::io(shown, "utimensat", e))
}

fn copy_dir(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    stats: &mut CopyStats,
    depth: usize,
) -> Result<(), LayerError> {
    if depth > 1024 {
        return Err(LayerError::io(shown, "copying", rustix::io::Errno::LOOP));
    }
    let st = rustix::fs::fstat(src).map_err(|e| LayerError::io(shown, "fstat", e))?;
    rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700))
        .map_err(|e| LayerError::io(shown, "creating", e))?;
    stats.entries += 1;
    let out = rustix::fs::openat(
        dst,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io(shown, "opening", e))?;
    let mut mark = [0u8; 4];
    if let Ok(n) = rustix::fs::fgetxattr(src, "user.overlay.opaque", &mut mark) {
        rustix::fs::fsetxattr(
            &out,
            "user.overlay.opaque",
            &mark[..n],
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(|e| LayerError::io(shown, "setting the opaque mark", e))?;
    }
    for n in list_names(src, shown)? {
        let path = shown.join(&n);
        let est = rustix::fs::statat(src, &n, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| LayerError::io(&path, "stat", e))?;
        let mode = est.st_mode & 0o7777;
        match est.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = rustix::fs::openat(
                    src,
                    &n,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| LayerError::io(&path, "opening", e))?;
                copy_dir(sub.as_fd(), out.as_fd(), &n, &path, stats, depth + 1)?;
                continue;
            }
            libc::S_IFREG => {
                let from = rustix::fs::openat(
                    src,
                    &n,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| LayerError::io(&path, "opening", e))?;
                let to = rustix::fs::openat(
                    &out,
                    &n,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| LayerError::io(&path, "creating", e))?;
                if rustix::fs::ioctl_ficlone(&to, &from).is_ok() {
                    stats.reflinked += 1;
                } else {
                    let (mut r, mut w) = (std::fs::File::from(from), std::fs::File::from(to));
                    io::copy(&mut r, &mut w).map_err(|e| LayerError::io(&path, "copying", e))?;
                    stats.copied += 1;
                }
                stats.bytes += est.st_size as u64;
            }
            libc::S_IFLNK => {
                let t = rustix::fs::readlinkat(src, &n, Vec::new())
                    .map_err(|e| LayerError::io(&path, "readlink", e))?;
                rustix::fs::symlinkat(t.as_bytes(), &out, &n)
                    .map_err(|e| LayerError::io(&path, "symlink", e))?;
            }
            libc::S_IFCHR if est.st_rdev == 0 => {
                rustix::fs::mknodat(
                    &out,
                    &n,
                    rustix::fs::FileType::CharacterDevice,
                    Mode::empty(),
                    0,
                )
                .map_err(|e| LayerError::io(&path, "mknod (whiteout)", e))?;
            }
            libc::S_IFIFO => {
                rustix::fs::mknodat(
                    &out,
                    &n,
                    rustix::fs::FileType::Fifo,
                    Mode::from_raw_mode(0o600),
                    0,
                )
                .map_err(|e| LayerError::io(&path, "mkfifo", e))?;
            }
            _ => continue,
        }
        stats.entries += 1;
        if est.st_mode & libc::S_IFMT != libc::S_IFLNK {
            rustix::fs::chmodat(
                &out,
                &n,
                Mode::from_raw_mode(mode),
                rustix::fs::AtFlags::empty(),
            )
            .map_err(|e| LayerError::io(&path, "chmod", e))?;
        }
        copy_meta(out.as_fd(), &n, &est, &path)?;
    }
    rustix::fs::fchmod(&out, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| LayerError::io(shown, "chmod", e))?;
    copy_meta(dst, name, &st, shown)
}

/// The snapshot directory of a layer (created root 0700 when `create`).
fn snapshots_dir(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
    create: bool,
) -> Result<Option<OwnedFd>, LayerError> {
    let shown = layer.join(SNAPSHOTS);
    if create {
        return Ok(Some(hostpath::private_dir_at(
            layer_fd,
            OsStr::new(SNAPSHOTS),
            &shown,
        )?));
    }
    match hostpath::open_at_nofollow(
        layer_fd,
        Path::new(SNAPSHOTS),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Copies the layer's upper layer into `snapshots/<tag>/upper` and records it. The caller
/// freezes a running agent around this (`frozen` says whether it did).
pub fn snapshot(layer: &Path, tag: &str, frozen: bool) -> Result<Snapshot, LayerError> {
    check_tag(tag)?;
    let fd = open_layer_dir(layer, false)?;
    let store = open_store(fd.as_fd(), layer, Use::Read)?;
    let upper = store.upper(layer)?;
    let snaps = snapshots_dir(fd.as_fd(), layer, true)?.expect("created");
    let shown = layer.join(SNAPSHOTS).join(tag);
    match rustix::fs::mkdirat(&snaps, tag, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            return Err(LayerError::Unexpected {
                path: shown,
                what: "a snapshot with this tag exists".into(),
            })
        }
        Err(e) => return Err(LayerError::io(&shown, "creating", e)),
    }
    let dir = hostpath::open_at_nofollow(
        snaps.as_fd(),
        Path::new(tag),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )?;
    let t0 = std::time::Instant::now();
    let mut stats = CopyStats::default();
    let copied = copy_tree(
        upper.as_fd(),
        dir.as_fd(),
        OsStr::new(UPPER),
        &shown.join(UPPER),
        &mut stats,
    );
    if let Err(e) = copied {
        let _ = remove_tree_at(snaps.as_fd(), OsStr::new(tag), &shown);
        return Err(e);
    }
    let snap = Snapshot {
        tag: tag.into(),
        created: crate::token::now_unix(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        copy_ms: t0.elapsed().as_millis() as u64,
        frozen,
        stats,
    };
    let text = serde_json::to_vec_pretty(&snap).expect("a snapshot serialises");
    hostpath::replace_file_at(dir.as_fd(), OsStr::new(SNAPSHOT_META), &text, 0o600)?;
    // The directory the snapshot's changes belong to, so that a restore after a discard
    // (which removes the layer's record) binds the layer to that directory again.
    if let Some(record) = read_record(fd.as_fd(), layer)? {
        let text = serde_json::to_vec_pretty(&record).expect("a record serialises");
        hostpath::replace_file_at(dir.as_fd(), OsStr::new(RECORD), &text, 0o600)?;
    }
    Ok(snap)
}

/// The layer's snapshots, oldest first.
pub fn snapshots(layer: &Path) -> Result<Vec<Snapshot>, LayerError> {
    let fd = open_layer_dir(layer, false)?;
    let Some(snaps) = snapshots_dir(fd.as_fd(), layer, false)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for n in list_names(snaps.as_fd(), &layer.join(SNAPSHOTS))? {
        let rel = Path::new(&n).join(SNAPSHOT_META);
        let Ok(f) = hostpath::open_at_nofollow(snaps.as_fd(), &rel, OFlags::RDONLY, Mode::empty())
        else {
            continue;
        };
        let mut text = String::new();
        if std::fs::File::from(f)
            .take(64 * 1024)
            .read_to_string(&mut text)
            .is_err()
        {
            continue;
        }
        if let Ok(s) = serde_json::from_str::<Snapshot>(&text) {
            out.push(s);
        }
    }
    out.sort_by(|a, b| (a.created, a.created_ms, &a.tag).cmp(&(b.created, b.created_ms, &b.tag)));
    Ok(out)
}

/// The next free default tag: `s1`, `s2`, …
pub fn next_tag(layer: &Path) -> Result<String, LayerError> {
    let have: Vec<String> = snapshots(layer)?.into_iter().map(|s| s.tag).collect();
    Ok((1..)
        .map(|i| format!("s{i}"))
        .find(|t| !have.contains(t))
        .expect("an unused tag"))
}

/// Keeps the newest `keep` snapshots and removes the others; returns the tags removed.
pub fn prune_snapshots(layer: &Path, keep: usize) -> Result<Vec<String>, LayerError> {
    let all = snapshots(layer)?;
    let drop = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for s in all.into_iter().take(drop) {
        remove_snapshot(layer, &s.tag)?;
        removed.push(s.tag);
    }
    Ok(removed)
}

/// Removes snapshot `tag`.
pub fn remove_snapshot(layer: &Path, tag: &str) -> Result<(), LayerError> {
    check_tag(tag)?;
    let fd = open_layer_dir(layer, false)?;
    if let Some(snaps) = snapshots_dir(fd.as_fd(), layer, false)? {
        remove_tree_at(
            snaps.as_fd(),
            OsStr::new(tag),
            &layer.join(SNAPSHOTS).join(tag),
        )?;
    }
    Ok(())
}

fn snapshot_upper(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
    tag: &str,
) -> Result<OwnedFd, LayerError> {
    check_tag(tag)?;
    let rel = Path::new(SNAPSHOTS).join(tag).join(UPPER);
    hostpath::open_at_nofollow(
        layer_fd,
        &rel,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => LayerError::Unexpected {
            path: layer.join(SNAPSHOTS).join(tag),
            what: "no snapshot with this tag (`aitherctl snapshots NAME` lists them)".into(),
        },
        _ => e.into(),
    })
}

/// Puts snapshot `tag` back as the layer's upper layer (the agent must not be running): the
/// upper and work directories are replaced; the snapshots stay.
pub fn restore(layer: &Path, tag: &str) -> Result<CopyStats, LayerError> {
    let fd = open_layer_dir(layer, false)?;
    let _held = lock(fd.as_fd(), layer)?;
    let from = snapshot_upper(fd.as_fd(), layer, tag)?;
    // The snapshot's directory (snapshots made before records were kept have none): the
    // layer must still be bound to it, or be bound again after a discard.
    let snap_dir = layer.join(SNAPSHOTS).join(tag);
    let snap_record = hostpath::open_at_nofollow(
        fd.as_fd(),
        &Path::new(SNAPSHOTS).join(tag),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .map_err(LayerError::from)
    .and_then(|d| read_record(d.as_fd(), &snap_dir))?;
    let current = read_record(fd.as_fd(), layer)?;
    if let (Some(snap), Some(now)) = (&snap_record, &current) {
        if (snap.dev, snap.ino) != (now.dev, now.ino) {
            return Err(LayerError::Unexpected {
                path: snap_dir,
                what: format!(
                    "the snapshot holds changes to {}, the layer now to {}; discard the layer first",
                    snap.workspace.display(),
                    now.workspace.display()
                ),
            });
        }
    }
    // Into the layer's image when it has one: the restored tree counts against its quota.
    let store = open_store(fd.as_fd(), layer, Use::WriteLocked)?;
    for name in [UPPER, WORK] {
        remove_tree_at(store.dir.as_fd(), OsStr::new(name), &layer.join(name))?;
    }
    let mut stats = CopyStats::default();
    copy_tree(
        from.as_fd(),
        store.dir.as_fd(),
        OsStr::new(UPPER),
        &layer.join(UPPER),
        &mut stats,
    )?;
    hostpath::private_dir_at(store.dir.as_fd(), OsStr::new(WORK), &layer.join(WORK))?;
    if let (Some(record), None) = (&snap_record, &current) {
        let text = serde_json::to_vec_pretty(record).expect("a record serialises");
        hostpath::replace_file_at(fd.as_fd(), OsStr::new(RECORD), &text, 0o600)?;
    }
    Ok(stats)
}

/// Makes the layer `new` a copy of `layer`'s upper layer (or of its snapshot `from`), bound to
/// the same directory: the agent `new` then starts where `layer`'s agent was. `new` must have
/// no layer yet.
pub fn fork(layer: &Path, new: &Path, from: Option<&str>) -> Result<CopyStats, LayerError> {
    let fd = open_layer_dir(layer, false)?;
    let record = read_record(fd.as_fd(), layer)?.ok_or_else(|| LayerError::Unexpected {
        path: layer.into(),
        what: "the layer is empty (discarded, or its agent never started)".into(),
    })?;
    let src_store = open_store(fd.as_fd(), layer, Use::Read)?;
    let src = match from {
        Some(tag) => snapshot_upper(fd.as_fd(), layer, tag)?,
        None => src_store.upper(layer)?,
    };
    let nfd = open_layer_dir(new, true)?;
    let _held = lock(nfd.as_fd(), new)?;
    if read_record(nfd.as_fd(), new)?.is_some()
        || rustix::fs::statat(&nfd, UPPER, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
        || rustix::fs::statat(&nfd, IMAGE, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
    {
        return Err(LayerError::Unexpected {
            path: new.into(),
            what: "the new agent already has a layer (`aitherctl discard` it first, or pick another name)".into(),
        });
    }
    // A quota'd layer's fork gets an image of the same size: the copy counts against it.
    let dst = match src_store.quota {
        Some(q) => {
            let (image, size) = create_image(nfd.as_fd(), new, q)?;
            mount_image(nfd.as_fd(), new, image.as_fd(), size, Use::WriteLocked)?
        }
        None => open_store(nfd.as_fd(), new, Use::WriteLocked)?,
    };
    let mut stats = CopyStats::default();
    copy_tree(
        src.as_fd(),
        dst.dir.as_fd(),
        OsStr::new(UPPER),
        &new.join(UPPER),
        &mut stats,
    )?;
    hostpath::private_dir_at(dst.dir.as_fd(), OsStr::new(WORK), &new.join(WORK))?;
    let text = serde_json::to_vec_pretty(&record).expect("a record serialises");
    hostpath::replace_file_at(nfd.as_fd(), OsStr::new(RECORD), &text, 0o600)?;
    Ok(stats)
}

/// Bytes and entries in a tree (a layer's size for `inspect`), no link followed.
pub fn tree_size(dir: BorrowedFd<'_>, shown: &Path) -> Result<(u64, u64), LayerError> {
    let mut acc = (0u64, 0u64);
    size_walk(dir, shown, &mut acc, 0)?;
    Ok(acc)
}

fn size_walk(
    dir: BorrowedFd<'_>,
    shown: &Path,
    acc: &mut (u64, u64),
    depth: usize,
) -> Result<(), LayerError> {
    if depth > 1024 {
        return Err(LayerError::io(shown, "walking", rustix::io::Errno::LOOP));
    }
    for n in list_names(dir, shown)? {
        let Ok(st) = rustix::fs::statat(dir, &n, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        acc.1 += 1;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if let Ok(sub) = rustix::fs::openat(
                dir,
                &n,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                size_walk(sub.as_fd(), &shown.join(&n), acc, depth + 1)?;
            }
        } else if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            acc.0 += st.st_size as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_owned_workspaces_store_as_the_reserved_id_and_others_as_themselves() {
        assert_eq!(store_ids(1000, 1000), (1000, 1000));
        assert_eq!(store_ids(0, 0), (ROOT_STORE_ID, ROOT_STORE_ID));
        assert_eq!(store_ids(1000, 0), (1000, ROOT_STORE_ID));
        const { assert!(ROOT_STORE_ID < super::super::userns::UID_BASE) };
    }
}
