//! The host's secret store for credential routes (`aitherctl secret`), one namespace per owner
//! (docs/network.md, "Credentials the agent never sees"):
//!
//! - root's secrets: `<state dir>/secrets/NAME` (the layout before owners; unchanged);
//! - uid U's secrets: `<state dir>/secrets/.users/U/NAME` (a name never starts with '.', so
//!   `.users` is never a secret of root's).
//!
//! Every directory is 0700 and every file 0600, all root's (the effective uid's); members reach
//! theirs only through aitherd, never the files. Every access resolves the path without
//! following a link (src/hostpath.rs) and checks the opened descriptor (owner, type, one link)
//! before using it. Values are never logged, never printed by `ls`, and never enter a sandbox:
//! the gateway adds them to requests on the way out.
//!
//! A route's `secret` names the secret of the agent's owner (`NAME`), or root's
//! (`root:NAME`): see [`SecretRef`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, Mode, OFlags};

use crate::hostpath::{self, HostPathError, Kind};

/// Errors of the secret store.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?}: use 1 to 32 of lower-case letters, digits, '-' and '_'")]
    BadName(String),
    #[error("no secret named {0:?}")]
    NotFound(String),
    #[error("the secret's value is empty or has a line break or control character")]
    BadValue,
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: HostPathError,
    },
}

/// One entry of `ls` (never the value).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SecretInfo {
    /// The uid whose secret it is (0: root's).
    pub owner: u32,
    pub name: String,
    pub bytes: u64,
    pub modified_unix: u64,
}

/// The prefix of a route's `secret` that names root's secret rather than the agent owner's.
pub const ROOT_PREFIX: &str = super::rules::ROOT_SECRET_PREFIX;

/// What a route's `secret` field names: `NAME` (the agent owner's secret NAME) or
/// `root:NAME` (root's secret NAME, shared by root through a route root wrote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretRef<'a> {
    /// True for `root:NAME`.
    pub root: bool,
    pub name: &'a str,
}

impl<'a> SecretRef<'a> {
    /// Parses and checks a route's `secret` field.
    pub fn parse(s: &'a str) -> Result<SecretRef<'a>, SecretError> {
        let (root, name) = match s.strip_prefix(ROOT_PREFIX) {
            Some(n) => (true, n),
            None => (false, s),
        };
        check_name(name)?;
        Ok(SecretRef { root, name })
    }

    /// The uid whose secret this is, for an agent owned by `agent_owner`.
    pub fn owner(&self, agent_owner: u32) -> u32 {
        if self.root {
            0
        } else {
            agent_owner
        }
    }
}

/// The store at `dir` (`<state dir>/secrets`).
#[derive(Clone, Debug)]
pub struct SecretStore {
    dir: PathBuf,
}

/// A secret's name: 1 to 32 of lower-case letters, digits, '-' and '_', not starting with '-'.
pub fn check_name(n: &str) -> Result<(), SecretError> {
    let ok = !n.is_empty()
        && n.len() <= 32
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName(n.to_string()))
    }
}

fn check_value(v: &str) -> Result<(), SecretError> {
    if v.is_empty() || v.chars().any(|c| c.is_control()) {
        return Err(SecretError::BadValue);
    }
    Ok(())
}

/// The directory of the users' namespaces inside the store.
const USERS: &str = ".users";

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl SecretStore {
    pub fn new(dir: PathBuf) -> SecretStore {
        SecretStore { dir }
    }

    /// `<AITHER_STATE_DIR or /var/lib/aither>/secrets`.
    pub fn default_location() -> SecretStore {
        SecretStore::new(crate::token::state_dir().join("secrets"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `owner`'s secrets live (for messages).
    pub fn owner_dir(&self, owner: u32) -> PathBuf {
        if owner == 0 {
            self.dir.clone()
        } else {
            self.dir.join(USERS).join(owner.to_string())
        }
    }

    fn io(&self, owner: u32, source: HostPathError) -> SecretError {
        SecretError::Io {
            path: self.owner_dir(owner),
            source,
        }
    }

    /// `owner`'s directory, opened without following links and checked (a directory of ours,
    /// 0700 at most); created (0700) when `create`. `None`: it does not exist.
    fn open_owner(&self, owner: u32, create: bool) -> Result<Option<OwnedFd>, SecretError> {
        let top = if create {
            hostpath::owned_cache_dir(&self.dir, 0o700).map_err(|e| self.io(owner, e))?
        } else {
            match hostpath::open_dir_nofollow(&self.dir) {
                Ok(fd) => {
                    check_private(fd.as_fd(), &self.dir).map_err(|e| self.io(owner, e))?;
                    fd
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(self.io(owner, e)),
            }
        };
        if owner == 0 {
            return Ok(Some(top));
        }
        let users = self.dir.join(USERS);
        let mine = users.join(owner.to_string());
        let open = |dir: BorrowedFd<'_>, name: &str, shown: &Path| {
            if create {
                return hostpath::private_dir_at(dir, OsStr::new(name), shown).map(Some);
            }
            match hostpath::open_at_nofollow(
                dir,
                Path::new(name),
                OFlags::DIRECTORY | OFlags::RDONLY,
                Mode::empty(),
            ) {
                Ok(fd) => check_private(fd.as_fd(), shown).map(|()| Some(fd)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let Some(u) = open(top.as_fd(), USERS, &users).map_err(|e| self.io(owner, e))? else {
            return Ok(None);
        };
        open(u.as_fd(), &owner.to_string(), &mine).map_err(|e| self.io(owner, e))
    }

    /// Stores `value` as `owner`'s secret `name` (a new 0600 file renamed over the old one, so
    /// a reader never sees a torn value). True when it replaced a value (a rotation).
    pub fn set(&self, owner: u32, name: &str, value: &str) -> Result<bool, SecretError> {
        check_name(name)?;
        check_value(value)?;
        let dir = self
            .open_owner(owner, true)?
            .expect("created when asked to");
        let existed = matches!(self.read_at(owner, dir.as_fd(), name), Ok(Some(_)));
        hostpath::replace_file_at(dir.as_fd(), OsStr::new(name), value.as_bytes(), 0o600)
            .map_err(|e| self.io(owner, e))?;
        Ok(existed)
    }

    /// The file `name` in `dir`: a regular file of ours with one link, 0600 at most.
    fn read_at(
        &self,
        owner: u32,
        dir: BorrowedFd<'_>,
        name: &str,
    ) -> Result<Option<String>, SecretError> {
        let shown = self.owner_dir(owner).join(name);
        let fd = match hostpath::open_at_nofollow(
            dir,
            Path::new(name),
            OFlags::RDONLY | OFlags::NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(self.io(owner, e)),
        };
        let check = || -> Result<(), HostPathError> {
            let m = hostpath::check_fd(fd.as_fd()).map_err(|e| HostPathError::Io {
                path: shown.clone(),
                op: "fstat",
                source: e,
            })?;
            m.expect_kind(&shown, Kind::File)?
                .expect_owner(&shown, euid())?
                .expect_mode_within(&shown, 0o600)?;
            if m.nlink != 1 {
                return Err(HostPathError::Links {
                    path: shown.clone(),
                    nlink: m.nlink,
                });
            }
            Ok(())
        };
        check().map_err(|e| self.io(owner, e))?;
        let mut v = String::new();
        File::from(fd)
            .read_to_string(&mut v)
            .map_err(|e| self.io(owner, io_err(&shown, "reading", e)))?;
        Ok(Some(v))
    }

    /// `owner`'s secret `name`.
    pub fn get(&self, owner: u32, name: &str) -> Result<String, SecretError> {
        check_name(name)?;
        let Some(dir) = self.open_owner(owner, false)? else {
            return Err(SecretError::NotFound(name.into()));
        };
        self.read_at(owner, dir.as_fd(), name)?
            .ok_or_else(|| SecretError::NotFound(name.into()))
    }

    /// The secret a route's `secret` field names for an agent owned by `agent_owner`.
    pub fn resolve(&self, agent_owner: u32, reference: &str) -> Result<String, SecretError> {
        let r = SecretRef::parse(reference)?;
        self.get(r.owner(agent_owner), r.name)
    }

    /// Removes `owner`'s secret `name`.
    pub fn remove(&self, owner: u32, name: &str) -> Result<(), SecretError> {
        check_name(name)?;
        let Some(dir) = self.open_owner(owner, false)? else {
            return Err(SecretError::NotFound(name.into()));
        };
        match rfs::unlinkat(&dir, name, rfs::AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::NOENT) => Err(SecretError::NotFound(name.into())),
            Err(e) => Err(self.io(
                owner,
                io_err(&self.owner_dir(owner).join(name), "removing", e.into()),
            )),
        }
    }

    /// Whether `owner` has a secret `name` (a name that is not one: false).
    pub fn exists(&self, owner: u32, name: &str) -> Result<bool, SecretError> {
        match self.get(owner, name) {
            Ok(_) => Ok(true),
            Err(SecretError::NotFound(_) | SecretError::BadName(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `owner`'s secrets (`None`: everyone's), sorted by owner then name; never the values.
    pub fn list(&self, owner: Option<u32>) -> Result<Vec<SecretInfo>, SecretError> {
        let owners: Vec<u32> = match owner {
            Some(o) => vec![o],
            None => {
                let mut v = vec![0];
                if let Some(top) = self.open_owner(0, false)? {
                    let users = self.dir.join(USERS);
                    match hostpath::open_at_nofollow(
                        top.as_fd(),
                        Path::new(USERS),
                        OFlags::DIRECTORY | OFlags::RDONLY,
                        Mode::empty(),
                    ) {
                        Ok(fd) => {
                            check_private(fd.as_fd(), &users).map_err(|e| self.io(0, e))?;
                            let mut uids: Vec<u32> = entries(fd.as_fd())
                                .map_err(|e| self.io(0, io_err(&users, "reading", e)))?
                                .into_iter()
                                .filter_map(|n| n.parse().ok())
                                .filter(|u| *u != 0)
                                .collect();
                            uids.sort_unstable();
                            v.extend(uids);
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(self.io(0, e)),
                    }
                }
                v
            }
        };
        let mut out = Vec::new();
        for o in owners {
            let Some(dir) = self.open_owner(o, false)? else {
                continue;
            };
            let shown = self.owner_dir(o);
            let mut names =
                entries(dir.as_fd()).map_err(|e| self.io(o, io_err(&shown, "reading", e)))?;
            names.sort();
            for name in names {
                if check_name(&name).is_err() {
                    continue;
                }
                let Ok(st) = rfs::statat(&dir, name.as_str(), rfs::AtFlags::SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
                    continue;
                }
                out.push(SecretInfo {
                    owner: o,
                    name,
                    bytes: st.st_size as u64,
                    modified_unix: st.st_mtime.max(0) as u64,
                });
            }
        }
        Ok(out)
    }
}

fn io_err(path: &Path, op: &'static str, source: io::Error) -> HostPathError {
    HostPathError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// A directory of the store: ours, no group or other access.
fn check_private(fd: BorrowedFd<'_>, shown: &Path) -> Result<(), HostPathError> {
    let m = hostpath::check_fd(fd).map_err(|e| io_err(shown, "fstat", e))?;
    m.expect_kind(shown, Kind::Dir)?
        .expect_owner(shown, euid())?
        .expect_mode_within(shown, 0o700)?;
    Ok(())
}

/// The names in the directory `dir` (not `.` and `..`).
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut d = rfs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
    }
    Ok(out)
}

impl super::gateway::SecretSource for SecretStore {
    fn get(&self, agent_owner: u32, reference: &str) -> Option<String> {
        self.resolve(agent_owner, reference).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_private_files_and_ls_shows_no_value() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        assert!(!s.set(0, "openai", "sk-test-123").unwrap());
        let md = fs::metadata(d.path().join("secrets/openai")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        let dm = fs::metadata(d.path().join("secrets")).unwrap();
        assert_eq!(dm.permissions().mode() & 0o777, 0o700);
        assert_eq!(s.get(0, "openai").unwrap(), "sk-test-123");
        let ls = serde_json::to_string(&s.list(None).unwrap()).unwrap();
        assert!(ls.contains("openai") && !ls.contains("sk-test"), "{ls}");
        assert!(matches!(
            s.set(0, "../x", "v"),
            Err(SecretError::BadName(_))
        ));
        assert!(matches!(s.set(0, "x", "a\nb"), Err(SecretError::BadValue)));
        // A rotation says so.
        assert!(s.set(0, "openai", "sk-test-456").unwrap());
        assert_eq!(s.get(0, "openai").unwrap(), "sk-test-456");
        s.remove(0, "openai").unwrap();
        assert!(matches!(s.get(0, "openai"), Err(SecretError::NotFound(_))));
    }

    #[test]
    fn each_owner_has_a_namespace_and_root_prefix_names_roots() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        s.set(0, "k", "root-value").unwrap();
        s.set(1001, "k", "a-value").unwrap();
        s.set(1001, "only-a", "a2").unwrap();
        assert_eq!(s.get(1001, "k").unwrap(), "a-value");
        assert!(matches!(s.get(1002, "k"), Err(SecretError::NotFound(_))));
        assert!(matches!(
            s.get(1002, "only-a"),
            Err(SecretError::NotFound(_))
        ));
        assert!(matches!(
            s.remove(1002, "only-a"),
            Err(SecretError::NotFound(_))
        ));
        // Routes: NAME is the agent owner's, root:NAME root's.
        assert_eq!(s.resolve(1001, "k").unwrap(), "a-value");
        assert_eq!(s.resolve(1001, "root:k").unwrap(), "root-value");
        assert_eq!(s.resolve(0, "k").unwrap(), "root-value");
        assert!(s.resolve(1002, "only-a").is_err());
        assert!(s.resolve(1002, "root:only-a").is_err());
        assert!(matches!(
            SecretRef::parse("root:"),
            Err(SecretError::BadName(_))
        ));
        assert!(matches!(
            SecretRef::parse("user:k"),
            Err(SecretError::BadName(_))
        ));
        let all = s.list(None).unwrap();
        let seen: Vec<(u32, &str)> = all.iter().map(|i| (i.owner, i.name.as_str())).collect();
        assert_eq!(seen, vec![(0, "k"), (1001, "k"), (1001, "only-a")]);
        assert_eq!(s.list(Some(1002)).unwrap(), vec![]);
        // Root's listing of its own names never shows the users' directory.
        assert_eq!(s.list(Some(0)).unwrap().len(), 1);
        let users = d.path().join("secrets/.users/1001");
        let m = fs::metadata(&users).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_planted_link_or_a_hard_link_is_never_read() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        s.set(0, "real", "v").unwrap();
        let outside = d.path().join("outside");
        fs::write(&outside, "not-a-secret").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&outside, d.path().join("secrets/link")).unwrap();
        assert!(matches!(s.get(0, "link"), Err(SecretError::Io { .. })));
        fs::hard_link(&outside, d.path().join("secrets/hard")).unwrap();
        assert!(matches!(s.get(0, "hard"), Err(SecretError::Io { .. })));
        // A users' directory swapped for a link is refused, not followed.
        fs::create_dir(d.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), d.path().join("secrets/.users"))
            .unwrap();
        assert!(s.set(1001, "k", "v").is_err());
        assert!(!d.path().join("elsewhere/1001").exists());
    }
}
