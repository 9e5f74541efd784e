//! Settings of the connected on-ramps: `[[onramp.seqpacket]]` entries, each a Unix `SOCK_SEQPACKET` socket,
//! the local clients (by `SO_PEERCRED` uid/gid) that may use it, and per tenant what they may claim
//! (`[[onramp.seqpacket.tenant]]`: inner source prefixes, sites, devices, the policy identity of their flows).
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::raw::AddrList;
use super::validate::resolve;
use super::{valid_ident, Collector, Tenant, TenantId, UserName};

/// Default `max_connections` of an entry.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default `max_bad_packets`: garbage datagrams a connection may send before it is closed.
pub const DEFAULT_MAX_BAD_PACKETS: u32 = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnramps {
    #[serde(default)]
    pub seqpacket: Vec<RawSeqpacket>,
    #[serde(default)]
    pub gue: Vec<super::gue::RawGue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSeqpacket {
    pub name: String,
    pub path: String,
    /// Octal file mode of the socket (default "0660").
    pub mode: Option<String>,
    pub uids: Option<Vec<u32>>,
    pub gids: Option<Vec<u32>>,
    /// Answer the context with a reply datagram (default true; false is Oxy's pure protocol).
    pub reply: Option<bool>,
    pub max_connections: Option<u64>,
    pub max_bad_packets: Option<u64>,
    #[serde(default)]
    pub tenant: Vec<RawSeqpacketTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSeqpacketTenant {
    pub id: String,
    /// Inner source addresses the connections of this tenant may send from.
    pub prefixes: AddrList,
    pub sites: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// One `[[onramp.seqpacket]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqpacketOnramp {
    /// Names the on-ramp in flow records (the subject's device name starts with it).
    pub name: String,
    pub path: PathBuf,
    pub mode: u32,
    /// A client is let in when its uid is listed or its gid is.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub reply: bool,
    pub max_connections: usize,
    pub max_bad_packets: u32,
    pub tenants: Vec<OnrampGrant>,
}

/// What a client of an entry may claim for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnrampGrant {
    pub tenant: TenantId,
    pub prefixes: Vec<IpNet>,
    /// `None`: any site (or none); `Some`: a site the context names must be listed.
    pub sites: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    /// Policy identity of the connection's flows (`users = [...]`, `groups = [...]` in rules).
    pub user: UserName,
    pub groups: Vec<String>,
}

impl SeqpacketOnramp {
    pub fn grant(&self, tenant: &str) -> Option<&OnrampGrant> {
        self.tenants.iter().find(|g| g.tenant.as_str() == tenant)
    }

    /// Whether a client with these credentials may connect at all.
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

pub(super) fn validate_onramps(
    raw: Vec<RawSeqpacket>,
    tenants: &[Tenant],
    base: &Path,
    c: &mut Collector<'_>,
) -> Vec<SeqpacketOnramp> {
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut paths = std::collections::HashSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("onramp.seqpacket[{i}]");
        let mut ok = true;
        if !valid_ident(&r.name, 32) {
            c.push(
                format!("{key}.name"),
                format!("{:?} is not a valid name: use 1-32 letters, digits, '-', '_' or '.', like \"warp\"", r.name),
            );
            ok = false;
        } else if !names.insert(r.name.clone()) {
            c.push(
                format!("{key}.name"),
                format!(
                    "duplicate on-ramp name {:?}; give every [[onramp.seqpacket]] its own name",
                    r.name
                ),
            );
            ok = false;
        }
        let key = format!("{key} ({})", r.name);
        let path = resolve(base, &r.path);
        if r.path.is_empty() || !paths.insert(path.clone()) {
            c.push(
                format!("{key}.path"),
                "empty or used by another entry; write a socket path of its own, like \"/run/rampart/onramp.sock\"",
            );
            ok = false;
        }
        let mode = match r.mode.as_deref() {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o777 && v & 0o002 == 0 => v,
                _ => {
                    c.push(
                        format!("{key}.mode"),
                        format!("{m:?} is not an octal file mode without world write; write one like \"0660\" (the file mode is the socket's first gate)"),
                    );
                    ok = false;
                    0
                }
            },
        };
        let (uids, gids) = (r.uids.unwrap_or_default(), r.gids.unwrap_or_default());
        if uids.is_empty() && gids.is_empty() {
            c.push(
                format!("{key}.uids"),
                "no client could connect; list the uids (or `gids`) of the processes that may use this on-ramp, like `uids = [998]`",
            );
            ok = false;
        }
        let max_connections = match r.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n @ 1..=65_536) => n as usize,
            Some(_) => {
                c.push(
                    format!("{key}.max_connections"),
                    "must be 1-65536 (default 64)",
                );
                ok = false;
                0
            }
        };
        let max_bad_packets = match r.max_bad_packets {
            None => DEFAULT_MAX_BAD_PACKETS,
            Some(n @ 1..=1_000_000) => n as u32,
            Some(_) => {
                c.push(
                    format!("{key}.max_bad_packets"),
                    "must be 1-1000000 (default 100)",
                );
                ok = false;
                0
            }
        };
        if r.tenant.is_empty() {
            c.push(
                format!("{key}.tenant"),
                "no tenant may be claimed; add a [[onramp.seqpacket.tenant]] with `id` and `prefixes`",
            );
            ok = false;
        }
        let mut grants = Vec::new();
        for (j, t) in r.tenant.into_iter().enumerate() {
            let tkey = format!("{key}.tenant[{j}]");
            if let Some(g) = validate_grant(t, &r.name, tenants, &tkey, c) {
                if grants.iter().any(|o: &OnrampGrant| o.tenant == g.tenant) {
                    c.push(
                        format!("{tkey}.id"),
                        "this tenant is listed twice in the entry; merge the two",
                    );
                    ok = false;
                }
                grants.push(g);
            } else {
                ok = false;
            }
        }
        if ok {
            out.push(SeqpacketOnramp {
                name: r.name,
                path,
                mode,
                uids,
                gids,
                reply: r.reply.unwrap_or(true),
                max_connections,
                max_bad_packets,
                tenants: grants,
            });
        }
    }
    out
}

fn validate_grant(
    t: RawSeqpacketTenant,
    entry: &str,
    tenants: &[Tenant],
    key: &str,
    c: &mut Collector<'_>,
) -> Option<OnrampGrant> {
    let Some(tenant) = tenants.iter().find(|x| x.id.as_str() == t.id) else {
        c.push(
            format!("{key}.id"),
            format!(
                "{:?} is not a configured tenant; write the `id` of a [[tenant]]",
                t.id
            ),
        );
        return None;
    };
    let mut ok = true;
    let prefixes = source_networks(
        &t.prefixes,
        tenant,
        &format!("{key}.prefixes"),
        "this tenant's connections use",
        c,
    );
    ok &= prefixes.is_some();
    let prefixes = prefixes.unwrap_or_default();
    let mut names = |field: &str, v: Option<Vec<String>>| -> Option<Vec<String>> {
        let v = v?;
        for n in &v {
            if !valid_ident(n, 64) {
                c.push(
                    format!("{key}.{field}"),
                    format!("{n:?} is not a valid name: use 1-64 letters, digits, '-', '_' or '.'"),
                );
                ok = false;
            }
        }
        Some(v)
    };
    let sites = names("sites", t.sites);
    let devices = names("devices", t.devices);
    let user = match UserName::parse(t.user.as_deref().unwrap_or(&format!("onramp:{entry}"))) {
        Ok(u) => u,
        Err(m) => {
            c.push(format!("{key}.user"), m);
            return None;
        }
    };
    ok.then_some(OnrampGrant {
        tenant: tenant.id.clone(),
        prefixes,
        sites,
        devices,
        user,
        groups: t.groups,
    })
}

/// The inner source networks of an on-ramp grant or GUE site (`field` names the key): CIDRs, truncated, at
/// least one, none overlapping the tenant's device pools or gateway addresses (a source there could send as a
/// device). `None` once every problem is reported.
pub(super) fn source_networks(
    list: &AddrList,
    tenant: &Tenant,
    field: &str,
    whose: &str,
    c: &mut Collector<'_>,
) -> Option<Vec<IpNet>> {
    let mut ok = true;
    let mut nets = Vec::new();
    for p in list.items() {
        let Ok(net) = p.parse::<IpNet>() else {
            c.push(
                field,
                format!("{p:?} is not a CIDR; write it like \"10.7.0.0/16\""),
            );
            ok = false;
            continue;
        };
        let net = net.trunc();
        let clash = tenant
            .pools()
            .any(|pool| pool.contains(&net) || net.contains(&pool))
            || tenant.gateway_addresses().any(|a| net.contains(&a));
        if clash {
            c.push(
                field,
                format!("{p} overlaps the tenant's address pool or gateway address; on-ramp sources must be networks of their own (they could otherwise send as a device)"),
            );
            ok = false;
            continue;
        }
        nets.push(net);
    }
    if nets.is_empty() && ok {
        c.push(
            field,
            format!("empty; list the inner source networks {whose}, like [\"10.7.0.0/16\"]"),
        );
        ok = false;
    }
    ok.then_some(nets)
}
