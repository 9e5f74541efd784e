//! Zero-trust policy: each tenant's ordered rules compiled for evaluation. The first matching rule decides;
//! nothing matching means deny. Evaluated once per flow (at its first packet) and again on reload.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{Action, DeviceName, DstMatch, Inspect, Proto, Tenant, UserName};
use crate::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Who opened a flow: the identity bound to the source device's WireGuard key.
pub struct Subject<'a> {
    pub user: &'a UserName,
    pub groups: &'a [String],
    pub device: &'a DeviceName,
}

/// What a flow is addressed to.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub dst: IpAddr,
    pub protocol: u8,
    /// Destination port for TCP/UDP.
    pub dport: Option<u16>,
}

/// The outcome of evaluating a flow against policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// Index of the deciding rule; `None` for the default deny.
    pub rule: Option<u16>,
}

impl Decision {
    pub const DEFAULT_DENY: Decision = Decision {
        action: Action::Deny,
        rule: None,
    };
}

/// The id recorded for flows no rule matched.
pub const DEFAULT_DENY_ID: &str = "default-deny";

#[derive(Clone)]
struct CompiledRule {
    id: Arc<str>,
    action: Action,
    users: Vec<UserName>,
    groups: Vec<String>,
    devices: Vec<DeviceName>,
    sites: Vec<String>,
    dst: Option<Vec<IpNet>>,
    proto: Proto,
    ports: Vec<(u16, u16)>,
    inspect: Inspect,
}

/// A tenant's compiled rules.
pub struct Policy {
    rules: Vec<CompiledRule>,
    default_id: Arc<str>,
}

impl Policy {
    /// Resolves device names and `gateway` to addresses of this tenant. A rule naming a device that does not
    /// exist (yet) matches nothing for that entry.
    ///
    /// An `inspect_http` rule is preceded by its own refusal of UDP/443 to the same destinations (QUIC, that
    /// is HTTP/3, would carry the same requests around the inspector): clients fall back to TCP.
    pub fn compile(t: &Tenant) -> Policy {
        let mut rules = Vec::with_capacity(t.rules.len());
        for r in &t.rules {
            let dst = r.dst.as_ref().map(|list| {
                list.iter()
                    .flat_map(|d| -> Vec<IpNet> {
                        match d {
                            DstMatch::Net(n) => vec![*n],
                            DstMatch::Gateway => t.gateway_addresses().map(IpNet::from).collect(),
                            DstMatch::Device(name) => {
                                let found: Vec<IpNet> = t
                                    .devices
                                    .iter()
                                    .filter(|dev| &dev.name == name)
                                    .flat_map(|dev| dev.addresses().map(IpNet::from))
                                    .collect();
                                if found.is_empty() {
                                    tracing::debug!(tenant = %t.id, rule = %r.id, device = %name, "rule names a device that is not enrolled");
                                }
                                found
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let rule = CompiledRule {
                id: Arc::from(r.id.as_str()),
                action: r.action,
                users: r.users.clone(),
                groups: r.groups.clone(),
                devices: r.devices.clone(),
                sites: r.sites.clone(),
                dst,
                proto: r.proto,
                ports: r.ports.clone(),
                inspect: r.inspect.clone(),
            };
            if r.action == Action::InspectHttp {
                rules.push(CompiledRule {
                    id: Arc::from(format!("{}/no-quic", r.id)),
                    action: Action::Reject,
                    proto: Proto::Udp,
                    ports: vec![(443, 443)],
                    inspect: Inspect::None,
                    ..rule.clone()
                });
            }
            rules.push(rule);
        }
        rules.truncate(usize::from(u16::MAX));
        Policy {
            rules,
            default_id: Arc::from(DEFAULT_DENY_ID),
        }
    }

    pub fn evaluate(&self, s: &Subject<'_>, t: &Target) -> Decision {
        for (i, r) in self.rules.iter().enumerate() {
            if r.matches(s, t) {
                return Decision {
                    action: r.action,
                    rule: Some(i as u16),
                };
            }
        }
        Decision::DEFAULT_DENY
    }

    /// The inspector the deciding rule puts between the two legs of a layer-4 flow.
    pub fn inspect(&self, d: &Decision) -> Inspect {
        d.rule
            .and_then(|i| self.rules.get(usize::from(i)))
            .map_or(Inspect::None, |r| r.inspect.clone())
    }

    /// The id records name for a decision.
    pub fn rule_id(&self, d: &Decision) -> Arc<str> {
        match d.rule.and_then(|i| self.rules.get(usize::from(i))) {
            Some(r) => r.id.clone(),
            None => self.default_id.clone(),
        }
    }
}

impl CompiledRule {
    fn matches(&self, s: &Subject<'_>, t: &Target) -> bool {
        (self.users.is_empty() || self.users.contains(s.user))
            && (self.groups.is_empty() || self.groups.iter().any(|g| s.groups.contains(g)))
            && (self.devices.is_empty() || self.devices.contains(s.device))
            && (self.sites.is_empty()
                || s.device
                    .onramp_site()
                    .is_some_and(|site| self.sites.iter().any(|x| x == site)))
            && self
                .dst
                .as_ref()
                .is_none_or(|nets| nets.iter().any(|n| n.contains(&t.dst)))
            && match self.proto {
                Proto::Any => true,
                Proto::Tcp => t.protocol == PROTO_TCP,
                Proto::Udp => t.protocol == PROTO_UDP,
                Proto::Icmp => t.protocol == PROTO_ICMP || t.protocol == PROTO_ICMPV6,
            }
            && (self.ports.is_empty()
                || t.dport
                    .is_some_and(|p| self.ports.iter().any(|&(a, b)| (a..=b).contains(&p))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use std::path::Path;

    const CFG: &str = r#"
[gateway]
state_dir = "/x"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[tenant.rule]]
id = "eng-ssh"
action = "allow"
groups = ["eng"]
dst = ["10.1.0.0/16", "db-1"]
proto = "tcp"
ports = ["22"]
[[tenant.rule]]
id = "block-db-web"
action = "reject"
dst = ["db-1"]
[[tenant.rule]]
id = "wiki"
action = "allow"
dst = ["100.96.0.0/24"]
proto = "tcp"
ports = ["443", "8000-8100"]
[[tenant.rule]]
id = "ping-gw"
action = "allow"
dst = ["gateway"]
proto = "icmp"
[[tenant.device]]
name = "db-1"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "100.96.0.5"
user = "svc"
"#;

    fn policy() -> Policy {
        let c = Config::from_toml(CFG, Path::new("/t.toml")).unwrap();
        Policy::compile(&c.tenants[0])
    }

    fn eval(
        p: &Policy,
        groups: &[&str],
        dst: &str,
        proto: u8,
        port: Option<u16>,
    ) -> (Action, String) {
        let user = UserName::parse("alice").unwrap();
        let device = DeviceName::parse("laptop").unwrap();
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let d = p.evaluate(
            &Subject {
                user: &user,
                groups: &groups,
                device: &device,
            },
            &Target {
                dst: dst.parse().unwrap(),
                protocol: proto,
                dport: port,
            },
        );
        (d.action, p.rule_id(&d).to_string())
    }

    #[test]
    fn sites_match_the_site_of_an_onramp_subject_only() {
        let text = CFG.replace(
            "[[tenant.rule]]\nid = \"eng-ssh\"",
            "[[tenant.rule]]\nid = \"branch-web\"\naction = \"allow\"\nsites = [\"branch-7\"]\nproto = \"tcp\"\nports = [\"80\"]\n[[tenant.rule]]\nid = \"eng-ssh\"",
        );
        let c = Config::from_toml(&text, Path::new("/t.toml")).unwrap();
        let p = Policy::compile(&c.tenants[0]);
        let user = UserName::parse("onramp:gue/branch-7").unwrap();
        let eval_as = |name: &str| {
            let device = DeviceName::onramp_subject_for_test(name);
            let d = p.evaluate(
                &Subject {
                    user: &user,
                    groups: &[],
                    device: &device,
                },
                &Target {
                    dst: "198.51.100.7".parse().unwrap(),
                    protocol: PROTO_TCP,
                    dport: Some(80),
                },
            );
            p.rule_id(&d).to_string()
        };
        // Positive control: the site, through a GUE and a SEQPACKET on-ramp (with a device behind it).
        assert_eq!(eval_as("gue/branch-7"), "branch-web");
        assert_eq!(eval_as("warp/branch-7/laptop"), "branch-web");
        // Another site, an on-ramp subject without a site, and a device named like the site are not it.
        assert_eq!(eval_as("gue/branch-8"), DEFAULT_DENY_ID);
        assert_eq!(eval_as("warp/-/branch-7"), DEFAULT_DENY_ID);
        assert_eq!(eval_as("branch-7"), DEFAULT_DENY_ID);
    }

    #[test]
    fn first_match_wins_in_order() {
        let p = policy();
        assert_eq!(
            eval(&p, &["eng"], "100.96.0.5", PROTO_TCP, Some(22)),
            (Action::Allow, "eng-ssh".into())
        );
        assert_eq!(
            eval(&p, &["sales"], "100.96.0.5", PROTO_TCP, Some(22)),
            (Action::Reject, "block-db-web".into())
        );
        assert_eq!(
            eval(&p, &["eng"], "10.1.2.3", PROTO_TCP, Some(22)),
            (Action::Allow, "eng-ssh".into())
        );
        assert_eq!(
            eval(&p, &[], "100.96.0.9", PROTO_TCP, Some(8050)),
            (Action::Allow, "wiki".into())
        );
        assert_eq!(
            eval(&p, &[], "100.96.0.1", PROTO_ICMP, None),
            (Action::Allow, "ping-gw".into())
        );
    }

    #[test]
    fn anything_else_is_denied_by_default() {
        let p = policy();
        assert_eq!(
            eval(&p, &["eng"], "10.1.2.3", PROTO_TCP, Some(23)),
            (Action::Deny, DEFAULT_DENY_ID.into())
        );
        assert_eq!(
            eval(&p, &["eng"], "10.1.2.3", PROTO_UDP, Some(22)),
            (Action::Deny, DEFAULT_DENY_ID.into())
        );
        assert_eq!(
            eval(&p, &[], "100.96.0.9", PROTO_ICMP, None),
            (Action::Deny, DEFAULT_DENY_ID.into())
        );
    }

    proptest! {
        /// An empty rule list denies every flow.
        #[test]
        fn empty_policy_denies_everything(a in any::<u32>(), proto in any::<u8>(), port in any::<Option<u16>>()) {
            let mut c = Config::from_toml(CFG, Path::new("/t.toml")).unwrap();
            c.tenants[0].rules.clear();
            let p = Policy::compile(&c.tenants[0]);
            let user = UserName::parse("u").unwrap();
            let device = DeviceName::parse("d").unwrap();
            let d = p.evaluate(&Subject { user: &user, groups: &[], device: &device }, &Target { dst: IpAddr::from(a.to_be_bytes()), protocol: proto, dport: port });
            prop_assert_eq!(d, Decision::DEFAULT_DENY);
        }

        /// Every decision is the one a hand-written model of `CFG`'s rules gives (first match wins, default
        /// deny). Addresses, ports and groups are drawn from the rules' own CIDRs, devices, ports and groups most
        /// of the time, so every rule, and the boundaries around it, decides often.
        #[test]
        fn decisions_match_a_model_of_the_rules(
            dst in prop_oneof![
                any::<u32>().prop_map(Ipv4Addr::from),
                any::<u16>().prop_map(|h| Ipv4Addr::from(0x0a01_0000 | u32::from(h))),
                any::<u8>().prop_map(|h| Ipv4Addr::new(100, 96, 0, h)),
                prop_oneof![Just([100, 96, 0, 5]), Just([100, 96, 0, 1]), Just([10, 0, 255, 255]), Just([10, 2, 0, 0]), Just([100, 96, 1, 0])].prop_map(Ipv4Addr::from),
            ],
            proto in prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(PROTO_ICMP), any::<u8>()],
            port in prop_oneof![any::<u16>(), Just(22), Just(443), 7998u16..8102],
            groups in prop_oneof![Just(vec![]), Just(vec!["eng"]), Just(vec!["sales"]), Just(vec!["sales", "eng"])],
        ) {
            let p = policy();
            let dport = crate::packet::Transport::has_ports(proto).then_some(port);
            let got = eval(&p, &groups, &dst.to_string(), proto, dport);
            let in_net = |net: &str| net.parse::<ipnet::Ipv4Net>().unwrap().contains(&dst);
            let db = dst == Ipv4Addr::new(100, 96, 0, 5);
            let want = if groups.contains(&"eng") && (in_net("10.1.0.0/16") || db) && proto == PROTO_TCP && port == 22 {
                (Action::Allow, "eng-ssh")
            } else if db {
                (Action::Reject, "block-db-web")
            } else if in_net("100.96.0.0/24") && proto == PROTO_TCP && (port == 443 || (8000..=8100).contains(&port)) {
                (Action::Allow, "wiki")
            } else if dst == Ipv4Addr::new(100, 96, 0, 1) && proto == PROTO_ICMP {
                (Action::Allow, "ping-gw")
            } else {
                (Action::Deny, DEFAULT_DENY_ID)
            };
            prop_assert_eq!((got.0, got.1.as_str()), want);
        }
    }
}
