//! The host (root) signing key, created at first use, and public-key parsing.
//!
//! The key lives in `$AITHER_STATE_DIR/keys/host.ed25519` (directory 0700, file 0600, owned by
//! the user aither runs as: root): one line, the 32-byte ed25519 seed in base64url. A key file
//! or directory that others could read or write is refused, not repaired. Two processes that
//! create the key at once agree on one: the key is written to a private temporary file and
//! published with link(2), which fails if another process published first.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::{hex, random_bytes, TokenError};

/// File name of the host key under `<state dir>/keys`.
pub const HOST_KEY_FILE: &str = "host.ed25519";

/// The host's signing key.
pub struct HostKey {
    signing: SigningKey,
    path: PathBuf,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("path", &self.path)
            .field("public", &encode_public_key(&self.public()))
            .finish_non_exhaustive()
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn key_error(path: &Path, reason: impl Into<String>) -> TokenError {
    TokenError::HostKey {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Refuses a file or directory that is a symlink, of the wrong type, not owned by us, or open
/// to group or others.
fn check_private(path: &Path, md: &fs::Metadata, want_dir: bool) -> Result<(), TokenError> {
    let ft = md.file_type();
    if ft.is_symlink() || (want_dir && !ft.is_dir()) || (!want_dir && !ft.is_file()) {
        return Err(key_error(
            path,
            if want_dir {
                "is not a directory"
            } else {
                "is not a regular file"
            },
        ));
    }
    let (mode, uid, me) = (md.mode() & 0o7777, md.uid(), euid());
    if mode & 0o077 != 0 || uid != me {
        let want = if want_dir { "0700" } else { "0600" };
        return Err(key_error(
            path,
            format!(
                "has mode {mode:04o} and owner uid {uid}: it must be {want} and owned by uid {me} \
                 (fix with `chown {me} {p} && chmod {want} {p}`)",
                p = path.display()
            ),
        ));
    }
    Ok(())
}

impl HostKey {
    /// `<state dir>/keys/host.ed25519`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("keys").join(HOST_KEY_FILE)
    }

    /// Loads the host key, creating the directory and the key if this is the first use.
    pub fn load_or_create(state_dir: &Path) -> Result<HostKey, TokenError> {
        match Self::load(state_dir) {
            Err(TokenError::HostKeyMissing { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let dir = state_dir.join("keys");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(TokenError::io("create the key directory", &dir))?;
        let md = fs::symlink_metadata(&dir).map_err(TokenError::io("stat", &dir))?;
        check_private(&dir, &md, true)?;
        let path = dir.join(HOST_KEY_FILE);
        if fs::symlink_metadata(&path).is_err() {
            publish_new_key(&dir, &path)?;
        }
        Self::load(state_dir)
    }

    /// Loads an existing host key (never creates one).
    pub fn load(state_dir: &Path) -> Result<HostKey, TokenError> {
        let path = Self::path_in(state_dir);
        let dir = state_dir.join("keys");
        let missing = |source: std::io::Error| TokenError::HostKeyMissing {
            path: path.clone(),
            source,
        };
        let md = fs::symlink_metadata(&dir).map_err(missing)?;
        check_private(&dir, &md, true)?;
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(missing)?;
        let md = f.metadata().map_err(TokenError::io("stat", &path))?;
        check_private(&path, &md, false)?;
        let mut text = String::new();
        f.take(256)
            .read_to_string(&mut text)
            .map_err(TokenError::io("read", &path))?;
        let seed = URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                key_error(&path, "does not hold a base64url ed25519 seed of 32 bytes")
            })?;
        Ok(HostKey {
            signing: SigningKey::from_bytes(&seed),
            path,
        })
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes a new key to a private temporary file and links it into place; if another process
/// linked its key first, that one stays.
fn publish_new_key(dir: &Path, path: &Path) -> Result<(), TokenError> {
    let mut seed = [0u8; 32];
    random_bytes(&mut seed)?;
    let mut tag = [0u8; 6];
    random_bytes(&mut tag)?;
    let tmp = dir.join(format!(
        ".{HOST_KEY_FILE}.{}.{}.tmp",
        std::process::id(),
        hex(&tag)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(TokenError::io("create", &tmp))?;
        f.write_all(format!("{}\n", URL_SAFE_NO_PAD.encode(seed)).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(TokenError::io("write", &tmp))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(TokenError::io("publish the host key as", path)(e)),
        }
        if let Ok(d) = fs::File::open(dir) {
            // Make the new directory entry durable; a failure here loses nothing yet.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// The public key as base64url (43 characters), the form `token pubkey` prints.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// Parses a public key given as a file holding one, or as text: 64 hex digits or 43
/// base64url characters (standard base64 with padding is accepted too).
pub fn parse_public_key(arg: &str) -> Result<VerifyingKey, TokenError> {
    let bad = |reason: &str| TokenError::BadPublicKey {
        input: arg.chars().take(100).collect(),
        reason: reason.to_string(),
    };
    let p = Path::new(arg);
    let text = if p.is_file() {
        let mut s = String::new();
        fs::File::open(p)
            .and_then(|f| f.take(4096).read_to_string(&mut s))
            .map_err(TokenError::io("read the public key", p))?;
        s
    } else {
        arg.to_string()
    };
    let t = text.trim();
    let t = t.strip_prefix("ed25519:").unwrap_or(t);
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad("not hex"))?
    } else {
        URL_SAFE_NO_PAD
            .decode(t)
            .or_else(|_| STANDARD.decode(t))
            .map_err(|_| {
                bad("expected 64 hex digits or 43 base64url characters, or a file holding them")
            })?
    };
    let arr = <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| bad("an ed25519 public key has 32 bytes"))?;
    VerifyingKey::from_bytes(&arr).map_err(|_| bad("not a valid ed25519 public key"))
}
