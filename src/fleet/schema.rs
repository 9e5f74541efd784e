//! The fleet's PostgreSQL schema, every migration in one place ([`MIGRATIONS`], applied in order under an
//! advisory lock, so nodes starting together migrate once). Records are keyed by `(node_id, seq)`: `seq` is
//! the entry's number in its node's hash chain, so a second copy of a record is a conflict, never a row.
#![deny(unsafe_code)]

/// Version `i + 1` is `MIGRATIONS[i]`.
pub const MIGRATIONS: &[&str] = &[
    // 1: nodes with their shipping high-water marks, every chain entry with its canonical record, the flows'
    // rows for review, the signed checkpoints.
    "
CREATE TABLE fleet_nodes (
    node_id TEXT PRIMARY KEY,
    shipped_seq BIGINT NOT NULL DEFAULT 0,
    shipped_hash BYTEA,
    checkpoint_seq BIGINT NOT NULL DEFAULT 0,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_shipped TIMESTAMPTZ
);
CREATE TABLE fleet_chain (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    digest BYTEA NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL,
    record TEXT,
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX fleet_chain_by_kind ON fleet_chain (kind, at_ms);
CREATE TABLE fleet_flows (
    node_id TEXT NOT NULL,
    start_chain BIGINT NOT NULL,
    id BIGINT NOT NULL,
    run_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    \"user\" TEXT NOT NULL,
    protocol INTEGER NOT NULL,
    src TEXT NOT NULL,
    sport INTEGER NOT NULL,
    dst TEXT NOT NULL,
    dport INTEGER NOT NULL,
    dst_device TEXT,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    established_ms BIGINT,
    ended_ms BIGINT,
    packets_out BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    packets_in BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    end_reason TEXT,
    est_chain BIGINT,
    end_chain BIGINT,
    PRIMARY KEY (node_id, start_chain)
);
CREATE INDEX fleet_flows_by_time ON fleet_flows (started_ms, node_id, start_chain);
CREATE TABLE fleet_checkpoints (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    at_ms BIGINT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
",
    // 2: shared state (`fleet::state`): the config version, the tenant policy documents, the devices; node
    // membership (address, applied version, heartbeat) on the nodes' rows.
    "
ALTER TABLE fleet_nodes
    ADD COLUMN address TEXT,
    ADD COLUMN applied_version BIGINT,
    ADD COLUMN last_heartbeat TIMESTAMPTZ,
    ADD COLUMN software TEXT;
CREATE TABLE fleet_config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO fleet_config (id, version) VALUES (1, 0);
CREATE TABLE fleet_policy (
    version BIGINT PRIMARY KEY,
    node_id TEXT NOT NULL,
    doc TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE fleet_devices (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    origin_node TEXT NOT NULL,
    device TEXT NOT NULL,
    removed BOOLEAN NOT NULL DEFAULT false,
    version BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
",
    // 3: shared enrollment (`fleet::enrollment`): the enrollment tokens (a use is taken by one statement, so
    // two nodes cannot both spend the last one), the self-enrolled devices' credentials (only the hash of the
    // device token) so any node answers `/v1/devices/self`, and each node's public enrollment URL for
    // failover.
    "
ALTER TABLE fleet_nodes ADD COLUMN enroll_url TEXT;
CREATE TABLE fleet_tokens (
    id TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL,
    tenant TEXT NOT NULL,
    \"user\" TEXT,
    groups TEXT NOT NULL,
    max_uses BIGINT,
    used BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    ephemeral_secs BIGINT,
    preapproved BOOLEAN NOT NULL,
    revoked_at BIGINT,
    created_by TEXT NOT NULL,
    note TEXT NOT NULL,
    last_used_at BIGINT,
    failures BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT
);
CREATE TABLE fleet_device_credentials (
    id TEXT PRIMARY KEY,
    origin_node TEXT NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    \"user\" TEXT NOT NULL,
    groups TEXT NOT NULL,
    public_key TEXT NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    token_id TEXT NOT NULL,
    token_hash BYTEA NOT NULL,
    enrolled_at BIGINT NOT NULL,
    key_set_at BIGINT NOT NULL
);
CREATE INDEX fleet_device_credentials_by_node ON fleet_device_credentials (origin_node);
",
    // 4: each node's audit signing public keys, against which `verify --fleet` checks the shipped
    // checkpoints' signatures. A key is a row of its own and rows are never updated: a node whose key
    // changed has two rows, both shown by `verify --fleet` (a change is recorded, never overwritten).
    "
CREATE TABLE fleet_node_keys (
    node_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, fingerprint)
);
",
];

/// Brings the schema to the newest version; refuses a database a newer Rampart migrated.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    // Any constant key: serialises migrations across nodes.
    tx.execute("SELECT pg_advisory_xact_lock(5272617274)", &[])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL)")
        .await?;
    let version: i32 = tx
        .query_opt("SELECT version FROM fleet_schema", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    if version > version_now() {
        anyhow::bail!(
            "the fleet database was migrated by a newer Rampart (schema {version}, this build knows {}); upgrade this node",
            version_now()
        );
    }
    if version == 0 {
        tx.execute("INSERT INTO fleet_schema (version) VALUES (0)", &[])
            .await?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql).await?;
        tx.execute("UPDATE fleet_schema SET version = $1", &[&(i as i32 + 1)])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The schema version this build writes.
pub fn version_now() -> i32 {
    MIGRATIONS.len() as i32
}
