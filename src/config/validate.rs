//! Validation: `RawConfig` -> `Config`, collecting every problem with its file, key and fix.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::*;
use crate::keys::PeerKey;

pub(super) fn validate(raw: RawConfig, base: &Path, path: &Path, c: &mut Collector<'_>) -> Config {
    let g = raw.gateway;
    let listen = parse_socket(
        c,
        "gateway.listen",
        g.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        "0.0.0.0:51820",
    );
    let admin_listen = parse_socket(
        c,
        "gateway.admin_listen",
        g.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        "127.0.0.1:8080",
    );
    let admin_token =
        super::admin::validate_admin_token(admin_listen, g.admin_token_file.as_deref(), base, c);
    let Some(state_dir) = g.state_dir.as_deref() else {
        c.push(
            "gateway.state_dir",
            "missing; add `state_dir = \"/var/lib/rampart\"` (where enrolled devices are kept)",
        );
        return empty(path);
    };
    let state_dir = resolve(base, state_dir);
    let private_key_file = match g.private_key_file.as_deref() {
        Some(p) => resolve(base, p),
        None => state_dir.join("gateway.key"),
    };
    if let Some(ep) = &g.public_endpoint {
        if !valid_endpoint(ep) {
            c.push(
                "gateway.public_endpoint",
                format!("{ep:?} is not HOST:PORT; write the address clients reach, like \"vpn.example.com:51820\""),
            );
        }
    }

    let user = g.user.clone();
    if let Some(u) = &user {
        let valid = !u.is_empty()
            && u.len() <= 32
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !u.starts_with('-');
        if !valid || u == "root" {
            c.push(
                "gateway.user",
                format!("{u:?} is not an unprivileged system user name; write one like \"rampart\" (create it with `useradd --system rampart`), or remove the key to keep the gateway root"),
            );
        }
    }
    let flows = validate_flows(raw.flows, c);
    let audit = validate_audit(raw.audit, &state_dir, base, c);
    let enroll = super::enroll::validate_enroll(raw.enroll, g.enroll_listen.as_deref(), base, c);
    let ui = super::ui::validate_ui(raw.ui, g.ui_listen.as_deref(), c);
    let fleet = super::fleet::validate_fleet(raw.fleet, base, c);
    let mut tenants = Vec::new();
    let mut ids = HashSet::new();
    for (i, rt) in raw.tenant.into_iter().enumerate() {
        let key = format!("tenant[{i}]");
        let id = match TenantId::parse(&rt.id) {
            Ok(id) => id,
            Err(m) => {
                c.push(format!("{key}.id"), m);
                continue;
            }
        };
        let key = format!("tenant[{i}] ({id})");
        if !ids.insert(id.clone()) {
            c.push(
                format!("{key}.id"),
                "duplicate tenant id; give every [[tenant]] its own id",
            );
            continue;
        }
        let Some((pool, pool_v6)) = validate_pools(&rt.address_pool, &key, c) else {
            continue;
        };
        let Some((gw, gw_v6)) =
            validate_gateway_addresses(&rt.gateway_address, pool, pool_v6, &key, c)
        else {
            continue;
        };
        let mut offramp = Vec::new();
        for n in rt.offramp.unwrap_or_default() {
            match n.parse::<IpNet>() {
                Ok(net) => offramp.push(net.trunc()),
                Err(_) => c.push(
                    format!("{key}.offramp"),
                    format!("{n:?} is not a CIDR; write it like \"0.0.0.0/0\" or \"10.9.0.0/16\""),
                ),
            }
        }
        let egress = validate_egress(rt.egress, base, &key, c);
        let mut offramp_allow_local = Vec::new();
        for a in rt.offramp_allow_local.unwrap_or_default() {
            match a.parse::<SocketAddr>() {
                Ok(sa) => offramp_allow_local.push(sa),
                Err(_) => c.push(
                    format!("{key}.offramp_allow_local"),
                    format!("{a:?} is not an address:port; write it like \"198.18.0.1:53\""),
                ),
            }
        }
        if !offramp.is_empty() && !crate::OFFRAMP_AVAILABLE {
            c.push(
                format!("{key}.offramp"),
                "off-ramp routing to upstream networks is not available in this build (it needs the layer-4 \
                 upgrade path); remove the key",
            );
        }
        let audit_recipient = rt.audit_recipient.filter(|r| {
            let ok = crate::audit::capture::RecipientKey::from_base64(r).is_ok();
            if !ok {
                c.push(
                    format!("{key}.audit_recipient"),
                    "is not a base64 X25519 public key; paste the public key `rampart audit keygen` printed",
                );
            }
            ok
        });
        let max_flows = rt.max_flows.map(|n| n as usize);
        if max_flows == Some(0) {
            c.push(
                format!("{key}.max_flows"),
                "must be at least 1 (omit it for no per-tenant limit)",
            );
        }
        let mut rule_ids = HashSet::new();
        let mut rules = Vec::new();
        for (j, rr) in rt.rule.into_iter().enumerate() {
            let rkey = format!("{key}.rule[{j}]");
            if !rule_ids.insert(rr.id.clone()) {
                c.push(
                    format!("{rkey}.id"),
                    format!(
                        "duplicate rule id {:?}; rule ids are unique per tenant",
                        rr.id
                    ),
                );
            }
            if let Some(r) = validate_rule(rr, &rkey, c) {
                rules.push(r);
            }
        }
        let http = validate_tenant_http(
            HttpKeys {
                rules: rt.http_rule,
                tls_decrypt: rt.tls_decrypt,
                do_not_inspect: rt.do_not_inspect,
                tls_upstream_ca: rt.tls_upstream_ca,
                tls_passthrough_alpn: rt.tls_passthrough_alpn,
                http_allow_upgrade: rt.http_allow_upgrade,
            },
            base,
            &key,
            c,
        );
        let mut tenant = Tenant {
            name: rt.name.unwrap_or_else(|| id.to_string()),
            id,
            address_pool: pool,
            gateway_address: gw,
            address_pool_v6: pool_v6,
            gateway_address_v6: gw_v6,
            max_flows,
            offramp,
            egress,
            offramp_allow_local,
            onramp_prefixes: Vec::new(),
            audit_recipient,
            rules,
            devices: Vec::new(),
            http,
        };
        let mut index = DeviceIndex::default();
        for (j, rd) in rt.device.into_iter().enumerate() {
            let dkey = format!("{key}.device[{j}]");
            if let Some(mut d) = validate_device(rd, &dkey, c) {
                if d.address_v6.is_none() {
                    d.address_v6 = tenant.derived_v6(d.address);
                }
                tenant.devices.push(d);
                check_tenant_devices(&tenant, &mut index, c, &dkey);
            }
        }
        tenants.push(tenant);
    }
    check_unique_keys(&tenants, c);
    warn_shared_offramp(&tenants);
    let seqpacket_onramps = super::onramp::validate_onramps(raw.onramp, &tenants, base, c);
    for g in seqpacket_onramps.iter().flat_map(|e| &e.tenants) {
        if let Some(t) = tenants.iter_mut().find(|t| t.id == g.tenant) {
            for p in &g.prefixes {
                if !t.onramp_prefixes.contains(p) {
                    t.onramp_prefixes.push(*p);
                }
            }
        }
    }
    Config {
        source: path.to_path_buf(),
        gateway: GatewaySettings {
            listen,
            private_key_file,
            state_dir,
            admin_listen,
            admin_token,
            public_endpoint: g.public_endpoint,
            user,
        },
        flows,
        audit,
        enroll,
        ui,
        fleet,
        tenants,
        seqpacket_onramps,
    }
}

pub(super) fn validate_flows(raw: Option<RawFlows>, c: &mut Collector<'_>) -> FlowSettings {
    let d = FlowSettings::default();
    let Some(r) = raw else { return d };
    let mut secs = |key: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => {
            c.push(format!("flows.{key}"), "must be at least 1 second");
            default
        }
        Some(n) => Duration::from_secs(n),
        None => default,
    };
    let s = FlowSettings {
        max_flows: d.max_flows,
        tcp_established_timeout: secs(
            "tcp_established_timeout_secs",
            r.tcp_established_timeout_secs,
            d.tcp_established_timeout,
        ),
        tcp_transitory_timeout: secs(
            "tcp_transitory_timeout_secs",
            r.tcp_transitory_timeout_secs,
            d.tcp_transitory_timeout,
        ),
        udp_timeout: secs("udp_timeout_secs", r.udp_timeout_secs, d.udp_timeout),
        icmp_timeout: secs("icmp_timeout_secs", r.icmp_timeout_secs, d.icmp_timeout),
        other_timeout: secs("other_timeout_secs", r.other_timeout_secs, d.other_timeout),
        deny_summary: secs("deny_summary_secs", r.deny_summary_secs, d.deny_summary),
        device_max_flows: d.device_max_flows,
        device_new_flows_per_sec: d.device_new_flows_per_sec,
        device_new_flows_burst: d.device_new_flows_burst,
    };
    let mut count = |key: &str, v: Option<u64>, default: u64, max: u64| match v {
        Some(0) => {
            c.push(format!("flows.{key}"), "must be at least 1");
            default
        }
        Some(n) if n > max => {
            c.push(
                format!("flows.{key}"),
                format!("{n} is too large; at most {max}"),
            );
            default
        }
        Some(n) => n,
        None => default,
    };
    let s = FlowSettings {
        device_max_flows: count(
            "device_max_flows",
            r.device_max_flows,
            d.device_max_flows as u64,
            u64::from(u32::MAX),
        ) as usize,
        device_new_flows_per_sec: count(
            "device_new_flows_per_sec",
            r.device_new_flows_per_sec,
            u64::from(d.device_new_flows_per_sec),
            1_000_000,
        ) as u32,
        device_new_flows_burst: count(
            "device_new_flows_burst",
            r.device_new_flows_burst,
            u64::from(d.device_new_flows_burst),
            1_000_000,
        ) as u32,
        ..s
    };
    match r.max_flows {
        Some(0) => {
            c.push("flows.max_flows", "must be at least 1");
            s
        }
        Some(n) if n > u64::from(u32::MAX) => {
            c.push(
                "flows.max_flows",
                format!("{n} is too large; at most {}", u32::MAX),
            );
            s
        }
        Some(n) => FlowSettings {
            max_flows: n as usize,
            ..s
        },
        None => s,
    }
}

pub(super) fn validate_audit(
    raw: Option<RawAudit>,
    state_dir: &Path,
    base: &Path,
    c: &mut Collector<'_>,
) -> AuditSettings {
    let r = raw.unwrap_or(RawAudit {
        path: None,
        queue: None,
        commit_interval_ms: None,
        on_overflow: None,
        on_failure: None,
        checkpoint_every: None,
        checkpoint_interval_secs: None,
        checkpoint_sink: None,
        verify_key: None,
        max_store_mb: None,
        max_recordings_mb: None,
    });
    let on_overflow = match r.on_overflow.as_deref() {
        None | Some("drop") => OverflowPolicy::Drop,
        Some("block_new_flows") => OverflowPolicy::BlockNewFlows,
        Some(o) => {
            c.push(
                "audit.on_overflow",
                format!("{o:?} is not a policy; use \"drop\" or \"block_new_flows\""),
            );
            OverflowPolicy::Drop
        }
    };
    let on_failure = match r.on_failure.as_deref() {
        None | Some("fail_open") => FailurePolicy::FailOpen,
        Some("fail_closed") => FailurePolicy::FailClosed,
        Some(o) => {
            c.push(
                "audit.on_failure",
                format!("{o:?} is not a policy; use \"fail_open\" or \"fail_closed\""),
            );
            FailurePolicy::FailOpen
        }
    };
    let queue = match r.queue {
        Some(n) if !(16..=10_000_000).contains(&n) => {
            c.push(
                "audit.queue",
                format!("{n} is out of range; use 16..=10000000 records"),
            );
            65_536
        }
        Some(n) => n as usize,
        None => 65_536,
    };
    let commit_interval = match r.commit_interval_ms {
        Some(n) if !(1..=60_000).contains(&n) => {
            c.push(
                "audit.commit_interval_ms",
                format!("{n} is out of range; use 1..=60000 (milliseconds)"),
            );
            Duration::from_millis(250)
        }
        Some(n) => Duration::from_millis(n),
        None => Duration::from_millis(250),
    };
    let checkpoint_every = match r.checkpoint_every {
        Some(n) if !(1..=1_000_000).contains(&n) => {
            c.push(
                "audit.checkpoint_every",
                format!("{n} is out of range; use 1..=1000000 (records)"),
            );
            256
        }
        Some(n) => n,
        None => 256,
    };
    let checkpoint_interval = match r.checkpoint_interval_secs {
        Some(n) if !(1..=86_400).contains(&n) => {
            c.push(
                "audit.checkpoint_interval_secs",
                format!("{n} is out of range; use 1..=86400 (seconds)"),
            );
            Duration::from_secs(30)
        }
        Some(n) => Duration::from_secs(n),
        None => Duration::from_secs(30),
    };
    // What proves the store was not cut or re-signed must not live where the store's writer can change it.
    let outside_state = |key: &str, p: PathBuf, c: &mut Collector<'_>| {
        if p.starts_with(state_dir) {
            c.push(
                key,
                format!(
                    "{} is inside state_dir ({}), next to the audit store it vouches for; put it on another mount",
                    p.display(),
                    state_dir.display()
                ),
            );
        }
        p
    };
    let checkpoint_sink = match r.checkpoint_sink.as_deref() {
        None | Some("") => CheckpointSink::None,
        Some("syslog") => CheckpointSink::Syslog,
        Some(s) if s.starts_with("file:") => CheckpointSink::File(outside_state(
            "audit.checkpoint_sink",
            resolve(base, &s["file:".len()..]),
            c,
        )),
        Some(s) => {
            c.push(
                "audit.checkpoint_sink",
                format!("{s:?} is not a sink; use \"file:/mnt/evidence/rampart-heads.log\" or \"syslog\""),
            );
            CheckpointSink::None
        }
    };
    let mut quota = |key: &str, v: Option<u64>, default: u64| match v {
        Some(n) if !(1..=MAX_QUOTA_MB).contains(&n) => {
            c.push(
                format!("audit.{key}"),
                format!(
                    "{n} is out of range; use 1..={MAX_QUOTA_MB} (MiB; there is no unlimited setting, give the \
                     space the disk can spare, default {default})"
                ),
            );
            default << 20
        }
        Some(n) => n << 20,
        None => default << 20,
    };
    let max_store_bytes = quota("max_store_mb", r.max_store_mb, DEFAULT_MAX_STORE_MB);
    let max_recordings_bytes = quota(
        "max_recordings_mb",
        r.max_recordings_mb,
        DEFAULT_MAX_RECORDINGS_MB,
    );
    let verify_key = r
        .verify_key
        .as_deref()
        .map(|p| outside_state("audit.verify_key", resolve(base, p), c));
    AuditSettings {
        path: r
            .path
            .as_deref()
            .map(|p| resolve(base, p))
            .unwrap_or_else(|| state_dir.join("audit.db")),
        queue,
        commit_interval,
        on_overflow,
        on_failure,
        checkpoint_every,
        checkpoint_interval,
        checkpoint_sink,
        verify_key,
        max_store_bytes,
        max_recordings_bytes,
    }
}

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

pub(super) fn empty(path: &Path) -> Config {
    Config {
        source: path.to_path_buf(),
        flows: FlowSettings::default(),
        audit: validate_audit(
            None,
            Path::new(""),
            Path::new(""),
            &mut Collector {
                file: "",
                errors: Vec::new(),
            },
        ),
        gateway: GatewaySettings {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            private_key_file: PathBuf::new(),
            state_dir: PathBuf::new(),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            admin_token: None,
            public_endpoint: None,
            user: None,
        },
        enroll: super::EnrollSettings::default(),
        ui: super::UiSettings::default(),
        fleet: None,
        tenants: Vec::new(),
        seqpacket_onramps: Vec::new(),
    }
}

pub(super) fn valid_endpoint(ep: &str) -> bool {
    match ep.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

pub(super) fn parse_socket(c: &mut Collector<'_>, key: &str, v: &str, example: &str) -> SocketAddr {
    v.parse().unwrap_or_else(|_| {
        c.push(
            key,
            format!("{v:?} is not IP:PORT; write it like \"{example}\""),
        );
        example.parse().expect("valid example")
    })
}

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

pub(super) fn line_of(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1;
    format!("line {line}")
}

pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(super) fn validate_egress(
    raw: Option<RawEgress>,
    base: &Path,
    key: &str,
    c: &mut Collector<'_>,
) -> Egress {
    let Some(raw) = raw else {
        return Egress::default();
    };
    let netns = raw.netns.map(|p| resolve(base, &p));
    if let Some(p) = &netns {
        if !p.exists() {
            c.push(
                format!("{key}.egress.netns"),
                format!(
                    "{} does not exist; create the namespace first (`ip netns add NAME` makes /run/netns/NAME)",
                    p.display()
                ),
            );
        }
    }
    if let Some(i) = &raw.interface {
        let ok = !i.is_empty()
            && i.len() < 16
            && i.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.@".contains(ch));
        if !ok {
            c.push(
                format!("{key}.egress.interface"),
                format!("{i:?} is not an interface name; write it like \"eth1\" (at most 15 characters)"),
            );
        }
    }
    if raw.fwmark == Some(0) {
        c.push(
            format!("{key}.egress.fwmark"),
            "0 means no mark; omit the key or pick a mark your routing rules use",
        );
    }
    Egress {
        netns,
        interface: raw.interface,
        fwmark: raw.fwmark,
    }
}

/// Two tenants whose off-ramp networks overlap and leave through the same egress reach the same hosts:
/// legitimate (a shared service) but worth a word, since tenants usually expect their own networks.
fn warn_shared_offramp(tenants: &[Tenant]) {
    for (i, a) in tenants.iter().enumerate() {
        for b in &tenants[i + 1..] {
            let overlap = a.offramp.iter().find(|na| {
                b.offramp
                    .iter()
                    .any(|nb| na.contains(&nb.network()) || nb.contains(&na.network()))
            });
            if let (Some(net), true) = (overlap, a.egress == b.egress) {
                tracing::warn!(
                    tenant_a = %a.id, tenant_b = %b.id, %net,
                    "two tenants off-ramp overlapping networks through the same egress; they reach the same hosts \
                     (give each tenant its own egress to keep their networks apart)"
                );
            }
        }
    }
}

/// `address_pool`: one CIDR, or one IPv4 and one IPv6 CIDR (dual stack). Returns (first, IPv6 second).
fn validate_pools(
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
fn validate_gateway_addresses(
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
fn device_addresses(
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
