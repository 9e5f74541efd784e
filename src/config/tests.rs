use super::*;

const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:51820"
state_dir = "state"

[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"

[[tenant.device]]
name = "laptop"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "100.96.0.2"
user = "alice"
groups = ["eng"]

[[tenant]]
id = "globex"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
"#;

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new("/etc/rampart/gateway.toml"))
}

#[test]
fn good_config_resolves_paths_and_defaults() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.gateway.state_dir, Path::new("/etc/rampart/state"));
    assert_eq!(
        c.gateway.private_key_file,
        Path::new("/etc/rampart/state/gateway.key")
    );
    assert_eq!(c.gateway.admin_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.tenants.len(), 2);
    assert_eq!(c.tenants[0].devices[0].user.as_str(), "alice");
}

#[test]
fn embedded_default_config_is_valid() {
    let c = load(DEFAULT_CONFIG).unwrap();
    assert!(!c.tenants.is_empty());
}

#[test]
fn unknown_key_names_file_and_line() {
    let err = load(&GOOD.replace("listen =", "lisen ="))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/etc/rampart/gateway.toml: line 3"), "{err}");
    assert!(err.contains("unknown field `lisen`"), "{err}");
}

#[test]
fn bad_values_name_key_and_fix() {
    let text = GOOD.replace(
        "100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\n[[tenant.device]]",
        "100.96.0.0/33\"\ngateway_address = \"100.96.0.1\"\n\n[[tenant.device]]",
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("tenant[0] (acme).address_pool"), "{err}");
    assert!(err.contains("write it like"), "{err}");
}

#[test]
fn proxy_threads_is_a_restart_only_count_in_range() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.gateway.proxy_threads, None);
    let with = |n: &str| {
        GOOD.replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"state\"\nproxy_threads = {n}"),
        )
    };
    let two = load(&with("2")).unwrap();
    assert_eq!(two.gateway.proxy_threads, Some(2));
    assert_eq!(c.restart_only_differences(&two), ["gateway.proxy_threads"]);
    for bad in ["0", "65"] {
        let err = load(&with(bad)).unwrap_err().to_string();
        assert!(
            err.contains("gateway.proxy_threads") && err.contains("write 1 to 64"),
            "{err}"
        );
    }
}

#[test]
fn all_problems_reported_at_once() {
    let text = GOOD
        .replace("listen = \"127.0.0.1:51820\"", "listen = \"nowhere\"")
        .replace("user = \"alice\"", "user = \"\"");
    let err = load(&text).unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
}

#[test]
fn duplicate_device_key_across_tenants_is_rejected() {
    let text = format!(
        "{GOOD}\n[[tenant.device]]\nname = \"x\"\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddress = \"100.96.0.9\"\nuser = \"bob\"\n"
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("every device needs its own key pair"), "{err}");
}

#[test]
fn ssh_keys_only_on_inspect_ssh_rules_and_recipient_checked() {
    let text = GOOD.replace(
        "[[tenant.device]]",
        "audit_recipient = \"not-a-key\"\n[[tenant.rule]]\nid = \"r\"\naction = \"allow\"\nrecording = \"off\"\n[[tenant.device]]",
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("rule[0].recording: only applies to action = \"inspect_ssh\""),
        "{err}"
    );
    assert!(
        err.contains("audit_recipient: is not a base64 X25519 public key"),
        "{err}"
    );
    if !crate::SSH_INSPECTION_AVAILABLE {
        let text = GOOD.replace(
            "[[tenant.device]]",
            "[[tenant.rule]]\nid = \"s\"\naction = \"inspect_ssh\"\nproto = \"tcp\"\n[[tenant.device]]",
        );
        assert!(load(&text)
            .unwrap_err()
            .to_string()
            .contains("not available in this version yet"));
    }
}

#[test]
fn http_rules_and_tls_keys_are_validated() {
    let good = GOOD.replace(
        "[[tenant.device]]",
        "tls_decrypt = true\ndo_not_inspect = [\"bank.example\", \"*.pinned.example\", \"10.9.0.0/16\"]\n\
         [[tenant.http_rule]]\nid = \"no-admin\"\naction = \"block\"\nhosts = [\"*.Example.com\"]\n\
         paths = [\"/admin\"]\nmethods = [\"post\"]\ngroups = [\"eng\"]\n[[tenant.device]]",
    );
    let c = load(&good).unwrap();
    let h = &c.tenants[0].http;
    assert!(h.tls_decrypt);
    assert_eq!(h.do_not_inspect.len(), 3);
    assert_eq!(h.rules[0].methods, ["POST"]);
    assert_eq!(
        h.rules[0].hosts,
        [HostPattern::Suffix(".example.com".into())]
    );
    assert!(h.rules[0].hosts[0].matches("a.example.com"));
    assert!(!h.rules[0].hosts[0].matches("example.com"));
    let bad = GOOD.replace(
        "[[tenant.device]]",
        "do_not_inspect = [\"not a host\"]\ntls_upstream_ca = \"/nonexistent/ca.pem\"\n\
         [[tenant.http_rule]]\nid = \"x\"\naction = \"deny\"\npaths = [\"admin\"]\n[[tenant.device]]",
    );
    let err = load(&bad).unwrap_err().to_string();
    for want in [
        "tenant[0] (acme).http_rule[0].action: \"deny\" is not an HTTP rule action",
        "http_rule[0].paths: \"admin\" is not a path prefix",
        "do_not_inspect: \"not a host\" is neither a host name",
        "tls_upstream_ca: /nonexistent/ca.pem does not exist",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    // Protocol switches and passthrough protocols: defaults, and what can never be allowed.
    assert_eq!(h.allow_upgrade, ["websocket"]);
    assert!(h.passthrough_alpn.is_empty());
    let keys = GOOD.replace(
        "[[tenant.device]]",
        "tls_decrypt = true\ntls_passthrough_alpn = [\"imap\"]\nhttp_allow_upgrade = [\"WebSocket\", \"x-tunnel\"]\n\
         [[tenant.http_rule]]\nid = \"a\"\naction = \"block\"\npaths = [\"/Admin\"]\ncase_insensitive = true\n\
         [[tenant.device]]",
    );
    let c = load(&keys).unwrap();
    let h = &c.tenants[0].http;
    assert_eq!(h.allow_upgrade, ["websocket", "x-tunnel"]);
    assert_eq!(h.passthrough_alpn, ["imap"]);
    assert!(h.rules[0].case_insensitive && h.rules[0].paths == ["/admin"]);
    let bad = GOOD.replace(
        "[[tenant.device]]",
        "tls_passthrough_alpn = [\"h2\"]\nhttp_allow_upgrade = [\"h2c\", \"a b\"]\n[[tenant.device]]",
    );
    let err = load(&bad).unwrap_err().to_string();
    for want in [
        "tls_passthrough_alpn: only applies with tls_decrypt = true",
        "tls_passthrough_alpn: \"h2\" is HTTP, which is always decrypted",
        "http_allow_upgrade: \"h2c\" is never allowed",
        "http_allow_upgrade: \"a b\" is not an Upgrade protocol name",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    let unknown = GOOD.replace(
        "[[tenant.device]]",
        "[[tenant.http_rule]]\nid = \"x\"\naction = \"allow\"\nhost = [\"a\"]\n[[tenant.device]]",
    );
    let err = load(&unknown).unwrap_err().to_string();
    assert!(err.contains("unknown field `host`"), "{err}");
}

#[test]
fn inspect_rules_carry_tcp_only() {
    let rule = |action: &str, proto: &str| {
        GOOD.replace(
            "[[tenant.device]]",
            &format!(
                "[[tenant.rule]]\nid = \"i\"\naction = \"{action}\"\n{proto}[[tenant.device]]"
            ),
        )
    };
    for action in ["inspect_http", "inspect_ssh"] {
        let enabled = match action {
            "inspect_http" => crate::HTTP_INSPECTION_AVAILABLE,
            _ => crate::SSH_INSPECTION_AVAILABLE,
        };
        if !enabled {
            continue;
        }
        assert!(load(&rule(action, "proto = \"tcp\"\n")).is_ok(), "{action}");
        for (proto, written) in [
            ("proto = \"udp\"\n", "\"udp\""),
            ("proto = \"any\"\n", "\"any\""),
            ("", "missing (any protocol)"),
        ] {
            let err = load(&rule(action, proto)).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "tenant[0] (acme).rule[0].proto: {written}, but {action} inspects TCP only"
                )) && err.contains("set proto = \"tcp\""),
                "{err}"
            );
        }
    }
    // Layer-4 `proxy` rules may still carry UDP.
    assert!(load(&rule("proxy", "proto = \"udp\"\n")).is_ok());
}

#[test]
fn duplicate_tenant_id_is_rejected() {
    let err = load(&GOOD.replace("id = \"globex\"", "id = \"acme\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("duplicate tenant id"), "{err}");
}

#[test]
fn device_ssh_keys_are_authorized_keys_lines_without_options() {
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF3+XWcr4LMUC14L2eyt9mYsB3Jou5DA4dcoqo+tGSOA";
    let good = GOOD.replace(
        "groups = [\"eng\"]",
        &format!("groups = [\"eng\"]\nssh_keys = [\"{KEY} alice@laptop\"]"),
    );
    let c = load(&good).unwrap();
    let keys = &c.tenants[0].devices[0].ssh_keys;
    assert_eq!(keys.len(), 1);
    assert!(keys[0].fingerprint().starts_with("SHA256:"));
    assert_eq!(keys[0].as_str(), format!("{KEY} alice@laptop"));
    let bad = GOOD.replace(
        "groups = [\"eng\"]",
        &format!("groups = [\"eng\"]\nssh_keys = [\"from=\\\"10.0.0.1\\\" {KEY}\", \"ssh-ed25519 AAAAnotakey\"]"),
    );
    let err = load(&bad).unwrap_err().to_string();
    assert!(
        err.contains("device[0].ssh_keys: ") && err.contains("has authorized_keys options (from="),
        "{err}"
    );
    assert!(err.contains("is not an SSH public key"), "{err}");
}

#[test]
fn ssh_logins_are_account_names_or_the_user_placeholder() {
    let rule = |logins: &str| {
        GOOD.replace(
            "[[tenant.device]]",
            &format!(
                "[[tenant.rule]]\nid = \"s\"\naction = \"inspect_ssh\"\nproto = \"tcp\"\nlogins = {logins}\n[[tenant.device]]"
            ),
        )
    };
    let c = load(&rule("[\"deploy\", \"{user}\"]")).unwrap();
    let Inspect::Ssh(s) = &c.tenants[0].rules[0].inspect else {
        panic!("not an SSH rule")
    };
    let alice = UserName::parse("alice@acme.example").unwrap();
    assert!(s.login_allowed("deploy", &alice));
    assert!(s.login_allowed("alice", &alice));
    assert!(!s.login_allowed("root", &alice));
    assert!(!s.login_allowed("alice@acme.example", &alice));
    let err = load(&rule("[]")).unwrap_err().to_string();
    assert!(err.contains("rule[0].logins: lists no account"), "{err}");
    let err = load(&rule("[\"-oProxyCommand\"]")).unwrap_err().to_string();
    assert!(err.contains("is not an account name"), "{err}");
    let err = load(&GOOD.replace(
        "[[tenant.device]]",
        "[[tenant.rule]]\nid = \"a\"\naction = \"allow\"\nlogins = [\"root\"]\n[[tenant.device]]",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rule[0].logins: only applies to action = \"inspect_ssh\""),
        "{err}"
    );
}

#[test]
fn ssh_recording_caps_default_and_are_checked() {
    let rule = |keys: &str| {
        GOOD.replace(
            "[[tenant.device]]",
            &format!(
                "[[tenant.rule]]\nid = \"s\"\naction = \"inspect_ssh\"\nproto = \"tcp\"\n{keys}\n[[tenant.device]]"
            ),
        )
    };
    let caps = |keys: &str| {
        let c = load(&rule(keys)).unwrap();
        let Inspect::Ssh(s) = &c.tenants[0].rules[0].inspect else {
            panic!("not an SSH rule")
        };
        (s.max_recording_bytes, s.max_recording_time.as_secs())
    };
    assert_eq!(
        caps(""),
        (DEFAULT_MAX_RECORDING_MB << 20, DEFAULT_MAX_RECORDING_SECS)
    );
    assert_eq!(
        caps("max_recording_mb = 3\nmax_recording_secs = 60"),
        (3 << 20, 60)
    );
    let err = load(&rule("max_recording_mb = 0")).unwrap_err().to_string();
    assert!(
        err.contains("rule[0].max_recording_mb: 0 is out of range"),
        "{err}"
    );
    let err = load(&rule("recording = \"off\"\nmax_recording_secs = 5"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rule[0].max_recording_secs: has no effect with recording = \"off\""),
        "{err}"
    );
}

#[test]
fn audit_quotas_default_parse_and_refuse_zero_naming_file_key_and_fix() {
    let with = |keys: &str| {
        GOOD.replace(
            "[[tenant]]\nid = \"acme\"",
            &format!("[audit]\n{keys}\n\n[[tenant]]\nid = \"acme\""),
        )
    };
    let c = load(GOOD).unwrap();
    assert_eq!(
        (c.audit.max_store_bytes, c.audit.max_recordings_bytes),
        (DEFAULT_MAX_STORE_MB << 20, DEFAULT_MAX_RECORDINGS_MB << 20)
    );
    let c = load(&with("max_store_mb = 1\nmax_recordings_mb = 7")).unwrap();
    assert_eq!(
        (c.audit.max_store_bytes, c.audit.max_recordings_bytes),
        (1 << 20, 7 << 20)
    );
    for key in ["max_store_mb", "max_recordings_mb"] {
        for bad in ["0".to_string(), (MAX_QUOTA_MB + 1).to_string()] {
            let err = load(&with(&format!("{key} = {bad}")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/etc/rampart/gateway.toml")
                    && err.contains(&format!("audit.{key}: {bad} is out of range; use 1..="))
                    && err.contains("no unlimited setting"),
                "{err}"
            );
        }
    }
}

#[test]
fn admin_listen_off_loopback_needs_a_token_file_of_mode_0600() {
    use std::os::unix::fs::PermissionsExt as _;
    let with = |extra: &str| {
        GOOD.replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"state\"\n{extra}"),
        )
    };
    for local in [
        "127.0.0.1:8080",
        "127.0.0.2:9",
        "[::1]:8080",
        "[::ffff:127.0.0.1]:8080",
    ] {
        let c = load(&with(&format!("admin_listen = \"{local}\""))).unwrap();
        assert_eq!(c.gateway.admin_token, None, "{local}");
    }
    for open in ["0.0.0.0:8080", "198.18.0.1:9090", "[::]:8080"] {
        let err = load(&with(&format!("admin_listen = \"{open}\"")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/rampart/gateway.toml: gateway.admin_listen:")
                && err.contains("not a loopback address")
                && err.contains("admin_token_file")
                && err.contains("openssl rand"),
            "{open}: {err}"
        );
    }
    let dir = std::env::temp_dir().join(format!("rampart-admin-token-{}", crate::clock::uuid_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("admin.token");
    let cfg = with(&format!(
        "admin_listen = \"198.18.0.1:9090\"\nadmin_token_file = \"{}\"",
        file.display()
    ));
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("gateway.admin_token_file: cannot read") && err.contains("umask 077"),
        "{err}"
    );
    std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("is mode 0644") && err.contains(&format!("chmod 600 {}", file.display())),
        "{err}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = load(&cfg).unwrap();
    let t = c.gateway.admin_token.as_ref().unwrap();
    assert_eq!(t.secret(), b"0123456789abcdef0123");
    assert!(
        !format!("{c:?}").contains("0123456789abcdef0123"),
        "the token never shows in Debug"
    );
    for bad in ["short\n", "has a space in the middle\n", "\n"] {
        std::fs::write(&file, bad).unwrap();
        let err = load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("does not hold a usable token"),
            "{bad:?}: {err}"
        );
    }
    // A token file on loopback turns HTTPS and the token on there too.
    std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
    let c = load(&cfg.replace("198.18.0.1:9090", "127.0.0.1:8080")).unwrap();
    assert!(c.gateway.admin_token.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device's name and address are unique in its tenant; the error names the device that has them already
/// (checked through an index, so 100,000 devices validate in linear time).
#[test]
fn duplicate_device_names_and_addresses_name_the_first_holder() {
    let device = |name: &str, addr: &str, key: &str| {
        format!(
            "[[tenant.device]]\nname = \"{name}\"\npublic_key = \"{key}\"\naddress = \"{addr}\"\nuser = \"u\"\n"
        )
    };
    let k = |_: u8| crate::keys::PrivateKey::generate().public_key().to_string();
    let base = GOOD
        .split("[[tenant]]\nid = \"globex\"")
        .next()
        .unwrap()
        .to_string();
    let text = base.clone()
        + &device("tablet", "100.96.0.3", &k(1))
        + &device("phone", "100.96.0.4", &k(2))
        + &device("tablet", "100.96.0.5", &k(3))
        + &device("watch", "100.96.0.4", &k(4));
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("device name \"tablet\" is already used in tenant acme"),
        "{err}"
    );
    assert!(
        err.contains("100.96.0.4 is already assigned to device \"phone\""),
        "{err}"
    );
    assert_eq!(err.matches("already").count(), 2, "{err}");
    // The control: the same devices with distinct names and addresses load.
    let ok = base
        + &device("tablet", "100.96.0.3", &k(1))
        + &device("phone", "100.96.0.4", &k(2))
        + &device("tablet2", "100.96.0.5", &k(3))
        + &device("watch", "100.96.0.6", &k(4));
    assert_eq!(load(&ok).unwrap().tenants[0].devices.len(), 5);
}

/// `GOOD` with a `[fleet]` table (tables after `[[tenant]]` would belong to it: put it after `[gateway]`).
fn with_fleet(fleet: &str) -> String {
    GOOD.replacen(
        "\n[[tenant]]",
        &format!("\n[fleet]\n{fleet}\n[[tenant]]"),
        1,
    )
}

#[test]
fn fleet_is_optional_and_resolves_its_password_file() {
    assert_eq!(
        load(GOOD).unwrap().fleet,
        None,
        "a single box needs no [fleet]"
    );
    let c = load(&with_fleet(
        "node_id = \"gw-a\"\npostgres_url = \"postgres://rampart@db.example:5432/rampart\"\npostgres_password_file = \"pg.pass\"",
    ))
    .unwrap();
    let f = c.fleet.unwrap();
    assert_eq!(f.node_id, "gw-a");
    assert_eq!(
        f.postgres_password_file.unwrap(),
        Path::new("/etc/rampart/pg.pass")
    );
    assert_eq!(f.ship_interval, std::time::Duration::from_secs(1));
}

#[test]
fn bad_fleet_values_name_the_key() {
    let err = load(&with_fleet(
        "node_id = \"GW A\"\npostgres_url = \"postgres://db:notaport/x\"\nship_interval_ms = 0",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("fleet.node_id"), "{err}");
    assert!(err.contains("fleet.postgres_url"), "{err}");
    assert!(err.contains("fleet.ship_interval_ms"), "{err}");
    let err = load(&with_fleet("node_id = \"gw-a\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("postgres_url"),
        "a missing URL is named: {err}"
    );
}

const FLEET_PG: &str =
    "node_id = \"gw-a\"\npostgres_url = \"postgres://rampart@db.example:5432/rampart\"\n";

#[test]
fn fleet_objects_take_credentials_from_files_or_env_names() {
    assert_eq!(
        load(&with_fleet(FLEET_PG)).unwrap().fleet.unwrap().objects,
        None,
        "[fleet] without [fleet.objects] keeps recordings on the node"
    );
    let c = load(&with_fleet(&format!(
        "{FLEET_PG}[fleet.objects]\nendpoint = \"http://127.0.0.1:9000/\"\nbucket = \"rec-ords\"\n\
         access_key_id_file = \"s3.id\"\nsecret_access_key_env = \"S3_SECRET\"\nprefix = \"fleet\"\n"
    )))
    .unwrap();
    let o = c.fleet.unwrap().objects.unwrap();
    assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(o.region, "us-east-1");
    assert_eq!(o.prefix, "fleet/");
    assert!(o.keep_local, "the local copy is kept by default");
    assert_eq!(o.part_size, 8 << 20);
    assert_eq!(
        o.access_key_id,
        super::SecretSource::File("/etc/rampart/s3.id".into())
    );
    assert_eq!(
        o.secret_access_key,
        super::SecretSource::Env("S3_SECRET".into())
    );
}

#[test]
fn bad_fleet_objects_name_the_key_and_the_fix() {
    let err = load(&with_fleet(&format!(
        "{FLEET_PG}[fleet.objects]\nendpoint = \"ftp://x/y\"\nbucket = \"No_Such\"\n\
         access_key_id_file = \"a\"\naccess_key_id_env = \"A\"\nsecret_access_key_env = \"lower case\"\n\
         part_size_mb = 1\nprefix = \"/abs\"\n"
    )))
    .unwrap_err()
    .to_string();
    for key in [
        "fleet.objects.endpoint",
        "fleet.objects.bucket",
        "fleet.objects.access_key_id_file",
        "fleet.objects.secret_access_key_env",
        "fleet.objects.part_size_mb",
        "fleet.objects.prefix",
    ] {
        assert!(err.contains(key), "{key} is named: {err}");
    }
    let err = load(&with_fleet(&format!(
        "{FLEET_PG}[fleet.objects]\nbucket = \"recordings\"\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("fleet.objects.access_key_id_file") && err.contains("never the secret itself"),
        "missing credentials say where to put them: {err}"
    );
    let err = load(&with_fleet(&format!(
        "{FLEET_PG}[fleet.objects]\nbucket = \"recordings\"\nsecret_access_key = \"inline\"\n"
    )))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("secret_access_key"),
        "an inline secret is refused: {err}"
    );
}

const SEQPACKET: &str = r#"
[[onramp.seqpacket]]
name = "warp"
path = "/run/rampart/onramp.sock"
uids = [998]

[[onramp.seqpacket.tenant]]
id = "acme"
prefixes = ["10.7.0.0/16"]
sites = ["branch-7"]
groups = ["sites"]
"#;

#[test]
fn seqpacket_onramp_parses_with_defaults() {
    let c = load(&format!("{GOOD}{SEQPACKET}")).unwrap();
    let o = &c.seqpacket_onramps[0];
    assert_eq!(o.name, "warp");
    assert_eq!(o.mode, 0o660);
    assert!(o.reply);
    assert_eq!(o.max_bad_packets, 100);
    assert!(o.admits(998, 5) && !o.admits(1000, 1000));
    let g = o.grant("acme").unwrap();
    assert_eq!(g.user.as_str(), "onramp:warp");
    assert_eq!(g.prefixes[0].to_string(), "10.7.0.0/16");
    assert!(o.grant("globex").is_none());
}

#[test]
fn seqpacket_onramp_errors_name_key_and_fix() {
    for (from, to, key, fix) in [
        (
            "uids = [998]",
            "",
            "onramp.seqpacket[0] (warp).uids",
            "uids = [998]",
        ),
        (
            "id = \"acme\"\nprefixes",
            "id = \"nope\"\nprefixes",
            ".tenant[0].id",
            "not a configured tenant",
        ),
        // A prefix covering the device pool would let a connection send as a device.
        (
            "10.7.0.0/16",
            "100.96.0.0/16",
            ".tenant[0].prefixes",
            "overlaps the tenant's address pool",
        ),
        (
            "10.7.0.0/16",
            "10.7.0.0/33",
            ".tenant[0].prefixes",
            "is not a CIDR",
        ),
        (
            "uids = [998]",
            "uids = [998]\nmode = \"0666\"",
            ".mode",
            "without world write",
        ),
        (
            "name = \"warp\"",
            "name = \"w a\"",
            "onramp.seqpacket[0].name",
            "valid name",
        ),
    ] {
        let text = format!("{GOOD}{}", SEQPACKET.replacen(from, to, 1));
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("/etc/rampart/gateway.toml"), "{err}");
        assert!(err.contains(key) && err.contains(fix), "{key}: {err}");
    }
    // Positive control: the unchanged entry loads.
    assert!(load(&format!("{GOOD}{SEQPACKET}")).is_ok());
}
