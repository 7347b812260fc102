//! Revoked token and block ids, kept in the state database `$AITHER_STATE_DIR/state.db`
//! (SQLite, WAL, busy_timeout), table `token_revocations`.
//!
//! Revoking a token's id (block 0's) refuses the token and every attenuation of it; revoking
//! a later block's id refuses that block and every block appended after it. Verification
//! (aither-core's `token::verify`) asks through [`RevocationCheck`]; this is the SQLite side,
//! outside the core so that the launcher links no SQLite.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::token::{is_valid_id, RevocationCheck, Revoked, TokenError};

/// File name of the state database under the state directory.
pub const STATE_DB: &str = "state.db";

/// How long a writer waits for another one before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
        let db = |source: rusqlite::Error| TokenError::Database {
            path: path.to_path_buf(),
            source: Box::new(source),
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
            source: Box::new(source),
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
            source: Box::new(rusqlite::Error::QueryReturnedNoRows),
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::policy::{Policy, BUILTIN_POLICIES};
    use crate::token::{mint, verify, Attenuation, Claims, Token};

    const NOW: u64 = 1_800_000_000;

    fn root_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn minted(p: &str) -> (Token, Claims) {
        let src = BUILTIN_POLICIES
            .iter()
            .find(|b| b.0 == p)
            .expect("built-in")
            .1;
        let policy = Policy::parse(src, p).expect("built-in policy parses");
        let c = Claims::from_policy_at(
            &policy,
            "agent-1",
            "aither@test",
            NOW,
            Duration::from_secs(3600),
        )
        .expect("claims");
        (mint(&root_key(), &c).expect("mint"), c)
    }

    #[test]
    fn revocation_by_token_id_and_by_block_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = RevocationStore::open(dir.path()).unwrap();
        let (t, c0) = minted("strict");
        let c1 = Attenuation {
            pids: Some(8),
            ..Default::default()
        }
        .apply(&c0, NOW)
        .unwrap();
        let t1 = t.append(&c1).unwrap();
        let pk = root_key().verifying_key();
        verify(&t1, &pk, NOW, &store).expect("nothing revoked yet");

        // Revoking the attenuation's block id refuses the attenuated token only.
        store.revoke(&c1.id, "leaked", NOW).unwrap();
        verify(&t, &pk, NOW, &store).expect("the root token is still valid");
        match verify(&t1, &pk, NOW, &store) {
            Err(TokenError::Revoked { id, reason, .. }) => {
                assert_eq!(id, c1.id);
                assert_eq!(reason, "leaked");
            }
            other => panic!("{other:?}"),
        }
        // Revoking the token id refuses both.
        let r = store.revoke(&c0.id, "", NOW + 5).unwrap();
        assert_eq!(r.at, NOW + 5);
        let again = store.revoke(&c0.id, "later", NOW + 9).unwrap();
        assert_eq!(again, r, "a second revocation keeps the first record");
        for tok in [&t, &t1] {
            let e = verify(tok, &pk, NOW, &store).unwrap_err();
            assert!(matches!(e, TokenError::Revoked { .. }), "{e:?}");
            assert!(e.to_string().contains("was revoked at"), "{e}");
        }
        let list = store.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(matches!(
            store.revoke("not-an-id", "", NOW),
            Err(TokenError::BadRequest { field: "id", .. })
        ));
        // Persisted, and seen by a second connection.
        drop(store);
        let reopened = RevocationStore::open_existing(dir.path()).unwrap().unwrap();
        assert_eq!(reopened.list().unwrap(), list);
        let mode = std::fs::metadata(dir.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let empty = tempfile::tempdir().unwrap();
        assert!(RevocationStore::open_existing(empty.path())
            .unwrap()
            .is_none());
        assert!(
            !empty.path().join("state.db").exists(),
            "verification creates no database"
        );
    }
}
