//! Validation of a tenant's rules: flow rules (`validate_rule`), their inspection settings (`validate_inspect`,
//! SSH logins) and the tenant's HTTP rules (`validate_tenant_http`). Part of `config::validate`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::validate::resolve;
use super::*;

/// The identity part of a rule (`users`, `groups`, `devices`), shared by flow and HTTP rules.
pub(super) fn validate_identity(
    users: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    devices: Option<Vec<String>>,
    key: &str,
    c: &mut Collector<'_>,
) -> (Vec<UserName>, Vec<String>, Vec<DeviceName>) {
    let users = users
        .unwrap_or_default()
        .iter()
        .filter_map(|u| {
            UserName::parse(u)
                .map_err(|m| c.push(format!("{key}.users"), m))
                .ok()
        })
        .collect();
    let devices = devices
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            DeviceName::parse(d)
                .map_err(|m| c.push(format!("{key}.devices"), m))
                .ok()
        })
        .collect();
    let groups = groups.unwrap_or_default();
    for g in &groups {
        if !valid_ident(g, 64) {
            c.push(
                format!("{key}.groups"),
                format!("{g:?} is not a valid group name"),
            );
        }
    }
    (users, groups, devices)
}

pub(super) fn validate_rule(r: RawRule, key: &str, c: &mut Collector<'_>) -> Option<Rule> {
    let n = c.errors.len();
    if !valid_ident(&r.id, 64) {
        c.push(format!("{key}.id"), format!("{:?} is not a valid rule id: use letters, digits, '-', '_' or '.', like \"eng-ssh\"", r.id));
    }
    let action = match r.action.as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        "reject" => Some(Action::Reject),
        "proxy" => Some(Action::Proxy),
        "inspect_ssh" if crate::SSH_INSPECTION_AVAILABLE => Some(Action::InspectSsh),
        "inspect_http" if crate::HTTP_INSPECTION_AVAILABLE => Some(Action::InspectHttp),
        "inspect_ssh" | "inspect_http" => {
            c.push(
                format!("{key}.action"),
                format!(
                    "{:?} is not available in this version yet; use \"proxy\" to carry the flow at layer 4, or \
                     \"allow\", \"deny\", \"reject\"",
                    r.action
                ),
            );
            None
        }
        other => {
            c.push(format!("{key}.action"), format!("{other:?} is not an action; use allow, deny, reject, proxy, inspect_ssh or inspect_http"));
            None
        }
    };
    let inspect = action.map(|a| validate_inspect(a, &r, key, c));
    let (users, groups, devices) = validate_identity(r.users, r.groups, r.devices, key, c);
    let sites = r.sites.unwrap_or_default();
    for s in &sites {
        if !valid_ident(s, 64) {
            c.push(
                format!("{key}.sites"),
                format!("{s:?} is not a site name: use 1-64 letters, digits, '-', '_' or '.', like \"branch-7\""),
            );
        }
    }
    let dst = r.dst.map(|list| {
        list.iter()
            .filter_map(|d| {
                if d == "gateway" {
                    Some(DstMatch::Gateway)
                } else if d.contains('/') || d.parse::<IpAddr>().is_ok() {
                    let net = d
                        .parse::<IpNet>()
                        .or_else(|_| d.parse::<IpAddr>().map(IpNet::from));
                    net.map(|n| DstMatch::Net(n.trunc()))
                        .map_err(|_| {
                            c.push(
                                format!("{key}.dst"),
                                format!("{d:?} is not a CIDR; write it like \"10.1.0.0/16\""),
                            )
                        })
                        .ok()
                } else {
                    DeviceName::parse(d)
                        .map(DstMatch::Device)
                        .map_err(|_| {
                            c.push(
                                format!("{key}.dst"),
                                format!("{d:?} is neither a CIDR, a device name nor \"gateway\""),
                            )
                        })
                        .ok()
                }
            })
            .collect()
    });
    let proto = match r.proto.as_deref() {
        None | Some("any") => Proto::Any,
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some("icmp") => Proto::Icmp,
        Some(p) => {
            c.push(
                format!("{key}.proto"),
                format!("{p:?} is not a protocol; use tcp, udp, icmp or any"),
            );
            Proto::Any
        }
    };
    let mut ports = Vec::new();
    for p in r.ports.unwrap_or_default() {
        let range = match p.split_once('-') {
            Some((a, b)) => a
                .trim()
                .parse::<u16>()
                .ok()
                .zip(b.trim().parse::<u16>().ok()),
            None => p.trim().parse::<u16>().ok().map(|v| (v, v)),
        };
        match range {
            Some((a, b)) if a <= b => ports.push((a, b)),
            _ => c.push(
                format!("{key}.ports"),
                format!("{p:?} is not a port or range; write \"22\" or \"8000-8100\""),
            ),
        }
    }
    if !ports.is_empty() && !matches!(proto, Proto::Tcp | Proto::Udp) {
        c.push(
            format!("{key}.ports"),
            "ports need proto = \"tcp\" or \"udp\"",
        );
    }
    // The inspectors only see TCP: anything else under such a rule would be relayed around them (QUIC).
    if let Some(a @ (Action::InspectSsh | Action::InspectHttp)) = action {
        if proto != Proto::Tcp {
            let written = r
                .proto
                .as_deref()
                .map_or("missing (any protocol)".to_string(), |p| format!("{p:?}"));
            c.push(
                format!("{key}.proto"),
                format!(
                    "{written}, but {} inspects TCP only (UDP such as QUIC would pass around the \
                     inspector); set proto = \"tcp\"",
                    a.as_str()
                ),
            );
        }
    }
    if c.errors.len() != n {
        return None;
    }
    let action = action?;
    let inspect = inspect??;
    Some(Rule {
        id: r.id,
        action,
        users,
        groups,
        devices,
        sites,
        dst,
        proto,
        ports,
        inspect,
    })
}

/// The `inspect_ssh` keys: only on `inspect_ssh` rules, with defaults (recording required, client auth none,
/// any login).
pub(super) fn validate_inspect(
    action: Action,
    r: &RawRule,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<Inspect> {
    if action != Action::InspectSsh {
        let given = [
            ("recording", r.recording.is_some()),
            ("ssh_auth", r.ssh_auth.is_some()),
            ("capture_input", r.capture_input.is_some()),
            ("allow_forwarding", r.allow_forwarding.is_some()),
            ("logins", r.logins.is_some()),
            ("max_recording_mb", r.max_recording_mb.is_some()),
            ("max_recording_secs", r.max_recording_secs.is_some()),
        ];
        for (k, _) in given.iter().filter(|(_, g)| *g) {
            c.push(
                format!("{key}.{k}"),
                "only applies to action = \"inspect_ssh\"; remove it or change the action",
            );
        }
        return Some(if action == Action::InspectHttp {
            Inspect::Http
        } else {
            Inspect::None
        });
    }
    let recording = match r.recording.as_deref() {
        None | Some("required") => Recording::Required,
        Some("best_effort") => Recording::BestEffort,
        Some("off") => Recording::Off,
        Some(o) => {
            c.push(
                format!("{key}.recording"),
                format!(
                    "{o:?} is not a recording mode; use \"off\", \"best_effort\" or \"required\""
                ),
            );
            return None;
        }
    };
    let auth = match r.ssh_auth.as_deref() {
        None | Some("none") => SshAuth::None,
        Some("publickey") => SshAuth::Publickey,
        Some(o) => {
            c.push(
                format!("{key}.ssh_auth"),
                format!("{o:?} is not an SSH client authentication; use \"none\" or \"publickey\""),
            );
            return None;
        }
    };
    let logins = match &r.logins {
        None => None,
        Some(list) if list.is_empty() => {
            c.push(
                format!("{key}.logins"),
                "lists no account, so no session could start; list accounts like [\"deploy\", \"{user}\"] \
                 or remove the key to allow any",
            );
            return None;
        }
        Some(list) => {
            let mut out = Vec::new();
            for l in list {
                if l == "{user}" {
                    out.push(LoginPattern::UserLocalPart);
                } else if valid_login(l) {
                    out.push(LoginPattern::Name(l.clone()));
                } else {
                    c.push(
                        format!("{key}.logins"),
                        format!(
                            "{l:?} is not an account name: use letters, digits, '.', '_', '-', '@' or '$', \
                             or \"{{user}}\" for the local part of the device's user"
                        ),
                    );
                    return None;
                }
            }
            Some(out)
        }
    };
    let caps = [
        (
            "max_recording_mb",
            r.max_recording_mb,
            DEFAULT_MAX_RECORDING_MB,
            1 << 20,
        ),
        (
            "max_recording_secs",
            r.max_recording_secs,
            DEFAULT_MAX_RECORDING_SECS,
            366 * 86400,
        ),
    ]
    .map(|(k, given, default, max)| match given {
        Some(_) if recording == Recording::Off => {
            c.push(
                format!("{key}.{k}"),
                "has no effect with recording = \"off\"; remove it or turn recording on",
            );
            None
        }
        Some(v) if v == 0 || v > max => {
            c.push(
                format!("{key}.{k}"),
                format!("{v} is out of range; use 1 to {max}"),
            );
            None
        }
        Some(v) => Some(v),
        None => Some(default),
    });
    let [Some(mb), Some(secs)] = caps else {
        return None;
    };
    Some(Inspect::Ssh(SshRuleSettings {
        recording,
        auth,
        capture_input: r.capture_input.unwrap_or(false),
        allow_forwarding: r.allow_forwarding.unwrap_or(false),
        logins,
        max_recording_bytes: mb << 20,
        max_recording_time: Duration::from_secs(secs),
    }))
}

/// A login name as sshd would accept it (no control characters, no option-like names).
pub fn valid_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 64
        && !login.starts_with('-')
        && login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'$'))
}

/// The HTTP keys of a `[[tenant]]`, as written.
pub(super) struct HttpKeys {
    pub rules: Vec<RawHttpRule>,
    pub tls_decrypt: Option<bool>,
    pub do_not_inspect: Option<Vec<String>>,
    pub tls_upstream_ca: Option<String>,
    pub tls_passthrough_alpn: Option<Vec<String>>,
    pub http_allow_upgrade: Option<Vec<String>>,
}

/// The HTTP keys of a `[[tenant]]`: `http_rule`, `tls_decrypt`, `do_not_inspect`, `tls_upstream_ca`,
/// `tls_passthrough_alpn`, `http_allow_upgrade`.
pub(super) fn validate_tenant_http(
    raw: HttpKeys,
    base: &Path,
    key: &str,
    c: &mut Collector<'_>,
) -> TenantHttp {
    let HttpKeys {
        rules: raw_rules,
        tls_decrypt,
        do_not_inspect,
        tls_upstream_ca,
        tls_passthrough_alpn,
        http_allow_upgrade,
    } = raw;
    let tls_decrypt = tls_decrypt.unwrap_or(false);
    let mut ids = HashSet::new();
    let mut rules = Vec::new();
    for (j, r) in raw_rules.into_iter().enumerate() {
        let rkey = format!("{key}.http_rule[{j}]");
        let n = c.errors.len();
        if !valid_ident(&r.id, 64) {
            c.push(
                format!("{rkey}.id"),
                format!(
                    "{:?} is not a valid rule id: use 1-64 letters, digits, '-', '_' or '.'",
                    r.id
                ),
            );
        } else if !ids.insert(r.id.clone()) {
            c.push(
                format!("{rkey}.id"),
                format!(
                    "duplicate http_rule id {:?}; ids are unique per tenant",
                    r.id
                ),
            );
        }
        let action = match r.action.as_str() {
            "allow" => HttpAction::Allow,
            "block" => HttpAction::Block,
            "log" => HttpAction::Log,
            other => {
                c.push(
                    format!("{rkey}.action"),
                    format!(
                        "{other:?} is not an HTTP rule action; use \"allow\", \"block\" or \"log\""
                    ),
                );
                HttpAction::Allow
            }
        };
        let hosts = r
            .hosts
            .unwrap_or_default()
            .iter()
            .filter_map(|h| {
                HostPattern::parse(h)
                    .map_err(|m| c.push(format!("{rkey}.hosts"), m))
                    .ok()
            })
            .collect();
        let case_insensitive = r.case_insensitive.unwrap_or(false);
        let mut paths = r.paths.unwrap_or_default();
        if case_insensitive {
            paths.iter_mut().for_each(|p| p.make_ascii_lowercase());
        }
        for p in &paths {
            if !p.starts_with('/') || p.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                c.push(
                    format!("{rkey}.paths"),
                    format!("{p:?} is not a path prefix; write it like \"/admin\""),
                );
            }
        }
        let methods: Vec<String> = r
            .methods
            .unwrap_or_default()
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        for m in &methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                c.push(
                    format!("{rkey}.methods"),
                    format!("{m:?} is not an HTTP method; write it like \"POST\""),
                );
            }
        }
        let (users, groups, devices) = validate_identity(r.users, r.groups, r.devices, &rkey, c);
        if c.errors.len() == n {
            rules.push(HttpRule {
                id: r.id,
                action,
                hosts,
                paths,
                case_insensitive,
                methods,
                users,
                groups,
                devices,
            });
        }
    }
    let mut no_inspect = Vec::new();
    for entry in do_not_inspect.unwrap_or_default() {
        if let Ok(net) = entry.parse::<IpNet>() {
            no_inspect.push(NoInspect::Net(net.trunc()));
        } else if let Ok(ip) = entry.parse::<IpAddr>() {
            no_inspect.push(NoInspect::Net(IpNet::from(ip)));
        } else {
            match HostPattern::parse(&entry) {
                Ok(h) => no_inspect.push(NoInspect::Host(h)),
                Err(_) => c.push(
                    format!("{key}.do_not_inspect"),
                    format!("{entry:?} is neither a host name (\"bank.example\", \"*.bank.example\") nor a CIDR (\"10.9.0.0/16\")"),
                ),
            }
        }
    }
    let tls_upstream_ca = tls_upstream_ca.map(|p| resolve(base, &p));
    if let Some(p) = &tls_upstream_ca {
        if !p.is_file() {
            c.push(
                format!("{key}.tls_upstream_ca"),
                format!(
                    "{} does not exist; point it at a PEM file of CA certificates",
                    p.display()
                ),
            );
        }
    }
    let passthrough_alpn = tls_passthrough_alpn.unwrap_or_default();
    if !passthrough_alpn.is_empty() && !tls_decrypt {
        c.push(
            format!("{key}.tls_passthrough_alpn"),
            "only applies with tls_decrypt = true (without decryption all TLS is relayed untouched); \
             remove it or set tls_decrypt = true",
        );
    }
    for p in &passthrough_alpn {
        if matches!(p.as_str(), "h2" | "http/1.1" | "http/1.0" | "h2c" | "h3") {
            c.push(
                format!("{key}.tls_passthrough_alpn"),
                format!("{p:?} is HTTP, which is always decrypted and inspected; remove it"),
            );
        } else if p.is_empty() || p.len() > 255 || !p.bytes().all(|b| b.is_ascii_graphic()) {
            c.push(
                format!("{key}.tls_passthrough_alpn"),
                format!(
                    "{p:?} is not an ALPN protocol name; write it as registered, like \"imap\""
                ),
            );
        }
    }
    let allow_upgrade: Vec<String> = match http_allow_upgrade {
        Some(list) => list.iter().map(|p| p.to_ascii_lowercase()).collect(),
        None => vec![DEFAULT_UPGRADE.to_string()],
    };
    for p in &allow_upgrade {
        if p == "h2c" {
            c.push(
                format!("{key}.http_allow_upgrade"),
                "\"h2c\" is never allowed: it would turn the connection into HTTP/2 the inspector \
                 does not see; remove it",
            );
        } else if p.is_empty() || !p.bytes().all(is_token_char) {
            c.push(
                format!("{key}.http_allow_upgrade"),
                format!("{p:?} is not an Upgrade protocol name; write it like \"websocket\""),
            );
        }
    }
    TenantHttp {
        rules,
        tls_decrypt,
        do_not_inspect: no_inspect,
        tls_upstream_ca,
        passthrough_alpn,
        allow_upgrade,
    }
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
