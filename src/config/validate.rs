//! Validation: `RawConfig` -> `Config`, collecting every problem with its file, key and fix.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::devices::{
    check_tenant_devices, validate_device, validate_gateway_addresses, validate_pools, DeviceIndex,
};
use super::rules::{validate_rule, validate_tenant_http, HttpKeys};
use super::*;

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
    let proxy_threads = g.proxy_threads.and_then(|n| {
        if (1..=MAX_PROXY_THREADS).contains(&n) {
            Some(n as usize)
        } else {
            c.push(
                "gateway.proxy_threads",
                format!("{n} is out of range; write 1 to {MAX_PROXY_THREADS} (threads of the off-ramp proxy and the inspectors), or remove the key to size it from the cores"),
            );
            None
        }
    });
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
            let ok = crate::keys::recipient::RecipientKey::from_base64(r).is_ok();
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
    let onramps = raw.onramp.unwrap_or_default();
    let seqpacket_onramps = super::onramp::validate_onramps(onramps.seqpacket, &tenants, base, c);
    let gue_onramps = super::gue::validate_gue(onramps.gue, &tenants, base, c);
    let onramp_nets = seqpacket_onramps
        .iter()
        .flat_map(|e| &e.tenants)
        .map(|g| (&g.tenant, &g.prefixes))
        .chain(
            gue_onramps
                .iter()
                .flat_map(|e| &e.sites)
                .map(|s| (&s.tenant, &s.inner_prefixes)),
        );
    for (tenant, prefixes) in onramp_nets {
        if let Some(t) = tenants.iter_mut().find(|t| &t.id == tenant) {
            for p in prefixes {
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
            proxy_threads,
        },
        flows,
        audit,
        enroll,
        ui,
        fleet,
        tenants,
        seqpacket_onramps,
        gue_onramps,
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
            proxy_threads: None,
        },
        enroll: super::EnrollSettings::default(),
        ui: super::UiSettings::default(),
        fleet: None,
        tenants: Vec::new(),
        seqpacket_onramps: Vec::new(),
        gue_onramps: Vec::new(),
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

/// The text of a secret file (`key` names the setting, `what` the secret): a regular file that only its owner
/// can read. Every problem is reported with the command that makes a good one (`make`); `None` then.
pub(super) fn read_private_file(
    file: &Path,
    key: &str,
    what: &str,
    make: &str,
    c: &mut Collector<'_>,
) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let cannot_read = |e: std::io::Error, c: &mut Collector<'_>| {
        c.push(
            key,
            format!("cannot read {}: {e}; create it: `{make}`", file.display()),
        );
    };
    let meta = match std::fs::metadata(file) {
        Ok(m) if m.is_file() => m,
        Ok(_) => {
            c.push(
                key,
                format!(
                    "{} is not a regular file; create it: `{make}`",
                    file.display()
                ),
            );
            return None;
        }
        Err(e) => {
            cannot_read(e, c);
            return None;
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        c.push(
            key,
            format!(
                "{} is mode {mode:04o}: other users can read the {what}; `chmod 600 {}`",
                file.display(),
                file.display()
            ),
        );
        return None;
    }
    match std::fs::read_to_string(file) {
        Ok(t) => Some(t),
        Err(e) => {
            cannot_read(e, c);
            None
        }
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
