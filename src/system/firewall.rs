//! `rampart system firewall`: the appliance's inbound nftables policy, derived from the gateway config.
//!
//! Default drop on input; accepted are loopback, established/related traffic, DHCP replies, the ICMPv6 that IPv6
//! needs (neighbour discovery, router advertisements), and one rule per listener the config exposes off the box:
//! WireGuard (`gateway.listen`, UDP) and, when set to a non-loopback address, the admin (`gateway.admin_listen`),
//! enrollment (`gateway.enroll_listen`) and review UI (`gateway.ui_listen`) listeners (TCP). A listener on a
//! specific address is opened only for that destination address. Forwarding and output are left alone: the
//! gateway's data path runs in its own namespaces and sockets, not through the host's forward chain.
//!
//! The appliance loads it at boot before the gateway starts (`firmware-image/rootfs/usr/lib/rampart/firewall-up`).
//! The ruleset replaces only its own table (`inet rampart`), atomically, so it can be reapplied after a config
//! change. Pure text generation: it never runs `nft` itself.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::config::Config;

/// nftables table the policy lives in.
pub const TABLE: &str = "rampart";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

/// One listener the config opens to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Opening {
    proto: Proto,
    addr: SocketAddr,
    what: &'static str,
}

fn openings(cfg: &Config) -> Vec<Opening> {
    let mut v = vec![Opening {
        proto: Proto::Udp,
        addr: cfg.gateway.listen,
        what: "WireGuard (gateway.listen)",
    }];
    let tcp = [
        (
            Some(cfg.gateway.admin_listen),
            "admin (gateway.admin_listen)",
        ),
        (cfg.enroll.listen, "enrollment (gateway.enroll_listen)"),
        (cfg.ui.listen, "review UI (gateway.ui_listen)"),
    ];
    for (addr, what) in tcp {
        if let Some(addr) = addr {
            v.push(Opening {
                proto: Proto::Tcp,
                addr,
                what,
            });
        }
    }
    // Loopback listeners are reachable only from the box itself (iif lo is accepted anyway).
    v.retain(|o| !o.addr.ip().is_loopback());
    v
}

/// The nft script for `cfg`, or with `cfg = None` the base policy (nothing but loopback, established traffic,
/// DHCP and ICMPv6 housekeeping), which the appliance loads before its network comes up.
pub fn ruleset(cfg: Option<&Config>) -> String {
    let mut s = String::new();
    let source = cfg.map_or("no config: base policy only".to_string(), |c| {
        format!("from {}", c.source.display())
    });
    let _ = writeln!(
        s,
        "# Rampart appliance inbound policy (`rampart system firewall`, {source}).\n\
         # Replaces only table inet {TABLE}, atomically.\n\
         table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy drop;\n\
         \t\tiif \"lo\" accept\n\
         \t\tct state established,related accept\n\
         \t\tct state invalid drop\n\
         \t\tudp sport 67 udp dport 68 accept comment \"DHCP replies\"\n\
         \t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} ip6 hoplimit 255 accept comment \"IPv6 neighbour discovery\""
    );
    for o in cfg.map(openings).unwrap_or_default() {
        let proto = match o.proto {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        };
        let port = o.addr.port();
        let dst = match o.addr {
            a if a.ip().is_unspecified() => String::new(),
            SocketAddr::V4(a) => format!("ip daddr {} ", a.ip()),
            SocketAddr::V6(a) => format!("ip6 daddr {} ", a.ip()),
        };
        let _ = writeln!(
            s,
            "\t\t{dst}{proto} dport {port} accept comment \"{}\"",
            o.what
        );
    }
    s.push_str("\t}\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(gateway_extra: &str) -> Config {
        let text = format!(
            "[gateway]\nlisten = \"0.0.0.0:51820\"\nprivate_key_file = \"gateway.key\"\nstate_dir = \"state\"\n{gateway_extra}\n\
             [[tenant]]\nid = \"default\"\nname = \"Default\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n"
        );
        Config::from_toml(&text, Path::new("/data/config/gateway.toml")).unwrap()
    }

    fn rules(r: &str) -> Vec<&str> {
        r.lines()
            .map(str::trim)
            .filter(|l| l.contains("dport"))
            .collect()
    }

    #[test]
    fn default_config_opens_only_wireguard() {
        // The default admin listener is on loopback: no rule, iif lo covers it.
        let r = ruleset(Some(&config("")));
        assert!(r.contains("policy drop;"), "{r}");
        assert!(r.contains("from /data/config/gateway.toml"), "{r}");
        let opened: Vec<&str> = rules(&r)
            .into_iter()
            .filter(|l| !l.contains("DHCP"))
            .collect();
        assert_eq!(
            opened,
            ["udp dport 51820 accept comment \"WireGuard (gateway.listen)\""],
            "{r}"
        );
    }

    #[test]
    fn enabled_listeners_are_opened_loopback_ones_are_not() {
        // An admin listener off loopback needs its bearer token file (mode 0600).
        let dir = std::env::temp_dir().join(format!("rampart-firewall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("admin.token");
        std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let r = ruleset(Some(&config(&format!(
            "admin_listen = \"0.0.0.0:8080\"\nadmin_token_file = \"{}\"\nenroll_listen = \"192.0.2.10:8443\"\nui_listen = \"127.0.0.1:9443\"",
            token.display()
        ))));
        let _ = std::fs::remove_dir_all(&dir);
        let opened = rules(&r);
        assert!(
            opened.contains(&"tcp dport 8080 accept comment \"admin (gateway.admin_listen)\""),
            "{r}"
        );
        assert!(
            opened.contains(&"ip daddr 192.0.2.10 tcp dport 8443 accept comment \"enrollment (gateway.enroll_listen)\""),
            "{r}"
        );
        assert!(!r.contains("9443"), "{r}");
    }

    #[test]
    fn base_policy_opens_no_service_port() {
        let r = ruleset(None);
        assert!(
            r.contains("policy drop;") && r.contains("iif \"lo\" accept"),
            "{r}"
        );
        assert!(rules(&r).iter().all(|l| l.contains("DHCP")), "{r}");
        // Reapplying replaces the table instead of adding a second one.
        assert!(
            r.contains("table inet rampart\ndelete table inet rampart\n"),
            "{r}"
        );
    }
}
