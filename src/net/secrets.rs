//! The host's secret store for credential routes (`aitherctl secret`): one file per secret in
//! `<state dir>/secrets/` (directory 0700, files 0600, root's). Values are never logged, never
//! printed by `ls`, and never enter a sandbox: the gateway adds them to requests on the way out.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of the secret store.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?}: use 1 to 32 of lower-case letters, digits, '-' and '_'")]
    BadName(String),
    #[error("secret {0:?} is not set")]
    NotFound(String),
    #[error("the secret's value is empty or has a line break or control character")]
    BadValue,
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One entry of `ls` (never the value).
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub bytes: u64,
    pub modified_unix: u64,
}

/// The store at `dir` (`<state dir>/secrets`).
#[derive(Clone, Debug)]
pub struct SecretStore {
    dir: PathBuf,
}

fn check_name(n: &str) -> Result<(), SecretError> {
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

    fn io(&self, source: io::Error) -> SecretError {
        SecretError::Io {
            path: self.dir.clone(),
            source,
        }
    }

    /// Stores `value` under `name` (written to a 0600 temporary file, then renamed over).
    pub fn set(&self, name: &str, value: &str) -> Result<(), SecretError> {
        check_name(name)?;
        if value.is_empty() || value.chars().any(|c| c.is_control()) {
            return Err(SecretError::BadValue);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.io(e))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| self.io(e))?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        f.write_all(value.as_bytes()).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        fs::rename(&tmp, self.dir.join(name)).map_err(|e| self.io(e))
    }

    pub fn get(&self, name: &str) -> Result<String, SecretError> {
        check_name(name)?;
        match fs::read_to_string(self.dir.join(name)) {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SecretError::NotFound(name.to_string()))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    pub fn remove(&self, name: &str) -> Result<(), SecretError> {
        check_name(name)?;
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SecretError::NotFound(name.to_string()))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Names, sizes and times, sorted by name.
    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            out.push(SecretInfo {
                name,
                bytes: md.len(),
                modified_unix: md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs()),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

impl super::gateway::SecretSource for SecretStore {
    fn get(&self, name: &str) -> Option<String> {
        SecretStore::get(self, name).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_files_and_ls_shows_no_value() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        s.set("openai", "sk-test-123").unwrap();
        let md = fs::metadata(d.path().join("secrets/openai")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        let dm = fs::metadata(d.path().join("secrets")).unwrap();
        assert_eq!(dm.permissions().mode() & 0o777, 0o700);
        assert_eq!(s.get("openai").unwrap(), "sk-test-123");
        let ls = serde_json::to_string(&s.list().unwrap()).unwrap();
        assert!(ls.contains("openai") && !ls.contains("sk-test"), "{ls}");
        assert!(matches!(s.set("../x", "v"), Err(SecretError::BadName(_))));
        assert!(matches!(s.set("x", "a\nb"), Err(SecretError::BadValue)));
        s.remove("openai").unwrap();
        assert!(matches!(s.get("openai"), Err(SecretError::NotFound(_))));
    }
}
