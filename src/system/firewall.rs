//! `rampart system firewall`: the appliance's nftables policy, derived from the gateway config.
//!
//! Input, default drop: accepted are loopback, established/related traffic, DHCP replies, the ICMPv6 that IPv6
//! needs (neighbour discovery, router advertisements), and one rule per listener the config exposes off the box:
//! WireGuard (`gateway.listen`, UDP) and, when set to a non-loopback address, the admin (`gateway.admin_listen`),
//! enrollment (`gateway.enroll_listen`) and review UI (`gateway.ui_listen`) listeners (TCP). A listener on a
//! specific address is opened only for that destination address. Each GUE site (`[[onramp.gue.site]]`) is
//! let in only from its `remote` addresses to its entry's `listen`.
//!
//! Forward, default drop: the appliance routes nothing (the gateway's data path runs in its own namespaces and
//! sockets, not through the host's forward chain).
//!
//! Output: what the gateway's user (`gateway.user`) sends is limited to replies (established/related),
//! loopback, WireGuard and GUE from their listening ports, and new connections to each tenant's `offramp` networks out
//! of the interface its `egress.interface` names (and with its `egress.fwmark`); a tenant that names no
//! interface leaves through the main routing table, so its networks are allowed out of any interface. A
//! tenant with `egress.netns` connects from that namespace, whose own firewall applies. Everything else the
//! gateway sends is rejected (ICMP administratively prohibited, so a connect fails at once instead of hanging
//! through SYN retries as with a drop; logged, rate-limited), so a compromised gateway cannot reach the admin network or
//! the internet beyond the off-ramps. Other users (root's DHCP client, the admin's tools) are not filtered.
//! Without `gateway.user` the gateway is root, like everything else on the box, and its output is not filtered.
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
        "# Rampart appliance firewall policy (`rampart system firewall`, {source}).\n\
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
    // GUE sites: only from their outer source addresses (an unkeyed site is known by that address alone).
    for g in cfg.map(|c| &c.gue_onramps[..]).unwrap_or_default() {
        let dst = match g.listen {
            SocketAddr::V4(a) => format!("ip daddr {} ", a.ip()),
            SocketAddr::V6(a) => format!("ip6 daddr {} ", a.ip()),
        };
        for site in &g.sites {
            for r in &site.remotes {
                let src = match r {
                    std::net::IpAddr::V4(a) => format!("ip saddr {a} "),
                    std::net::IpAddr::V6(a) => format!("ip6 saddr {a} "),
                };
                let _ = writeln!(
                    s,
                    "\t\t{src}{dst}udp dport {} accept comment \"GUE site {} (onramp.gue {})\"",
                    g.listen.port(),
                    site.name,
                    g.name
                );
            }
        }
    }
    s.push_str(
        "\t}\n\
         \tchain forward {\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t}\n",
    );
    if let Some(cfg) = cfg {
        gateway_output(&mut s, cfg);
    }
    s.push_str("}\n");
    s
}

/// The output chain that limits what the gateway's user sends (see the module docs).
fn gateway_output(s: &mut String, cfg: &Config) {
    let Some(user) = &cfg.gateway.user else {
        s.push_str(
            "\t# gateway.user is not set: the gateway runs as root and its outbound traffic is not filtered.\n",
        );
        return;
    };
    let _ = writeln!(
        s,
        "\tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\tmeta skuid \"{user}\" jump gateway_out comment \"the gateway (gateway.user)\"\n\
         \t}}\n\
         \tchain gateway_out {{\n\
         \t\toif \"lo\" accept\n\
         \t\tct state established,related accept\n\
         \t\tudp sport {} accept comment \"WireGuard (gateway.listen)\"",
        cfg.gateway.listen.port()
    );
    for g in &cfg.gue_onramps {
        let _ = writeln!(
            s,
            "\t\tudp sport {} accept comment \"GUE replies to sites (onramp.gue {})\"",
            g.listen.port(),
            g.name
        );
    }
    for t in &cfg.tenants {
        if t.offramp.is_empty() {
            continue;
        }
        let e = &t.egress;
        if let Some(ns) = &e.netns {
            let _ = writeln!(
                s,
                "\t\t# tenant {}: off-ramp from namespace {} (its own firewall applies there)",
                t.id,
                ns.display()
            );
            continue;
        }
        let mut via = String::new();
        if let Some(i) = &e.interface {
            let _ = write!(via, "oifname \"{i}\" ");
        }
        if let Some(m) = e.fwmark {
            let _ = write!(via, "meta mark {m:#x} ");
        }
        let how = if e.interface.is_some() {
            "egress.interface"
        } else {
            "no egress.interface: any interface the routing table picks"
        };
        for (family, v6) in [("ip", false), ("ip6", true)] {
            let nets: Vec<String> = t
                .offramp
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(|n| n.to_string())
                .collect();
            if nets.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "\t\t{via}{family} daddr {{ {} }} accept comment \"tenant {} off-ramp ({how})\"",
                nets.join(", "),
                t.id
            );
        }
    }
    s.push_str(
        "\t\tlimit rate 6/minute burst 5 packets log prefix \"rampart egress refused: \" comment \"anything else the gateway sends\"\n\
         \t\tcounter reject with icmpx admin-prohibited comment \"anything else the gateway sends\"\n\
         \t}\n",
    );
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
    fn gue_sites_are_let_in_from_their_remotes_only() {
        let text = "[gateway]\nlisten = \"0.0.0.0:51820\"\nprivate_key_file = \"gateway.key\"\nstate_dir = \"state\"\nuser = \"rampart\"\n\
                    [[tenant]]\nid = \"acme\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\
                    [[onramp.gue]]\nlisten = \"192.0.2.10\"\n[[onramp.gue.site]]\nname = \"b7\"\ntenant = \"acme\"\n\
                    remote = [\"198.18.7.2\", \"198.18.7.3\"]\ninner_prefixes = \"10.7.0.0/16\"\n";
        let cfg = Config::from_toml(text, Path::new("/etc/rampart/rampart.toml")).unwrap();
        let r = ruleset(Some(&cfg));
        for src in ["198.18.7.2", "198.18.7.3"] {
            let want = format!("ip saddr {src} ip daddr 192.0.2.10 udp dport 6080 accept comment \"GUE site b7 (onramp.gue gue)\"");
            assert!(r.contains(&want), "{want} missing:\n{r}");
        }
        assert_eq!(r.matches("udp dport 6080").count(), 2, "{r}");
        assert!(r.contains("udp sport 6080 accept"), "{r}");
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

    /// The rules of chain `name`, trimmed, without its hook line.
    fn chain<'a>(r: &'a str, name: &str) -> Vec<&'a str> {
        r.lines()
            .skip_while(|l| l.trim() != format!("chain {name} {{"))
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .filter(|l| !l.starts_with("type filter"))
            .collect()
    }

    #[test]
    fn nothing_is_forwarded() {
        for r in [ruleset(None), ruleset(Some(&config("")))] {
            assert!(
                r.contains("chain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}"),
                "{r}"
            );
            assert!(chain(&r, "forward").is_empty(), "{r}");
        }
    }

    #[test]
    fn without_a_gateway_user_output_is_not_filtered() {
        let r = ruleset(Some(&config("")));
        assert!(!r.contains("hook output"), "{r}");
        assert!(
            r.contains("gateway.user is not set: the gateway runs as root"),
            "{r}"
        );
        assert!(!ruleset(None).contains("hook output"));
    }

    #[test]
    fn the_gateway_reaches_only_off_ramps_through_their_interfaces() {
        let text = "[gateway]\nlisten = \"[::]:51821\"\nprivate_key_file = \"gateway.key\"\nstate_dir = \"state\"\nuser = \"rampart\"\n\
            [[tenant]]\nid = \"acme\"\nname = \"Acme\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\
            offramp = [\"10.20.0.0/16\", \"fd00:20::/64\", \"10.21.0.0/16\"]\negress = { interface = \"eth1\" }\n\
            [[tenant]]\nid = \"globex\"\nname = \"Globex\"\naddress_pool = \"100.97.0.0/24\"\ngateway_address = \"100.97.0.1\"\n\
            offramp = [\"10.20.0.0/16\"]\negress = { interface = \"eth2\", fwmark = 7 }\n\
            [[tenant]]\nid = \"hooli\"\nname = \"Hooli\"\naddress_pool = \"100.98.0.0/24\"\ngateway_address = \"100.98.0.1\"\n\
            offramp = [\"10.30.0.0/16\"]\n\
            [[tenant]]\nid = \"initech\"\nname = \"Initech\"\naddress_pool = \"100.99.0.0/24\"\ngateway_address = \"100.99.0.1\"\n\
            offramp = [\"10.40.0.0/16\"]\negress = { netns = \"/proc/self/ns/net\" }\n\
            [[tenant]]\nid = \"umbrella\"\nname = \"Umbrella\"\naddress_pool = \"100.100.0.0/24\"\ngateway_address = \"100.100.0.1\"\n\
            egress = { interface = \"eth3\" }\n";
        let cfg = Config::from_toml(text, Path::new("/data/config/gateway.toml")).unwrap();
        let r = ruleset(Some(&cfg));
        // Only the gateway's user goes through the filter; the policy of the hook itself stays accept.
        assert_eq!(
            chain(&r, "output"),
            ["meta skuid \"rampart\" jump gateway_out comment \"the gateway (gateway.user)\""],
            "{r}"
        );
        assert!(
            r.contains("hook output priority filter; policy accept;"),
            "{r}"
        );
        assert_eq!(
            chain(&r, "gateway_out"),
            [
                "oif \"lo\" accept",
                "ct state established,related accept",
                "udp sport 51821 accept comment \"WireGuard (gateway.listen)\"",
                "oifname \"eth1\" ip daddr { 10.20.0.0/16, 10.21.0.0/16 } accept comment \"tenant acme off-ramp (egress.interface)\"",
                "oifname \"eth1\" ip6 daddr { fd00:20::/64 } accept comment \"tenant acme off-ramp (egress.interface)\"",
                "oifname \"eth2\" meta mark 0x7 ip daddr { 10.20.0.0/16 } accept comment \"tenant globex off-ramp (egress.interface)\"",
                "ip daddr { 10.30.0.0/16 } accept comment \"tenant hooli off-ramp (no egress.interface: any interface the routing table picks)\"",
                "# tenant initech: off-ramp from namespace /proc/self/ns/net (its own firewall applies there)",
                "limit rate 6/minute burst 5 packets log prefix \"rampart egress refused: \" comment \"anything else the gateway sends\"",
                "counter reject with icmpx admin-prohibited comment \"anything else the gateway sends\"",
            ],
            "{r}"
        );
        // A tenant without off-ramps opens nothing, even with an interface named.
        assert!(!r.contains("eth3") && !r.contains("umbrella"), "{r}");
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
