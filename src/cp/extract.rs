//! Writing a tar stream from an agent below a host directory (see the module above for the
//! rules). Everything is done relative to the destination's fd, as the calling user.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, Timespec, Timestamps};

use super::tar::{EntryKind, Header, Reader};
use super::{shown, CopyError};
use crate::hostpath;

/// How the stream's names map below the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Names {
    /// Every member must be `FROM` or below it; that first component becomes `TO`
    /// (`cp agent:/w/report.txt ./saved.txt`; `FROM` = `TO` copies into a directory).
    Top { from: OsString, to: OsString },
    /// The members are a directory's contents (`cp agent:/w/dir/. ./here`).
    Contents,
}

/// Writes members below `root` (an fd of a directory opened without links).
pub struct Extractor {
    root: OwnedFd,
    /// The destination as the user gave it (for messages).
    dest: PathBuf,
    names: Names,
    /// Members not copied (device nodes, fifos), with why.
    pub skipped: Vec<String>,
    /// Members written.
    pub written: usize,
}

/// The relative path of a member: `.` and empty components dropped, `..` and absolute names
/// refused (never "sanitised" into another name).
pub fn member_path(name: &[u8]) -> Result<PathBuf, CopyError> {
    let refused = |why| CopyError::Refused {
        member: shown(name),
        why,
    };
    if name.first() == Some(&b'/') {
        return Err(refused("an absolute name"));
    }
    if name.contains(&0) {
        return Err(refused("a NUL byte in the name"));
    }
    let mut p = PathBuf::new();
    for c in name.split(|&c| c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(refused("a '..' component in the name")),
            c => p.push(OsStr::from_bytes(c)),
        }
    }
    Ok(p)
}

impl Extractor {
    pub fn new(root: OwnedFd, dest: PathBuf, names: Names) -> Self {
        Extractor {
            root,
            dest,
            names,
            skipped: vec![],
            written: 0,
        }
    }

    /// Where a member goes, relative to the root (empty: the root itself).
    fn target(&self, name: &[u8]) -> Result<PathBuf, CopyError> {
        let rel = member_path(name)?;
        let Names::Top { from, to } = &self.names else {
            return Ok(rel);
        };
        let mut comps = rel.components();
        match comps.next() {
            Some(c) if c.as_os_str() == from.as_os_str() => Ok(Path::new(to).join(comps.as_path())),
            _ => Err(CopyError::Refused {
                member: shown(name),
                why: "outside the path that was asked for",
            }),
        }
    }

    /// Writes one member; a file's data is read from `r`.
    pub fn entry<R: Read>(&mut self, h: &Header, r: &mut Reader<R>) -> Result<(), CopyError> {
        let rel = self.target(&h.path)?;
        let shown_path = self.dest.join(&rel);
        let perm = h.mode & 0o777;
        match h.kind {
            EntryKind::Dir => {
                if !rel.as_os_str().is_empty() {
                    hostpath::mkdirs_at(self.root.as_fd(), &rel, perm | 0o700)
                        .map_err(|e| in_dest(e, &shown_path))?;
                }
            }
            EntryKind::File | EntryKind::Symlink => {
                let (parent, name) = self.parent_of(&rel, &h.path, &shown_path)?;
                if h.kind == EntryKind::File {
                    write_file(parent.as_fd(), &name, perm, h, r, &shown_path)?;
                } else {
                    write_link(parent.as_fd(), &name, &h.link, &shown_path)?;
                }
            }
            EntryKind::HardLink => {
                return Err(CopyError::Refused {
                    member: shown(&h.path),
                    why: "a hard link (the agent side sends none: its target could name any \
                          host file)",
                })
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                self.skipped.push(format!(
                    "{}: not copied: a device node or fifo",
                    shown_path.display()
                ));
                return Ok(());
            }
        }
        self.written += 1;
        Ok(())
    }

    /// The directory a member goes in (created as needed, no link followed) and its name.
    fn parent_of(
        &self,
        rel: &Path,
        member: &[u8],
        shown_path: &Path,
    ) -> Result<(OwnedFd, OsString), CopyError> {
        let name = rel.file_name().ok_or_else(|| CopyError::Refused {
            member: shown(member),
            why: "a file named as the destination directory itself",
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let fd = hostpath::mkdirs_at(self.root.as_fd(), parent, 0o755)
            .map_err(|e| in_dest(e, shown_path))?;
        Ok((fd, name.to_owned()))
    }
}

/// A hostpath error with the member's full host path (its own names only the part below).
fn in_dest(e: hostpath::HostPathError, shown_path: &Path) -> CopyError {
    match e {
        hostpath::HostPathError::Symlink { .. } => {
            CopyError::Host(hostpath::HostPathError::Symlink {
                path: shown_path.to_owned(),
            })
        }
        hostpath::HostPathError::Io { op, source, .. } => CopyError::io(shown_path, op, source),
        other => CopyError::Host(other),
    }
}

/// A temporary name beside `name` in the same directory.
fn tmp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".aither-cp.{}", std::process::id()));
    t
}

/// Puts `tmp` in place of `name` (a link at `name` is replaced, never followed); `tmp` is
/// removed if that fails.
fn rename_into(
    dir: BorrowedFd<'_>,
    tmp: &OsStr,
    name: &OsStr,
    shown_path: &Path,
) -> Result<(), CopyError> {
    rfs::renameat(dir, tmp, dir, name).map_err(|e| {
        let _ = rfs::unlinkat(dir, tmp, AtFlags::empty());
        CopyError::io(shown_path, "replacing", e)
    })
}

fn write_file<R: Read>(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    perm: u32,
    h: &Header,
    r: &mut Reader<R>,
    shown_path: &Path,
) -> Result<(), CopyError> {
    let tmp = tmp_name(name);
    let _ = rfs::unlinkat(dir, &tmp, AtFlags::empty());
    let fd = hostpath::create_file_excl_at(dir, &tmp, 0o600).map_err(|e| in_dest(e, shown_path))?;
    let mut f = File::from(fd);
    let res = r.copy_data(&mut f).map_err(CopyError::from).and_then(|_| {
        f.flush()
            .and_then(|()| rfs::fchmod(&f, Mode::from_raw_mode(perm)).map_err(Into::into))
            .map_err(|e| CopyError::io(shown_path, "writing", e))
    });
    if let Err(e) = res {
        let _ = rfs::unlinkat(dir, &tmp, AtFlags::empty());
        return Err(e);
    }
    let t = Timespec {
        tv_sec: h.mtime,
        tv_nsec: 0,
    };
    let _ = rfs::futimens(
        &f,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    );
    rename_into(dir, &tmp, name, shown_path)
}

fn write_link(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    target: &[u8],
    shown_path: &Path,
) -> Result<(), CopyError> {
    if target.is_empty() || target.contains(&0) {
        return Err(CopyError::Refused {
            member: shown_path.display().to_string(),
            why: "a link with an empty or NUL-bearing target",
        });
    }
    let tmp = tmp_name(name);
    let _ = rfs::unlinkat(dir, &tmp, AtFlags::empty());
    let target = OsString::from_vec(target.to_vec());
    rfs::symlinkat(&target, dir, &tmp)
        .map_err(|e| CopyError::io(shown_path, "creating the link", e))?;
    rename_into(dir, &tmp, name, shown_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::tar::Writer;
    use std::os::unix::fs::PermissionsExt;

    fn stream(entries: &[(&str, EntryKind, &str, u32)]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        for (path, kind, data, mode) in entries {
            let link = if matches!(kind, EntryKind::Symlink | EntryKind::HardLink) {
                data.as_bytes().to_vec()
            } else {
                vec![]
            };
            let size = if *kind == EntryKind::File {
                data.len() as u64
            } else {
                0
            };
            w.header(&Header {
                path: path.as_bytes().to_vec(),
                kind: *kind,
                mode: *mode,
                size,
                mtime: 0,
                link,
            })
            .unwrap();
            if *kind == EntryKind::File {
                w.data(&mut data.as_bytes(), size).unwrap();
            }
        }
        w.finish().unwrap()
    }

    /// Extracts all of `s` into `dir`; the first error stops it.
    fn extract(dir: &Path, names: Names, s: &[u8]) -> Result<Extractor, CopyError> {
        let fd = hostpath::open_dir_nofollow(dir).unwrap();
        let mut x = Extractor::new(fd, dir.to_owned(), names);
        let mut r = Reader::new(s);
        while let Some(h) = r.next_entry()? {
            x.entry(&h, &mut r)?;
        }
        Ok(x)
    }

    fn top(from: &str, to: &str) -> Names {
        Names::Top {
            from: from.into(),
            to: to.into(),
        }
    }

    use EntryKind::*;

    #[test]
    fn files_directories_and_links_are_written_renamed_and_set_id_bits_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = stream(&[
            ("./src/", Dir, "", 0o755),
            ("./src/a.txt", File, "alpha", 0o6755),
            ("./src/sub/b", File, "beta", 0o644),
            ("./src/l", Symlink, "a.txt", 0o777),
        ]);
        let x = extract(d.path(), top("src", "dst"), &s).unwrap();
        assert_eq!(x.written, 4);
        let a = d.path().join("dst/a.txt");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "alpha");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("dst/sub/b")).unwrap(),
            "beta"
        );
        assert_eq!(
            std::fs::read_link(d.path().join("dst/l")).unwrap(),
            Path::new("a.txt")
        );
    }

    #[test]
    fn absolute_names_dotdot_hard_links_and_other_tops_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for (name, kind, why) in [
            ("/etc/evil", File, "absolute"),
            ("./src/../../evil", File, "'..'"),
            ("src/../evil", File, "'..'"),
            ("./other/evil", File, "outside"),
            ("./src/h", HardLink, "hard link"),
        ] {
            let s = stream(&[(name, kind, "/etc/shadow", 0o644)]);
            let e = extract(d.path(), top("src", "src"), &s)
                .err()
                .expect(name)
                .to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "nothing written"
        );
    }

    #[test]
    fn nothing_is_written_through_a_link_of_the_stream_or_of_the_host() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let o = outside.path().to_str().unwrap();
        // The stream makes a link, then writes through it (as a directory and as a file).
        let s = stream(&[
            ("src/", Dir, "", 0o755),
            ("src/out", Symlink, o, 0o777),
            ("src/out/planted", File, "x", 0o644),
        ]);
        let e = extract(d.path(), top("src", "src"), &s)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let s = stream(&[
            ("src/f", Symlink, &format!("{o}/f"), 0o777),
            ("src/f", File, "x", 0o644),
        ]);
        extract(d.path(), top("src", "src"), &s).unwrap();
        // The file replaced the link; nothing went where it pointed.
        assert!(!std::fs::symlink_metadata(d.path().join("src/f"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A link already on the host, in the destination.
        std::os::unix::fs::symlink(outside.path(), d.path().join("src/host-link")).unwrap();
        let s = stream(&[("src/host-link/x", File, "x", 0o644)]);
        assert!(extract(d.path(), top("src", "src"), &s).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn devices_and_fifos_are_skipped_and_named() {
        let d = tempfile::tempdir().unwrap();
        let s = stream(&[("p", Fifo, "", 0o644), ("n", CharDevice, "", 0o666)]);
        let x = extract(d.path(), Names::Contents, &s).unwrap();
        assert_eq!(x.skipped.len(), 2);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
