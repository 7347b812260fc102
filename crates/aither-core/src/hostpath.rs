//! The host side's one rule for a privileged action on a path an agent could have touched
//! (docs/security-model.md, "The host side"): resolve the path **once**, without following a
//! symbolic link anywhere in it, **check the opened fd** (type, owner, mode, links), then **act
//! on the fd** (write, fchown, fchmod, open_tree with AT_EMPTY_PATH) and never on the name again.
//!
//! Resolution uses `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` (Linux ≥ 5.6) and falls
//! back, where the kernel answers ENOSYS, to a walk of `openat(O_NOFOLLOW | O_DIRECTORY)` one
//! component at a time. `..` never reaches the kernel: paths are made absolute against the
//! working directory (which the kernel already resolved) and normalised lexically, which is
//! exact because no component may be a link. The syscalls come from `rustix`; the `pathrs`
//! crate was considered and not used (docs/security-model.md says why).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a host path was refused or could not be acted on. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: a symbolic link is on the way (Aither never follows links on a path an agent \
         could have written); give the path without links"
    )]
    Symlink { path: PathBuf },
    #[error("{path}: is {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        found: Kind,
        expected: Kind,
    },
    #[error("{path}: owned by uid {uid}, expected uid {expected}")]
    Owner {
        path: PathBuf,
        uid: u32,
        expected: u32,
    },
    #[error(
        "{path}: mode {mode:04o} gives group or others access (at most {allowed:04o} is accepted)"
    )]
    Mode {
        path: PathBuf,
        mode: u32,
        allowed: u32,
    },
    #[error("{path}: has {nlink} hard links; Aither only writes a file with one")]
    Links { path: PathBuf, nlink: u64 },
    #[error("{path}: {what}")]
    BadName { path: PathBuf, what: &'static str },
}

impl HostPathError {
    fn io(path: &Path, op: &'static str, e: impl Into<io::Error>) -> Self {
        HostPathError::Io {
            path: path.to_owned(),
            op,
            source: e.into(),
        }
    }

    /// The errno behind an I/O failure, if that is what it was.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            HostPathError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The type of an inode, as `fstat` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDev => "a character device",
            Kind::BlockDev => "a block device",
        })
    }
}

/// What `fstat` says about an opened fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with set-id and sticky bits (`st_mode & 07777`).
    pub mode: u32,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
}

impl Meta {
    /// Refuses anything but `kind`.
    pub fn expect_kind(&self, path: &Path, kind: Kind) -> Result<&Self, HostPathError> {
        if self.kind != kind {
            return Err(HostPathError::WrongType {
                path: path.to_owned(),
                found: self.kind,
                expected: kind,
            });
        }
        Ok(self)
    }

    /// Refuses an owner other than `uid`.
    pub fn expect_owner(&self, path: &Path, uid: u32) -> Result<&Self, HostPathError> {
        if self.uid != uid {
            return Err(HostPathError::Owner {
                path: path.to_owned(),
                uid: self.uid,
                expected: uid,
            });
        }
        Ok(self)
    }

    /// Refuses permission bits outside `allowed` (e.g. 0o700 for a private directory).
    pub fn expect_mode_within(&self, path: &Path, allowed: u32) -> Result<&Self, HostPathError> {
        if self.mode & !allowed != 0 {
            return Err(HostPathError::Mode {
                path: path.to_owned(),
                mode: self.mode,
                allowed,
            });
        }
        Ok(self)
    }
}

/// `fstat` of an fd: what it actually is, whatever its name now points to.
pub fn check_fd(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    let st = rfs::fstat(fd)?;
    let kind = match rfs::FileType::from_raw_mode(st.st_mode) {
        rfs::FileType::RegularFile => Kind::File,
        rfs::FileType::Directory => Kind::Dir,
        rfs::FileType::Symlink => Kind::Symlink,
        rfs::FileType::Fifo => Kind::Fifo,
        rfs::FileType::Socket => Kind::Socket,
        rfs::FileType::CharacterDevice => Kind::CharDev,
        rfs::FileType::BlockDevice => Kind::BlockDev,
        rfs::FileType::Unknown => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    Ok(Meta {
        kind,
        uid: st.st_uid,
        gid: st.st_gid,
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink as u64,
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
    })
}

/// How a path is walked. `Openat2` is used where the kernel has it; `PerComponent` is the
/// fallback for kernels before 5.6 (and is tested on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    Openat2,
    PerComponent,
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Makes `path` absolute against the working directory and removes `.` and `..` lexically
/// (exact here: no component may be a link). The result starts with `/`.
pub fn normalise(path: &Path) -> Result<PathBuf, HostPathError> {
    if path.as_os_str().is_empty() {
        return Err(HostPathError::BadName {
            path: path.to_owned(),
            what: "empty path",
        });
    }
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| HostPathError::io(path, "reading the working directory", e))?
            .join(path)
    };
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

fn root_fd(path: &Path) -> Result<OwnedFd, HostPathError> {
    rfs::open(
        "/",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostPathError::io(path, "opening /", e))
}

/// Opens `rel` (relative, no `..`) beneath `dir` with `flags`, following no link in any
/// component, the last included. With `O_PATH`, where the kernel hands out an fd of a link
/// itself, a link is refused after the open.
fn open_beneath_with(
    how: Resolver,
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
    shown: &Path,
) -> Result<OwnedFd, HostPathError> {
    let fd = open_beneath_inner(how, dir, rel, flags, mode, shown)?;
    if flags.contains(OFlags::PATH)
        && check_fd(fd.as_fd())
            .map_err(|e| HostPathError::io(shown, "fstat", e))?
            .kind
            == Kind::Symlink
    {
        return Err(HostPathError::Symlink {
            path: shown.to_owned(),
        });
    }
    Ok(fd)
}

fn open_beneath_inner(
    how: Resolver,
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
    shown: &Path,
) -> Result<OwnedFd, HostPathError> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    // openat2 refuses a mode without O_CREAT or O_TMPFILE.
    let mode = if flags.contains(OFlags::CREATE) || flags.contains(OFlags::TMPFILE) {
        mode
    } else {
        Mode::empty()
    };
    if rel.as_os_str().is_empty() {
        // The directory itself.
        return rfs::openat(dir, ".", flags & !OFlags::NOFOLLOW, mode)
            .map_err(|e| HostPathError::io(shown, "opening", e));
    }
    if how == Resolver::Openat2 && !NO_OPENAT2.load(Ordering::Relaxed) {
        let resolve =
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH;
        // EAGAIN: a rename raced the walk; the kernel asks to retry (bounded).
        for _ in 0..16 {
            match rfs::openat2(dir, rel, flags, mode, resolve) {
                Ok(fd) => return Ok(fd),
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                Err(Errno::LOOP) => {
                    return Err(HostPathError::Symlink {
                        path: shown.to_owned(),
                    })
                }
                // O_DIRECTORY | O_NOFOLLOW on a link answers ENOTDIR: say which it was.
                Err(e @ Errno::NOTDIR) => return Err(link_or(dir, rel, shown, e)),
                Err(e) => return Err(HostPathError::io(shown, "opening", e)),
            }
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            return Err(HostPathError::io(shown, "opening", Errno::AGAIN));
        }
    }
    // Fallback: one component at a time, O_NOFOLLOW on each.
    let comps: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(HostPathError::BadName {
                path: shown.to_owned(),
                what: "not a plain relative path beneath its directory",
            }),
        })
        .collect::<Result<_, _>>()?;
    let mut cur: Option<OwnedFd> = None;
    for (i, name) in comps.iter().enumerate() {
        let at = cur.as_ref().map_or(dir, |f| f.as_fd());
        let last = i + 1 == comps.len();
        let (f, m) = if last {
            (flags, mode)
        } else {
            (
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
            )
        };
        match rfs::openat(at, *name, f, m) {
            Ok(fd) => cur = Some(fd),
            Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::MLINK)) => {
                return Err(link_or(at, Path::new(name), shown, e))
            }
            Err(e) => return Err(HostPathError::io(shown, "opening", e)),
        }
    }
    cur.ok_or_else(|| HostPathError::BadName {
        path: shown.to_owned(),
        what: "empty path",
    })
}

/// The error for a failed open of `rel` in `dir`: a link if the last component is one (for the
/// message only: nothing is opened or acted on here), else the errno.
fn link_or(dir: BorrowedFd<'_>, rel: &Path, shown: &Path, e: Errno) -> HostPathError {
    let is_link = rfs::statat(dir, rel, rfs::AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink)
        .unwrap_or(false);
    if is_link || e == Errno::LOOP {
        HostPathError::Symlink {
            path: shown.to_owned(),
        }
    } else {
        HostPathError::io(shown, "opening", e)
    }
}

/// Opens `path` (absolute or relative to the working directory) with `flags`, following no
/// symbolic link in any component. `O_CREAT` creates the last component (never through a link).
pub fn open_nofollow(path: &Path, flags: OFlags, mode: Mode) -> Result<OwnedFd, HostPathError> {
    open_nofollow_with(Resolver::Openat2, path, flags, mode)
}

/// [`open_nofollow`] with a chosen walk (the fallback is tested on this kernel too).
pub fn open_nofollow_with(
    how: Resolver,
    path: &Path,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, HostPathError> {
    let abs = normalise(path)?;
    let root = root_fd(path)?;
    let rel = abs.strip_prefix("/").unwrap_or(&abs);
    open_beneath_with(how, root.as_fd(), rel, flags, mode, path)
}

/// Opens the directory `path`, following no link in any component.
pub fn open_dir_nofollow(path: &Path) -> Result<OwnedFd, HostPathError> {
    open_nofollow(path, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
}

/// Opens `rel` beneath the directory `dir` (no `..`, not absolute, no link anywhere).
pub fn open_at_nofollow(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, HostPathError> {
    if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
        return Err(HostPathError::BadName {
            path: rel.to_owned(),
            what: "must be a relative path without '..'",
        });
    }
    open_beneath_with(Resolver::Openat2, dir, rel, flags, mode, rel)
}

/// One plain name: no `/`, not `.` or `..`, not empty.
fn plain_name(name: &OsStr) -> Result<(), HostPathError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(HostPathError::BadName {
            path: PathBuf::from(name),
            what: "not a plain file name",
        });
    }
    Ok(())
}

/// Creates the new file `name` in `dir` (`O_CREAT | O_EXCL | O_NOFOLLOW`: never an existing
/// file, never through a link) with `mode`, open for writing.
pub fn create_file_excl_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: u32,
) -> Result<OwnedFd, HostPathError> {
    plain_name(name)?;
    rfs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| HostPathError::io(Path::new(name), "creating", e))
}

/// Writes `bytes` to `name` in `dir` as a whole: a new file (O_EXCL, `mode`) beside it, then
/// renamed over `name` within `dir` (a link planted at `name` is replaced, never followed).
pub fn replace_file_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
) -> Result<(), HostPathError> {
    replace_file_with(dir, name, bytes, mode, true)
}

/// As [`replace_file_at`], without the fsync: a reader never sees a torn file while the host
/// runs, but after a power cut the name may hold an empty or older file. For files whose
/// reader tolerates that and that a power cut makes moot (aitherd's copy of a run's
/// enforcement report: the run dies with the host), where the fsync would be paid per spawn.
pub fn replace_file_at_unsynced(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
) -> Result<(), HostPathError> {
    replace_file_with(dir, name, bytes, mode, false)
}

fn replace_file_with(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
    sync: bool,
) -> Result<(), HostPathError> {
    plain_name(name)?;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", std::process::id()));
    let shown = Path::new(name);
    // A leftover of a killed writer with this pid: remove the name (never followed).
    let _ = rfs::unlinkat(dir, &tmp, rfs::AtFlags::empty());
    let fd = create_file_excl_at(dir, &tmp, mode)?;
    let mut f = File::from(fd);
    let res = f
        .write_all(bytes)
        .and_then(|()| rfs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(io::Error::from))
        // On disk before the name shows it: a reader never sees a torn file, even after a
        // power cut.
        .and_then(|()| if sync { f.sync_all() } else { Ok(()) })
        .map_err(|e| HostPathError::io(shown, "writing", e))
        .and_then(|()| {
            rfs::renameat(dir, &tmp, dir, name).map_err(|e| HostPathError::io(shown, "renaming", e))
        });
    if res.is_err() {
        let _ = rfs::unlinkat(dir, &tmp, rfs::AtFlags::empty());
    }
    res
}

/// Creates (as needed, `mode` less the umask) and opens the directory `rel` beneath `dir`, one
/// component at a time: `mkdirat`, then an open that follows no link. A link on the way is
/// refused, never followed. `rel` empty: `dir` itself (duplicated).
pub fn mkdirs_at(dir: BorrowedFd<'_>, rel: &Path, mode: u32) -> Result<OwnedFd, HostPathError> {
    let mut cur = rfs::openat(
        dir,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| HostPathError::io(rel, "opening", e))?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            if c == Component::CurDir {
                continue;
            }
            return Err(HostPathError::BadName {
                path: rel.to_owned(),
                what: "must be a relative path without '..'",
            });
        };
        match rfs::mkdirat(&cur, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(HostPathError::io(rel, "creating", e)),
        }
        cur = open_beneath_with(
            Resolver::Openat2,
            cur.as_fd(),
            Path::new(name),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
            rel,
        )?;
    }
    Ok(cur)
}

/// A directory to fill from scratch (an export bundle): created (mode 0700 until the caller
/// widens it through the fd) or, if it exists, an empty directory owned by the caller, opened
/// without following a link anywhere in `path`.
pub fn empty_dir(path: &Path) -> Result<OwnedFd, HostPathError> {
    let abs = normalise(path)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let name = abs.file_name().ok_or(HostPathError::BadName {
        path: path.to_owned(),
        what: "names no directory",
    })?;
    let pdir = open_dir_nofollow(parent).map_err(|e| match e {
        HostPathError::Symlink { .. } => HostPathError::Symlink {
            path: path.to_owned(),
        },
        e => e,
    })?;
    let created = match rfs::mkdirat(&pdir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(HostPathError::io(path, "creating", e)),
    };
    let fd = open_beneath_with(
        Resolver::Openat2,
        pdir.as_fd(),
        Path::new(name),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
        path,
    )?;
    if !created {
        let m = check_fd(fd.as_fd()).map_err(|e| HostPathError::io(path, "fstat", e))?;
        m.expect_owner(path, rustix::process::geteuid().as_raw())?;
        let d = rfs::Dir::read_from(&fd).map_err(|e| HostPathError::io(path, "listing", e))?;
        for e in d {
            let e = e.map_err(|e| HostPathError::io(path, "listing", e))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                return Err(HostPathError::BadName {
                    path: path.to_owned(),
                    what: "is not empty",
                });
            }
        }
    }
    Ok(fd)
}

/// Opens `path` for writing a report, a bundle file or a log the caller asked for: no link on
/// the way, the file created if absent (mode 0644 less the umask) or, if present, a regular
/// file with one link owned by the caller or by the directory's owner; truncated through the
/// fd. Open it before an agent exists; write to the returned file, never to the name.
pub fn open_output_file(path: &Path) -> Result<File, HostPathError> {
    open_output_file_mode(path, 0o644)
}

/// [`open_output_file`] with the mode a new file gets (less the umask); an existing file is
/// narrowed to it through the fd (a token written with 0600 never stays world-readable).
pub fn open_output_file_mode(path: &Path, mode: u32) -> Result<File, HostPathError> {
    let abs = normalise(path)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let name = abs.file_name().ok_or(HostPathError::BadName {
        path: path.to_owned(),
        what: "names no file",
    })?;
    let dir = open_dir_nofollow(parent).map_err(|e| match e {
        HostPathError::Symlink { .. } => HostPathError::Symlink {
            path: path.to_owned(),
        },
        e => e,
    })?;
    let dmeta = check_fd(dir.as_fd()).map_err(|e| HostPathError::io(parent, "fstat", e))?;
    let fd = open_beneath_with(
        Resolver::Openat2,
        dir.as_fd(),
        Path::new(name),
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(mode),
        path,
    )?;
    let m = check_fd(fd.as_fd()).map_err(|e| HostPathError::io(path, "fstat", e))?;
    m.expect_kind(path, Kind::File)?;
    if m.nlink != 1 {
        return Err(HostPathError::Links {
            path: path.to_owned(),
            nlink: m.nlink,
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if m.uid != me && m.uid != dmeta.uid {
        return Err(HostPathError::Owner {
            path: path.to_owned(),
            uid: m.uid,
            expected: me,
        });
    }
    if m.mode & !mode != 0 {
        rfs::fchmod(&fd, Mode::from_raw_mode(m.mode & mode))
            .map_err(|e| HostPathError::io(path, "fchmod", e))?;
    }
    rfs::ftruncate(&fd, 0).map_err(|e| HostPathError::io(path, "truncating", e))?;
    Ok(File::from(fd))
}

/// Opens (creating if absent, mode 0700) the directory `path` that steers enforcement (a
/// cache, keys): it must be a directory owned by the effective uid with no group or other
/// access. An existing directory of ours with a wider mode (an older version's 0755) is
/// narrowed through the fd; one owned by anyone else is refused. The parent must exist.
pub fn private_dir(path: &Path) -> Result<OwnedFd, HostPathError> {
    let abs = normalise(path)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let name = abs.file_name().ok_or(HostPathError::BadName {
        path: path.to_owned(),
        what: "names no directory",
    })?;
    let pdir = open_dir_nofollow(parent)?;
    private_dir_at(pdir.as_fd(), name, path)
}

/// A cache directory that steers enforcement (`/var/cache/aither/seccomp`, `…/etc`): the
/// leaf is owned by us with no permission bits outside `allowed` (0o700 for what only root
/// reads; 0o755 for what sandboxes must traverse: never writable by group or others),
/// created so and narrowed through its fd if ours and wider; its parent is created 0755 if
/// absent and otherwise left as it is (a directory swapped in by whoever can write the parent
/// fails the leaf's owner check).
pub fn owned_cache_dir(dir: &Path, allowed: u32) -> Result<OwnedFd, HostPathError> {
    let abs = normalise(dir)?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let name = abs.file_name().ok_or(HostPathError::BadName {
        path: dir.to_owned(),
        what: "names no directory",
    })?;
    let pfd = match open_dir_nofollow(parent) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let gp = parent.parent().unwrap_or(Path::new("/"));
            let pname = parent.file_name().unwrap_or(OsStr::new("."));
            owned_dir_at(open_dir_nofollow(gp)?.as_fd(), pname, parent, 0o755)?
        }
        r => r?,
    };
    owned_dir_at(pfd.as_fd(), name, dir, allowed)
}

/// [`private_dir`] for the entry `name` of the directory `dir` (`shown` names it in errors).
pub fn private_dir_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
) -> Result<OwnedFd, HostPathError> {
    owned_dir_at(dir, name, shown, 0o700)
}

/// The directory `name` in `dir`, created with mode `allowed` if absent: ours, and narrowed
/// to `allowed` through its fd if wider.
pub fn owned_dir_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    allowed: u32,
) -> Result<OwnedFd, HostPathError> {
    plain_name(name)?;
    match rfs::mkdirat(dir, name, Mode::from_raw_mode(allowed)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(HostPathError::io(shown, "creating", e)),
    }
    let fd = open_beneath_with(
        Resolver::Openat2,
        dir,
        Path::new(name),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
        shown,
    )?;
    let m = check_fd(fd.as_fd()).map_err(|e| HostPathError::io(shown, "fstat", e))?;
    m.expect_kind(shown, Kind::Dir)?
        .expect_owner(shown, rustix::process::geteuid().as_raw())?;
    if m.mode & !allowed != 0 {
        rfs::fchmod(&fd, Mode::from_raw_mode(m.mode & allowed))
            .map_err(|e| HostPathError::io(shown, "fchmod", e))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests;
