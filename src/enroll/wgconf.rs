//! Address allocation from a tenant's pool and the wg-quick client config a device imports.
#![deny(unsafe_code)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::Tenant;
use crate::keys::{PeerKey, PrivateKey};

/// Inner MTU every device uses (wireguard-go's default; fits a 1500-byte underlay with an IPv6 outer header).
pub const DEVICE_MTU: u16 = 1420;
/// Keeps NAT mappings open and lets the gateway reach the device (it learns endpoints only from traffic).
pub const PERSISTENT_KEEPALIVE: u16 = 25;
/// Upper bound on addresses probed in huge (IPv6) pools.
const MAX_PROBES: usize = 1 << 20;

/// The first free host address of `tenant`'s pool: not the network or broadcast address, not the gateway, not
/// a device's.
pub fn allocate_address(tenant: &Tenant) -> Option<IpAddr> {
    free_addresses(tenant).next()
}

/// The free host addresses of `tenant`'s pool in allocation order (at most `MAX_PROBES` probed).
pub fn free_addresses(tenant: &Tenant) -> impl Iterator<Item = IpAddr> + '_ {
    let used: HashSet<IpAddr> = tenant
        .devices
        .iter()
        .flat_map(|d| d.addresses())
        .chain(tenant.gateway_addresses())
        .collect();
    // In a dual-stack tenant the IPv6 address follows the IPv4 one: both must be free. Hosts of an IPv6 pool
    // skip the first (the subnet-router anycast address).
    let hosts: Box<dyn Iterator<Item = IpAddr>> = match tenant.address_pool {
        IpNet::V4(p) => Box::new(p.hosts().map(IpAddr::V4)),
        IpNet::V6(p) => Box::new(p.hosts().skip(1).map(IpAddr::V6)),
    };
    hosts.take(MAX_PROBES).filter(move |a| {
        !used.contains(a) && tenant.derived_v6(*a).is_none_or(|v6| !used.contains(&v6))
    })
}

/// What a device routes into the tunnel: the tenant's pools, its off-ramp networks and the networks of its
/// connected on-ramps.
pub fn allowed_ips(tenant: &Tenant) -> Vec<IpNet> {
    let mut allowed: Vec<IpNet> = tenant.pools().collect();
    allowed.extend(tenant.offramp.iter().copied());
    allowed.extend(tenant.onramp_prefixes.iter().copied());
    allowed
}

/// Everything that goes into a device's client config.
pub struct ClientConfig<'a> {
    pub tenant: &'a Tenant,
    pub device_name: &'a str,
    pub private_key: Option<&'a PrivateKey>,
    pub address: IpAddr,
    pub gateway_key: PeerKey,
    pub endpoint: &'a str,
}

impl ClientConfig<'_> {
    /// A standard wg-quick config: `[Interface]` with the device key and address, `[Peer]` = the gateway, routing
    /// the tenant's pool into the tunnel.
    pub fn render(&self) -> String {
        let host_prefix = if self.address.is_ipv4() { 32 } else { 128 };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Rampart device {:?}, tenant {:?} ({})",
            self.device_name,
            self.tenant.id.as_str(),
            self.tenant.name
        );
        let _ = writeln!(s, "[Interface]");
        match self.private_key {
            Some(k) => {
                let _ = writeln!(s, "PrivateKey = {}", k.to_base64());
            }
            None => {
                let _ = writeln!(
                    s,
                    "# PrivateKey = <the private key this device was created with>"
                );
            }
        }
        match self.tenant.derived_v6(self.address) {
            Some(v6) => {
                let _ = writeln!(s, "Address = {}/{host_prefix}, {v6}/128", self.address);
            }
            None => {
                let _ = writeln!(s, "Address = {}/{host_prefix}", self.address);
            }
        }
        let _ = writeln!(s, "MTU = {DEVICE_MTU}");
        let _ = writeln!(s);
        let _ = writeln!(s, "[Peer]");
        let _ = writeln!(s, "PublicKey = {}", self.gateway_key);
        let _ = writeln!(s, "Endpoint = {}", self.endpoint);
        let allowed: Vec<String> = allowed_ips(self.tenant)
            .iter()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(s, "AllowedIPs = {}", allowed.join(", "));
        let _ = writeln!(s, "PersistentKeepalive = {PERSISTENT_KEEPALIVE}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Device, DeviceName, DeviceOrigin, TenantId, UserName};

    fn tenant(pool: &str, gw: &str) -> Tenant {
        Tenant {
            id: TenantId::parse("acme").unwrap(),
            name: "Acme".into(),
            address_pool: pool.parse().unwrap(),
            gateway_address: gw.parse().unwrap(),
            address_pool_v6: None,
            gateway_address_v6: None,
            max_flows: None,
            offramp: Vec::new(),
            egress: Default::default(),
            offramp_allow_local: Vec::new(),
            onramp_prefixes: Vec::new(),
            audit_recipient: None,
            rules: Vec::new(),
            devices: Vec::new(),
            http: Default::default(),
        }
    }

    fn device(addr: &str, n: usize) -> Device {
        Device {
            name: DeviceName::parse(&format!("d{n}")).unwrap(),
            public_key: PeerKey([n as u8; 32]),
            address: addr.parse().unwrap(),
            address_v6: None,
            user: UserName::parse("u").unwrap(),
            groups: vec![],
            ssh_keys: vec![],
            origin: DeviceOrigin::Enrolled,
        }
    }

    #[test]
    fn allocates_first_free_skipping_gateway_and_used() {
        let mut t = tenant("100.96.0.0/24", "100.96.0.1");
        assert_eq!(allocate_address(&t), Some("100.96.0.2".parse().unwrap()));
        t.devices.push(device("100.96.0.2", 1));
        t.devices.push(device("100.96.0.4", 2));
        assert_eq!(allocate_address(&t), Some("100.96.0.3".parse().unwrap()));
    }

    #[test]
    fn full_pool_yields_none() {
        let mut t = tenant("100.96.0.0/30", "100.96.0.1");
        t.devices.push(device("100.96.0.2", 1));
        assert_eq!(allocate_address(&t), None);
    }

    #[test]
    fn ipv6_pool_allocates() {
        let t = tenant("fd00:1::/64", "fd00:1::1");
        assert_eq!(allocate_address(&t), Some("fd00:1::2".parse().unwrap()));
    }

    #[test]
    fn offramp_networks_are_routed_into_the_tunnel() {
        let mut t = tenant("100.96.0.0/24", "100.96.0.1");
        t.offramp = vec![
            "198.51.100.0/24".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ];
        let text = ClientConfig {
            tenant: &t,
            device_name: "laptop",
            private_key: None,
            address: "100.96.0.2".parse().unwrap(),
            gateway_key: PeerKey([1; 32]),
            endpoint: "198.18.0.1:51820",
        }
        .render();
        assert!(
            text.lines()
                .any(|l| l == "AllowedIPs = 100.96.0.0/24, 198.51.100.0/24, 10.9.0.0/16"),
            "{text}"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("PrivateKey")),
            "no private key unless given"
        );
    }

    #[test]
    fn client_config_is_wg_quick_shaped() {
        let t = tenant("100.96.0.0/24", "100.96.0.1");
        let k = PrivateKey::generate();
        let text = ClientConfig {
            tenant: &t,
            device_name: "laptop",
            private_key: Some(&k),
            address: "100.96.0.2".parse().unwrap(),
            gateway_key: PeerKey([1; 32]),
            endpoint: "198.18.0.1:51820",
        }
        .render();
        for line in [
            format!("PrivateKey = {}", k.to_base64()),
            "Address = 100.96.0.2/32".into(),
            "Endpoint = 198.18.0.1:51820".into(),
            "AllowedIPs = 100.96.0.0/24".into(),
            "PersistentKeepalive = 25".into(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
