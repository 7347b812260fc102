//! Making the tar stream sent into an agent from host files, opened with the caller's own
//! privileges: the source path is resolved without following a link anywhere in it, and
//! below it every entry is opened from its directory's fd with `O_NOFOLLOW` (a link is sent
//! as a link, never followed). Set-id and sticky bits are not sent.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

use super::tar::{EntryKind, Header, Writer};
use super::CopyError;
use crate::hostpath;

/// Directories deeper than this are refused (each level holds an fd).
pub const MAX_DEPTH: usize = 128;

/// Sends `src` (opened without links) as the member `top`, or with `top` `None` the
/// contents of the directory `src`. Device nodes, fifos and sockets are skipped and named
/// in `skipped`.
pub fn pack<W: Write>(
    src: &Path,
    top: Option<&OsStr>,
    w: &mut Writer<W>,
    skipped: &mut Vec<String>,
) -> Result<(), CopyError> {
    let fd = hostpath::open_nofollow(
        src,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rfs::fstat(&fd).map_err(|e| CopyError::io(src, "reading", e))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let mut p = Packer { w, skipped };
    match (top, kind) {
        (None, FileType::Directory) => p.dir_contents(fd.as_fd(), src, b"", 0),
        (None, _) => Err(CopyError::io(
            src,
            "copying its contents (`/.`)",
            std::io::Error::from_raw_os_error(libc::ENOTDIR),
        )),
        (Some(name), _) => p.one(fd, st, src, name.as_bytes(), 0),
    }
}

struct Packer<'a, W: Write> {
    w: &'a mut Writer<W>,
    skipped: &'a mut Vec<String>,
}

fn header(path: &[u8], kind: EntryKind, st: &rfs::Stat, link: Vec<u8>) -> Header {
    Header {
        path: path.to_vec(),
        kind,
        mode: st.st_mode & 0o777,
        size: if kind == EntryKind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime: st.st_mtime,
        link,
    }
}

impl<W: Write> Packer<'_, W> {
    /// One opened file or directory, sent as `member`.
    fn one(
        &mut self,
        fd: OwnedFd,
        st: rfs::Stat,
        shown: &Path,
        member: &[u8],
        depth: usize,
    ) -> Result<(), CopyError> {
        let wr = |e| CopyError::io(shown, "sending", e);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                self.w
                    .header(&header(member, EntryKind::File, &st, vec![]))
                    .map_err(wr)?;
                self.w
                    .data(&mut File::from(fd), st.st_size as u64)
                    .map_err(wr)
            }
            FileType::Directory => {
                let mut name = member.to_vec();
                name.push(b'/');
                self.w
                    .header(&header(&name, EntryKind::Dir, &st, vec![]))
                    .map_err(wr)?;
                self.dir_contents(fd.as_fd(), shown, &name, depth)
            }
            _ => {
                self.skipped.push(format!(
                    "{}: not copied: not a file, directory or link",
                    shown.display()
                ));
                Ok(())
            }
        }
    }

    /// The entries of the directory `dir`, each named `prefix` + its name.
    fn dir_contents(
        &mut self,
        dir: BorrowedFd<'_>,
        shown: &Path,
        prefix: &[u8],
        depth: usize,
    ) -> Result<(), CopyError> {
        if depth >= MAX_DEPTH {
            return Err(CopyError::io(
                shown,
                "copying (directories nested too deep)",
                std::io::Error::from_raw_os_error(libc::ELOOP),
            ));
        }
        let mut names: Vec<Vec<u8>> = Vec::new();
        let it = rfs::Dir::read_from(dir).map_err(|e| CopyError::io(shown, "listing", e))?;
        for e in it {
            let e = e.map_err(|e| CopyError::io(shown, "listing", e))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort();
        for n in names {
            let name = OsStr::from_bytes(&n);
            let path = shown.join(name);
            let mut member = prefix.to_vec();
            member.extend_from_slice(&n);
            self.child(dir, name, &path, &member, depth)?;
        }
        Ok(())
    }

    fn child(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        member: &[u8],
        depth: usize,
    ) -> Result<(), CopyError> {
        let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| CopyError::io(path, "reading", e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let target = rfs::readlinkat(dir, name, Vec::new())
                    .map_err(|e| CopyError::io(path, "reading the link", e))?;
                self.w
                    .header(&header(
                        member,
                        EntryKind::Symlink,
                        &st,
                        target.into_bytes(),
                    ))
                    .map_err(|e| CopyError::io(path, "sending", e))
            }
            FileType::RegularFile | FileType::Directory => {
                // Opened without following a link; what it is now is what is sent (a name
                // swapped since the statat is sent as what the fd is).
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY
                        | OFlags::NOFOLLOW
                        | OFlags::NONBLOCK
                        | OFlags::NOCTTY
                        | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| CopyError::io(path, "opening", e))?;
                let st = rfs::fstat(&fd).map_err(|e| CopyError::io(path, "reading", e))?;
                self.one(fd, st, path, member, depth + 1)
            }
            _ => {
                self.skipped.push(format!(
                    "{}: not copied: a device node, fifo or socket",
                    path.display()
                ));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::tar::Reader;

    #[test]
    fn a_directory_is_sent_with_its_links_as_links_and_without_set_id_bits() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "data").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(src.join("f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("l")).unwrap();
        let mut w = Writer::new(Vec::new());
        let mut skipped = vec![];
        pack(&src, Some(OsStr::new("dst")), &mut w, &mut skipped).unwrap();
        let s = w.finish().unwrap();
        let mut r = Reader::new(&s[..]);
        let mut got = vec![];
        while let Some(h) = r.next_entry().unwrap() {
            got.push((String::from_utf8(h.path).unwrap(), h.kind, h.mode, h.link));
        }
        assert_eq!(got[0].0, "dst/");
        assert_eq!(got[1], ("dst/f".into(), EntryKind::File, 0o755, vec![]));
        assert_eq!(
            got[2],
            (
                "dst/l".into(),
                EntryKind::Symlink,
                0o777,
                b"/etc/shadow".to_vec()
            )
        );
        // A link as the source itself is refused, not followed.
        let e = pack(
            &src.join("l"),
            Some(OsStr::new("x")),
            &mut Writer::new(Vec::new()),
            &mut skipped,
        );
        assert!(e.unwrap_err().to_string().contains("symbolic link"));
    }
}
