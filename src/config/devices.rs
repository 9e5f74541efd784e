//! Validation of devices and addresses: one device (`validate_device`, its SSH keys), the tenant's devices and
//! the index that finds duplicates (`DeviceIndex`, `check_tenant_devices`, `check_unique_keys`), address pools and
//! gateway addresses. Part of `config::validate`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::keys::PeerKey;

pub(super) fn validate_device(rd: RawDevice, key: &str, c: &mut Collector<'_>) -> Option<Device> {
    let name = DeviceName::parse(&rd.name)
        .map_err(|m| c.push(format!("{key}.name"), m))
        .ok();
    let public_key = rd
        .public_key
        .parse::<PeerKey>()
        .map_err(|e| {
            c.push(
                format!("{key}.public_key"),
                format!("{e}; paste the output of `wg pubkey`"),
            )
        })
        .ok();
    let addresses = device_addresses(&rd.address, &format!("{key}.address"), c);
    let user = UserName::parse(&rd.user)
        .map_err(|m| c.push(format!("{key}.user"), m))
        .ok();
    for g in &rd.groups {
        if !valid_ident(g, 64) {
            c.push(
                format!("{key}.groups"),
                format!("{g:?} is not a valid group name: use letters, digits, '-', '_' or '.'"),
            );
        }
    }
    let ssh_keys = parse_ssh_keys(&rd.ssh_keys, &format!("{key}.ssh_keys"), c);
    Some(Device {
        name: name?,
        public_key: public_key?,
        address: addresses?.0,
        address_v6: addresses?.1,
        user: user?,
        groups: rd.groups,
        ssh_keys,
        origin: DeviceOrigin::Config,
    })
}

/// A device's `ssh_keys` (authorized_keys lines); each bad line is reported under `key`.
pub(super) fn parse_ssh_keys(
    lines: &[String],
    key: &str,
    c: &mut Collector<'_>,
) -> Vec<SshClientKey> {
    lines
        .iter()
        .filter_map(|l| {
            SshClientKey::parse(l)
                .map_err(|m| c.push(key.to_string(), m))
                .ok()
        })
        .collect()
}

/// Checks the newest device of `t` against the others: pool membership, unique name and address.
/// The devices of one tenant checked so far, by name and address, so adding a device is checked in O(1) and a
/// tenant of 100,000 devices validates in linear time. Address values are indexes into `Tenant::devices` (the
/// first device with that address), which the error names.
#[derive(Default)]
pub(super) struct DeviceIndex {
    names: HashSet<DeviceName>,
    addresses: HashMap<IpAddr, usize>,
    addresses_v6: HashMap<IpAddr, usize>,
}

impl DeviceIndex {
    /// The index of `devices`, as if each had been added and checked in turn.
    pub(super) fn of(devices: &[Device]) -> DeviceIndex {
        let mut index = DeviceIndex::default();
        for (i, d) in devices.iter().enumerate() {
            index.insert(i, d);
        }
        index
    }

    fn insert(&mut self, i: usize, d: &Device) {
        self.names.insert(d.name.clone());
        self.addresses.entry(d.address).or_insert(i);
        if let Some(a6) = d.address_v6 {
            self.addresses_v6.entry(a6).or_insert(i);
        }
    }
}

/// Checks the tenant's last device against the tenant and the devices before it (`index`), then adds it to
/// `index`.
pub(super) fn check_tenant_devices(
    t: &Tenant,
    index: &mut DeviceIndex,
    c: &mut Collector<'_>,
    key: &str,
) {
    let Some((d, others)) = t.devices.split_last() else {
        return;
    };
    let other = |i: Option<&usize>| i.map(|&i| &others[i]);
    if d.address.is_ipv4() != t.address_pool.addr().is_ipv4() {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is not in the family of the tenant's first address_pool {}; list the device's addresses in \
                 the pools' order",
                d.address, t.address_pool
            ),
        );
    }
    if let Some(a6) = d.address_v6 {
        match t.address_pool_v6 {
            Some(p6) if p6.contains(&a6) => {}
            Some(p6) => c.push(
                format!("{key}.address"),
                format!("{a6} is outside the tenant's IPv6 pool {p6}; use an address inside it"),
            ),
            None => c.push(
                format!("{key}.address"),
                format!(
                    "the tenant has no IPv6 pool for {a6}; add one to address_pool or give the device one address"
                ),
            ),
        }
        if Some(a6) == t.gateway_address_v6 {
            c.push(
                format!("{key}.address"),
                format!("{a6} is the tenant's gateway_address; pick another"),
            );
        }
        if let Some(o) = other(index.addresses_v6.get(&a6)) {
            c.push(
                format!("{key}.address"),
                format!(
                    "{a6} is already assigned to device {:?}; give each device its own address",
                    o.name.as_str()
                ),
            );
        }
    }
    if !t.address_pool.contains(&d.address) {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is outside the tenant's address_pool {}; use an address inside the pool",
                d.address, t.address_pool
            ),
        );
    }
    if d.address == t.gateway_address {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is the tenant's gateway_address; pick another",
                d.address
            ),
        );
    }
    if index.names.contains(&d.name) {
        c.push(
            format!("{key}.name"),
            format!(
                "device name {:?} is already used in tenant {}; names are unique per tenant",
                d.name.as_str(),
                t.id
            ),
        );
    }
    if let Some(o) = other(index.addresses.get(&d.address)) {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is already assigned to device {:?}; give each device its own address",
                d.address,
                o.name.as_str()
            ),
        );
    }
    index.insert(others.len(), d);
}

pub(super) fn check_unique_keys(tenants: &[Tenant], c: &mut Collector<'_>) {
    let mut seen: HashMap<PeerKey, (&TenantId, &DeviceName)> = HashMap::new();
    for t in tenants {
        for d in &t.devices {
            if let Some((ot, od)) = seen.insert(d.public_key, (&t.id, &d.name)) {
                c.push(
                    format!("tenant {} device {}", t.id, d.name),
                    format!("public_key is also used by device {od} of tenant {ot}; every device needs its own key pair"),
                );
            }
        }
    }
}

/// `address_pool`: one CIDR, or one IPv4 and one IPv6 CIDR (dual stack). Returns (first, IPv6 second).
pub(super) fn validate_pools(
    raw: &AddrList,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<(IpNet, Option<IpNet>)> {
    let k = format!("{key}.address_pool");
    let mut nets = Vec::new();
    for s in raw.items() {
        match s.parse::<IpNet>() {
            Ok(n) => nets.push(n.trunc()),
            Err(_) => {
                c.push(
                    &k,
                    format!("{s:?} is not a CIDR; write it like \"100.96.0.0/24\" (or a list of an IPv4 and an IPv6 one)"),
                );
                return None;
            }
        }
    }
    match nets.as_slice() {
        [one] => Some((*one, None)),
        [IpNet::V4(a), IpNet::V6(b)] | [IpNet::V6(b), IpNet::V4(a)] => {
            Some((IpNet::V4(*a), Some(IpNet::V6(*b))))
        }
        _ => {
            c.push(
                &k,
                "give one CIDR, or two: one IPv4 and one IPv6 (dual stack), like [\"100.96.0.0/24\", \"fd00:96::/64\"]",
            );
            None
        }
    }
}

/// `gateway_address`: one address per pool, each inside its pool.
pub(super) fn validate_gateway_addresses(
    raw: &AddrList,
    pool: IpNet,
    pool_v6: Option<IpNet>,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<(IpAddr, Option<IpAddr>)> {
    let k = format!("{key}.gateway_address");
    let mut addrs = Vec::new();
    for s in raw.items() {
        match s.parse::<IpAddr>() {
            Ok(a) => addrs.push(a),
            Err(_) => {
                c.push(
                    &k,
                    format!("{s:?} is not an IP address; write it like \"100.96.0.1\""),
                );
                return None;
            }
        }
    }
    let pick = |v4: bool| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
    let first = pick(pool.addr().is_ipv4());
    let second = pool_v6.and_then(|_| pick(false));
    let wanted = 1 + usize::from(pool_v6.is_some());
    let (Some(gw), true) = (
        first,
        addrs.len() == wanted && (pool_v6.is_none() || second.is_some()),
    ) else {
        c.push(
            &k,
            format!("give one gateway address per address_pool ({wanted}), each inside its pool"),
        );
        return None;
    };
    for (a, p) in std::iter::once((gw, pool)).chain(second.zip(pool_v6)) {
        if !p.contains(&a) {
            c.push(
                &k,
                format!("{a} is outside address_pool {p}; pick an address inside the pool (usually its first)"),
            );
        }
    }
    Some((gw, second))
}

/// A device's `address`: one, or one per pool of a dual-stack tenant (IPv4 first, or in any order).
pub(super) fn device_addresses(
    raw: &AddrList,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<(IpAddr, Option<IpAddr>)> {
    let mut addrs = Vec::new();
    for s in raw.items() {
        match s.parse::<IpAddr>() {
            Ok(a) => addrs.push(a),
            Err(_) => {
                c.push(
                    key,
                    format!("{s:?} is not an IP address; write it like \"100.96.0.2\""),
                );
                return None;
            }
        }
    }
    match addrs.as_slice() {
        [one] => Some((*one, None)),
        [a, b] if a.is_ipv4() && b.is_ipv6() => Some((*a, Some(*b))),
        [b, a] if a.is_ipv4() && b.is_ipv6() => Some((*a, Some(*b))),
        _ => {
            c.push(
                key,
                "give one address, or an IPv4 and an IPv6 one (dual-stack tenant)",
            );
            None
        }
    }
}
