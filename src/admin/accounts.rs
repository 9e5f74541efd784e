//! Accounts of the review web UI, in `state_dir/admin.db` (SQLite, mode 0600): local users with Argon2id
//! password hashes (PHC strings, OWASP parameters m=19 MiB, t=2, p=1), a role, and the tenants they may see;
//! API tokens for automation (`rpa1_<id>_<secret>`, only SHA-256 of the secret kept, like enrollment tokens).
//!
//! The first account is made on the console (`rampart admin create`): there is no default password. Wrong
//! passwords count per account; `[ui] lockout_failures` in a row lock it for `lockout_secs`.
//!
//! Never: store or log a password or a token secret; tell "no such user" apart from "wrong password".
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Shortest password `rampart admin create` accepts.
pub const MIN_PASSWORD: usize = 12;
const TOKEN_PREFIX: &str = "rpa1_";

/// What an account may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::EnumString, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Role {
    /// Everything an auditor may, plus terminating sessions and managing devices and enrollment tokens.
    Admin,
    /// Reads sessions, commands and recordings of its tenants.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The tenants an account sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    All,
    Tenants(Vec<String>),
}

impl Scope {
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenants(t) => t.iter().any(|x| x == tenant),
        }
    }

    fn to_column(&self) -> String {
        match self {
            Scope::All => "*".into(),
            Scope::Tenants(t) => t.join(","),
        }
    }

    fn from_column(s: &str) -> Scope {
        if s == "*" {
            Scope::All
        } else {
            Scope::Tenants(
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    pub created_ms: i64,
    /// Locked by wrong passwords until then (ms), if in the future.
    pub locked_until_ms: i64,
}

impl Account {
    pub fn sees(&self, tenant: &str) -> bool {
        self.scope.sees(tenant)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account names are 1-64 characters of letters, digits, '.', '_', '-' and '@'")]
    BadName,
    #[error("an account {0:?} exists already (change its password with `rampart admin passwd`)")]
    Exists(String),
    #[error("no account {0:?}; see `rampart admin list`")]
    NoAccount(String),
    #[error("the password must be at least {MIN_PASSWORD} characters")]
    WeakPassword,
    #[error("a role needs tenants: give --tenant T (repeatable) or --all-tenants")]
    NoTenants,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("{path}: {source}")]
    Store {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Why a sign-in failed. `BadCredentials` covers unknown accounts too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    BadCredentials,
    Locked { until_ms: i64 },
}

pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.db")
}

fn hasher() -> Argon2<'static> {
    // OWASP's first recommendation for Argon2id; the parameters are stored in each PHC string.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub fn hash_password(password: &str) -> Result<String, AccountError> {
    PasswordHasher::<PasswordHash>::hash_password(&hasher(), password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => {
            PasswordVerifier::<PasswordHash>::verify_password(&hasher(), password.as_bytes(), &h)
                .is_ok()
        }
        Err(_) => false,
    }
}

/// A hash no password matches, verified for unknown accounts so they take as long as known ones.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let mut b = [0u8; 32];
        let _ = getrandom::fill(&mut b);
        hash_password(&hex::encode(b)).unwrap_or_default()
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// `admin.db`. Each call opens its own connection (the UI runs these on blocking threads).
pub struct AccountStore {
    conn: Connection,
    path: PathBuf,
}

impl AccountStore {
    pub fn open(state_dir: &Path) -> Result<AccountStore, AccountError> {
        let path = db_path(state_dir);
        let err = |source| AccountError::Store {
            path: path.clone(),
            source,
        };
        let fresh = !path.exists();
        let conn = Connection::open(&path).map_err(err)?;
        if fresh {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS accounts (
                name TEXT PRIMARY KEY,
                hash TEXT NOT NULL,
                role TEXT NOT NULL,
                tenants TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                failures INTEGER NOT NULL DEFAULT 0,
                locked_until_ms INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS api_tokens (
                id TEXT PRIMARY KEY,
                secret_sha256 BLOB NOT NULL,
                account TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                revoked_ms INTEGER
             );",
        )
        .map_err(err)?;
        Ok(AccountStore { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> AccountError {
        AccountError::Store {
            path: self.path.clone(),
            source,
        }
    }

    pub fn create(
        &self,
        name: &str,
        password: &str,
        role: Role,
        scope: Scope,
        now_ms: i64,
    ) -> Result<Account, AccountError> {
        if !valid_name(name) {
            return Err(AccountError::BadName);
        }
        if password.chars().count() < MIN_PASSWORD {
            return Err(AccountError::WeakPassword);
        }
        if scope == Scope::Tenants(Vec::new()) {
            return Err(AccountError::NoTenants);
        }
        let hash = hash_password(password)?;
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO accounts (name, hash, role, tenants, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, hash, role.as_str(), scope.to_column(), now_ms],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(AccountError::Exists(name.into()));
        }
        Ok(Account {
            name: name.into(),
            role,
            scope,
            created_ms: now_ms,
            locked_until_ms: 0,
        })
    }

    pub fn set_password(&self, name: &str, password: &str) -> Result<(), AccountError> {
        if password.chars().count() < MIN_PASSWORD {
            return Err(AccountError::WeakPassword);
        }
        let hash = hash_password(password)?;
        let n = self
            .conn
            .execute(
                "UPDATE accounts SET hash = ?2, failures = 0, locked_until_ms = 0 WHERE name = ?1",
                params![name, hash],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(AccountError::NoAccount(name.into()));
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<Account>, AccountError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT name, role, tenants, created_ms, locked_until_ms FROM accounts ORDER BY name",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], row_account)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().flatten().collect())
    }

    pub fn get(&self, name: &str) -> Result<Option<Account>, AccountError> {
        self.conn
            .query_row(
                "SELECT name, role, tenants, created_ms, locked_until_ms FROM accounts WHERE name = ?1",
                params![name],
                row_account,
            )
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(e))
    }

    pub fn remove(&self, name: &str) -> Result<(), AccountError> {
        let n = self
            .conn
            .execute("DELETE FROM accounts WHERE name = ?1", params![name])
            .map_err(|e| self.err(e))?;
        self.conn
            .execute("DELETE FROM api_tokens WHERE account = ?1", params![name])
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(AccountError::NoAccount(name.into()));
        }
        Ok(())
    }

    /// Checks a password (slow: Argon2id; call from a blocking thread). Unknown accounts cost the same and
    /// fail the same way as wrong passwords.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        now_ms: i64,
        lockout_failures: u32,
        lockout_ms: i64,
    ) -> Result<Result<Account, LoginError>, AccountError> {
        let row: Option<(String, i64, i64)> = self
            .conn
            .query_row(
                "SELECT hash, failures, locked_until_ms FROM accounts WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((hash, failures, locked_until_ms)) = row else {
            verify_password(password, decoy_hash());
            return Ok(Err(LoginError::BadCredentials));
        };
        if locked_until_ms > now_ms {
            return Ok(Err(LoginError::Locked {
                until_ms: locked_until_ms,
            }));
        }
        if !verify_password(password, &hash) {
            let failures = failures + 1;
            let locked = if failures >= i64::from(lockout_failures) {
                now_ms + lockout_ms
            } else {
                0
            };
            self.conn
                .execute(
                    "UPDATE accounts SET failures = ?2, locked_until_ms = ?3 WHERE name = ?1",
                    params![name, if locked > 0 { 0 } else { failures }, locked],
                )
                .map_err(|e| self.err(e))?;
            return Ok(Err(if locked > 0 {
                LoginError::Locked { until_ms: locked }
            } else {
                LoginError::BadCredentials
            }));
        }
        self.conn
            .execute(
                "UPDATE accounts SET failures = 0, locked_until_ms = 0 WHERE name = ?1",
                params![name],
            )
            .map_err(|e| self.err(e))?;
        Ok(self
            .get(name)?
            .ok_or(LoginError::BadCredentials)
            .map_err(|_| LoginError::BadCredentials))
    }

    /// A new API token for `account`: the wire form (shown once) and its public id.
    pub fn create_token(
        &self,
        account: &str,
        now_ms: i64,
    ) -> Result<(String, String), AccountError> {
        if self.get(account)?.is_none() {
            return Err(AccountError::NoAccount(account.into()));
        }
        let id: [u8; 8] = rand::random();
        let secret: [u8; 32] = rand::random();
        let id = hex::encode(id);
        let secret = hex::encode(secret);
        self.conn
            .execute(
                "INSERT INTO api_tokens (id, secret_sha256, account, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![id, Sha256::digest(secret.as_bytes()).to_vec(), account, now_ms],
            )
            .map_err(|e| self.err(e))?;
        Ok((format!("{TOKEN_PREFIX}{id}_{secret}"), id))
    }

    pub fn revoke_token(&self, id: &str, now_ms: i64) -> Result<bool, AccountError> {
        self.conn
            .execute(
                "UPDATE api_tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms],
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// The account an API token belongs to; `None` for anything else (malformed, unknown, revoked, wrong
    /// secret), compared in constant time.
    pub fn check_token(&self, token: &str) -> Result<Option<Account>, AccountError> {
        let Some((id, secret)) = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|t| t.split_once('_'))
        else {
            return Ok(None);
        };
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let row: Option<(Vec<u8>, String)> = self
            .conn
            .query_row(
                "SELECT secret_sha256, account FROM api_tokens WHERE id = ?1 AND revoked_ms IS NULL",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((want, account)) = row else {
            return Ok(None);
        };
        let got = Sha256::digest(secret.as_bytes());
        if !bool::from(got.as_slice().ct_eq(&want)) {
            return Ok(None);
        }
        self.get(&account)
    }
}

fn row_account(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Account>> {
    let role: String = r.get(1)?;
    let tenants: String = r.get(2)?;
    Ok(role.parse::<Role>().ok().map(|role| Account {
        name: r.get(0).unwrap_or_default(),
        role,
        scope: Scope::from_column(&tenants),
        created_ms: r.get(3).unwrap_or_default(),
        locked_until_ms: r.get(4).unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a temp dir, removed when the returned guard drops.
    fn store() -> (AccountStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (AccountStore::open(dir.path()).unwrap(), dir)
    }

    #[test]
    fn passwords_lockout_and_tokens() {
        let (s, _dir) = store();
        assert!(matches!(
            s.create("al", "short", Role::Admin, Scope::All, 0),
            Err(AccountError::WeakPassword)
        ));
        assert!(matches!(
            s.create("a l", "long enough pw", Role::Admin, Scope::All, 0),
            Err(AccountError::BadName)
        ));
        s.create(
            "ann",
            "correct horse battery",
            Role::Auditor,
            Scope::Tenants(vec!["acme".into()]),
            1,
        )
        .unwrap();
        assert!(matches!(
            s.create("ann", "another password", Role::Admin, Scope::All, 0),
            Err(AccountError::Exists(_))
        ));
        let hash: String = s
            .conn
            .query_row("SELECT hash FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        let ok = s
            .login("ann", "correct horse battery", 10, 3, 1000)
            .unwrap();
        let acct = ok.unwrap();
        assert!(acct.sees("acme") && !acct.sees("beta"));
        assert_eq!(
            s.login("nobody", "correct horse battery", 10, 3, 1000)
                .unwrap(),
            Err(LoginError::BadCredentials)
        );
        for _ in 0..2 {
            assert_eq!(
                s.login("ann", "wrong", 10, 3, 1000).unwrap(),
                Err(LoginError::BadCredentials)
            );
        }
        assert_eq!(
            s.login("ann", "wrong", 10, 3, 1000).unwrap(),
            Err(LoginError::Locked { until_ms: 1010 })
        );
        // Locked: even the right password is refused until the lock ends.
        assert_eq!(
            s.login("ann", "correct horse battery", 500, 3, 1000)
                .unwrap(),
            Err(LoginError::Locked { until_ms: 1010 })
        );
        assert!(s
            .login("ann", "correct horse battery", 1011, 3, 1000)
            .unwrap()
            .is_ok());
        let (token, id) = s.create_token("ann", 5).unwrap();
        assert_eq!(s.check_token(&token).unwrap().unwrap().name, "ann");
        let mut forged = token.clone();
        forged.pop();
        forged.push('0');
        assert!(s.check_token(&forged).unwrap().is_none() || forged == token);
        assert!(s.check_token("rpa1_zz").unwrap().is_none());
        assert!(s.revoke_token(&id, 6).unwrap());
        assert!(s.check_token(&token).unwrap().is_none());
    }
}
