use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use super::*;

const BOTH: [Resolver; 2] = [Resolver::Openat2, Resolver::PerComponent];

fn dir_flags() -> OFlags {
    OFlags::DIRECTORY | OFlags::RDONLY
}

#[test]
fn a_plain_directory_opens_with_either_walk() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("a/b")).unwrap();
    for how in BOTH {
        let fd = open_nofollow_with(how, &t.path().join("a/b"), dir_flags(), Mode::empty())
            .unwrap_or_else(|e| panic!("{how:?}: {e}"));
        let m = check_fd(fd.as_fd()).unwrap();
        assert_eq!(m.kind, Kind::Dir);
        assert_eq!(
            m.ino,
            std::fs::metadata(t.path().join("a/b")).unwrap().ino()
        );
    }
}

#[test]
fn a_link_in_the_middle_or_at_the_end_is_refused_by_either_walk() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("real")).unwrap();
    std::fs::write(t.path().join("real/f"), b"x").unwrap();
    symlink(t.path().join("real"), t.path().join("dirlink")).unwrap();
    symlink("/etc/passwd", t.path().join("filelink")).unwrap();
    symlink("/nonexistent-aither", t.path().join("dangling")).unwrap();
    for how in BOTH {
        for (p, flags) in [
            ("dirlink/f", OFlags::RDONLY),
            ("dirlink", dir_flags()),
            ("filelink", OFlags::RDONLY),
            ("filelink", OFlags::PATH),
            ("dirlink", OFlags::PATH),
            ("filelink", OFlags::WRONLY | OFlags::CREATE),
            ("dangling", OFlags::WRONLY | OFlags::CREATE),
        ] {
            let e = open_nofollow_with(how, &t.path().join(p), flags, Mode::from_raw_mode(0o600))
                .expect_err(p);
            assert!(
                matches!(e, HostPathError::Symlink { .. }),
                "{how:?} {p}: {e}"
            );
        }
    }
    // Nothing was created through the dangling link.
    assert!(!Path::new("/nonexistent-aither").exists());
}

#[test]
fn dot_dot_is_resolved_lexically_and_never_escapes_through_a_link() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("d")).unwrap();
    symlink("/etc", t.path().join("l")).unwrap();
    // "l/.." would be /  (the link's parent) if followed; lexically it is the temp dir.
    let fd = open_dir_nofollow(&t.path().join("l/..")).unwrap();
    let m = check_fd(fd.as_fd()).unwrap();
    assert_eq!(m.ino, std::fs::metadata(t.path()).unwrap().ino());
    assert_eq!(
        normalise(Path::new("/a/./b/../c")).unwrap(),
        Path::new("/a/c")
    );
    assert_eq!(normalise(Path::new("/../..")).unwrap(), Path::new("/"));
}

#[test]
fn open_at_refuses_absolute_and_parent_paths() {
    let t = tempfile::tempdir().unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    for p in ["/etc", "../x", "a/../../x"] {
        assert!(matches!(
            open_at_nofollow(d.as_fd(), Path::new(p), OFlags::RDONLY, Mode::empty()),
            Err(HostPathError::BadName { .. })
        ));
    }
}

#[test]
fn create_excl_never_opens_an_existing_name() {
    let t = tempfile::tempdir().unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    symlink("/etc/passwd", t.path().join("l")).unwrap();
    std::fs::write(t.path().join("f"), b"keep").unwrap();
    for n in ["l", "f"] {
        let e = create_file_excl_at(d.as_fd(), OsStr::new(n), 0o600).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{n}");
    }
    for n in ["", ".", "..", "a/b"] {
        assert!(matches!(
            create_file_excl_at(d.as_fd(), OsStr::new(n), 0o600),
            Err(HostPathError::BadName { .. })
        ));
    }
    let fd = create_file_excl_at(d.as_fd(), OsStr::new("new"), 0o600).unwrap();
    let m = check_fd(fd.as_fd()).unwrap();
    assert_eq!((m.kind, m.nlink), (Kind::File, 1));
    assert_eq!(std::fs::read(t.path().join("f")).unwrap(), b"keep");
}

#[test]
fn replace_replaces_a_planted_link_instead_of_following_it() {
    let t = tempfile::tempdir().unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"host file").unwrap();
    symlink(&victim, t.path().join("out")).unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    replace_file_at(d.as_fd(), OsStr::new("out"), b"new", 0o600).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
    let md = std::fs::symlink_metadata(t.path().join("out")).unwrap();
    assert!(md.file_type().is_file());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(t.path().join("out")).unwrap(), b"new");
}

#[test]
fn an_output_file_is_never_a_link_a_hard_link_or_a_special_file() {
    let t = tempfile::tempdir().unwrap();
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"host file").unwrap();
    symlink(&victim, t.path().join("sym")).unwrap();
    std::fs::hard_link(&victim, t.path().join("hard")).unwrap();
    std::fs::create_dir(t.path().join("dir")).unwrap();
    symlink(t.path().join("dir"), t.path().join("dirlink")).unwrap();
    assert!(matches!(
        open_output_file(&t.path().join("sym")),
        Err(HostPathError::Symlink { .. })
    ));
    assert!(matches!(
        open_output_file(&t.path().join("dirlink/r.json")),
        Err(HostPathError::Symlink { .. })
    ));
    assert!(matches!(
        open_output_file(&t.path().join("hard")),
        Err(HostPathError::Links { nlink: 2, .. })
    ));
    assert!(matches!(
        open_output_file(&t.path().join("dir")),
        Err(HostPathError::Io { .. }) | Err(HostPathError::WrongType { .. })
    ));
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
    assert!(!t.path().join("dir/r.json").exists());
    // A plain existing file is truncated through the fd; a new one is created.
    std::fs::write(t.path().join("old"), b"0123456789").unwrap();
    let mut f = open_output_file(&t.path().join("old")).unwrap();
    f.write_all(b"ab").unwrap();
    assert_eq!(std::fs::read(t.path().join("old")).unwrap(), b"ab");
    open_output_file(&t.path().join("new")).unwrap();
    assert!(t.path().join("new").is_file());
}

#[test]
fn an_output_file_owned_by_someone_else_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("theirs");
    std::fs::write(&p, b"x").unwrap();
    std::os::unix::fs::chown(&p, Some(4242), Some(4242)).unwrap();
    assert!(matches!(
        open_output_file(&p),
        Err(HostPathError::Owner { uid: 4242, .. })
    ));
    assert_eq!(std::fs::read(&p).unwrap(), b"x");
}

#[test]
fn a_private_dir_is_created_0700_narrowed_if_ours_and_refused_if_not() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("cache");
    private_dir(&p).unwrap();
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    private_dir(&p).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    std::os::unix::fs::chown(&p, Some(4242), None).unwrap();
    assert!(matches!(
        private_dir(&p),
        Err(HostPathError::Owner { uid: 4242, .. })
    ));
    let l = t.path().join("link");
    symlink(&p, &l).unwrap();
    assert!(matches!(
        private_dir(&l),
        Err(HostPathError::Symlink { .. })
    ));
    std::fs::write(t.path().join("file"), b"").unwrap();
    assert!(private_dir(&t.path().join("file")).is_err());
}

#[test]
fn a_cache_dir_that_sandboxes_traverse_stays_0755_and_is_never_writable_by_others() {
    let t = tempfile::tempdir().unwrap();
    // The parent is created 0755 when absent (sandboxes traverse it), the leaf as asked.
    let leaf = t.path().join("cache/etc");
    owned_cache_dir(&leaf, 0o755).unwrap();
    for p in [t.path().join("cache"), leaf.clone()] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }
    std::fs::set_permissions(&leaf, std::fs::Permissions::from_mode(0o777)).unwrap();
    owned_cache_dir(&leaf, 0o755).unwrap();
    assert_eq!(
        std::fs::metadata(&leaf).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let private = t.path().join("cache/seccomp");
    owned_cache_dir(&private, 0o700).unwrap();
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    std::os::unix::fs::chown(&leaf, Some(4242), None).unwrap();
    assert!(matches!(
        owned_cache_dir(&leaf, 0o755),
        Err(HostPathError::Owner { uid: 4242, .. })
    ));
}

// Tests below were added for the survivors of `scripts/mutants.sh` (docs/testing.md,
// "Mutation testing with cargo-mutants"): each asserts what a user or an agent would see.

fn errno<T>(r: Result<T, HostPathError>) -> Option<i32> {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error(),
    }
}

fn cloexec(fd: BorrowedFd<'_>) -> bool {
    rustix::io::fcntl_getfd(fd)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A directory tree below `root` whose path is at least `min_len` bytes long (past PATH_MAX if
/// asked), made with one `mkdirat` per component (the whole path is never handed to the
/// kernel). Returns the path and an fd of the deepest directory.
fn deep_tree(root: &Path, min_len: usize) -> (PathBuf, OwnedFd) {
    let name = "d".repeat(100);
    let mut path = root.to_path_buf();
    let mut fd = rfs::open(root, dir_flags(), Mode::empty()).unwrap();
    while path.as_os_str().len() < min_len {
        rfs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rfs::openat(&fd, name.as_str(), dir_flags(), Mode::empty()).unwrap();
        path.push(&name);
    }
    (path, fd)
}

#[test]
fn a_wrong_type_is_named_in_words() {
    let t = tempfile::tempdir().unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    let m = check_fd(d.as_fd()).unwrap();
    let e = m.expect_kind(t.path(), Kind::File).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: is a directory, expected a regular file",
            t.path().display()
        )
    );
}

#[test]
fn the_mode_is_the_permission_bits_and_a_wider_one_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d");
    std::fs::create_dir(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
    let fd = open_dir_nofollow(&p).unwrap();
    let m = check_fd(fd.as_fd()).unwrap();
    assert_eq!(m.mode, 0o750);
    m.expect_mode_within(&p, 0o750).unwrap();
    m.expect_mode_within(&p, 0o755).unwrap();
    assert!(matches!(
        m.expect_mode_within(&p, 0o700),
        Err(HostPathError::Mode {
            mode: 0o750,
            allowed: 0o700,
            ..
        })
    ));
}

#[test]
fn a_file_or_socket_where_a_directory_is_expected_is_not_a_directory_not_a_link() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("file"), b"x").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(t.path().join("sock")).unwrap();
    for how in BOTH {
        for p in ["file", "file/x", "sock/x"] {
            let e = open_nofollow_with(how, &t.path().join(p), dir_flags(), Mode::empty())
                .expect_err(p);
            assert!(matches!(e, HostPathError::Io { .. }), "{how:?} {p}: {e}");
            // A socket on the way is never opened (that would answer ENXIO).
            assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{how:?} {p}: {e}");
        }
    }
    assert_eq!(
        errno(open_dir_nofollow(&t.path().join("file"))),
        Some(libc::ENOTDIR)
    );
}

#[test]
fn each_walk_is_the_one_asked_for() {
    // openat2 takes the path whole and refuses one past PATH_MAX; the fallback opens one
    // component at a time and walks it. So each result shows which walk ran.
    let t = tempfile::tempdir().unwrap();
    let (long, fd) = deep_tree(t.path(), libc::PATH_MAX as usize + 200);
    let ino = check_fd(fd.as_fd()).unwrap().ino;
    let got = open_nofollow_with(Resolver::PerComponent, &long, dir_flags(), Mode::empty())
        .expect("the fallback walks a path of any length");
    assert_eq!(check_fd(got.as_fd()).unwrap().ino, ino);
    assert_eq!(
        errno(open_nofollow_with(
            Resolver::Openat2,
            &long,
            dir_flags(),
            Mode::empty()
        )),
        Some(libc::ENAMETOOLONG),
        "openat2 was not used (this kernel has it: Linux >= 5.6)"
    );
    assert!(!NO_OPENAT2.load(Ordering::Relaxed));
}

#[test]
fn either_walk_opens_and_creates_files_with_the_mode_asked() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("a")).unwrap();
    std::fs::write(t.path().join("a/f"), b"content").unwrap();
    for how in BOTH {
        let fd = open_nofollow_with(how, &t.path().join("a/f"), OFlags::RDONLY, Mode::empty())
            .unwrap_or_else(|e| panic!("{how:?}: {e}"));
        let mut s = String::new();
        std::io::Read::read_to_string(&mut File::from(fd), &mut s).unwrap();
        assert_eq!(s, "content", "{how:?}");
        let new = t.path().join(format!("a/new-{how:?}"));
        let fd = open_nofollow_with(
            how,
            &new,
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o600),
        )
        .unwrap_or_else(|e| panic!("{how:?}: {e}"));
        assert_eq!(check_fd(fd.as_fd()).unwrap().kind, Kind::File);
        assert_eq!(mode_of(&new), 0o600, "{how:?}");
    }
}

#[test]
fn every_fd_is_close_on_exec_and_a_callers_own_flags_are_kept() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("f"), b"x").unwrap();
    symlink(t.path().join("f"), t.path().join("l")).unwrap();
    for how in BOTH {
        for flags in [OFlags::RDONLY, OFlags::RDONLY | OFlags::CLOEXEC] {
            let fd = open_nofollow_with(how, &t.path().join("f"), flags, Mode::empty()).unwrap();
            assert!(cloexec(fd.as_fd()), "{how:?} {flags:?}");
        }
        // O_NOFOLLOW given by the caller too: the link is still refused, not followed.
        let e = open_nofollow_with(
            how,
            &t.path().join("l"),
            OFlags::RDONLY | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .unwrap_err();
        assert!(matches!(e, HostPathError::Symlink { .. }), "{how:?}: {e}");
    }
}

#[test]
fn the_directory_itself_opens_with_the_flags_asked() {
    let t = tempfile::tempdir().unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    let ino = check_fd(d.as_fd()).unwrap().ino;
    let again = open_at_nofollow(d.as_fd(), Path::new(""), dir_flags(), Mode::empty()).unwrap();
    assert_eq!(check_fd(again.as_fd()).unwrap().ino, ino);
    assert!(cloexec(again.as_fd()));
    // Asked for writing, a directory is refused (the flags are the caller's, not O_RDONLY).
    assert_eq!(
        errno(open_at_nofollow(
            d.as_fd(),
            Path::new(""),
            OFlags::WRONLY,
            Mode::empty()
        )),
        Some(libc::EISDIR)
    );
    let root = open_dir_nofollow(Path::new("/")).unwrap();
    assert_eq!(
        check_fd(root.as_fd()).unwrap().ino,
        std::fs::metadata("/").unwrap().ino()
    );
}

#[test]
fn mkdirs_creates_each_component_and_refuses_links_files_and_dot_dot() {
    let t = tempfile::tempdir().unwrap();
    let d = open_dir_nofollow(t.path()).unwrap();
    let fd = mkdirs_at(d.as_fd(), Path::new("./a/./b/c"), 0o700).unwrap();
    assert!(cloexec(fd.as_fd()));
    assert_eq!(
        check_fd(fd.as_fd()).unwrap().ino,
        std::fs::metadata(t.path().join("a/b/c")).unwrap().ino()
    );
    assert_eq!(mode_of(&t.path().join("a/b/c")), 0o700);
    // An existing path is opened as it is.
    mkdirs_at(d.as_fd(), Path::new("a/b"), 0o700).unwrap();
    // Empty: the directory itself, a new close-on-exec fd.
    let same = mkdirs_at(d.as_fd(), Path::new(""), 0o700).unwrap();
    assert_eq!(
        check_fd(same.as_fd()).unwrap().ino,
        check_fd(d.as_fd()).unwrap().ino
    );
    assert!(cloexec(same.as_fd()));
    let sub = open_dir_nofollow(&t.path().join("a")).unwrap();
    for p in ["../x", "/x", "b/../../x"] {
        assert!(
            matches!(
                mkdirs_at(sub.as_fd(), Path::new(p), 0o700),
                Err(HostPathError::BadName { .. })
            ),
            "{p}"
        );
    }
    assert!(!t.path().join("x").exists());
    assert!(!t.path().join("a/x").exists());
    // A link on the way is refused and nothing is made through it.
    let target = tempfile::tempdir().unwrap();
    symlink(target.path(), t.path().join("l")).unwrap();
    assert!(matches!(
        mkdirs_at(d.as_fd(), Path::new("l/x"), 0o700),
        Err(HostPathError::Symlink { .. })
    ));
    assert!(!target.path().join("x").exists());
    // A file where a directory is asked for is not opened as one.
    std::fs::write(t.path().join("f"), b"x").unwrap();
    assert_eq!(
        errno(mkdirs_at(d.as_fd(), Path::new("f"), 0o700)),
        Some(libc::ENOTDIR)
    );
}

#[test]
fn an_export_dir_is_new_or_an_empty_one_of_ours() {
    let t = tempfile::tempdir().unwrap();
    let new = t.path().join("new");
    empty_dir(&new).unwrap();
    assert_eq!(mode_of(&new), 0o700);
    // Existing and empty, ours: accepted (again).
    empty_dir(&new).unwrap();
    let full = t.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"data").unwrap();
    assert!(matches!(
        empty_dir(&full),
        Err(HostPathError::BadName {
            what: "is not empty",
            ..
        })
    ));
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"data");
    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    assert!(matches!(
        empty_dir(&theirs),
        Err(HostPathError::Owner { uid: 65534, .. })
    ));
    // Somebody's file at the name: refused as not a directory, left as it was.
    let file = t.path().join("file");
    std::fs::write(&file, b"theirs").unwrap();
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
    assert_eq!(errno(empty_dir(&file)), Some(libc::ENOTDIR));
    assert_eq!(std::fs::read(&file).unwrap(), b"theirs");
    symlink(&new, t.path().join("link")).unwrap();
    assert!(matches!(
        empty_dir(&t.path().join("link")),
        Err(HostPathError::Symlink { .. })
    ));
}

#[test]
fn an_output_file_gets_the_mode_asked_and_an_existing_one_is_narrowed() {
    let t = tempfile::tempdir().unwrap();
    let new = t.path().join("token");
    open_output_file_mode(&new, 0o600).unwrap();
    let md = std::fs::metadata(&new).unwrap();
    assert_eq!((mode_of(&new), md.uid()), (0o600, 0));
    for (before, after) in [(0o644, 0o600), (0o044, 0o000), (0o400, 0o400)] {
        let p = t.path().join(format!("old-{before:o}"));
        std::fs::write(&p, b"secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(before)).unwrap();
        open_output_file_mode(&p, 0o600).unwrap();
        assert_eq!(mode_of(&p), after, "{before:o}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }
}

#[test]
fn an_output_file_of_the_directorys_owner_or_ours_is_accepted_and_nobody_elses() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("home");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    for (name, uid) in [("theirs", 65534), ("ours", 0), ("other", 4242)] {
        let p = dir.join(name);
        std::fs::write(&p, b"old").unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }
    for name in ["theirs", "ours"] {
        let mut f = open_output_file(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), b"new");
    }
    assert!(matches!(
        open_output_file(&dir.join("other")),
        Err(HostPathError::Owner { uid: 4242, .. })
    ));
    assert_eq!(std::fs::read(dir.join("other")).unwrap(), b"old");
}

#[test]
fn a_cache_dirs_parent_that_cannot_be_opened_is_reported_and_left_as_it_is() {
    // Only a missing parent is created; any other failure to open it (here a path past
    // PATH_MAX) is returned, and the parent is not reopened from its own parent and narrowed.
    let t = tempfile::tempdir().unwrap();
    let (gp, gpfd) = deep_tree(t.path(), libc::PATH_MAX as usize - 300);
    let pname = "p".repeat(250);
    rfs::mkdirat(&gpfd, pname.as_str(), Mode::from_raw_mode(0o755)).unwrap();
    let pfd = rfs::openat(&gpfd, pname.as_str(), dir_flags(), Mode::empty()).unwrap();
    rfs::fchmod(&pfd, Mode::from_raw_mode(0o777)).unwrap();
    let leaf = gp.join(&pname).join("etc");
    assert!(leaf.as_os_str().len() > libc::PATH_MAX as usize);
    assert_eq!(
        errno(owned_cache_dir(&leaf, 0o755)),
        Some(libc::ENAMETOOLONG)
    );
    assert_eq!(check_fd(pfd.as_fd()).unwrap().mode, 0o777);
    assert_eq!(
        rfs::statat(&pfd, "etc", rfs::AtFlags::SYMLINK_NOFOLLOW).unwrap_err(),
        Errno::NOENT
    );
}

#[test]
fn a_private_dirs_place_taken_by_a_file_is_not_a_directory_and_any_wider_mode_is_narrowed() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("file"), b"x").unwrap();
    assert_eq!(
        errno(private_dir(&t.path().join("file"))),
        Some(libc::ENOTDIR)
    );
    // Group and other bits only: none of them is left.
    let p = t.path().join("d");
    std::fs::create_dir(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o077)).unwrap();
    private_dir(&p).unwrap();
    assert_eq!(mode_of(&p), 0o000);
}

/// Set in the child process of [`where_openat2_answers_enosys_the_fallback_takes_over`].
const ENOSYS_CHILD: &str = "AITHER_HOSTPATH_TEST_OPENAT2_ENOSYS";

/// Makes openat2 answer ENOSYS on this thread (a seccomp filter without TSYNC), as on a
/// kernel before 5.6 or inside a sandbox's own filter.
fn openat2_enosys_on_this_thread() {
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        // A = seccomp_data.nr
        ins(0x20, 0, 0, 0),
        // if A == openat2: ERRNO(ENOSYS) else ALLOW
        ins(0x15, 0, 1, libc::SYS_openat2 as u32),
        ins(0x06, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ins(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    nix::sys::prctl::set_no_new_privs().expect("no_new_privs");
    // Raw: nix 0.30 and rustix 1 have no seccomp.
    // SAFETY: `fprog` points at a valid program that outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "seccomp: {}", io::Error::last_os_error());
}

#[test]
fn where_openat2_answers_enosys_the_fallback_takes_over() {
    if std::env::var_os(ENOSYS_CHILD).is_none() {
        // The parent: NO_OPENAT2 is process-wide, so the check runs in a process of its own.
        let name = "hostpath::tests::where_openat2_answers_enosys_the_fallback_takes_over";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1"])
            .env(ENOSYS_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child failed or did not run:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    openat2_enosys_on_this_thread();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("real")).unwrap();
    std::fs::write(t.path().join("real/f"), b"x").unwrap();
    symlink(t.path().join("real"), t.path().join("dirlink")).unwrap();
    symlink(t.path().join("real/f"), t.path().join("filelink")).unwrap();
    assert!(!NO_OPENAT2.load(Ordering::Relaxed));
    let fd = open_nofollow(&t.path().join("real/f"), OFlags::RDONLY, Mode::empty())
        .expect("the first open after ENOSYS falls back");
    assert!(NO_OPENAT2.load(Ordering::Relaxed));
    assert_eq!(check_fd(fd.as_fd()).unwrap().kind, Kind::File);
    for p in ["dirlink/f", "filelink"] {
        assert!(
            matches!(
                open_nofollow(&t.path().join(p), OFlags::RDONLY, Mode::empty()),
                Err(HostPathError::Symlink { .. })
            ),
            "{p}"
        );
    }
    // Past PATH_MAX: only the fallback walks it, so it is the one in use.
    let (long, _) = deep_tree(t.path(), libc::PATH_MAX as usize + 200);
    open_dir_nofollow(&long).unwrap();
}
