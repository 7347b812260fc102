//! A layer's disk quota (policy `resources.workspace_disk`, docs/workspaces.md "Disk quota"):
//! the layer's `upper` and `work` live in an ext4 image of the quota's size,
//! `<state>/layers/<name>/layer.img` (root's 0600, sparse), attached to a loop device with
//! autoclear and mounted as a *detached* mount (fsopen/fsconfig/fsmount): it is in no mount
//! namespace, nothing is left on the host's mount table, and the loop device goes away with
//! the last reference to the filesystem. A write past the quota is ENOSPC inside the sandbox;
//! the state directory's filesystem grows by the image's blocks, at most its size.
//!
//! One loop device (one superblock) per image at any time, so two mounts never write one
//! image behind each other's back: a mounter first looks for a loop device already backed by
//! the image (by device and inode, `LOOP_GET_STATUS64`) and mounts that one (the kernel shares
//! its superblock); only under the layer's lock does it attach a new one.
//!
//! The agent never writes the image's bytes: it writes files through the overlay, which the
//! kernel's ext4 writes into the image, so the image is always the kernel's own formatting
//! and the ext4 driver never parses bytes the agent chose (the image is root's 0600 beneath
//! the 0700 layer directory, and no one but the launcher attaches it).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::layer::{lock, LayerError, UPPER};
use crate::hostpath;

/// The image holding a quota'd layer's `upper` and `work`.
pub const IMAGE: &str = "layer.img";
/// The smallest quota (an ext4 with its journal and inode tables needs a few MiB).
pub const MIN_QUOTA: u64 = 8 << 20;
/// The largest (ext4 with 4 KiB blocks and no 64bit feature: 16 TiB).
pub const MAX_QUOTA: u64 = 16 << 40;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u32 = 7;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zero_info() -> LoopInfo64 {
    // SAFETY: LoopInfo64 is plain integers and byte arrays; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Where a layer's `upper` and `work` are: the layer directory itself (no quota), or the root
/// of its image's detached mount, which is unmounted when the last descriptor of it goes.
pub struct Store {
    /// A directory descriptor holding `upper` and `work`.
    pub dir: OwnedFd,
    /// The image's size, when the layer has one.
    pub quota: Option<u64>,
    /// The detached mount itself (the idmap and the overlay need the mount, not a directory).
    pub mount: Option<OwnedFd>,
    /// The loop device, held open while the store is.
    _loop: Option<OwnedFd>,
}

impl Store {
    /// Blocks and bytes used in the image's filesystem (statvfs), when the layer has an image.
    pub fn used(&self) -> Option<u64> {
        self.quota?;
        let s = rustix::fs::fstatvfs(&self.dir).ok()?;
        Some(s.f_blocks.saturating_sub(s.f_bfree) * s.f_frsize)
    }

    /// `upper` in the store.
    pub fn upper(&self, layer: &Path) -> Result<OwnedFd, LayerError> {
        hostpath::open_at_nofollow(
            self.dir.as_fd(),
            Path::new(UPPER),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => LayerError::Unexpected {
                path: layer.into(),
                what: "the layer is empty (discarded, or its agent never started)".into(),
            },
            _ => e.into(),
        })
    }
}

fn err(layer: &Path, op: &'static str, e: impl Into<io::Error>) -> LayerError {
    LayerError::Io {
        path: layer.join(IMAGE),
        op,
        source: e.into(),
    }
}

/// The layer's image, if it has one: a regular root-owned file with one link, opened
/// read-write beneath the layer directory without following a link; with its size.
pub fn image_of(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
) -> Result<Option<(OwnedFd, u64)>, LayerError> {
    let shown = layer.join(IMAGE);
    let fd = match hostpath::open_at_nofollow(
        layer_fd,
        Path::new(IMAGE),
        OFlags::RDWR | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        r => r?,
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| err(layer, "fstat", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != 0 || st.st_nlink != 1 {
        return Err(LayerError::Unexpected {
            path: shown,
            what: "not a regular root-owned file with one link".into(),
        });
    }
    Ok(Some((fd, st.st_size as u64)))
}

/// Makes the layer's image: a sparse file of `size` bytes formatted ext4 (no reserved blocks,
/// root's root directory) under a temporary name, renamed into place once complete.
pub fn create_image(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
    size: u64,
) -> Result<(OwnedFd, u64), LayerError> {
    const NEW: &str = "layer.img.new";
    super::layer::remove_tree_at(layer_fd, OsStr::new(NEW), &layer.join(NEW))?;
    let fd = rustix::fs::openat(
        layer_fd,
        NEW,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| err(layer, "creating", e))?;
    rustix::fs::ftruncate(&fd, size).map_err(|e| err(layer, "sizing", e))?;
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| LayerError::Unexpected {
            path: layer.join(IMAGE),
            what: "a disk quota needs mke2fs (e2fsprogs), which is not installed".into(),
        })?;
    // The file by our descriptor, not by a name beneath the state directory.
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let out = std::process::Command::new(mke2fs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            "-E",
            "root_owner=0:0,lazy_itable_init=0,nodiscard",
            "-L",
            "aither-layer",
            &path,
        ])
        .stdin(std::process::Stdio::null())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| err(layer, "running mke2fs", e))?;
    if !out.status.success() {
        let _ = rustix::fs::unlinkat(layer_fd, NEW, rustix::fs::AtFlags::empty());
        return Err(LayerError::Unexpected {
            path: layer.join(IMAGE),
            what: format!(
                "mke2fs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    rustix::fs::fsync(&fd).map_err(|e| err(layer, "fsync", e))?;
    rustix::fs::renameat(layer_fd, NEW, layer_fd, IMAGE).map_err(|e| err(layer, "renaming", e))?;
    Ok((fd, size))
}

/// The loop device already backed by `image`, held open (it cannot be detached while held).
fn find_attached(image: BorrowedFd<'_>) -> io::Result<Option<(OwnedFd, u32)>> {
    let st = rustix::fs::fstat(image)?;
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Ok(None);
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("loop"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok((dev, info)) = open_loop(n, false).and_then(|d| status(d.as_fd()).map(|i| (d, i)))
        else {
            continue;
        };
        if info.lo_device == st.st_dev && info.lo_inode == st.st_ino {
            return Ok(Some((dev, n)));
        }
    }
    Ok(None)
}

/// `/dev/loopN`, checked to be loop device N.
fn open_loop(n: u32, write: bool) -> io::Result<OwnedFd> {
    let mode = if write { OFlags::RDWR } else { OFlags::RDONLY };
    let fd = rustix::fs::open(
        format!("/dev/loop{n}"),
        mode | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    let rdev = st.st_rdev;
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK
        || libc::major(rdev) != LOOP_MAJOR
        || libc::minor(rdev) != n
    {
        return Err(io::Error::other(format!(
            "/dev/loop{n} is not loop device {n}"
        )));
    }
    Ok(fd)
}

fn status(dev: BorrowedFd<'_>) -> io::Result<LoopInfo64> {
    let mut info = zero_info();
    // SAFETY: LOOP_GET_STATUS64 writes one struct loop_info64 into `info`.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Attaches `image` to a free loop device with autoclear (it detaches itself when the last
/// user, the filesystem mounted from it, goes).
fn attach(image: BorrowedFd<'_>) -> io::Result<(OwnedFd, u32)> {
    let ctl = rustix::fs::open(
        "/dev/loop-control",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("/dev/loop-control: {e}")))?;
    let mut last = io::Error::other("no free loop device");
    // Another process may take the free device between GET_FREE and CONFIGURE: try again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as u32;
        let dev = open_loop(n, true)?;
        let mut info = zero_info();
        info.lo_flags = LO_FLAGS_AUTOCLEAR;
        let cfg = LoopConfig {
            fd: image.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one struct loop_config.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r == 0 {
            return Ok((dev, n));
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}

/// A detached mount of the ext4 on loop device `n` (nosuid, nodev, noexec; read-only when not
/// `write`: the superblock stays read-write, so that it is the one a running sandbox shares).
fn mount_ext4(n: u32, write: bool) -> io::Result<OwnedFd> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("ext4", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", format!("/dev/loop{n}"))?;
    fsconfig_set_string(&fs, "errors", "remount-ro")?;
    fsconfig_create(&fs)?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    if !write {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    Ok(fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?)
}

/// How a caller uses the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Reads it (diff, snapshot): mounted read-only; a running sandbox's image is shared,
    /// else the image is attached under the layer's lock (refused while a launch, discard or
    /// restore holds it).
    Read,
    /// Writes it, the caller holding the layer's lock (the launcher, restore, fork's target).
    WriteLocked,
}

/// The layer's store: the layer directory when it has no image, else the image mounted as a
/// detached mount (see the module's text for the one-loop-device rule).
pub fn open_store(layer_fd: BorrowedFd<'_>, layer: &Path, how: Use) -> Result<Store, LayerError> {
    let Some((image, size)) = image_of(layer_fd, layer)? else {
        let dir = rustix::fs::openat(
            layer_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LayerError::io(layer, "opening", e))?;
        return Ok(Store {
            dir,
            quota: None,
            mount: None,
            _loop: None,
        });
    };
    mount_image(layer_fd, layer, image.as_fd(), size, how)
}

/// Mounts the layer's image (see [`open_store`]).
pub fn mount_image(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
    image: BorrowedFd<'_>,
    size: u64,
    how: Use,
) -> Result<Store, LayerError> {
    let write = how == Use::WriteLocked;
    let (dev, n, held) = match find_attached(image)
        .map_err(|e| err(layer, "finding its loop device", e))?
    {
        // Mounted already (a running sandbox, or a reader's mount that outlived it): the
        // same superblock, shared.
        Some((dev, n)) => (dev, n, None),
        None => {
            let held = match how {
                Use::Read => Some(lock(layer_fd, layer)?),
                Use::WriteLocked => None,
            };
            let (dev, n) = attach(image).map_err(|e| err(layer, "attaching a loop device", e))?;
            (dev, n, held)
        }
    };
    let mnt = mount_ext4(n, write).map_err(|e| err(layer, "mounting its ext4", e))?;
    // Attached and mounted: from here on others find this loop device (the lock only keeps
    // two attachers apart).
    drop(held);
    let dir = rustix::fs::openat(
        &mnt,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(layer, "opening its root", e))?;
    if write {
        // Root's 0700, like the layer directory: a descriptor of `upper` handed to a member
        // (aitherd's layer_open on a kernel that cannot clone it) leads nowhere above it.
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))
            .map_err(|e| err(layer, "chmod its root", e))?;
    }
    Ok(Store {
        dir,
        quota: Some(size),
        mount: Some(mnt),
        _loop: Some(dev),
    })
}

/// The layer's store only if its image is mounted already (a running sandbox) or it has none:
/// for `inspect`, which must never hold the lock a launch needs. None: an image not mounted.
pub fn peek_store(layer_fd: BorrowedFd<'_>, layer: &Path) -> Result<Option<Store>, LayerError> {
    let Some((image, _)) = image_of(layer_fd, layer)? else {
        return open_store(layer_fd, layer, Use::Read).map(Some);
    };
    if find_attached(image.as_fd())
        .map_err(|e| err(layer, "finding its loop device", e))?
        .is_none()
    {
        return Ok(None);
    }
    open_store(layer_fd, layer, Use::Read).map(Some)
}

/// The image's size and the bytes it takes on the state directory's filesystem.
pub fn image_usage(
    layer_fd: BorrowedFd<'_>,
    layer: &Path,
) -> Result<Option<(u64, u64)>, LayerError> {
    let Some((image, size)) = image_of(layer_fd, layer)? else {
        return Ok(None);
    };
    let st = rustix::fs::fstat(&image).map_err(|e| err(layer, "fstat", e))?;
    Ok(Some((size, st.st_blocks as u64 * 512)))
}

/// Removes the image (discard; the caller holds the lock). A mount of it still held by a
/// reader keeps the file's blocks until it goes.
pub fn remove_image(layer_fd: BorrowedFd<'_>, layer: &Path) -> Result<(), LayerError> {
    match rustix::fs::unlinkat(layer_fd, IMAGE, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(err(layer, "removing", e)),
    }
}
