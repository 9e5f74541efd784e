//! The enrollment store: `state_dir/enroll.db` (SQLite, WAL, `synchronous = FULL`, mode 0600) with the
//! enrollment tokens and the devices that enrolled themselves with one.
//!
//! One database holds both so that consuming a token and creating its device are one transaction
//! (`Tx::consume_token` + `Tx::insert_device`, committed together or not at all). Writers that change devices
//! also hold the registry lock (`registry::Registry::lock`), the same lock `rampart device add` takes, so
//! address allocation sees every device. Active devices reach the data path through `Config::load`
//! (`data_path_devices`); pending ones never do.
//!
//! Never: store a secret (only `SecretHash`), or hand a pending device to the config.
#![deny(unsafe_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _, Row, TransactionBehavior};

use super::api::DeviceState;
use super::secret::{PublicId, SecretHash};
use crate::config::{DeviceName, TenantId, UserName};
use crate::keys::PeerKey;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    tenant TEXT NOT NULL,
    user TEXT,
    groups TEXT NOT NULL,
    max_uses INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ephemeral_secs INTEGER,
    preapproved INTEGER NOT NULL,
    revoked_at INTEGER,
    created_by TEXT NOT NULL,
    note TEXT NOT NULL,
    last_used_at INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    user TEXT NOT NULL,
    groups TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    token_id TEXT NOT NULL,
    hw_id TEXT,
    token_hash BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    key_set_at INTEGER NOT NULL,
    approved_at INTEGER,
    proven_at INTEGER,
    last_seen_at INTEGER,
    ephemeral_secs INTEGER,
    os TEXT,
    hostname TEXT,
    UNIQUE (tenant, name),
    UNIQUE (tenant, address),
    UNIQUE (token_id, hw_id)
);
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("enrollment store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("enrollment store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("enrollment store holds a bad {what}: {value:?}; fix or remove the row")]
    Corrupt { what: &'static str, value: String },
}

/// An enrollment token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: PublicId,
    pub secret_hash: SecretHash,
    pub tenant: TenantId,
    /// The user its devices belong to (`None`: `token-<id>`).
    pub user: Option<UserName>,
    pub groups: Vec<String>,
    /// `None`: reusable without limit.
    pub max_uses: Option<u32>,
    pub used: u32,
    pub created_at: i64,
    pub expires_at: i64,
    /// Devices enrolled with it are removed after this long without being seen.
    pub ephemeral_secs: Option<u64>,
    /// False: its devices wait for `rampart device approve`.
    pub preapproved: bool,
    pub revoked_at: Option<i64>,
    pub created_by: String,
    pub note: String,
    pub last_used_at: Option<i64>,
    /// Wrong secrets since the last lockout or success.
    pub failures: u32,
    pub locked_until: Option<i64>,
}

/// Whether a token enrolls devices now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    Locked,
    Expired,
    UsedUp,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Locked => "locked",
            TokenState::Expired => "expired",
            TokenState::UsedUp => "used_up",
            TokenState::Revoked => "revoked",
        }
    }
}

impl TokenRow {
    /// The state at `now`; the most final one wins (revoked over expired over used up over locked).
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at <= now {
            TokenState::Expired
        } else if self.max_uses.is_some_and(|m| self.used >= m) {
            TokenState::UsedUp
        } else if self.locked_until.is_some_and(|t| t > now) {
            TokenState::Locked
        } else {
            TokenState::Valid
        }
    }

    /// The user of devices it enrolls.
    pub fn device_user(&self) -> UserName {
        self.user.clone().unwrap_or_else(|| {
            UserName::parse(&format!("token-{}", self.id)).expect("token ids are valid user names")
        })
    }
}

/// A device that enrolled itself with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: PublicId,
    pub tenant: TenantId,
    pub name: DeviceName,
    pub user: UserName,
    pub groups: Vec<String>,
    pub public_key: PeerKey,
    pub address: IpAddr,
    pub state: DeviceState,
    pub token_id: PublicId,
    /// The `device_id` the device sent (hardware or MDM id).
    pub hw_id: Option<String>,
    /// Hash of its device token's secret.
    pub token_hash: SecretHash,
    pub enrolled_at: i64,
    /// When its current key was set (enrollment or rotation).
    pub key_set_at: i64,
    pub approved_at: Option<i64>,
    /// First completed handshake with the current key: proof it holds the private key.
    pub proven_at: Option<i64>,
    pub last_seen_at: Option<i64>,
    pub ephemeral_secs: Option<u64>,
    pub os: Option<String>,
    pub hostname: Option<String>,
}

impl DeviceRow {
    /// `dev_<id>`, as the API names it.
    pub fn api_id(&self) -> String {
        format!("dev_{}", self.id)
    }

    /// The last sign of life: seen by the data path, or the latest admin/enrollment action.
    pub fn last_activity(&self) -> i64 {
        [self.last_seen_at, self.approved_at, Some(self.key_set_at)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.enrolled_at)
    }
}

impl From<DeviceRow> for crate::registry::EnrolledDevice {
    fn from(d: DeviceRow) -> Self {
        crate::registry::EnrolledDevice {
            tenant: d.tenant,
            name: d.name,
            public_key: d.public_key,
            address: d.address,
            user: d.user,
            groups: d.groups,
            ssh_keys: Vec::new(),
            enrolled_at: d.enrolled_at.max(0) as u64,
        }
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("enroll.db")
}

pub struct Store {
    conn: Connection,
}

/// A write transaction (`BEGIN IMMEDIATE`: concurrent writers queue up behind it).
pub struct Tx<'a>(rusqlite::Transaction<'a>);

impl Store {
    /// Opens (creating if needed) the store of `state_dir` for reading and writing.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let p = path(state_dir);
        let open = || -> rusqlite::Result<Connection> {
            std::fs::create_dir_all(state_dir)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let conn = Connection::open(&p)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(SCHEMA)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open {
            path: p.clone(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        Ok(Store { conn })
    }

    /// Opens an existing store without writing; `None` when there is none yet.
    pub fn open_readonly(state_dir: &Path) -> Result<Option<Store>, StoreError> {
        let p = path(state_dir);
        if !p.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &p,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: p.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Some(Store { conn }))
    }

    pub fn begin(&mut self) -> Result<Tx<'_>, StoreError> {
        Ok(Tx(self.conn.transaction_with_behavior(
            TransactionBehavior::Immediate,
        )?))
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        tokens(&self.conn)
    }

    pub fn token(&self, id: &PublicId) -> Result<Option<TokenRow>, StoreError> {
        token(&self.conn, id)
    }

    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        devices(&self.conn, "1 = 1", [])
    }

    pub fn device(&self, id: &PublicId) -> Result<Option<DeviceRow>, StoreError> {
        Ok(devices(&self.conn, "id = ?1", [id.as_str()])?.pop())
    }
}

impl Tx<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit()?)
    }

    pub fn token(&self, id: &PublicId) -> Result<Option<TokenRow>, StoreError> {
        token(&self.0, id)
    }

    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        devices(&self.0, "1 = 1", [])
    }

    pub fn device(&self, id: &PublicId) -> Result<Option<DeviceRow>, StoreError> {
        Ok(devices(&self.0, "id = ?1", [id.as_str()])?.pop())
    }

    pub fn insert_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO tokens (id, secret_hash, tenant, user, groups, max_uses, used, created_at, expires_at,
                 ephemeral_secs, preapproved, revoked_at, created_by, note, last_used_at, failures, locked_until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                t.id.as_str(),
                &t.secret_hash.0[..],
                t.tenant.as_str(),
                t.user.as_ref().map(|u| u.as_str()),
                groups_text(&t.groups),
                t.max_uses,
                t.used,
                t.created_at,
                t.expires_at,
                t.ephemeral_secs.map(|s| s as i64),
                t.preapproved,
                t.revoked_at,
                t.created_by,
                t.note,
                t.last_used_at,
                t.failures,
                t.locked_until,
            ],
        )?;
        Ok(())
    }

    /// Marks the token revoked; false if it does not exist or was revoked already.
    pub fn revoke_token(&self, id: &PublicId, now: i64) -> Result<bool, StoreError> {
        Ok(self.0.execute(
            "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id.as_str(), now],
        )? == 1)
    }

    /// Counts a wrong secret; at `limit` failures the token locks until `now + lockout` (and the count starts
    /// over). Returns the lock's end when this failure locked it.
    pub fn record_failure(
        &self,
        id: &PublicId,
        now: i64,
        limit: u32,
        lockout: Duration,
    ) -> Result<Option<i64>, StoreError> {
        self.0.execute(
            "UPDATE tokens SET failures = failures + 1 WHERE id = ?1",
            params![id.as_str()],
        )?;
        let until = now + lockout.as_secs() as i64;
        let locked = self.0.execute(
            "UPDATE tokens SET failures = 0, locked_until = ?2 WHERE id = ?1 AND failures >= ?3",
            params![id.as_str(), until, limit],
        )? == 1;
        Ok(locked.then_some(until))
    }

    pub fn reset_failures(&self, id: &PublicId) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE tokens SET failures = 0 WHERE id = ?1 AND failures > 0",
            params![id.as_str()],
        )?;
        Ok(())
    }

    /// Takes one use of the token if it is still valid at `now`: the check and the count are one statement, so
    /// two enrollments can never both take the last use.
    pub fn consume_token(&self, id: &PublicId, now: i64) -> Result<bool, StoreError> {
        Ok(self.0.execute(
            "UPDATE tokens SET used = used + 1, last_used_at = ?2
             WHERE id = ?1 AND revoked_at IS NULL AND expires_at > ?2
               AND (max_uses IS NULL OR used < max_uses)
               AND (locked_until IS NULL OR locked_until <= ?2)",
            params![id.as_str(), now],
        )? == 1)
    }

    pub fn insert_device(&self, d: &DeviceRow) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO devices (id, tenant, name, user, groups, public_key, address, state, token_id, hw_id,
                 token_hash, enrolled_at, key_set_at, approved_at, proven_at, last_seen_at, ephemeral_secs, os,
                 hostname)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            params![
                d.id.as_str(),
                d.tenant.as_str(),
                d.name.as_str(),
                d.user.as_str(),
                groups_text(&d.groups),
                d.public_key.to_string(),
                d.address.to_string(),
                d.state.as_str(),
                d.token_id.as_str(),
                d.hw_id,
                &d.token_hash.0[..],
                d.enrolled_at,
                d.key_set_at,
                d.approved_at,
                d.proven_at,
                d.last_seen_at,
                d.ephemeral_secs.map(|s| s as i64),
                d.os,
                d.hostname,
            ],
        )?;
        Ok(())
    }

    /// Replaces a device's key (it must prove the new one with a handshake again) and, when given, its
    /// device token; owner and groups follow the token that re-enrolled it.
    pub fn set_key(
        &self,
        id: &PublicId,
        key: &PeerKey,
        token_hash: Option<&SecretHash>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE devices SET public_key = ?2, key_set_at = ?3, proven_at = NULL,
                 token_hash = COALESCE(?4, token_hash)
             WHERE id = ?1",
            params![
                id.as_str(),
                key.to_string(),
                now,
                token_hash.map(|h| h.0.to_vec())
            ],
        )?;
        Ok(())
    }

    pub fn set_device_token(&self, id: &PublicId, hash: &SecretHash) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE devices SET token_hash = ?2 WHERE id = ?1",
            params![id.as_str(), &hash.0[..]],
        )?;
        Ok(())
    }

    /// Pending -> active; false if the device is not pending.
    pub fn approve(&self, id: &PublicId, now: i64) -> Result<bool, StoreError> {
        Ok(self.0.execute(
            "UPDATE devices SET state = 'active', approved_at = ?2 WHERE id = ?1 AND state = 'pending'",
            params![id.as_str(), now],
        )? == 1)
    }

    pub fn delete_device(&self, id: &PublicId) -> Result<bool, StoreError> {
        Ok(self
            .0
            .execute("DELETE FROM devices WHERE id = ?1", params![id.as_str()])?
            == 1)
    }

    /// Records the first handshake with the current key; false if it was recorded already.
    pub fn mark_proven(&self, id: &PublicId, at: i64) -> Result<bool, StoreError> {
        Ok(self.0.execute(
            "UPDATE devices SET proven_at = ?2 WHERE id = ?1 AND proven_at IS NULL",
            params![id.as_str(), at],
        )? == 1)
    }

    pub fn mark_seen(&self, id: &PublicId, at: i64) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE devices SET last_seen_at = ?2 WHERE id = ?1 AND (last_seen_at IS NULL OR last_seen_at < ?2)",
            params![id.as_str(), at],
        )?;
        Ok(())
    }
}

/// The active self-enrolled devices of `state_dir`, for `Config::load` (nothing when there is no store yet).
pub fn data_path_devices(state_dir: &Path) -> Result<Vec<DeviceRow>, StoreError> {
    let Some(store) = Store::open_readonly(state_dir)? else {
        return Ok(Vec::new());
    };
    devices(&store.conn, "state = 'active'", [])
}

fn groups_text(groups: &[String]) -> String {
    serde_json::to_string(groups).unwrap_or_else(|_| "[]".into())
}

fn corrupt(what: &'static str, value: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(StoreError::Corrupt {
        what,
        value: value.into(),
    }))
}

fn hash_col(row: &Row<'_>, i: usize) -> rusqlite::Result<SecretHash> {
    let b: Vec<u8> = row.get(i)?;
    let arr: [u8; 32] = b
        .try_into()
        .map_err(|_| corrupt("secret hash", "(wrong length)"))?;
    Ok(SecretHash(arr))
}

fn id_col(row: &Row<'_>, i: usize) -> rusqlite::Result<PublicId> {
    let s: String = row.get(i)?;
    PublicId::parse(&s).ok_or_else(|| corrupt("id", s))
}

fn groups_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Vec<String>> {
    let s: String = row.get(i)?;
    serde_json::from_str(&s).map_err(|_| corrupt("groups", s))
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    let tenant: String = r.get(2)?;
    let user: Option<String> = r.get(3)?;
    Ok(TokenRow {
        id: id_col(r, 0)?,
        secret_hash: hash_col(r, 1)?,
        tenant: TenantId::parse(&tenant).map_err(|_| corrupt("tenant", tenant))?,
        user: match user {
            Some(u) => Some(UserName::parse(&u).map_err(|_| corrupt("user", u))?),
            None => None,
        },
        groups: groups_col(r, 4)?,
        max_uses: r.get(5)?,
        used: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        ephemeral_secs: r.get::<_, Option<i64>>(9)?.map(|s| s.max(0) as u64),
        preapproved: r.get(10)?,
        revoked_at: r.get(11)?,
        created_by: r.get(12)?,
        note: r.get(13)?,
        last_used_at: r.get(14)?,
        failures: r.get(15)?,
        locked_until: r.get(16)?,
    })
}

const TOKEN_COLS: &str = "id, secret_hash, tenant, user, groups, max_uses, used, created_at, expires_at, \
     ephemeral_secs, preapproved, revoked_at, created_by, note, last_used_at, failures, locked_until";

fn tokens(c: &Connection) -> Result<Vec<TokenRow>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at, id"
    ))?;
    let rows = st.query_map([], token_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn token(c: &Connection, id: &PublicId) -> Result<Option<TokenRow>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"),
        [id.as_str()],
        token_row,
    )
    .optional()?)
}

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    let tenant: String = r.get(1)?;
    let name: String = r.get(2)?;
    let user: String = r.get(3)?;
    let key: String = r.get(5)?;
    let address: String = r.get(6)?;
    let state: String = r.get(7)?;
    Ok(DeviceRow {
        id: id_col(r, 0)?,
        tenant: TenantId::parse(&tenant).map_err(|_| corrupt("tenant", tenant))?,
        name: DeviceName::parse(&name).map_err(|_| corrupt("device name", name))?,
        user: UserName::parse(&user).map_err(|_| corrupt("user", user))?,
        groups: groups_col(r, 4)?,
        public_key: key.parse().map_err(|_| corrupt("public key", key))?,
        address: address.parse().map_err(|_| corrupt("address", address))?,
        state: DeviceState::parse(&state).ok_or_else(|| corrupt("state", state))?,
        token_id: id_col(r, 8)?,
        hw_id: r.get(9)?,
        token_hash: hash_col(r, 10)?,
        enrolled_at: r.get(11)?,
        key_set_at: r.get(12)?,
        approved_at: r.get(13)?,
        proven_at: r.get(14)?,
        last_seen_at: r.get(15)?,
        ephemeral_secs: r.get::<_, Option<i64>>(16)?.map(|s| s.max(0) as u64),
        os: r.get(17)?,
        hostname: r.get(18)?,
    })
}

fn devices<P: rusqlite::Params>(
    c: &Connection,
    filter: &str,
    p: P,
) -> Result<Vec<DeviceRow>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT id, tenant, name, user, groups, public_key, address, state, token_id, hw_id, token_hash,
                enrolled_at, key_set_at, approved_at, proven_at, last_seen_at, ephemeral_secs, os, hostname
         FROM devices WHERE {filter} ORDER BY tenant, name"
    ))?;
    let rows = st.query_map(p, device_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::secret::{Credential, Kind};

    /// A temp dir, removed when the guard drops (also after a failure).
    pub(crate) fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("rampart-enroll-{tag}-"))
            .tempdir()
            .unwrap()
    }

    fn token(max_uses: Option<u32>) -> (Credential, TokenRow) {
        let c = Credential::generate(Kind::Enrollment, None);
        let row = TokenRow {
            id: c.id().clone(),
            secret_hash: c.hash(),
            tenant: TenantId::parse("acme").unwrap(),
            user: None,
            groups: vec!["eng".into()],
            max_uses,
            used: 0,
            created_at: 100,
            expires_at: 1000,
            ephemeral_secs: None,
            preapproved: true,
            revoked_at: None,
            created_by: "test".into(),
            note: String::new(),
            last_used_at: None,
            failures: 0,
            locked_until: None,
        };
        (c, row)
    }

    #[test]
    fn token_round_trips_and_consumption_stops_at_max_uses() {
        let dir_tmp = temp_dir("store");
        let dir = dir_tmp.path().to_path_buf();
        let mut s = Store::open(&dir).unwrap();
        let (_c, row) = token(Some(2));
        let tx = s.begin().unwrap();
        tx.insert_token(&row).unwrap();
        tx.commit().unwrap();
        assert_eq!(s.token(&row.id).unwrap().unwrap(), row);
        let tx = s.begin().unwrap();
        assert!(tx.consume_token(&row.id, 200).unwrap());
        assert!(tx.consume_token(&row.id, 200).unwrap());
        assert!(!tx.consume_token(&row.id, 200).unwrap(), "third use of 2");
        tx.commit().unwrap();
        let t = s.token(&row.id).unwrap().unwrap();
        assert_eq!(t.used, 2);
        assert_eq!(t.state(200), TokenState::UsedUp);
    }

    #[test]
    fn expired_revoked_and_locked_tokens_are_not_consumed() {
        let dir_tmp = temp_dir("states");
        let dir = dir_tmp.path().to_path_buf();
        let mut s = Store::open(&dir).unwrap();
        let (_c, row) = token(None);
        let tx = s.begin().unwrap();
        tx.insert_token(&row).unwrap();
        assert!(!tx.consume_token(&row.id, 1000).unwrap(), "expired");
        assert_eq!(
            tx.record_failure(&row.id, 200, 2, Duration::from_secs(60))
                .unwrap(),
            None
        );
        assert_eq!(
            tx.record_failure(&row.id, 200, 2, Duration::from_secs(60))
                .unwrap(),
            Some(260)
        );
        assert!(!tx.consume_token(&row.id, 259).unwrap(), "locked");
        assert!(tx.consume_token(&row.id, 260).unwrap(), "lock over");
        assert!(tx.revoke_token(&row.id, 300).unwrap());
        assert!(!tx.revoke_token(&row.id, 301).unwrap());
        assert!(!tx.consume_token(&row.id, 302).unwrap(), "revoked");
        let t = tx.token(&row.id).unwrap().unwrap();
        assert_eq!(t.state(302), TokenState::Revoked);
        assert_eq!(t.failures, 0);
    }

    #[test]
    fn only_active_devices_reach_the_data_path() {
        let dir_tmp = temp_dir("devices");
        let dir = dir_tmp.path().to_path_buf();
        let mut s = Store::open(&dir).unwrap();
        let (_c, t) = token(None);
        let dev = |n: u8, state| DeviceRow {
            id: PublicId::random(),
            tenant: t.tenant.clone(),
            name: DeviceName::parse(&format!("d{n}")).unwrap(),
            user: t.device_user(),
            groups: vec![],
            public_key: PeerKey([n; 32]),
            address: format!("100.96.0.{n}").parse().unwrap(),
            state,
            token_id: t.id.clone(),
            hw_id: None,
            token_hash: SecretHash([n; 32]),
            enrolled_at: 1,
            key_set_at: 1,
            approved_at: None,
            proven_at: None,
            last_seen_at: None,
            ephemeral_secs: None,
            os: None,
            hostname: None,
        };
        let tx = s.begin().unwrap();
        tx.insert_device(&dev(2, DeviceState::Active)).unwrap();
        let pending = dev(3, DeviceState::Pending);
        tx.insert_device(&pending).unwrap();
        let dup_key = DeviceRow {
            id: PublicId::random(),
            name: DeviceName::parse("other").unwrap(),
            address: "100.96.0.9".parse().unwrap(),
            ..dev(2, DeviceState::Active)
        };
        assert!(tx.insert_device(&dup_key).is_err(), "duplicate key");
        tx.commit().unwrap();
        let live = data_path_devices(&dir).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].name.as_str(), "d2");
        assert_eq!(s.devices().unwrap().len(), 2);
        let tx = s.begin().unwrap();
        assert!(tx.approve(&pending.id, 5).unwrap());
        assert!(!tx.approve(&pending.id, 6).unwrap());
        tx.commit().unwrap();
        assert_eq!(data_path_devices(&dir).unwrap().len(), 2);
    }
}
