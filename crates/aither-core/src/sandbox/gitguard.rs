//! The workspace's git files that name commands the host later runs (`workspace_git =
//! "read-only"`, the default; docs/security-model.md, "The host side"). An agent that can write
//! `.git/config` can set `core.fsmonitor`, `core.hooksPath`, `core.sshCommand`, a diff or
//! filter driver…, and one that can write `.git/hooks` can add `post-checkout`: the owner's next
//! `git status` or `git checkout` on the host runs it as the owner. Landlock cannot deny a
//! subtree of an allowed one, so read-only binds in the mount view are the enforcement:
//!
//! 1. `.git` is bound onto itself: a mountpoint cannot be renamed or removed (EBUSY), so the
//!    agent cannot move it aside and put a `.git` of its own in its place;
//! 2. `config`, `hooks`, `info`, `modules` (submodules' configs and hooks), `worktrees`
//!    (linked worktrees' `commondir` and `config.worktree`), and `commondir` and
//!    `config.worktree` are bound read-only over themselves (EROFS on write, EBUSY on rename
//!    or unlink); the launcher first creates those of [`PLACEHOLDERS`] that are missing
//!    (`hooks` empty, as `git init` does; `commondir` naming `.git` itself), so that the agent
//!    cannot create one (a `commondir` of its own would point the host's git at a config it
//!    wrote);
//! 3. a `.git` that is a file (a linked worktree's or submodule's `gitdir:` pointer) is bound
//!    read-only over itself.
//!
//! Objects, refs, logs, HEAD and the index stay writable: `git add` and `git commit` work.
//! Every entry is opened without following links (src/hostpath.rs) and bound through its fd;
//! an entry that is a symbolic link refuses the launch (a link there would point the host's
//! git at a file the agent can write).
//!
//! Runs in pid 1 after the workspace is attached, before anything of the agent runs.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use crate::hostpath::{self, HostPathError, Kind};
use crate::sys;

/// The entries of `.git` made read-only (when present; `hooks` is created if absent).
pub const READ_ONLY_ENTRIES: &[&str] = &[
    "config",
    "hooks",
    "info",
    "modules",
    "worktrees",
    "commondir",
    "config.worktree",
];

/// Why the git files could not be protected.
#[derive(Debug, thiserror::Error)]
pub enum GitGuardError {
    #[error(
        "{0}: a symbolic link; with workspace_git = \"read-only\" the git files that name \
         commands must be plain files or directories (remove the link, or use a policy with \
         workspace_git = \"writable\")"
    )]
    Link(PathBuf),
    #[error("{path}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: HostPathError,
    },
    #[error("{step} {path}: {source}")]
    Mount {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn opened(
    path: &Path,
    r: Result<OwnedFd, HostPathError>,
) -> Result<Option<OwnedFd>, GitGuardError> {
    match r {
        Ok(fd) => Ok(Some(fd)),
        Err(HostPathError::Symlink { .. }) => Err(GitGuardError::Link(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(GitGuardError::Path {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Binds the object `fd` refers to over itself, read-only if `read_only` (not recursive:
/// nothing is mounted below these entries).
fn bind_over(fd: BorrowedFd<'_>, read_only: bool, path: &Path) -> Result<(), GitGuardError> {
    let merr = |step| {
        let path = path.to_owned();
        move |e: std::io::Error| GitGuardError::Mount {
            step,
            path,
            source: e,
        }
    };
    let tree = rustix::mount::open_tree(
        fd,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| merr("open_tree")(e.into()))?;
    if read_only {
        sys::mount_setattr(
            tree.as_raw_fd(),
            Path::new(""),
            false,
            sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
            0,
            None,
        )
        .map_err(merr("mount_setattr read-only"))?;
    }
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        fd,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| merr("move_mount")(e.into()))
}

/// What the launcher puts at a name of [`READ_ONLY_ENTRIES`] that git would read if the agent
/// created it (the read-only bind needs something to cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// An empty directory (`hooks`, as `git init` makes it).
    Dir,
    /// A file with these bytes.
    File(&'static [u8]),
}

/// The names of `.git` that git reads when present and that an agent could otherwise create
/// (checked with git 2.47): `hooks` (a hook runs), `config` (a repository without one works,
/// and git reads one that appears), `commondir` (git then reads the config and hooks of the
/// directory it names; `.` names the git directory itself, so git behaves as without it) and
/// `config.worktree` (read when the config has `extensions.worktreeConfig`; empty is no
/// setting). Not here: `modules` and `worktrees` (git never reuses a linked worktree's
/// directory it did not make; an agent's submodule is covered in docs/security-model.md),
/// `info` (attributes name drivers only the read-only config defines), `gitdir` (read only
/// in a linked worktree's own directory, never in a repository's).
pub const PLACEHOLDERS: &[(&str, Placeholder)] = &[
    ("hooks", Placeholder::Dir),
    ("config", Placeholder::File(b"")),
    ("commondir", Placeholder::File(b".\n")),
    ("config.worktree", Placeholder::File(b"")),
];

/// In the launcher (host root), before the sandbox exists: each of [`PLACEHOLDERS`] a `.git`
/// directory lacks is created (`O_EXCL`, never through a link), owned as `.git` is, so that
/// the agent cannot create it and the read-only bind of [`protect`] covers it. They stay after
/// the run (harmless to git; a crash would leave them anyway). Acts through the workspace's
/// descriptor (`wsfd`, already opened and checked; `ws` names it in errors) and fds opened
/// from it without following links.
pub fn prepare_on_host(wsfd: BorrowedFd<'_>, ws: &Path) -> Result<(), GitGuardError> {
    let gpath = ws.join(".git");
    let g =
        hostpath::open_at_nofollow(wsfd.as_fd(), Path::new(".git"), OFlags::PATH, Mode::empty());
    let Some(g) = opened(&gpath, g)? else {
        return Ok(());
    };
    let m = hostpath::check_fd(g.as_fd()).map_err(|e| GitGuardError::Mount {
        step: "fstat",
        path: gpath.clone(),
        source: e,
    })?;
    if m.kind != Kind::Dir {
        return Ok(());
    }
    for &(name, what) in PLACEHOLDERS {
        create_placeholder(g.as_fd(), &gpath.join(name), name, what, (m.uid, m.gid))?;
    }
    Ok(())
}

/// Creates `name` in the `.git` at `gdir` as `what`, owned by `owner`; an existing entry (of
/// any kind: [`protect`] checks it) is left as it is.
fn create_placeholder(
    gdir: BorrowedFd<'_>,
    path: &Path,
    name: &str,
    what: Placeholder,
    owner: (u32, u32),
) -> Result<(), GitGuardError> {
    let merr = |step: &'static str| {
        let path = path.to_owned();
        move |e: std::io::Error| GitGuardError::Mount {
            step,
            path,
            source: e,
        }
    };
    let fd = match what {
        Placeholder::Dir => {
            match rustix::fs::mkdirat(gdir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => return Ok(()),
                Err(e) => return Err(merr("mkdir")(e.into())),
            }
            hostpath::open_at_nofollow(
                gdir,
                Path::new(name),
                OFlags::DIRECTORY | OFlags::RDONLY,
                Mode::empty(),
            )
            .map_err(|source| GitGuardError::Path {
                path: path.to_owned(),
                source,
            })?
        }
        Placeholder::File(bytes) => {
            let fd = match hostpath::create_file_excl_at(gdir, name.as_ref(), 0o644) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
                Err(source) => {
                    return Err(GitGuardError::Path {
                        path: path.to_owned(),
                        source,
                    })
                }
            };
            let mut f = std::fs::File::from(fd);
            std::io::Write::write_all(&mut f, bytes).map_err(merr("write"))?;
            OwnedFd::from(f)
        }
    };
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
    )
    .map_err(|e| merr("fchown")(e.into()))
}

/// Protects the git files of the workspace at `ws` (a path of the sandbox's view, where the
/// workspace has just been attached). No `.git`: nothing to do.
pub fn protect(ws: &Path) -> Result<(), GitGuardError> {
    let wsfd = hostpath::open_dir_nofollow(ws).map_err(|source| GitGuardError::Path {
        path: ws.to_owned(),
        source,
    })?;
    let gpath = ws.join(".git");
    let git =
        |flags| hostpath::open_at_nofollow(wsfd.as_fd(), Path::new(".git"), flags, Mode::empty());
    let Some(g) = opened(&gpath, git(OFlags::PATH))? else {
        return Ok(());
    };
    let kind = hostpath::check_fd(g.as_fd())
        .map_err(|e| GitGuardError::Mount {
            step: "fstat",
            path: gpath.clone(),
            source: e,
        })?
        .kind;
    match kind {
        Kind::File => return bind_over(g.as_fd(), true, &gpath),
        Kind::Dir => {}
        // Anything else is no repository git would use.
        _ => return Ok(()),
    }
    // 1. Pin .git first (a later non-recursive bind of .git would hide the binds below).
    bind_over(g.as_fd(), false, &gpath)?;
    drop(g);
    // Reopened: the name now resolves to the pinned mount, where the binds below must go.
    let g = opened(&gpath, git(OFlags::PATH | OFlags::DIRECTORY))?.ok_or_else(|| {
        GitGuardError::Mount {
            step: "reopen",
            path: gpath.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        }
    })?;
    // 2. (The missing placeholders were created by `prepare_on_host`.)
    for name in READ_ONLY_ENTRIES {
        let p = gpath.join(name);
        let fd =
            hostpath::open_at_nofollow(g.as_fd(), Path::new(name), OFlags::PATH, Mode::empty());
        if let Some(fd) = opened(&p, fd)? {
            single_links(fd.as_fd(), &p)?;
            bind_over(fd.as_fd(), true, &p)?;
        }
    }
    Ok(())
}

/// Refuses a regular file with more than one link: its other name (in the workspace) would
/// stay writable through the read-only bind. For a directory, its regular files directly in it
/// (the hooks themselves, `info/attributes`).
fn single_links(fd: BorrowedFd<'_>, path: &Path) -> Result<(), GitGuardError> {
    let fstat_err = |e: std::io::Error| GitGuardError::Mount {
        step: "fstat",
        path: path.to_owned(),
        source: e,
    };
    let m = hostpath::check_fd(fd).map_err(fstat_err)?;
    let many = |p: &Path, n: u64| {
        Err(GitGuardError::Path {
            path: p.to_owned(),
            source: HostPathError::Links {
                path: p.to_owned(),
                nlink: n,
            },
        })
    };
    match m.kind {
        Kind::File if m.nlink > 1 => return many(path, m.nlink),
        Kind::Dir => {}
        _ => return Ok(()),
    }
    // An O_PATH fd cannot be listed: a real one of the same directory.
    let d = hostpath::open_at_nofollow(
        fd,
        Path::new(""),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .map_err(|source| GitGuardError::Path {
        path: path.to_owned(),
        source,
    })?;
    let list = rustix::fs::Dir::read_from(&d).map_err(|e| fstat_err(e.into()))?;
    for e in list {
        let e = e.map_err(|e| fstat_err(e.into()))?;
        if matches!(e.file_name().to_bytes(), b"." | b"..") {
            continue;
        }
        // lstat, not the d_type (which some filesystems leave unknown).
        let st = rustix::fs::statat(&d, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| fstat_err(e.into()))?;
        let regular =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
        if regular && st.st_nlink > 1 {
            let name = std::ffi::OsStr::from_bytes(e.file_name().to_bytes());
            return many(&path.join(name), st.st_nlink as u64);
        }
    }
    Ok(())
}
