//! The workspace, the one host directory a sandbox may write: resolved once without following
//! symlinks, checked as an open descriptor (type, owner, not a system or Aither directory and
//! not an ancestor of one), and mounted from that same descriptor (`open_tree` with
//! AT_EMPTY_PATH). Nothing is looked up by name twice, so a link or a `renameat2` exchange
//! planted by an earlier agent cannot redirect the mount (docs/security-model.md, "the host
//! side").
//!
//! Hand-written over libc (openat2, open_tree, fstat): the project has no `nix` dependency and
//! these are three calls, each behind its own SAFETY note.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Directories that are never a workspace, nor is anything below them.
const DENY_SUBTREE: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/run",
    "/var/lib/aither",
    "/var/cache/aither",
    "/var/log/aither",
];

/// Directories that are never a workspace themselves (their subdirectories may be): shared
/// parents whose other entries belong to other users or to the system, and home directories
/// (root's too: `/root/project` is where root clones a project, and only root or an admin can
/// name it, since a member's workspace must be their own).
const DENY_EXACT: &[&str] = &[
    "/", "/home", "/root", "/tmp", "/var", "/var/tmp", "/srv", "/opt", "/mnt", "/media",
];

/// Why a workspace was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace {path}: must be an absolute path")]
    NotAbsolute { path: PathBuf },
    #[error("workspace {path}: not its canonical path ({reason}); give the real path{}", real.as_ref().map(|r| format!(" ({})", r.display())).unwrap_or_default())]
    NotCanonical {
        path: PathBuf,
        reason: &'static str,
        real: Option<PathBuf>,
    },
    #[error("workspace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("workspace {path}: not a directory")]
    NotDirectory { path: PathBuf },
    #[error("workspace {path}: {what} cannot be a workspace; pick a project directory")]
    Denied { path: PathBuf, what: String },
    #[error("workspace {path}: owned by uid {owner}, not by the caller (uid {caller}); a workspace must be the caller's own directory")]
    NotOwner {
        path: PathBuf,
        owner: u32,
        caller: u32,
    },
    #[error("workspace {path}: a member's workspace must come as a directory they opened themselves (aitherctl passes it); none was passed")]
    NotPresented { path: PathBuf },
    #[error("workspace {path}: the directory passed is not the one at this path (or was opened without read access: O_PATH)")]
    PresentedMismatch { path: PathBuf },
    #[error("workspace {path}: the directory at this path is no longer the one checked at spawn (replaced or renamed); spawn again")]
    Replaced { path: PathBuf },
    #[error("workspace {path}: cloning the mount: {source}")]
    Clone {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the checked descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
}

impl DirId {
    /// What pins a directory across opens: (st_dev, st_ino).
    pub fn identity(&self) -> crate::sandbox::spec::DirIdentity {
        crate::sandbox::spec::DirIdentity {
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// Checks a descriptor the caller opened themselves (SCM_RIGHTS) against the directory
/// opened here: the same (dev, ino), and a real open (not O_PATH, which needs no read or
/// search permission on the directory itself), so the caller proved they can reach it.
pub fn check_presented(opened: &OpenedWorkspace, fd: BorrowedFd<'_>) -> Result<(), WorkspaceError> {
    let mismatch = || WorkspaceError::PresentedMismatch {
        path: opened.path.clone(),
    };
    match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) {
        Ok(fl) if fl & libc::O_PATH == 0 => {}
        _ => return Err(mismatch()),
    }
    let st = fstat(fd).map_err(|_| mismatch())?;
    if (st.st_dev, st.st_ino) != (opened.id.dev, opened.id.ino) {
        return Err(mismatch());
    }
    Ok(())
}

/// A workspace directory opened without following links and checked.
#[derive(Debug)]
pub struct OpenedWorkspace {
    pub path: PathBuf,
    pub fd: OwnedFd,
    pub id: DirId,
}

/// Refuses a path that is not written as its canonical form: relative, or with `.`, `..`
/// or empty components. Symlinks are refused at open (RESOLVE_NO_SYMLINKS).
pub fn check_lexical(path: &Path) -> Result<(), WorkspaceError> {
    if !path.is_absolute() {
        return Err(WorkspaceError::NotAbsolute { path: path.into() });
    }
    let text = path.as_os_str().as_encoded_bytes();
    // Anywhere, at the end too: "/x//" is not canonical, "/x/" is.
    if text.windows(2).any(|w| w == b"//") {
        return Err(not_canonical(path, "an empty component"));
    }
    let text = text.strip_suffix(b"/").unwrap_or(text);
    if text.split(|b| *b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(not_canonical(path, "a '.' or '..' component"));
    }
    Ok(())
}

fn not_canonical(path: &Path, reason: &'static str) -> WorkspaceError {
    WorkspaceError::NotCanonical {
        path: path.into(),
        reason,
        real: std::fs::canonicalize(path).ok().filter(|r| r != path),
    }
}

/// openat2(2) with RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, O_PATH | O_DIRECTORY.
pub fn open_no_follow(dirfd: Option<BorrowedFd<'_>>, path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    // rustix: nix 0.30 has no openat2.
    // No O_NOFOLLOW: RESOLVE_NO_SYMLINKS already refuses a link in any component, the last
    // one included (ELOOP), where O_NOFOLLOW|O_PATH would open the link itself.
    Ok(rustix::fs::openat2(
        dirfd.unwrap_or(rustix::fs::CWD),
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// fstat(2) of a descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    Ok(nix::sys::stat::fstat(fd)?)
}

fn id_of(st: &libc::stat) -> DirId {
    DirId {
        dev: st.st_dev,
        ino: st.st_ino,
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

/// (dev, ino) of a directory and of each of its ancestors up to "/", walking `..` from the
/// descriptor (mount crossings included), never by name.
fn chain(fd: BorrowedFd<'_>) -> io::Result<Vec<(u64, u64)>> {
    let st = fstat(fd)?;
    let mut out = vec![(st.st_dev, st.st_ino)];
    let mut cur = open_no_follow(Some(fd), Path::new("."))?;
    // Bounded: PATH_MAX / 2 levels at most.
    for _ in 0..2048 {
        let up = open_no_follow(Some(cur.as_fd()), Path::new(".."))?;
        let s = fstat(up.as_fd())?;
        let id = (s.st_dev, s.st_ino);
        if Some(&id) == out.last() {
            return Ok(out);
        }
        out.push(id);
        cur = up;
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// The deny lists, with the Aither state directory in force (AITHER_STATE_DIR) added.
fn deny_subtree() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = DENY_SUBTREE.iter().map(PathBuf::from).collect();
    v.push(crate::token::state_dir());
    v
}

/// Checks an opened directory against the deny lists by identity: it is none of them, no
/// ancestor of a protected directory, and not below one.
pub fn check_fd(path: &Path, fd: BorrowedFd<'_>) -> Result<DirId, WorkspaceError> {
    let open_err = |e| WorkspaceError::Open {
        path: path.into(),
        source: e,
    };
    let st = fstat(fd).map_err(open_err)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(WorkspaceError::NotDirectory { path: path.into() });
    }
    let me = (st.st_dev, st.st_ino);
    let mine = chain(fd).map_err(open_err)?;
    let denied = |what: String| WorkspaceError::Denied {
        path: path.into(),
        what,
    };
    let ident = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
    };
    for p in DENY_EXACT {
        if ident(Path::new(p)) == Some(me) {
            return Err(denied(if *p == "/" {
                "the whole host".into()
            } else {
                format!("{p} (a shared directory)")
            }));
        }
    }
    for p in deny_subtree() {
        let Ok(f) = std::fs::File::open(&p) else {
            continue;
        };
        let Ok(theirs) = chain(f.as_fd()) else {
            continue;
        };
        if mine.contains(&theirs[0]) {
            return Err(denied(format!(
                "{} or anything below it (a system or Aither directory)",
                p.display()
            )));
        }
        if theirs.contains(&me) {
            return Err(denied(format!(
                "an ancestor of {} (a system or Aither directory)",
                p.display()
            )));
        }
    }
    Ok(id_of(&st))
}

/// Opens `path` (which must be canonical: no symlink anywhere on it), checks the descriptor,
/// and, when `owner` is given, that the directory belongs to that uid.
pub fn open_checked(path: &Path, owner: Option<u32>) -> Result<OpenedWorkspace, WorkspaceError> {
    check_lexical(path)?;
    let fd = open_no_follow(None, path).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => not_canonical(path, "a symbolic link on the way"),
        Some(libc::ENOTDIR) => WorkspaceError::NotDirectory { path: path.into() },
        _ => WorkspaceError::Open {
            path: path.into(),
            source: e,
        },
    })?;
    let id = check_fd(path, fd.as_fd())?;
    if let Some(caller) = owner {
        if id.uid != caller {
            return Err(WorkspaceError::NotOwner {
                path: path.into(),
                owner: id.uid,
                caller,
            });
        }
    }
    Ok(OpenedWorkspace {
        path: path.into(),
        fd,
        id,
    })
}

/// A detached recursive copy of the mount at the descriptor: open_tree(fd, "",
/// AT_EMPTY_PATH | OPEN_TREE_CLONE | AT_RECURSIVE).
pub fn clone_tree(ws: &OpenedWorkspace) -> Result<OwnedFd, WorkspaceError> {
    use rustix::mount::OpenTreeFlags;
    // rustix: nix 0.30 has no open_tree.
    rustix::mount::open_tree(
        &ws.fd,
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| WorkspaceError::Clone {
        path: ws.path.clone(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::os::fd::AsRawFd;

    use nix::mount::MsFlags;

    use super::*;

    #[test]
    fn paths_that_are_not_canonical_are_refused() {
        for p in [
            "rel/dir",
            "/var/./tmp",
            "/var/tmp/../etc",
            "/var//tmp",
            "/a/b/..",
            "/var/tmp/x//",
        ] {
            assert!(check_lexical(Path::new(p)).is_err(), "{p} passed");
        }
        for p in ["/var/tmp/x", "/home/u/proj", "/var/tmp/x/"] {
            check_lexical(Path::new(p)).unwrap();
        }
    }

    #[test]
    fn a_project_in_roots_home_is_a_workspace_but_the_home_itself_is_not() {
        // Where root clones a project (the README's first command runs in it).
        let dir = Path::new("/root").join(format!("aither-ws-test-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("the unit tests run as root");
        let sub = open_checked(&dir, None);
        let home = open_checked(Path::new("/root"), None);
        std::fs::remove_dir(&dir).unwrap();
        sub.expect("a directory below /root is a workspace for root");
        assert!(home.is_err(), "/root itself was accepted");
    }

    #[test]
    fn system_directories_and_their_ancestors_are_refused() {
        for p in [
            "/",
            "/etc",
            "/etc/cron.d",
            "/root",
            "/home",
            "/tmp",
            "/var",
            "/usr/lib",
            "/srv",
            "/var/tmp",
            "/dev/shm",
            "/proc/self/cwd",
        ] {
            let p = Path::new(p);
            if !p.exists() {
                continue;
            }
            assert!(
                open_checked(p, None).is_err(),
                "{} was accepted",
                p.display()
            );
        }
    }

    #[test]
    fn a_link_on_the_way_is_refused_and_names_the_real_path() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
        let e = open_checked(&d.path().join("link"), None).unwrap_err();
        assert!(matches!(e, WorkspaceError::NotCanonical { .. }), "{e}");
        assert!(e.to_string().contains(&real.display().to_string()), "{e}");
        let e = open_checked(&d.path().join("out"), None).unwrap_err();
        assert!(matches!(e, WorkspaceError::NotCanonical { .. }), "{e}");
        let ok = open_checked(&real, None).unwrap();
        assert_eq!(ok.path, real);
    }

    #[test]
    fn another_users_directory_is_refused_when_an_owner_is_required() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let e = open_checked(d.path(), Some(4242)).unwrap_err();
        assert!(
            matches!(
                e,
                WorkspaceError::NotOwner {
                    owner: _,
                    caller: 4242,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("aither-ws-unit-")
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    #[test]
    fn a_presented_descriptor_must_be_a_real_open_of_the_same_directory() {
        let (a, b) = (scratch(), scratch());
        let opened = open_checked(a.path(), None).unwrap();
        let open = |p: &Path, flags| {
            rustix::fs::open(
                p,
                flags | rustix::fs::OFlags::DIRECTORY,
                rustix::fs::Mode::empty(),
            )
            .unwrap()
        };
        check_presented(&opened, open(a.path(), rustix::fs::OFlags::RDONLY).as_fd()).unwrap();
        for (what, fd) in [
            (
                "an O_PATH descriptor",
                open(a.path(), rustix::fs::OFlags::PATH),
            ),
            (
                "another directory",
                open(b.path(), rustix::fs::OFlags::RDONLY),
            ),
        ] {
            assert!(
                matches!(
                    check_presented(&opened, fd.as_fd()),
                    Err(WorkspaceError::PresentedMismatch { .. })
                ),
                "{what} was accepted"
            );
        }
    }

    #[test]
    fn a_file_is_refused_as_not_a_directory() {
        let d = scratch();
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            open_checked(&f, None),
            Err(WorkspaceError::NotDirectory { .. })
        ));
    }

    // Tests below were added for the survivors of `scripts/mutants.sh` (docs/testing.md).

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        rustix::io::fcntl_getfd(fd)
            .unwrap()
            .contains(rustix::io::FdFlags::CLOEXEC)
    }

    /// The mount an fd is on (`mnt_id` in /proc/self/fdinfo).
    fn mnt_id(fd: BorrowedFd<'_>) -> u64 {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("mnt_id:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn directories_deep_below_a_system_directory_are_refused() {
        // Two levels and more below: the ancestors are walked up to "/", not one step.
        for p in ["/sys/fs/cgroup", "/proc/sys/kernel", "/proc/1/fd"] {
            let p = Path::new(p);
            assert!(p.is_dir(), "{} is missing on this host", p.display());
            let e = open_checked(p, None).unwrap_err();
            assert!(
                e.to_string().contains("or anything below it"),
                "{}: {e}",
                p.display()
            );
        }
    }

    #[test]
    fn the_root_is_refused_as_the_whole_host_and_tmp_as_shared() {
        let e = open_checked(Path::new("/"), None).unwrap_err();
        assert!(e.to_string().contains("the whole host"), "{e}");
        let e = open_checked(Path::new("/tmp"), None).unwrap_err();
        assert!(e.to_string().contains("/tmp (a shared directory)"), "{e}");
    }

    #[test]
    fn a_socket_is_refused_as_not_a_directory_without_being_opened() {
        let d = scratch();
        let s = d.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&s).unwrap();
        assert!(matches!(
            open_checked(&s, None),
            Err(WorkspaceError::NotDirectory { .. })
        ));
    }

    #[test]
    fn a_trailing_dot_is_not_canonical() {
        for p in ["/var/tmp/x/.", "/a/b/..", "/var/tmp/x/./"] {
            assert!(
                matches!(
                    check_lexical(Path::new(p)),
                    Err(WorkspaceError::NotCanonical { .. })
                ),
                "{p} passed"
            );
        }
    }

    #[test]
    fn the_workspace_fd_and_its_mount_clone_are_close_on_exec_and_the_same_directory() {
        let d = scratch();
        let opened = open_checked(d.path(), Some(0)).unwrap();
        assert!(cloexec(opened.fd.as_fd()));
        let md = std::fs::metadata(d.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            opened.id.identity(),
            crate::sandbox::spec::DirIdentity {
                dev: md.dev(),
                ino: md.ino()
            }
        );
        let tree = clone_tree(&opened).unwrap();
        assert!(cloexec(tree.as_fd()));
        let st = fstat(tree.as_fd()).unwrap();
        assert_eq!((st.st_dev, st.st_ino), (md.dev(), md.ino()));
        // A new, detached mount: not the one the workspace is on.
        assert_ne!(mnt_id(tree.as_fd()), mnt_id(opened.fd.as_fd()));
    }

    /// Set in the child process of [`a_mount_that_cannot_be_cloned_is_an_error`].
    const UNBINDABLE_CHILD: &str = "AITHER_WORKSPACE_TEST_UNBINDABLE";

    fn mount(src: &CStr, target: &Path, fstype: Option<&CStr>, flags: MsFlags) {
        let r = nix::mount::mount(Some(src), target, fstype, flags, None::<&CStr>);
        assert_eq!(r, Ok(()), "mount {}", target.display());
    }

    #[test]
    fn a_mount_that_cannot_be_cloned_is_an_error() {
        let Some(dir) = std::env::var_os(UNBINDABLE_CHILD) else {
            // The parent: the child gets a mount namespace of its own (nothing it mounts
            // reaches the host's) and clones an unbindable mount, which open_tree refuses.
            use std::os::unix::process::CommandExt;
            let d = scratch();
            let name = "sandbox::workspace::tests::a_mount_that_cannot_be_cloned_is_an_error";
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args([name, "--exact", "--test-threads=1"])
                .env(UNBINDABLE_CHILD, d.path());
            // SAFETY: unshare is async-signal-safe (nix's wrapper allocates nothing); nothing
            // else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| Ok(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?));
            }
            let out = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "the child failed or did not run:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        };
        let dir = Path::new(&dir);
        mount(
            c"none",
            Path::new("/"),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        );
        mount(c"tmpfs", dir, Some(c"tmpfs"), MsFlags::empty());
        mount(c"none", dir, None, MsFlags::MS_UNBINDABLE);
        let opened = open_checked(dir, None).unwrap();
        assert!(matches!(
            clone_tree(&opened),
            Err(WorkspaceError::Clone { .. })
        ));
    }
}
