//! The tar format, as much as `aitherctl cp` needs: a reader for the stream an agent sends
//! (hostile: every field is checked, every length bounded) and a writer for the stream sent to
//! an agent. ustar and GNU headers, GNU long names (`L`, `K`) and pax `path`/`linkpath`/`size`
//! records; sparse files, multi-volume and other extensions are refused.

use std::io::{self, Read, Write};

/// A tar block.
pub const BLOCK: usize = 512;

/// The longest name (GNU `L`/`K` entry or pax record) accepted from a stream.
pub const MAX_NAME: u64 = 64 * 1024;

/// The largest pax extended header accepted from a stream.
pub const MAX_PAX: u64 = 1024 * 1024;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One entry's header, long names and pax records applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The member's name as the stream gives it (bytes; never a host path as it is).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits as sent (`st_mode & 07777`); the reader's user decides what to keep.
    pub mode: u32,
    /// Bytes of data that follow (files only; 0 for the others).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// A link's target (symbolic or hard).
    pub link: Vec<u8>,
}

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("tar stream: {0}")]
    Io(#[from] io::Error),
    #[error("tar stream: truncated at byte {0}")]
    Truncated(u64),
    #[error("tar stream: the header at byte {0} has a wrong checksum (not a tar stream?)")]
    Checksum(u64),
    #[error("tar stream: the {field} of the header at byte {at} is not a number")]
    Number { field: &'static str, at: u64 },
    #[error("tar stream: entry type {kind:?} at byte {at} is not supported")]
    Type { kind: char, at: u64 },
    #[error("tar stream: a {what} of {size} bytes at byte {at} (at most {max} accepted)")]
    TooLong {
        what: &'static str,
        size: u64,
        max: u64,
        at: u64,
    },
    #[error("tar stream: a malformed pax record at byte {0}")]
    Pax(u64),
}

/// Bytes of padding after `size` bytes of data.
fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads entries one after the other; each entry's data is read (or skipped) before the next.
pub struct Reader<R> {
    r: R,
    /// Bytes consumed so far (for messages).
    pos: u64,
    /// Data bytes of the current entry not yet read.
    left: u64,
    /// Padding after them.
    pad: u64,
}

/// Extensions that apply to the next real header.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
}

impl<R: Read> Reader<R> {
    pub fn new(r: R) -> Self {
        Reader {
            r,
            pos: 0,
            left: 0,
            pad: 0,
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(self.pos + got as u64)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += got as u64;
        Ok(true)
    }

    /// Skips what is left of the current entry's data and padding.
    fn skip(&mut self) -> Result<(), TarError> {
        let mut n = self.left + self.pad;
        self.left = 0;
        self.pad = 0;
        let mut buf = [0u8; BLOCK * 8];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            if !self.fill(&mut buf[..k])? {
                return Err(TarError::Truncated(self.pos));
            }
            n -= k as u64;
        }
        Ok(())
    }

    /// The data of an extension entry (long name, pax), bounded by `max`.
    fn small(&mut self, size: u64, max: u64, what: &'static str) -> Result<Vec<u8>, TarError> {
        if size > max {
            return Err(TarError::TooLong {
                what,
                size,
                max,
                at: self.pos,
            });
        }
        let mut v = vec![0u8; size as usize];
        if size > 0 && !self.fill(&mut v)? {
            return Err(TarError::Truncated(self.pos));
        }
        self.left = 0;
        self.pad = padding(size);
        self.skip()?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive (a zero block, or EOF where a
    /// header would start).
    /// The underlying reader, where the stream stopped being read.
    pub fn into_inner(self) -> R {
        self.r
    }

    pub fn next_entry(&mut self) -> Result<Option<Header>, TarError> {
        self.skip()?;
        let mut pending = Pending::default();
        loop {
            let at = self.pos;
            let mut b = [0u8; BLOCK];
            if !self.fill(&mut b)? || b.iter().all(|&x| x == 0) {
                return Ok(None);
            }
            check_sum(&b, at)?;
            let size = number(&b[124..136], "size", at)?;
            let flag = b[156];
            match flag {
                b'L' => {
                    pending.path = Some(trim_nul(self.small(size, MAX_NAME, "long name")?));
                    continue;
                }
                b'K' => {
                    pending.link = Some(trim_nul(self.small(size, MAX_NAME, "long link")?));
                    continue;
                }
                b'x' => {
                    let data = self.small(size, MAX_PAX, "pax header")?;
                    pax(&data, &mut pending, at)?;
                    continue;
                }
                b'g' => {
                    self.small(size, MAX_PAX, "pax global header")?;
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' => EntryKind::File,
                b'1' => EntryKind::HardLink,
                b'2' => EntryKind::Symlink,
                b'3' => EntryKind::CharDevice,
                b'4' => EntryKind::BlockDevice,
                b'5' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                other => {
                    return Err(TarError::Type {
                        kind: other as char,
                        at,
                    })
                }
            };
            let size = pending.size.unwrap_or(size);
            let size = if kind == EntryKind::File { size } else { 0 };
            let path = pending.path.take().unwrap_or_else(|| ustar_name(&b));
            let link = pending
                .link
                .take()
                .unwrap_or_else(|| trim_nul(b[157..257].to_vec()));
            self.left = size;
            self.pad = padding(size);
            return Ok(Some(Header {
                path,
                kind,
                mode: number(&b[100..108], "mode", at)? as u32 & 0o7777,
                size,
                mtime: number(&b[136..148], "mtime", at)? as i64,
                link,
            }));
        }
    }

    /// Copies the current entry's data to `w` (all of it).
    pub fn copy_data(&mut self, w: &mut impl Write) -> Result<u64, TarError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        while self.left > 0 {
            let k = self.left.min(buf.len() as u64) as usize;
            if !self.fill(&mut buf[..k])? {
                return Err(TarError::Truncated(self.pos));
            }
            w.write_all(&buf[..k])?;
            self.left -= k as u64;
            n += k as u64;
        }
        Ok(n)
    }
}

/// The name of a header: ustar's prefix and name (the prefix only in POSIX ustar headers;
/// GNU headers keep other fields there).
fn ustar_name(b: &[u8; BLOCK]) -> Vec<u8> {
    let name = trim_nul(b[0..100].to_vec());
    if &b[257..263] == b"ustar\0" && b[345] != 0 {
        let mut p = trim_nul(b[345..500].to_vec());
        p.push(b'/');
        p.extend_from_slice(&name);
        return p;
    }
    name
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|&c| c == 0) {
        v.truncate(i);
    }
    v
}

fn check_sum(b: &[u8; BLOCK], at: u64) -> Result<(), TarError> {
    let want = number(&b[148..156], "checksum", at)?;
    let sum: u64 = b
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                32
            } else {
                c as u64
            }
        })
        .sum();
    if sum != want {
        return Err(TarError::Checksum(at));
    }
    Ok(())
}

/// An octal field (spaces and NULs around it), or GNU base-256 (high bit of the first byte).
fn number(f: &[u8], field: &'static str, at: u64) -> Result<u64, TarError> {
    let bad = || TarError::Number { field, at };
    if f.first().is_some_and(|&c| c & 0x80 != 0) {
        if f[0] & 0x40 != 0 {
            return Err(bad()); // negative
        }
        let mut n: u64 = (f[0] & 0x3f) as u64;
        for &c in &f[1..] {
            n = n.checked_mul(256).ok_or_else(bad)? | c as u64;
        }
        return Ok(n);
    }
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&c| c == b' ')
        .take_while(|&c| c != 0 && c != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&s).map_err(|_| bad())?;
    u64::from_str_radix(s, 8).map_err(|_| bad())
}

/// pax records: `LEN KEY=VALUE\n`, LEN counting the whole record.
fn pax(mut data: &[u8], p: &mut Pending, at: u64) -> Result<(), TarError> {
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&c| c == b' ')
            .ok_or(TarError::Pax(at))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(TarError::Pax(at))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(TarError::Pax(at));
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or(TarError::Pax(at))?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        match k {
            b"path" => p.path = Some(v.to_vec()),
            b"linkpath" => p.link = Some(v.to_vec()),
            b"size" => {
                let s = std::str::from_utf8(v).map_err(|_| TarError::Pax(at))?;
                p.size = Some(s.parse().map_err(|_| TarError::Pax(at))?);
            }
            _ => {}
        }
        data = &data[len..];
    }
    Ok(())
}

/// Writes a GNU tar stream.
pub struct Writer<W> {
    w: W,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Self {
        Writer { w }
    }

    /// A header (with a GNU long-name entry first where a name is over 100 bytes); for a file
    /// the caller then writes exactly `h.size` bytes with [`Writer::data`].
    pub fn header(&mut self, h: &Header) -> io::Result<()> {
        if h.path.len() > 100 {
            self.long(b'L', &h.path)?;
        }
        if h.link.len() > 100 {
            self.long(b'K', &h.link)?;
        }
        let flag = match h.kind {
            EntryKind::File => b'0',
            EntryKind::HardLink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::CharDevice => b'3',
            EntryKind::BlockDevice => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        };
        let size = if h.kind == EntryKind::File { h.size } else { 0 };
        let b = raw_header(&h.path, &h.link, flag, h.mode, size, h.mtime.max(0) as u64);
        self.w.write_all(&b)
    }

    fn long(&mut self, flag: u8, name: &[u8]) -> io::Result<()> {
        let mut data = name.to_vec();
        data.push(0);
        let b = raw_header(b"././@LongLink", b"", flag, 0o644, data.len() as u64, 0);
        self.w.write_all(&b)?;
        self.w.write_all(&data)?;
        self.w
            .write_all(&[0u8; BLOCK][..padding(data.len() as u64) as usize])
    }

    /// Exactly `size` bytes of `r` (zeros if it ends early, the rest ignored if it grows:
    /// the header already said the size), then the padding.
    pub fn data(&mut self, r: &mut impl Read, size: u64) -> io::Result<()> {
        let n = io::copy(&mut r.take(size), &mut self.w)?;
        let mut short = size - n;
        let zeros = [0u8; BLOCK];
        while short > 0 {
            let k = short.min(BLOCK as u64) as usize;
            self.w.write_all(&zeros[..k])?;
            short -= k as u64;
        }
        self.w.write_all(&zeros[..padding(size) as usize])
    }

    /// The end of the archive (two zero blocks).
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; BLOCK * 2])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

fn octal(field: &mut [u8], n: u64) {
    let digits = field.len() - 1;
    let s = format!("{n:0digits$o}");
    if s.len() <= digits {
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        // GNU base-256 for what octal cannot hold.
        field.fill(0);
        field[0] = 0x80;
        let bytes = n.to_be_bytes();
        let k = field.len();
        field[k - 8..].copy_from_slice(&bytes);
    }
}

fn raw_header(path: &[u8], link: &[u8], flag: u8, mode: u32, size: u64, mtime: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let n = path.len().min(100);
    b[..n].copy_from_slice(&path[..n]);
    octal(&mut b[100..108], (mode & 0o7777) as u64);
    octal(&mut b[108..116], 0);
    octal(&mut b[116..124], 0);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime);
    b[156] = flag;
    let l = link.len().min(100);
    b[157..157 + l].copy_from_slice(&link[..l]);
    b[257..265].copy_from_slice(b"ustar  \0");
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|&c| c as u64).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(path: &str, kind: EntryKind, size: u64) -> Header {
        Header {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o4755,
            size,
            mtime: 1_700_000_000,
            link: if kind == EntryKind::Symlink {
                b"/etc".to_vec()
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads_back_long_names_included() {
        let long = format!("d/{}", "x".repeat(200));
        let mut w = Writer::new(Vec::new());
        w.header(&h("d", EntryKind::Dir, 0)).unwrap();
        w.header(&h(&long, EntryKind::File, 5)).unwrap();
        w.data(&mut &b"hello"[..], 5).unwrap();
        w.header(&h("d/l", EntryKind::Symlink, 0)).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = Reader::new(&bytes[..]);
        assert_eq!(r.next_entry().unwrap().unwrap().kind, EntryKind::Dir);
        let f = r.next_entry().unwrap().unwrap();
        assert_eq!((f.path, f.size, f.mode), (long.into_bytes(), 5, 0o4755));
        let mut data = Vec::new();
        r.copy_data(&mut data).unwrap();
        assert_eq!(data, b"hello");
        let l = r.next_entry().unwrap().unwrap();
        assert_eq!((l.kind, l.link), (EntryKind::Symlink, b"/etc".to_vec()));
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn gnu_tars_own_stream_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let long = "y".repeat(150);
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a").join(&long), "data").unwrap();
        let out = std::process::Command::new("tar")
            .args(["-c", "-f", "-", "-C"])
            .arg(dir.path())
            .arg("./a")
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut r = Reader::new(&out.stdout[..]);
        let mut names = vec![];
        while let Some(e) = r.next_entry().unwrap() {
            names.push(String::from_utf8(e.path).unwrap());
        }
        assert_eq!(names, ["./a/", &format!("./a/{long}")]);
    }

    #[test]
    fn a_bad_checksum_a_truncated_stream_and_an_oversized_long_name_are_errors() {
        let mut w = Writer::new(Vec::new());
        w.header(&h("f", EntryKind::File, 700)).unwrap();
        w.data(&mut &[1u8; 700][..], 700).unwrap();
        let good = w.finish().unwrap();
        let mut bad = good.clone();
        bad[0] = b'g';
        assert!(matches!(
            Reader::new(&bad[..]).next_entry(),
            Err(TarError::Checksum(0))
        ));
        let mut r = Reader::new(&good[..600]);
        r.next_entry().unwrap();
        assert!(matches!(
            r.copy_data(&mut Vec::new()),
            Err(TarError::Truncated(_))
        ));
        let mut w = Writer::new(Vec::new());
        let huge = "z".repeat(MAX_NAME as usize + 1);
        w.header(&h(&huge, EntryKind::File, 0)).unwrap();
        let s = w.finish().unwrap();
        assert!(matches!(
            Reader::new(&s[..]).next_entry(),
            Err(TarError::TooLong { .. })
        ));
    }

    #[test]
    fn pax_path_and_size_apply_to_the_next_entry() {
        let mut p = Pending::default();
        pax(b"13 path=/abs\n11 size=42\n", &mut p, 0).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"/abs"[..]));
        assert_eq!(p.size, Some(42));
        assert!(pax(b"99 path=x\n", &mut Pending::default(), 0).is_err());
    }
}
