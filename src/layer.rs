//! The changes in a layered workspace (docs/workspaces.md): what `aitherctl diff` shows and
//! `aitherctl apply` copies into the user's directory.
//!
//! [`scan`] compares the agent's upper layer with the directory (the lower layer), both as
//! descriptors, walking entries with `*at` calls that follow no link: a whiteout (a 0/0
//! character device) is a removal, an opaque directory (`user.overlay.opaque`) hides every
//! lower entry below it, and a file, link or directory of the upper layer is an addition or,
//! where the lower one differs in type, mode, content or link target, a change. Renames show
//! as a removal and an addition (the overlay has no redirects: sandbox::layer).
//!
//! [`apply`] writes as whoever calls it (aitherctl: the caller, or for root the directory's
//! owner), beneath the directory's descriptor: parents are opened one component at a time
//! without following a link, files are made `O_EXCL` beside their name and renamed over it,
//! links are recreated as links, and modes lose set-id and sticky bits. Nothing is written
//! through a link, neither the agent's nor one already in the directory.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::Serialize;

use crate::hostpath;

/// Text files up to this size get a unified diff; larger ones, and binary ones, a summary.
pub const MAX_TEXT_DIFF: u64 = 1 << 20;

/// Why a scan or an apply stopped.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Host(#[from] hostpath::HostPathError),
    #[error(transparent)]
    Layer(#[from] crate::sandbox::layer::LayerError),
    #[error("{} would be applied, and the host runs such files by itself (git hooks and config, direnv, editor tasks…); review them with `aitherctl diff`, then apply with --allow-host-run", list(.paths))]
    HostRun { paths: Vec<String> },
    #[error("{path}: no change of the agent's is at or below this path")]
    NoSuchChange { path: String },
}

fn list(p: &[String]) -> String {
    let mut s = p.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if p.len() > 5 {
        s.push_str(&format!(" and {} more", p.len() - 5));
    }
    s
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> ChangeError + 'a {
    move |e| ChangeError::Io {
        path: path.into(),
        op,
        source: e.into(),
    }
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device node: shown, never applied.
    Other,
}

/// One side of a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    pub kind: Kind,
    /// Permission bits (set-id and sticky included, as found).
    pub mode: u32,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    Added,
    Changed,
    Removed,
}

/// One change of the agent's, at `path` relative to the workspace.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// As text (names that are not UTF-8 shown lossily; `raw` is exact).
    pub path: String,
    #[serde(skip)]
    pub raw: PathBuf,
    pub change: What,
    /// The directory's entry before (changed, removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Side>,
    /// The agent's entry (added, changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Side>,
    /// A file the host runs by itself (`apply` needs --allow-host-run).
    pub host_run: bool,
}

/// Paths the host runs without anyone asking for a build or a run: git reads `.git/config`
/// and runs `.git/hooks` at the owner's next `git status` or `commit` (at any depth: a nested
/// repository is one too), direnv loads `.envrc` on `cd`, editors run `.vscode`/`.idea` tasks
/// and dev containers on open, `.gitmodules` and `.gitattributes` name commands and filters.
/// Build files (Makefile, package.json, build.rs…) run when the user builds: they are code
/// to review in the diff like any other, not in this list (docs/workspaces.md).
const HOST_RUN_DIRS: &[&str] = &[".git", ".vscode", ".idea", ".devcontainer", ".husky"];
const HOST_RUN_FILES: &[&str] = &[".envrc", ".gitmodules", ".gitattributes", ".git"];

/// Whether `rel` is (or is below) a file the host runs by itself.
pub fn is_host_run(rel: &Path) -> bool {
    let comps: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((last, dirs)) = comps.split_last() else {
        return false;
    };
    dirs.iter()
        .any(|d| HOST_RUN_DIRS.iter().any(|h| OsStr::new(h) == *d))
        || HOST_RUN_FILES.iter().any(|h| OsStr::new(h) == *last)
        || HOST_RUN_DIRS.iter().any(|h| OsStr::new(h) == *last)
}

fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<rustix::fs::Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

fn kind_of(st: &rustix::fs::Stat) -> Kind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

fn side(dir: BorrowedFd<'_>, name: &OsStr, st: &rustix::fs::Stat) -> Side {
    let kind = kind_of(st);
    let target = (kind == Kind::Symlink)
        .then(|| rustix::fs::readlinkat(dir, name, Vec::new()).ok())
        .flatten()
        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned());
    Side {
        kind,
        mode: st.st_mode & 0o7777,
        size: st.st_size as u64,
        target,
    }
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(rustix::io::Errno::INVAL);
    }
    Ok(std::fs::File::from(fd))
}

fn names(dir: BorrowedFd<'_>, shown: &Path) -> Result<Vec<OsString>, ChangeError> {
    let d = open_dir_at(dir, OsStr::new(".")).map_err(io_err(shown, "opening"))?;
    let mut it = rustix::fs::Dir::read_from(&d).map_err(io_err(shown, "reading"))?;
    let mut v = Vec::new();
    while let Some(e) = it.read() {
        let e = e.map_err(io_err(shown, "reading"))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            v.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    v.sort();
    Ok(v)
}

fn opaque(dir: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 4];
    matches!(
        rustix::fs::fgetxattr(dir, "user.overlay.opaque", &mut buf),
        Ok(n) if &buf[..n] == b"y"
    )
}

fn same_content(a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let (mut fa, mut fb) = (open_file_at(a, name)?, open_file_at(b, name)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The changes in the upper layer `upper` against the directory `lower`, sorted by path
/// (parents before what is below them).
pub fn scan(upper: BorrowedFd<'_>, lower: BorrowedFd<'_>) -> Result<Vec<Change>, ChangeError> {
    let mut out = Vec::new();
    walk(upper, Some(lower), Path::new(""), &mut out, 0)?;
    out.sort_by(|a, b| a.raw.cmp(&b.raw));
    Ok(out)
}

fn change(rel: PathBuf, what: What, before: Option<Side>, after: Option<Side>) -> Change {
    Change {
        path: rel.to_string_lossy().into_owned(),
        host_run: is_host_run(&rel),
        raw: rel,
        change: what,
        before,
        after,
    }
}

fn walk(
    upper: BorrowedFd<'_>,
    lower: Option<BorrowedFd<'_>>,
    rel: &Path,
    out: &mut Vec<Change>,
    depth: usize,
) -> Result<(), ChangeError> {
    if depth > 1024 {
        return Err(ChangeError::Io {
            path: rel.into(),
            op: "walking",
            source: io::Error::from_raw_os_error(libc::ELOOP),
        });
    }
    let mine = names(upper, rel)?;
    if let (true, Some(l)) = (opaque(upper), lower) {
        // An opaque directory: every lower entry not in the upper one is gone.
        for n in names(l, rel)? {
            if mine.binary_search(&n).is_err() {
                if let Ok(st) = stat_at(l, &n) {
                    out.push(change(
                        rel.join(&n),
                        What::Removed,
                        Some(side(l, &n, &st)),
                        None,
                    ));
                }
            }
        }
    }
    for n in &mine {
        let path = rel.join(n);
        let st = stat_at(upper, n).map_err(io_err(&path, "stat"))?;
        let lst = lower.and_then(|l| stat_at(l, n).ok());
        let before = lower.zip(lst.as_ref()).map(|(l, s)| side(l, n, s));
        if is_whiteout(&st) {
            if before.is_some() {
                out.push(change(path, What::Removed, before, None));
            }
            continue;
        }
        let after = side(upper, n, &st);
        match after.kind {
            Kind::Dir => {
                let sub = open_dir_at(upper, n).map_err(io_err(&path, "opening"))?;
                let lsub = match &before {
                    Some(b) if b.kind == Kind::Dir => lower.and_then(|l| open_dir_at(l, n).ok()),
                    _ => None,
                };
                match &before {
                    None => out.push(change(path.clone(), What::Added, None, Some(after))),
                    Some(b) if b.kind != Kind::Dir || b.mode != after.mode => out.push(change(
                        path.clone(),
                        What::Changed,
                        before.clone(),
                        Some(after),
                    )),
                    Some(_) => {}
                }
                walk(
                    sub.as_fd(),
                    lsub.as_ref().map(|f| f.as_fd()),
                    &path,
                    out,
                    depth + 1,
                )?;
            }
            _ => {
                let differs = match &before {
                    None => None,
                    Some(b) if b.kind != after.kind || b.mode != after.mode => Some(true),
                    Some(b) if after.kind == Kind::Symlink => Some(b.target != after.target),
                    Some(b) if after.kind == Kind::File => Some(
                        b.size != after.size
                            || !same_content(upper, lower.expect("a lower side"), n).map_err(
                                |e| ChangeError::Io {
                                    path: path.clone(),
                                    op: "comparing",
                                    source: e,
                                },
                            )?,
                    ),
                    Some(_) => Some(true),
                };
                match differs {
                    None => out.push(change(path, What::Added, None, Some(after))),
                    Some(true) => out.push(change(path, What::Changed, before, Some(after))),
                    Some(false) => {}
                }
            }
        }
    }
    Ok(())
}

/// Reads a regular file at `rel` beneath `dir` (no link followed), up to `max` bytes; None when
/// it is not there, not a regular file, or larger.
pub fn read_small(dir: BorrowedFd<'_>, rel: &Path, max: u64) -> Option<Vec<u8>> {
    let fd = hostpath::open_at_nofollow(dir, rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
        .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 > max {
        return None;
    }
    let mut v = Vec::new();
    std::fs::File::from(fd).take(max).read_to_end(&mut v).ok()?;
    Some(v)
}

/// Whether bytes are text for a diff: UTF-8 without NUL.
pub fn is_text(b: &[u8]) -> bool {
    !b.contains(&0) && std::str::from_utf8(b).is_ok()
}

/// A unified diff of one change (files only; None for directories, links, binary or large
/// files), and its (lines added, lines removed).
pub fn text_diff(
    c: &Change,
    upper: BorrowedFd<'_>,
    lower: BorrowedFd<'_>,
) -> Option<(String, usize, usize)> {
    let file = |s: &Option<Side>| s.as_ref().is_some_and(|s| s.kind == Kind::File);
    let old = if file(&c.before) {
        read_small(lower, &c.raw, MAX_TEXT_DIFF)?
    } else {
        Vec::new()
    };
    let new = if file(&c.after) {
        read_small(upper, &c.raw, MAX_TEXT_DIFF)?
    } else {
        Vec::new()
    };
    if !(file(&c.before) || file(&c.after)) || !is_text(&old) || !is_text(&new) {
        return None;
    }
    let (old, new) = (String::from_utf8(old).ok()?, String::from_utf8(new).ok()?);
    let d = similar::TextDiff::from_lines(&old, &new);
    let (mut plus, mut minus) = (0, 0);
    for op in d.iter_all_changes() {
        match op.tag() {
            similar::ChangeTag::Insert => plus += 1,
            similar::ChangeTag::Delete => minus += 1,
            similar::ChangeTag::Equal => {}
        }
    }
    let a = if file(&c.before) {
        format!("a/{}", c.path)
    } else {
        "/dev/null".into()
    };
    let b = if file(&c.after) {
        format!("b/{}", c.path)
    } else {
        "/dev/null".into()
    };
    let text = d
        .unified_diff()
        .context_radius(3)
        .header(&a, &b)
        .to_string();
    Some((text, plus, minus))
}

/// Keeps the changes at or below one of `paths` (relative to the workspace; all when empty).
/// A path that selects nothing is an error.
pub fn select(changes: Vec<Change>, paths: &[PathBuf]) -> Result<Vec<Change>, ChangeError> {
    if paths.is_empty() {
        return Ok(changes);
    }
    let norm: Vec<PathBuf> = paths
        .iter()
        .map(|p| p.components().filter(|c| *c != Component::CurDir).collect())
        .collect();
    for (p, n) in paths.iter().zip(&norm) {
        if !changes.iter().any(|c| c.raw.starts_with(n)) {
            return Err(ChangeError::NoSuchChange {
                path: p.display().to_string(),
            });
        }
    }
    Ok(changes
        .into_iter()
        .filter(|c| norm.iter().any(|n| c.raw.starts_with(n)))
        .collect())
}

/// What `apply` did with one change.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub path: String,
    pub change: What,
    /// False for what is never applied (fifos, sockets, devices): `note` says why.
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Copies `changes` from the upper layer `upper` into the directory `target`, as the calling
/// process (module docs). Refuses host-run paths unless `allow_host_run`, before writing
/// anything.
pub fn apply(
    changes: &[Change],
    upper: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    allow_host_run: bool,
) -> Result<Vec<Applied>, ChangeError> {
    if !allow_host_run {
        let paths: Vec<String> = changes
            .iter()
            .filter(|c| c.host_run)
            .map(|c| c.path.clone())
            .collect();
        if !paths.is_empty() {
            return Err(ChangeError::HostRun { paths });
        }
    }
    let mut done = Vec::new();
    for c in changes {
        let note = apply_one(c, upper, target)?;
        done.push(Applied {
            path: c.path.clone(),
            change: c.change,
            applied: note.is_none(),
            note,
        });
    }
    Ok(done)
}

fn apply_one(
    c: &Change,
    upper: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
) -> Result<Option<String>, ChangeError> {
    let rel = &c.raw;
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(ChangeError::NoSuchChange {
                path: c.path.clone(),
            })
        }
    };
    // Parents: one component at a time, no link followed (one planted in the directory is
    // refused), made 0755 where missing (their own change, if any, came first: sorted).
    let pdir = hostpath::mkdirs_at(target, parent, 0o755)?;
    let existing = stat_at(pdir.as_fd(), name).ok().map(|s| kind_of(&s));
    let clear = |pdir: BorrowedFd<'_>| -> Result<(), ChangeError> {
        crate::sandbox::layer::remove_tree_at(pdir, name, rel)?;
        Ok(())
    };
    let Some(after) = &c.after else {
        clear(pdir.as_fd())?;
        return Ok(None);
    };
    let mode = after.mode & 0o777;
    match after.kind {
        Kind::Other => return Ok(Some("not a file, directory or link: not applied".into())),
        Kind::Dir => {
            if existing.is_some_and(|k| k != Kind::Dir) {
                clear(pdir.as_fd())?;
            }
            match rustix::fs::mkdirat(&pdir, name, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err(rel, "creating")(e)),
            }
            let d = open_dir_at(pdir.as_fd(), name).map_err(io_err(rel, "opening"))?;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(mode)).map_err(io_err(rel, "fchmod"))?;
        }
        Kind::File | Kind::Symlink => {
            let mut tmp = OsString::from(".");
            tmp.push(name);
            tmp.push(format!(".aither-apply.{}", std::process::id()));
            let _ = rustix::fs::unlinkat(&pdir, &tmp, AtFlags::empty());
            if after.kind == Kind::File {
                // The agent's file, beneath the upper layer's descriptor, no link followed.
                let src = hostpath::open_at_nofollow(
                    upper,
                    rel,
                    OFlags::RDONLY | OFlags::NONBLOCK,
                    Mode::empty(),
                )?;
                let st = rustix::fs::fstat(&src).map_err(io_err(rel, "fstat"))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(io_err(rel, "reading the agent's file")(
                        rustix::io::Errno::INVAL,
                    ));
                }
                let dst = hostpath::create_file_excl_at(pdir.as_fd(), &tmp, 0o600)?;
                let mut w = std::fs::File::from(dst);
                let copied = io::copy(&mut std::fs::File::from(src), &mut w)
                    .and_then(|_| w.flush())
                    .and_then(|()| {
                        rustix::fs::fchmod(&w, Mode::from_raw_mode(mode)).map_err(io::Error::from)
                    });
                if let Err(e) = copied {
                    let _ = rustix::fs::unlinkat(&pdir, &tmp, AtFlags::empty());
                    return Err(ChangeError::Io {
                        path: rel.clone(),
                        op: "copying",
                        source: e,
                    });
                }
            } else {
                // The link as a link: its target is text, never resolved here.
                let udir = hostpath::open_at_nofollow(
                    upper,
                    parent,
                    OFlags::DIRECTORY | OFlags::RDONLY,
                    Mode::empty(),
                )?;
                let t = rustix::fs::readlinkat(&udir, name, Vec::new())
                    .map_err(io_err(rel, "reading the agent's link"))?;
                rustix::fs::symlinkat(t.as_bytes(), &pdir, &tmp)
                    .map_err(io_err(rel, "creating the link"))?;
            }
            if existing == Some(Kind::Dir) {
                clear(pdir.as_fd())?;
            }
            if let Err(e) = rustix::fs::renameat(&pdir, &tmp, &pdir, name) {
                let _ = rustix::fs::unlinkat(&pdir, &tmp, AtFlags::empty());
                return Err(io_err(rel, "renaming into place")(e));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_run_paths_are_git_direnv_and_editor_files_at_any_depth() {
        for p in [
            ".git",
            ".git/hooks/pre-commit",
            "sub/.git/config",
            ".envrc",
            "a/.envrc",
            ".vscode/tasks.json",
            ".gitmodules",
            ".idea/workspace.xml",
        ] {
            assert!(is_host_run(Path::new(p)), "{p}");
        }
        for p in [
            "src/main.rs",
            "Makefile",
            "gitx/config",
            ".github2",
            "a.git",
        ] {
            assert!(!is_host_run(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn a_selection_keeps_the_path_and_what_is_below_it_and_refuses_an_empty_one() {
        let mk = |p: &str| change(PathBuf::from(p), What::Added, None, None);
        let all = vec![mk("a"), mk("a/b"), mk("ab"), mk("c/d")];
        let got = select(all.clone(), &[PathBuf::from("a")]).unwrap();
        assert_eq!(
            got.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            ["a", "a/b"]
        );
        assert!(matches!(
            select(all, &[PathBuf::from("zz")]),
            Err(ChangeError::NoSuchChange { .. })
        ));
    }
}
