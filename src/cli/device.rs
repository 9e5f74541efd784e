//! `rampart device ...`: enroll (key pair made here), list, remove, print a device's client config.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::{load, notify_gateway, tenant_or_bail, unix_now};
use crate::config::{Config, DeviceName, DeviceOrigin, SshClientKey, TenantId, UserName};
use crate::control::{self, Request};
use crate::enroll::{allocate_address, ClientConfig};
use crate::keys::PrivateKey;
use crate::registry::{EnrolledDevice, Registry};

#[allow(clippy::too_many_arguments)]
pub(super) fn device_add(
    config: &Path,
    tenant: &str,
    name: &str,
    user: &str,
    groups: Vec<String>,
    ssh_key_files: &[PathBuf],
    endpoint: Option<String>,
    qr: bool,
) -> anyhow::Result<()> {
    let name = DeviceName::parse(name).map_err(|m| anyhow::anyhow!("--name: {m}"))?;
    let user = UserName::parse(user).map_err(|m| anyhow::anyhow!("--user: {m}"))?;
    let mut ssh_keys = Vec::new();
    for f in ssh_key_files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("--ssh-key: cannot read {}", f.display()))?;
        let keys = SshClientKey::parse_lines(&text)
            .map_err(|m| anyhow::anyhow!("--ssh-key {}: {m}", f.display()))?;
        if keys.is_empty() {
            bail!(
                "--ssh-key {}: no key in the file; pass an id_*.pub file or authorized_keys lines",
                f.display()
            );
        }
        ssh_keys.extend(keys.iter().map(|k| k.as_str().to_string()));
    }
    let pre = load(config)?;
    let endpoint = client_endpoint(&pre, endpoint)?;
    let gateway_key = PrivateKey::read_file(&pre.gateway.private_key_file)
        .or_else(|_| {
            // First use before the gateway ever ran: create the key it will use.
            let k = PrivateKey::generate();
            k.write_new_file(&pre.gateway.private_key_file)?;
            Ok::<_, anyhow::Error>(k)
        })
        .with_context(|| {
            format!(
                "cannot read or create {}",
                pre.gateway.private_key_file.display()
            )
        })?
        .public_key();

    let registry = Registry::open(&pre.gateway.state_dir);
    let lock = registry.lock()?;
    // Re-read under the lock so concurrent enrollments see each other.
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    // Devices waiting for approval hold their name and address too.
    let view = crate::enroll::service::with_pending(
        t,
        &crate::enroll::admin::devices(&cfg.gateway.state_dir)?,
    );
    if let Some(d) = view.devices.iter().find(|d| d.name == name) {
        bail!("device {:?} already exists in tenant {} (address {}); choose another --name or remove it first", name.as_str(), t.id, d.address);
    }
    let Some(address) = allocate_address(&view) else {
        bail!(
            "address pool {} of tenant {} is full ({} devices); widen address_pool in {} or remove unused devices",
            t.address_pool,
            t.id,
            t.devices.len(),
            config.display()
        );
    };
    let key = PrivateKey::generate();
    let mut devices = registry.load()?;
    devices.push(EnrolledDevice {
        tenant: t.id.clone(),
        name: name.clone(),
        public_key: key.public_key(),
        address,
        user,
        groups,
        ssh_keys,
        enrolled_at: unix_now(),
    });
    registry.store(&lock, &devices)?;
    drop(lock);
    eprintln!(
        "enrolled device {} in tenant {} with address {address}",
        name.as_str(),
        t.id
    );
    let text = ClientConfig {
        tenant: t,
        device_name: name.as_str(),
        private_key: Some(&key),
        address,
        gateway_key,
        endpoint: &endpoint,
    }
    .render();
    notify_gateway(&cfg)?;
    std::io::stdout().write_all(text.as_bytes())?;
    if qr {
        let code =
            qrcode::QrCode::new(text.as_bytes()).context("config too large for a QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        eprintln!("{art}");
    }
    Ok(())
}

/// The Endpoint printed into client configs: `--endpoint`, else `gateway.public_endpoint`, else a specific
/// listen address.
pub(super) fn client_endpoint(cfg: &Config, endpoint: Option<String>) -> anyhow::Result<String> {
    match endpoint.or_else(|| cfg.gateway.public_endpoint.clone()) {
        Some(e) => Ok(e),
        None if !cfg.gateway.listen.ip().is_unspecified() => Ok(cfg.gateway.listen.to_string()),
        None => bail!(
            "no endpoint known for client configs: pass --endpoint HOST:PORT (the address devices reach this gateway at), \
             or set gateway.public_endpoint in {}",
            cfg.source.display()
        ),
    }
}

pub(super) fn device_config(
    config: &Path,
    tenant: &str,
    name: &str,
    endpoint: Option<String>,
) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    let Some(d) = t.devices.iter().find(|d| d.name.as_str() == name) else {
        bail!(
            "no device {name:?} in tenant {}; see `rampart device list -c {}`",
            t.id,
            config.display()
        );
    };
    let endpoint = client_endpoint(&cfg, endpoint)?;
    let gateway_key = PrivateKey::read_file(&cfg.gateway.private_key_file)?.public_key();
    let text = ClientConfig {
        tenant: t,
        device_name: name,
        private_key: None,
        address: d.address,
        gateway_key,
        endpoint: &endpoint,
    }
    .render();
    eprintln!("the gateway does not keep device private keys: keep the PrivateKey line of the device's current config");
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

pub(super) fn device_list(config: &Path, tenant: Option<&str>, json: bool) -> anyhow::Result<()> {
    let cfg = load(config)?;
    if let Some(t) = tenant {
        tenant_or_bail(&cfg, t)?;
    }
    let live = control::request(&cfg.gateway.state_dir, &Request::Status)
        .ok()
        .flatten()
        .map(|r| r.peers)
        .unwrap_or_default();
    let self_enrolled = crate::enroll::admin::devices(&cfg.gateway.state_dir)?;
    let mut rows = Vec::new();
    for t in cfg
        .tenants
        .iter()
        .filter(|t| tenant.is_none_or(|id| t.id.as_str() == id))
    {
        for d in &t.devices {
            let key = d.public_key.to_string();
            let st = live.iter().find(|p| p.public_key == key);
            let row = self_enrolled
                .iter()
                .find(|r| r.tenant == t.id && r.public_key == d.public_key);
            rows.push(serde_json::json!({
                "tenant": t.id,
                "name": d.name,
                "address": d.address,
                "user": d.user,
                "groups": d.groups,
                "public_key": key,
                "origin": d.origin,
                "state": "active",
                "id": row.map(|r| r.api_id()),
                "proven": row.map(|r| r.proven_at.is_some()),
                "endpoint": st.and_then(|s| s.endpoint.clone()),
                "last_handshake_secs": st.and_then(|s| s.last_handshake_secs),
                "rx_bytes": st.map(|s| s.rx_bytes),
                "tx_bytes": st.map(|s| s.tx_bytes),
            }));
        }
    }
    // Pending devices are not in the config (no tunnel until approved).
    for r in self_enrolled.iter().filter(|r| {
        r.state == crate::enroll::api::DeviceState::Pending
            && tenant.is_none_or(|id| r.tenant.as_str() == id)
    }) {
        rows.push(serde_json::json!({
            "tenant": r.tenant,
            "name": r.name,
            "address": r.address,
            "user": r.user,
            "groups": r.groups,
            "public_key": r.public_key,
            "origin": DeviceOrigin::Token,
            "state": "pending",
            "id": r.api_id(),
            "proven": false,
            "endpoint": null,
            "last_handshake_secs": null,
            "rx_bytes": null,
            "tx_bytes": null,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<20} {:<16} {:<24} {:<10} {:<9} {:<8} HANDSHAKE",
        "TENANT", "NAME", "ADDRESS", "USER", "GROUPS", "ORIGIN", "STATE"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let groups: Vec<&str> = r["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str())
            .collect();
        let hs = match r["last_handshake_secs"].as_u64() {
            Some(s) => format!("{s}s ago"),
            None => "never".into(),
        };
        println!(
            "{:<12} {:<20} {:<16} {:<24} {:<10} {:<9} {:<8} {hs}",
            s("tenant"),
            s("name"),
            s("address"),
            s("user"),
            groups.join(","),
            s("origin"),
            s("state")
        );
    }
    Ok(())
}

pub(super) fn device_remove(config: &Path, tenant: &str, name: &str) -> anyhow::Result<()> {
    let pre = load(config)?;
    let t = tenant_or_bail(&pre, tenant)?;
    let tenant_id: TenantId = t.id.clone();
    let found = t.devices.iter().find(|d| d.name.as_str() == name);
    if found.is_none_or(|d| d.origin == DeviceOrigin::Token)
        && super::token::device_revoke(config, tenant, name)?
    {
        return Ok(());
    }
    match found {
        None => bail!("no device {name:?} in tenant {tenant_id}; see `rampart device list -c {}`", config.display()),
        Some(d) if d.origin == DeviceOrigin::Config => bail!(
            "device {name:?} is declared in {}; delete its [[tenant.device]] entry there and run `rampart reload -c {}`",
            config.display(),
            config.display()
        ),
        Some(d) if d.origin == DeviceOrigin::Fleet => {
            let origin = crate::config::shared::FleetCache::load(&pre.gateway.state_dir)
                .ok()
                .and_then(|c| {
                    c.devices
                        .into_iter()
                        .find(|s| s.device.tenant == tenant_id && s.device.name.as_str() == name)
                        .map(|s| s.origin)
                })
                .unwrap_or_else(|| "another node".into());
            bail!(
                "device {name:?} in tenant {tenant_id} was enrolled on node {origin} of the fleet; remove it there (`rampart device remove` on {origin}); the change then applies on every node"
            )
        }
        Some(_) => {}
    }
    let registry = Registry::open(&pre.gateway.state_dir);
    let lock = registry.lock()?;
    let mut devices = registry.load()?;
    let before = devices.len();
    devices.retain(|d| !(d.tenant == tenant_id && d.name.as_str() == name));
    if devices.len() == before {
        bail!("device {name:?} in tenant {tenant_id} was removed concurrently");
    }
    registry.store(&lock, &devices)?;
    drop(lock);
    eprintln!("removed device {name} from tenant {tenant_id}");
    notify_gateway(&pre)
}
