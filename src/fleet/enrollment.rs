//! Shared enrollment of a fleet (schema migration 3): the enrollment tokens and the credentials of
//! self-enrolled devices live in PostgreSQL, so a token created or revoked on any node is valid or invalid on
//! every node, and a device enrolled on node A can refresh its config on node B (failover Mode A).
//!
//! - `fleet_tokens`: every token (only the hash of its secret). A use is taken by one `UPDATE ... WHERE used <
//!   max_uses RETURNING`, so two nodes can never both spend the last use.
//! - `fleet_device_credentials`: each self-enrolled device with the node it was enrolled on and only the hash
//!   of its device token, mirrored from that node's `enroll.db` by the sync thread ([`mirror`], called from
//!   `fleet::state`), whole, at every publish.
//! - `fleet_nodes.enroll_url`: each node's public enrollment URL (with its pin), written at every heartbeat;
//!   [`enroll_urls`] lists the live ones for device replies.
//!
//! The enrollment service is synchronous (blocking threads), so [`SharedEnrollment`] runs each call on a
//! current-thread runtime of its own with a connection of its own. PostgreSQL down: every call fails, and the
//! service refuses enrollments with a clear error (`unavailable`); a node's own devices keep refreshing from
//! its `enroll.db`.
//!
//! Must never: store a secret (only `SecretHash`), or be used without `[fleet]` (single-box keeps
//! `enroll.db` for tokens).
#![deny(unsafe_code)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::{Client, Row};

use super::Connector;
use crate::config::{DeviceName, TenantId, UserName};
use crate::enroll::api::DeviceState;
use crate::enroll::secret::{PublicId, SecretHash};
use crate::enroll::store::{DeviceRow, TokenRow};

/// Takes one use of token `$1` if it is still valid at `$2`: the check and the count are one statement, so two
/// nodes can never both take the last use.
const TAKE_USE: &str = "UPDATE fleet_tokens SET used = used + 1, last_used_at = $2
     WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2
       AND (max_uses IS NULL OR used < max_uses)
       AND (locked_until IS NULL OR locked_until <= $2)
     RETURNING used";

/// A node's handle on the shared enrollment tables (cheap to clone; connects per call).
#[derive(Debug, Clone)]
pub struct SharedEnrollment {
    connector: Connector,
    node: String,
    /// A node whose heartbeat is older than this is not offered to devices.
    live_after: Duration,
}

impl SharedEnrollment {
    /// `heartbeat`: the fleet's heartbeat interval; a node missing three heartbeats is left out of the URLs.
    pub fn new(connector: Connector, node: &str, heartbeat: Duration) -> SharedEnrollment {
        SharedEnrollment {
            connector,
            node: node.to_string(),
            live_after: heartbeat * 3,
        }
    }

    /// From a config with `[fleet]` (reads the password file); `None` without it.
    pub fn from_config(cfg: &crate::config::Config) -> anyhow::Result<Option<SharedEnrollment>> {
        let Some(f) = &cfg.fleet else {
            return Ok(None);
        };
        let c = Connector::new(f, &cfg.source)?;
        Ok(Some(SharedEnrollment::new(
            c,
            &f.node_id,
            f.heartbeat_interval,
        )))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `f` with a fresh connection on a runtime of its own (callers are blocking threads or the CLI).
    fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: for<'c> AsyncFnOnce(&'c mut Client) -> anyhow::Result<T>,
    {
        let rt = super::runtime().context("cannot start a runtime for the fleet database")?;
        rt.block_on(async {
            let mut c = self
                .connector
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            f(&mut c).await
        })
    }

    /// Migrates the schema first (for the CLI, which may run before any node of this version started).
    pub fn insert_token(&self, t: &TokenRow) -> anyhow::Result<()> {
        self.call(async |c| {
            super::schema::migrate(c).await?;
            c.execute(
                "INSERT INTO fleet_tokens (id, secret_hash, tenant, \"user\", groups, max_uses, used, created_at,
                     expires_at, ephemeral_secs, preapproved, revoked_at, created_by, note, last_used_at, failures,
                     locked_until)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                &[
                    &t.id.as_str(),
                    &&t.secret_hash.0[..],
                    &t.tenant.as_str(),
                    &t.user.as_ref().map(|u| u.as_str()),
                    &groups_text(&t.groups),
                    &t.max_uses.map(i64::from),
                    &i64::from(t.used),
                    &t.created_at,
                    &t.expires_at,
                    &t.ephemeral_secs.map(|s| s as i64),
                    &t.preapproved,
                    &t.revoked_at,
                    &t.created_by,
                    &t.note,
                    &t.last_used_at,
                    &i64::from(t.failures),
                    &t.locked_until,
                ],
            )
            .await?;
            Ok(())
        })
    }

    pub fn token(&self, id: &PublicId) -> anyhow::Result<Option<TokenRow>> {
        self.call(async |c| {
            let r = c
                .query_opt(
                    &format!("SELECT {TOKEN_COLS} FROM fleet_tokens WHERE id = $1"),
                    &[&id.as_str()],
                )
                .await?;
            r.as_ref().map(token_row).transpose()
        })
    }

    pub fn tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        self.call(async |c| {
            super::schema::migrate(c).await?;
            c.query(
                &format!("SELECT {TOKEN_COLS} FROM fleet_tokens ORDER BY created_at, id"),
                &[],
            )
            .await?
            .iter()
            .map(token_row)
            .collect()
        })
    }

    /// Marks the token revoked on every node; false if it does not exist or was revoked already.
    pub fn revoke_token(&self, id: &PublicId, now: i64) -> anyhow::Result<bool> {
        self.call(async |c| {
            Ok(c.execute(
                "UPDATE fleet_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id.as_str(), &now],
            )
            .await?
                == 1)
        })
    }

    /// Counts a wrong secret, fleet-wide; at `limit` failures the token locks until `now + lockout`. Returns
    /// the lock's end when this failure locked it. One statement.
    pub fn record_failure(
        &self,
        id: &PublicId,
        now: i64,
        limit: u32,
        lockout: Duration,
    ) -> anyhow::Result<Option<i64>> {
        let until = now + lockout.as_secs() as i64;
        self.call(async |c| {
            let r = c
                .query_opt(
                    "UPDATE fleet_tokens
                     SET failures = CASE WHEN failures + 1 >= $3 THEN 0 ELSE failures + 1 END,
                         locked_until = CASE WHEN failures + 1 >= $3 THEN $2 ELSE locked_until END
                     WHERE id = $1
                     RETURNING failures = 0 AND locked_until = $2",
                    &[&id.as_str(), &until, &i64::from(limit)],
                )
                .await?;
            Ok(r.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true))
                .then_some(until))
        })
    }

    pub fn reset_failures(&self, id: &PublicId) -> anyhow::Result<()> {
        self.call(async |c| {
            c.execute(
                "UPDATE fleet_tokens SET failures = 0 WHERE id = $1 AND failures > 0",
                &[&id.as_str()],
            )
            .await?;
            Ok(())
        })
    }

    /// Takes one use of the token if it is still valid at `now`: the check and the count are one statement,
    /// so two nodes can never both take the last use.
    pub fn consume_token(&self, id: &PublicId, now: i64) -> anyhow::Result<bool> {
        self.call(async |c| {
            Ok(c.query_opt(TAKE_USE, &[&id.as_str(), &now])
                .await?
                .is_some())
        })
    }

    /// A new device's place in the fleet, taken in one transaction under a per-tenant lock: the first of
    /// `candidates` (addresses free on this node, in allocation order) that no other node's self-enrolled
    /// device holds, one use of the token, and the device's credential row. So two nodes enrolling into one
    /// tenant at the same moment never hand out one address (nor one name) and never both spend the last use.
    /// `build` makes the device for the chosen address, given the tenant's device names on other nodes
    /// (`None`: no free name). Nothing is written unless every step succeeds.
    pub fn place_device<F>(
        &self,
        token: &PublicId,
        now: i64,
        tenant: &TenantId,
        candidates: &[IpAddr],
        build: F,
    ) -> anyhow::Result<Placed>
    where
        F: FnOnce(IpAddr, &HashSet<String>) -> Option<DeviceRow>,
    {
        self.call(async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('rampart-enroll:' || $1))",
                &[&tenant.as_str()],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT address, name FROM fleet_device_credentials WHERE tenant = $1",
                    &[&tenant.as_str()],
                )
                .await?;
            let held: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
            let names: HashSet<String> = rows.iter().map(|r| r.get(1)).collect();
            let Some(address) = candidates.iter().find(|a| !held.contains(&a.to_string())) else {
                return Ok(Placed::PoolFull);
            };
            let Some(d) = build(*address, &names) else {
                return Ok(Placed::NoName);
            };
            let spent = tx.query_opt(TAKE_USE, &[&token.as_str(), &now]).await?;
            if spent.is_none() {
                return Ok(Placed::TokenSpent);
            }
            upsert_credential(&tx, &self.node, &d).await?;
            tx.commit().await?;
            Ok(Placed::Device(Box::new(d)))
        })
    }

    /// A self-enrolled device of any node by its id, with the node it was enrolled on.
    pub fn device(&self, id: &PublicId) -> anyhow::Result<Option<(DeviceRow, String)>> {
        self.call(async |c| {
            let r = c
                .query_opt(
                    "SELECT id, tenant, name, \"user\", groups, public_key, address, state, token_id,
                            token_hash, enrolled_at, key_set_at, origin_node
                     FROM fleet_device_credentials WHERE id = $1",
                    &[&id.as_str()],
                )
                .await?;
            match r {
                Some(r) => Ok(Some((device_row(&r)?, r.get(12)))),
                None => Ok(None),
            }
        })
    }

    /// Mirrors this node's self-enrolled devices now (after a change the device may use elsewhere at once).
    pub fn mirror(&self, devices: &[DeviceRow]) -> anyhow::Result<()> {
        self.call(async |c| mirror(c, &self.node, devices).await)
    }

    /// The public enrollment URLs of the live nodes, this node's first.
    pub fn enroll_urls(&self) -> anyhow::Result<Vec<String>> {
        self.call(async |c| enroll_urls(c, &self.node, self.live_after).await)
    }
}

/// Makes `fleet_device_credentials` hold exactly `devices` for `node` (one transaction).
pub async fn mirror(c: &mut Client, node: &str, devices: &[DeviceRow]) -> anyhow::Result<()> {
    let tx = c.transaction().await?;
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    tx.execute(
        "DELETE FROM fleet_device_credentials WHERE origin_node = $1 AND NOT (id = ANY($2))",
        &[&node, &ids],
    )
    .await?;
    for d in devices {
        upsert_credential(&tx, node, d).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// What [`SharedEnrollment::place_device`] did.
#[derive(Debug)]
pub enum Placed {
    /// The device holds its address in the fleet, the token's use is taken.
    Device(Box<DeviceRow>),
    /// Every candidate address is held by a device of another node.
    PoolFull,
    /// `build` found no free name.
    NoName,
    /// The token was used up, revoked, expired or locked meanwhile.
    TokenSpent,
}

/// Writes (or updates, if it is `node`'s) one device's credential row.
async fn upsert_credential(
    tx: &tokio_postgres::Transaction<'_>,
    node: &str,
    d: &DeviceRow,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO fleet_device_credentials (id, origin_node, tenant, name, \"user\", groups, public_key,
             address, state, token_id, token_hash, enrolled_at, key_set_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (id) DO UPDATE
         SET tenant = EXCLUDED.tenant, name = EXCLUDED.name, \"user\" = EXCLUDED.\"user\",
             groups = EXCLUDED.groups, public_key = EXCLUDED.public_key, address = EXCLUDED.address,
             state = EXCLUDED.state, token_id = EXCLUDED.token_id, token_hash = EXCLUDED.token_hash,
             enrolled_at = EXCLUDED.enrolled_at, key_set_at = EXCLUDED.key_set_at
         WHERE fleet_device_credentials.origin_node = EXCLUDED.origin_node",
        &[
            &d.id.as_str(),
            &node,
            &d.tenant.as_str(),
            &d.name.as_str(),
            &d.user.as_str(),
            &groups_text(&d.groups),
            &d.public_key.to_string(),
            &d.address.to_string(),
            &d.state.as_str(),
            &d.token_id.as_str(),
            &&d.token_hash.0[..],
            &d.enrolled_at,
            &d.key_set_at,
        ],
    )
    .await?;
    Ok(())
}

/// The enrollment URLs of nodes with a heartbeat within `live_after`, `node`'s first, then by node id.
pub async fn enroll_urls(
    c: &Client,
    node: &str,
    live_after: Duration,
) -> anyhow::Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT enroll_url FROM fleet_nodes
             WHERE enroll_url IS NOT NULL
               AND last_heartbeat > now() - make_interval(secs => $2)
             ORDER BY node_id = $1 DESC, node_id",
            &[&node, &live_after.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

const TOKEN_COLS: &str = "id, secret_hash, tenant, \"user\", groups, max_uses, used, created_at, expires_at, \
     ephemeral_secs, preapproved, revoked_at, created_by, note, last_used_at, failures, locked_until";

fn groups_text(groups: &[String]) -> String {
    serde_json::to_string(groups).unwrap_or_else(|_| "[]".into())
}

fn bad(what: &str, value: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("the fleet database holds a bad {what}: {value:?}; fix or remove the row")
}

fn id_col(r: &Row, i: usize) -> anyhow::Result<PublicId> {
    let s: String = r.try_get(i)?;
    PublicId::parse(&s).ok_or_else(|| bad("id", s))
}

fn hash_col(r: &Row, i: usize) -> anyhow::Result<SecretHash> {
    let b: Vec<u8> = r.try_get(i)?;
    let arr: [u8; 32] = b
        .try_into()
        .map_err(|_| bad("secret hash", "(wrong length)"))?;
    Ok(SecretHash(arr))
}

fn groups_col(r: &Row, i: usize) -> anyhow::Result<Vec<String>> {
    let s: String = r.try_get(i)?;
    serde_json::from_str(&s).map_err(|_| bad("groups", s))
}

fn u32_col(r: &Row, i: usize) -> anyhow::Result<u32> {
    let v: i64 = r.try_get(i)?;
    u32::try_from(v).map_err(|_| bad("count", v))
}

fn token_row(r: &Row) -> anyhow::Result<TokenRow> {
    let tenant: String = r.try_get(2)?;
    let user: Option<String> = r.try_get(3)?;
    let max_uses: Option<i64> = r.try_get(5)?;
    Ok(TokenRow {
        id: id_col(r, 0)?,
        secret_hash: hash_col(r, 1)?,
        tenant: TenantId::parse(&tenant).map_err(|_| bad("tenant", &tenant))?,
        user: match user {
            Some(u) => Some(UserName::parse(&u).map_err(|_| bad("user", &u))?),
            None => None,
        },
        groups: groups_col(r, 4)?,
        max_uses: match max_uses {
            Some(m) => Some(u32::try_from(m).map_err(|_| bad("max_uses", m))?),
            None => None,
        },
        used: u32_col(r, 6)?,
        created_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        ephemeral_secs: r.try_get::<_, Option<i64>>(9)?.map(|s| s.max(0) as u64),
        preapproved: r.try_get(10)?,
        revoked_at: r.try_get(11)?,
        created_by: r.try_get(12)?,
        note: r.try_get(13)?,
        last_used_at: r.try_get(14)?,
        failures: u32_col(r, 15)?,
        locked_until: r.try_get(16)?,
    })
}

fn device_row(r: &Row) -> anyhow::Result<DeviceRow> {
    let tenant: String = r.try_get(1)?;
    let name: String = r.try_get(2)?;
    let user: String = r.try_get(3)?;
    let key: String = r.try_get(5)?;
    let address: String = r.try_get(6)?;
    let state: String = r.try_get(7)?;
    Ok(DeviceRow {
        id: id_col(r, 0)?,
        tenant: TenantId::parse(&tenant).map_err(|_| bad("tenant", &tenant))?,
        name: DeviceName::parse(&name).map_err(|_| bad("device name", &name))?,
        user: UserName::parse(&user).map_err(|_| bad("user", &user))?,
        groups: groups_col(r, 4)?,
        public_key: key.parse().map_err(|_| bad("public key", &key))?,
        address: address.parse().map_err(|_| bad("address", &address))?,
        state: DeviceState::parse(&state).ok_or_else(|| bad("state", &state))?,
        token_id: id_col(r, 8)?,
        hw_id: None,
        token_hash: hash_col(r, 9)?,
        enrolled_at: r.try_get(10)?,
        key_set_at: r.try_get(11)?,
        approved_at: None,
        proven_at: None,
        last_seen_at: None,
        ephemeral_secs: None,
        os: None,
        hostname: None,
    })
}
