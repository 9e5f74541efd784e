//! Where a `direct-tcpip` channel (`ssh -L`, `-W`, `-J`) may go: the target opens the connection, so the device
//! reaches `host:port` from the target's side of the network. It is decided like a new TCP flow of that device
//! from the tenant's flow policy in force: only `allow` and `proxy` let it through. A destination an `inspect_*`
//! rule decides is refused (its bytes would skip the inspector), as is a name the target would resolve (the
//! gateway cannot know its address): only address literals and `localhost` (the target itself) are decided.
//! Pure: the caller records the decision.
#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::config::{Action, Config};
use crate::core::policy::{Policy, Subject, Target, DEFAULT_DENY_ID};
use crate::handoff::Identity;
use crate::packet::PROTO_TCP;

/// The decision about one forwarded destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// The deciding rule lets the device reach the destination.
    Allowed { rule: Arc<str> },
    /// Refused; `rule` is the deciding rule when one was evaluated.
    Denied {
        rule: Option<Arc<str>>,
        reason: String,
    },
}

/// Decides a `direct-tcpip` request for `host:port` of the device `who`, made on a session to `target`.
pub fn decide(config: &Config, who: &Identity, target: Ipv4Addr, host: &str, port: u32) -> Forward {
    let denied = |rule: Option<Arc<str>>, reason: String| Forward::Denied { rule, reason };
    let Some(dport) = u16::try_from(port).ok().filter(|p| *p != 0) else {
        return denied(None, format!("port {port} is not a TCP port"));
    };
    let Some(dst) = destination(host, target) else {
        return denied(
            None,
            format!(
                "{host:?} is a name the target would resolve, which the gateway cannot check against policy; \
                 forward to an address"
            ),
        );
    };
    let Some(tenant) = config.tenant(who.tenant.as_str()) else {
        return denied(None, "the tenant is no longer configured".into());
    };
    let policy = Policy::compile(tenant);
    let decision = policy.evaluate(
        &Subject {
            user: &who.user,
            groups: &who.groups,
            device: &who.device,
        },
        &Target {
            dst,
            protocol: PROTO_TCP,
            dport: Some(dport),
        },
    );
    let rule = policy.rule_id(&decision);
    match decision.action {
        Action::Allow | Action::Proxy => Forward::Allowed { rule },
        Action::InspectSsh | Action::InspectHttp => denied(
            Some(rule.clone()),
            format!(
                "rule {rule} inspects tcp/{dport} to {dst}; connect to it directly, not through a forward"
            ),
        ),
        Action::Deny | Action::Reject if decision.rule.is_none() => denied(
            Some(rule),
            format!("no rule allows this device tcp/{dport} to {dst} ({DEFAULT_DENY_ID})"),
        ),
        Action::Deny | Action::Reject => denied(
            Some(rule.clone()),
            format!("rule {rule} refuses this device tcp/{dport} to {dst}"),
        ),
    }
}

/// The address `host` names as the target sees it: a literal, with loopback and unspecified meaning the target
/// itself; `None` for any other name.
fn destination(host: &str, target: Ipv4Addr) -> Option<IpAddr> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = match literal.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical(),
        Err(_) if is_localhost(host) => return Some(IpAddr::V4(target)),
        Err(_) => return None,
    };
    Some(if ip.is_loopback() || ip.is_unspecified() {
        IpAddr::V4(target)
    } else {
        ip
    })
}

fn is_localhost(host: &str) -> bool {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = r#"
[gateway]
state_dir = "/x"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[tenant.rule]]
id = "ssh"
action = "inspect_ssh"
dst = ["10.1.0.0/16"]
proto = "tcp"
ports = ["22"]
[[tenant.rule]]
id = "web"
action = "inspect_http"
dst = ["10.1.0.0/16"]
proto = "tcp"
ports = ["80"]
[[tenant.rule]]
id = "db"
action = "allow"
dst = ["10.1.0.9"]
proto = "tcp"
ports = ["5432"]
[[tenant.rule]]
id = "metrics"
action = "proxy"
dst = ["10.1.0.0/16"]
proto = "tcp"
ports = ["9100"]
[[tenant.rule]]
id = "no-smtp"
action = "reject"
proto = "tcp"
ports = ["25"]
[[tenant.device]]
name = "alice-laptop"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "100.96.0.2"
user = "alice@acme.example"
"#;

    fn check(host: &str, port: u32) -> Forward {
        let c = Config::from_toml(CFG, Path::new("/t.toml")).unwrap();
        let who = Identity {
            tenant: c.tenants[0].id.clone(),
            device: c.tenants[0].devices[0].name.clone(),
            user: c.tenants[0].devices[0].user.clone(),
            groups: Arc::from(Vec::new()),
        };
        decide(&c, &who, Ipv4Addr::new(10, 1, 0, 5), host, port)
    }

    fn allowed_by(f: &Forward) -> Option<&str> {
        match f {
            Forward::Allowed { rule } => Some(rule),
            Forward::Denied { .. } => None,
        }
    }

    #[test]
    fn allow_and_proxy_rules_let_a_forward_through() {
        assert_eq!(allowed_by(&check("10.1.0.9", 5432)), Some("db"));
        assert_eq!(allowed_by(&check("10.1.3.4", 9100)), Some("metrics"));
        // The target itself, however the client spells it.
        for me in [
            "localhost",
            "LOCALHOST.",
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(allowed_by(&check(me, 9100)), Some("metrics"), "{me}");
        }
    }

    #[test]
    fn inspected_refused_unmatched_and_named_destinations_are_denied() {
        let reason = |f: Forward| match f {
            Forward::Denied { reason, .. } => reason,
            Forward::Allowed { rule } => panic!("allowed by {rule}"),
        };
        // An inspected destination: the forward would skip the inspector.
        assert!(reason(check("localhost", 22)).contains("rule ssh inspects tcp/22 to 10.1.0.5"));
        assert!(reason(check("10.1.0.7", 80)).contains("rule web inspects"));
        assert!(reason(check("10.1.0.9", 25)).contains("rule no-smtp refuses"));
        assert!(reason(check("10.1.0.8", 5432)).contains("default-deny"));
        // Names the target resolves, including numeric forms getaddrinfo takes (127.1, 2130706433).
        for name in ["db.internal", "127.1", "2130706433", "0x7f000001", ""] {
            assert!(
                reason(check(name, 9100)).contains("forward to an address"),
                "{name}"
            );
        }
        assert!(reason(check("10.1.0.9", 0)).contains("not a TCP port"));
        assert!(reason(check("10.1.0.9", 70000)).contains("not a TCP port"));
    }
}
