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
