//! Revoked token and block ids, kept in the state database `$AITHER_STATE_DIR/state.db`
//! (SQLite, WAL, busy_timeout), table `token_revocations`.
//!
//! Revoking a token's id (block 0's) refuses the token and every attenuation of it; revoking
//! a later block's id refuses that block and every block appended after it.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::{is_valid_id, TokenError};

/// File name of the state database under the state directory.
pub const STATE_DB: &str = "state.db";

/// How long a writer waits for another one before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Revoked {
    pub id: String,
    /// Unix seconds.
    pub at: u64,
    pub reason: String,
}

/// Answers whether an id is revoked.
pub trait RevocationCheck {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError>;
}

/// Nothing is revoked: for tokens minted a moment ago in this process (`run --policy`), whose
/// random ids cannot be on any list, and for tools that verify signatures offline.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRevocations;

impl RevocationCheck for NoRevocations {
    fn revoked(&self, _id: &str) -> Result<Option<Revoked>, TokenError> {
        Ok(None)
    }
}

/// The revocation list in the state database.
pub struct RevocationStore {
    conn: Connection,
    path: PathBuf,
}

impl RevocationStore {
    /// `<state dir>/state.db`.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_DB)
    }

    /// Opens (creating it and its directory if needed) the state database.
    pub fn open(state_dir: &Path) -> Result<RevocationStore, TokenError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(TokenError::io("create the state directory", state_dir))?;
        let path = Self::path_in(state_dir);
        let created = !path.exists();
        let store = Self::open_path(&path)?;
        if created {
            // The database holds host state: root only (SQLite gives its -wal and -shm files
            // the database's mode).
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(TokenError::io("chmod 0600", &path))?;
        }
        Ok(store)
    }

    /// Opens the state database if it exists. None: no database, so nothing was ever revoked
    /// (verification does not create one).
    pub fn open_existing(state_dir: &Path) -> Result<Option<RevocationStore>, TokenError> {
        let path = Self::path_in(state_dir);
        if !path.exists() {
            return Ok(None);
        }
        Self::open_path(&path).map(Some)
    }

    fn open_path(path: &Path) -> Result<RevocationStore, TokenError> {
        let db = |source| TokenError::Database {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // journal_mode returns a row; the others do not.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db)?;
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS token_revocations (
                 id TEXT PRIMARY KEY NOT NULL,
                 revoked_at INTEGER NOT NULL,
                 reason TEXT NOT NULL DEFAULT ''
             ) WITHOUT ROWID;",
        )
        .map_err(db)?;
        Ok(RevocationStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> TokenError + '_ {
        move |source| TokenError::Database {
            path: self.path.clone(),
            source,
        }
    }

    /// Revokes `id` at `at` (Unix seconds). Revoking an id twice keeps the first record and
    /// returns it.
    pub fn revoke(&self, id: &str, reason: &str, at: u64) -> Result<Revoked, TokenError> {
        if !is_valid_id(id) {
            return Err(TokenError::BadRequest {
                field: "id",
                reason: format!("{id:?} is not a token or block id (32 lower-case hex digits; `aitherctl token inspect` shows them)"),
            });
        }
        self.conn
            .execute(
                "INSERT INTO token_revocations (id, revoked_at, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO NOTHING",
                params![id, at as i64, reason],
            )
            .map_err(self.db())?;
        self.revoked(id)?.ok_or_else(|| TokenError::Database {
            path: self.path.clone(),
            source: rusqlite::Error::QueryReturnedNoRows,
        })
    }

    /// Every revocation, oldest first.
    pub fn list(&self) -> Result<Vec<Revoked>, TokenError> {
        let mut st = self
            .conn
            .prepare("SELECT id, revoked_at, reason FROM token_revocations ORDER BY revoked_at, id")
            .map_err(self.db())?;
        let rows = st
            .query_map([], |r| {
                Ok(Revoked {
                    id: r.get(0)?,
                    at: r.get::<_, i64>(1)?.max(0) as u64,
                    reason: r.get(2)?,
                })
            })
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }
}

impl RevocationCheck for RevocationStore {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT revoked_at, reason FROM token_revocations WHERE id = ?1")
            .map_err(self.db())?;
        st.query_row([id], |r| {
            Ok(Revoked {
                id: id.to_string(),
                at: r.get::<_, i64>(0)?.max(0) as u64,
                reason: r.get(1)?,
            })
        })
        .optional()
        .map_err(self.db())
    }
}

impl RevocationCheck for Option<RevocationStore> {
    fn revoked(&self, id: &str) -> Result<Option<Revoked>, TokenError> {
        match self {
            Some(s) => s.revoked(id),
            None => Ok(None),
        }
    }
}
