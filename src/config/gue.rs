//! Settings of the unconnected on-ramp: `[[onramp.gue]]` entries, each a UDP socket that takes GUE
//! (`draft-ietf-intarea-gue`) from branch sites, and their `[[onramp.gue.site]]`s: which outer source addresses
//! a site sends from, which tenant it belongs to, which inner source networks it may use, and optionally a key
//! for authenticated private data (keyed MAC and replay counter, docs/onramps.md).
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::raw::AddrList;
use super::validate::resolve;
use super::{valid_ident, Collector, Tenant, TenantId, UserName};

/// The customary GUE port (Oxy, Linux examples).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Largest inner packet sent to a site unless `mtu` says otherwise: the WireGuard inner MTU, so upgraded TCP
/// (MSS clamped to 1380) fits; on a 1500-byte path with an IPv4 outer header that leaves 48 bytes for outer
/// IP, UDP, GUE and private data.
pub const DEFAULT_SITE_MTU: u16 = 1420;
/// A site key: 32 random bytes, written as 64 hex digits.
pub const GUE_KEY_LEN: usize = 32;

const MAKE_KEY: &str = "umask 077; openssl rand -hex 32 > FILE";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGue {
    /// Names the on-ramp in flow records (`<name>/<site>`); default "gue".
    pub name: Option<String>,
    /// `address` or `address:port` (port 6080 by default).
    pub listen: String,
    #[serde(default)]
    pub site: Vec<RawGueSite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGueSite {
    pub name: String,
    pub tenant: String,
    /// Outer source addresses the site sends from.
    pub remote: AddrList,
    /// Inner source networks the site may send from (and that route to it).
    pub inner_prefixes: AddrList,
    /// A file holding the site's 32-byte key as 64 hex digits: packets must then carry authenticated
    /// private data.
    pub key_file: Option<String>,
    pub key_id: Option<u32>,
    /// Largest inner packet sent to the site (default 1420).
    pub mtu: Option<u16>,
    /// The UDP port the site takes GUE on (its `ip fou add port`), where replies go; default 6080.
    pub port: Option<u16>,
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// One `[[onramp.gue]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GueOnramp {
    pub name: String,
    pub listen: SocketAddr,
    pub sites: Vec<GueSite>,
}

/// One `[[onramp.gue.site]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GueSite {
    pub name: String,
    pub tenant: TenantId,
    pub remotes: Vec<IpAddr>,
    pub inner_prefixes: Vec<IpNet>,
    pub key: Option<GueKey>,
    pub mtu: u16,
    /// Where replies go: the site's address it last sent from, this port.
    pub port: u16,
    /// Policy identity of the site's flows (`users = [...]`, `groups = [...]` in rules).
    pub user: UserName,
    pub groups: Vec<String>,
}

/// A site's MAC key. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct GueKey {
    pub id: u32,
    pub file: PathBuf,
    pub secret: [u8; GUE_KEY_LEN],
}

impl std::fmt::Debug for GueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GueKey")
            .field("id", &self.id)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl GueOnramp {
    /// The site that sends from `ip`, if any.
    pub fn site_by_remote(&self, ip: IpAddr) -> Option<&GueSite> {
        let ip = ip.to_canonical();
        self.sites.iter().find(|s| s.remotes.contains(&ip))
    }
}

/// Whether an outer address is on a network nobody on the internet can send from: loopback, private
/// (RFC 1918, fc00::/7), link-local, shared (100.64/10) or benchmarking (198.18/15) space.
pub fn outer_is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (18..20).contains(&o[1]))
        }
        IpAddr::V6(a) => {
            let s = a.segments()[0];
            a.is_loopback() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

/// An unauthenticated site's outer addresses that are not local: anyone who can reach the port and spoof one
/// of them can send as the site.
pub fn exposed_remotes(site: &GueSite) -> Vec<IpAddr> {
    if site.key.is_some() {
        return Vec::new();
    }
    site.remotes
        .iter()
        .copied()
        .filter(|&a| !outer_is_local(a))
        .collect()
}

fn parse_listen(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, DEFAULT_GUE_PORT))
    })
}

pub(super) fn validate_gue(
    raw: Vec<RawGue>,
    tenants: &[Tenant],
    base: &Path,
    c: &mut Collector<'_>,
) -> Vec<GueOnramp> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    let mut site_names = HashSet::new();
    // Inner networks per tenant, to refuse two sites of one tenant claiming overlapping networks.
    let mut inner: HashMap<TenantId, Vec<(IpNet, String)>> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let name = r.name.unwrap_or_else(|| "gue".to_string());
        let key = format!("onramp.gue[{i}]");
        let mut ok = true;
        if !valid_ident(&name, 32) {
            c.push(
                format!("{key}.name"),
                format!("{name:?} is not a valid name: use 1-32 letters, digits, '-', '_' or '.', like \"gue\""),
            );
            ok = false;
        } else if !names.insert(name.clone()) {
            c.push(
                format!("{key}.name"),
                format!(
                    "duplicate on-ramp name {name:?}; give every [[onramp.gue]] its own `name`"
                ),
            );
            ok = false;
        }
        let key = format!("{key} ({name})");
        let listen = match parse_listen(&r.listen) {
            Some(a) if a.ip().is_unspecified() => {
                c.push(
                    format!("{key}.listen"),
                    format!("{a} listens on every address, but GUE without a key is spoofable by anyone who can reach the port; write the site-facing or private address, like \"198.18.0.1:6080\""),
                );
                ok = false;
                a
            }
            Some(a) if a.port() == 0 => {
                c.push(
                    format!("{key}.listen"),
                    "port 0 is not a port; leave it out for 6080",
                );
                ok = false;
                a
            }
            Some(a) => {
                if !listens.insert(a) {
                    c.push(
                        format!("{key}.listen"),
                        format!(
                            "{a} is used by another [[onramp.gue]]; put its sites into that entry"
                        ),
                    );
                    ok = false;
                }
                a
            }
            None => {
                c.push(
                    format!("{key}.listen"),
                    format!("{:?} is not an address; write it like \"198.18.0.1\" or \"198.18.0.1:6080\"", r.listen),
                );
                ok = false;
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        if r.site.is_empty() {
            c.push(
                format!("{key}.site"),
                "no site may send; add a [[onramp.gue.site]] with `name`, `tenant`, `remote` and `inner_prefixes`",
            );
            ok = false;
        }
        let mut sites = Vec::new();
        let mut remotes: HashMap<IpAddr, String> = HashMap::new();
        for (j, s) in r.site.into_iter().enumerate() {
            let skey = format!("{key}.site[{j}]");
            let Some(site) = validate_site(s, &name, tenants, base, &skey, c) else {
                ok = false;
                continue;
            };
            let skey = format!("{skey} ({})", site.name);
            if !site_names.insert(site.name.clone()) {
                c.push(
                    format!("{skey}.name"),
                    "another site has this name; site names are global (policy rules name them in `sites = [...]`)",
                );
                ok = false;
            }
            for &a in &site.remotes {
                if let Some(other) = remotes.insert(a, site.name.clone()) {
                    c.push(
                        format!("{skey}.remote"),
                        format!("{a} is also site {other:?}'s; a site is known by its outer source address, so each address may belong to one site"),
                    );
                    ok = false;
                }
            }
            let seen = inner.entry(site.tenant.clone()).or_default();
            for &n in &site.inner_prefixes {
                if let Some((_, other)) = seen
                    .iter()
                    .find(|(o, _)| o.contains(&n.network()) || n.contains(&o.network()))
                {
                    c.push(
                        format!("{skey}.inner_prefixes"),
                        format!("{n} overlaps site {other:?}'s inner networks in the same tenant; replies could not tell the sites apart, so give each site its own networks"),
                    );
                    ok = false;
                }
            }
            seen.extend(site.inner_prefixes.iter().map(|&n| (n, site.name.clone())));
            sites.push(site);
        }
        if ok {
            for s in &sites {
                let exposed = exposed_remotes(s);
                if !exposed.is_empty() {
                    tracing::warn!(
                        onramp = %name, site = %s.name, remotes = ?exposed,
                        "GUE site without a key sends from a public address: anyone who can spoof it reaches the \
                         site's tenant; add `key_file` to the site, or carry GUE inside IPsec or WireGuard"
                    );
                }
            }
            out.push(GueOnramp {
                name,
                listen,
                sites,
            });
        }
    }
    out
}

fn validate_site(
    s: RawGueSite,
    entry: &str,
    tenants: &[Tenant],
    base: &Path,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<GueSite> {
    let mut ok = true;
    if !valid_ident(&s.name, 64) {
        c.push(
            format!("{key}.name"),
            format!(
                "{:?} is not a valid name: use 1-64 letters, digits, '-', '_' or '.', like \"branch-7\"",
                s.name
            ),
        );
        ok = false;
    }
    let key = format!("{key} ({})", s.name);
    let Some(tenant) = tenants.iter().find(|t| t.id.as_str() == s.tenant) else {
        c.push(
            format!("{key}.tenant"),
            format!(
                "{:?} is not a configured tenant; write the `id` of a [[tenant]]",
                s.tenant
            ),
        );
        return None;
    };
    let mut remotes = Vec::new();
    for r in s.remote.items() {
        let ip = r
            .parse::<IpAddr>()
            .ok()
            .or_else(|| match r.parse::<IpNet>() {
                Ok(n) if n.prefix_len() == n.max_prefix_len() => Some(n.addr()),
                _ => None,
            });
        match ip {
            Some(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                remotes.push(ip.to_canonical())
            }
            _ => {
                c.push(
                    format!("{key}.remote"),
                    format!("{r:?} is not a unicast address; list the site's outer source addresses, like [\"198.51.100.7\"] (a site is looked up by exact address)"),
                );
                ok = false;
            }
        }
    }
    if remotes.is_empty() && ok {
        c.push(
            format!("{key}.remote"),
            "empty; list the outer source addresses the site sends from, like [\"198.51.100.7\"]",
        );
        ok = false;
    }
    let inner_prefixes = super::onramp::source_networks(
        &s.inner_prefixes,
        tenant,
        &format!("{key}.inner_prefixes"),
        "of the site",
        c,
    );
    ok &= inner_prefixes.is_some();
    let inner_prefixes = inner_prefixes.unwrap_or_default();
    let mtu = match s.mtu {
        None => DEFAULT_SITE_MTU,
        Some(m @ 576..=9000) => m,
        Some(_) => {
            c.push(
                format!("{key}.mtu"),
                "must be 576-9000 (the largest inner packet sent to the site; default 1420)",
            );
            ok = false;
            0
        }
    };
    let port = match s.port {
        None => DEFAULT_GUE_PORT,
        Some(0) => {
            c.push(
                format!("{key}.port"),
                "port 0 is not a port; leave it out for 6080 (the site's `ip fou add port`)",
            );
            ok = false;
            0
        }
        Some(p) => p,
    };
    let gue_key = match (&s.key_file, s.key_id) {
        (None, Some(_)) => {
            c.push(
                format!("{key}.key_id"),
                "names a key but the site has no `key_file`; add `key_file`, or remove `key_id`",
            );
            ok = false;
            None
        }
        (None, None) => None,
        (Some(f), id) => {
            let k = read_key(&resolve(base, f), &format!("{key}.key_file"), c);
            ok &= k.is_some();
            k.map(|secret| GueKey {
                id: id.unwrap_or(1),
                file: resolve(base, f),
                secret,
            })
        }
    };
    let user = match UserName::parse(
        s.user
            .as_deref()
            .unwrap_or(&format!("onramp:{entry}/{}", s.name)),
    ) {
        Ok(u) => u,
        Err(m) => {
            c.push(format!("{key}.user"), m);
            return None;
        }
    };
    ok.then_some(GueSite {
        name: s.name,
        tenant: tenant.id.clone(),
        remotes,
        inner_prefixes,
        key: gue_key,
        mtu,
        port,
        user,
        groups: s.groups,
    })
}

/// Reads a site key: a regular file only its owner can read, holding 64 hex digits.
fn read_key(file: &Path, key: &str, c: &mut Collector<'_>) -> Option<[u8; GUE_KEY_LEN]> {
    let make = MAKE_KEY.replace("FILE", &file.display().to_string());
    let text = super::validate::read_private_file(file, key, "site key", &make, c)?;
    let hex = text.trim();
    let mut secret = [0u8; GUE_KEY_LEN];
    let valid = hex.len() == 2 * GUE_KEY_LEN
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.iter_mut().enumerate().all(|(i, b)| {
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map(|v| *b = v)
                .is_ok()
        });
    if !valid {
        c.push(
            key,
            format!(
                "{} does not hold a site key: write 64 hex digits (32 random bytes): `{make}`",
                file.display()
            ),
        );
        return None;
    }
    Some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[gateway]
state_dir = "/nonexistent"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[tenant]]
id = "globex"
address_pool = "100.96.1.0/24"
gateway_address = "100.96.1.1"
"#;

    fn load(extra: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{BASE}{extra}"), Path::new("/etc/rampart/t.toml"))
            .map_err(|e| e.to_string())
    }

    const SITE: &str = r#"
[[onramp.gue]]
listen = "198.18.0.1"
[[onramp.gue.site]]
name = "branch-7"
tenant = "acme"
remote = "198.18.7.2"
inner_prefixes = ["10.7.0.0/16"]
"#;

    #[test]
    fn a_site_with_defaults() {
        let c = load(SITE).unwrap();
        let g = &c.gue_onramps[0];
        assert_eq!(g.name, "gue");
        assert_eq!(g.listen, "198.18.0.1:6080".parse().unwrap());
        let s = &g.sites[0];
        assert_eq!(s.mtu, DEFAULT_SITE_MTU);
        assert_eq!(s.key, None);
        assert_eq!(s.user.as_str(), "onramp:gue/branch-7");
        assert_eq!(
            g.site_by_remote("::ffff:198.18.7.2".parse().unwrap())
                .map(|s| s.name.as_str()),
            Some("branch-7")
        );
        assert!(g.site_by_remote("198.18.7.3".parse().unwrap()).is_none());
        // Local outer network: no warning needed.
        assert!(exposed_remotes(s).is_empty());
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            (
                SITE.replace("198.18.0.1\"", "0.0.0.0\""),
                "onramp.gue[0] (gue).listen",
                "site-facing",
            ),
            (
                SITE.replace("tenant = \"acme\"", "tenant = \"nope\""),
                "site[0] (branch-7).tenant",
                "configured tenant",
            ),
            (
                SITE.replace("remote = \"198.18.7.2\"", "remote = \"198.18.7.0/24\""),
                "site[0] (branch-7).remote",
                "unicast address",
            ),
            (
                SITE.replace("10.7.0.0/16", "100.96.0.0/25"),
                "site[0] (branch-7).inner_prefixes",
                "address pool",
            ),
            (
                format!("{SITE}mtu = 100\n"),
                "site[0] (branch-7).mtu",
                "576-9000",
            ),
            (
                format!("{SITE}key_id = 3\n"),
                "site[0] (branch-7).key_id",
                "add `key_file`",
            ),
            (
                format!("{SITE}key_file = \"/nonexistent/k\"\n"),
                "site[0] (branch-7).key_file",
                "openssl rand -hex 32",
            ),
            (
                SITE.replace("[[onramp.gue.site]]", "[[onramp.gue.x]]"),
                "",
                "unknown field",
            ),
        ];
        for (text, key, fix) in cases {
            let err = load(&text).unwrap_err();
            assert!(
                err.contains(key) && err.contains(fix),
                "want {key:?} and {fix:?} in:\n{err}"
            );
        }
    }

    #[test]
    fn sites_are_known_by_one_address_and_own_their_networks() {
        let two = format!(
            "{SITE}{}",
            r#"
[[onramp.gue.site]]
name = "branch-8"
tenant = "acme"
remote = "198.18.7.2"
inner_prefixes = ["10.7.128.0/24"]
"#
        );
        let err = load(&two).unwrap_err();
        assert!(err.contains("site[1] (branch-8).remote"), "{err}");
        assert!(err.contains("site[1] (branch-8).inner_prefixes"), "{err}");
        // Positive control: another tenant may use the same inner networks (tenants are isolated).
        let other = two.replace(
            "tenant = \"acme\"\nremote = \"198.18.7.2\"\ninner_prefixes = [\"10.7.128.0/24\"]",
            "tenant = \"globex\"\nremote = \"198.18.8.2\"\ninner_prefixes = [\"10.7.0.0/16\"]",
        );
        let c = load(&other).unwrap();
        assert_eq!(c.gue_onramps[0].sites.len(), 2);
    }

    #[test]
    fn key_file_is_read_and_checked() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("branch-7.key");
        std::fs::write(&f, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!("{SITE}key_file = \"{}\"\nkey_id = 7\n", f.display());
        let c = load(&text).unwrap();
        let k = c.gue_onramps[0].sites[0].key.as_ref().unwrap();
        assert_eq!((k.id, k.secret), (7, [0xab; 32]));
        assert!(!format!("{k:?}").contains("ab, ab") && !format!("{k:?}").contains("171"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&text).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "short").unwrap();
        assert!(load(&text).unwrap_err().contains("64 hex digits"));
    }

    #[test]
    fn public_unkeyed_sites_are_exposed() {
        let c = load(&SITE.replace("198.18.7.2", "203.0.113.9")).unwrap();
        assert_eq!(
            exposed_remotes(&c.gue_onramps[0].sites[0]),
            vec!["203.0.113.9".parse::<IpAddr>().unwrap()]
        );
        for local in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "100.64.0.9",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(outer_is_local(local.parse().unwrap()), "{local}");
        }
        for public in ["203.0.113.9", "8.8.8.8", "2001:db8::1"] {
            assert!(!outer_is_local(public.parse().unwrap()), "{public}");
        }
    }
}
