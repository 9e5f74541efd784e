//! The enrollment service against a real store, registry and config file (no listener, no data path).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;
use crate::enroll::admin::{self, TokenRequest};
use crate::enroll::secret::PublicId;

struct FakeGateway {
    path: PathBuf,
    reloads: AtomicUsize,
    peers: Mutex<Vec<PeerStatus>>,
}

impl GatewayHandle for FakeGateway {
    fn reload(&self) -> Result<String, String> {
        Config::load(&self.path).map_err(|e| e.to_string())?;
        self.reloads.fetch_add(1, Ordering::SeqCst);
        Ok("reloaded".into())
    }
    fn peers(&self) -> Vec<PeerStatus> {
        self.peers.lock().unwrap().clone()
    }
    fn config(&self) -> Arc<Config> {
        Arc::new(Config::load(&self.path).unwrap())
    }
}

struct World {
    dir: PathBuf,
    /// Holds `dir`: removed when the world drops, also after a failure.
    _tmp: tempfile::TempDir,
    gw: Arc<FakeGateway>,
    svc: Service,
}

fn world(pools: &[(&str, &str, &str)]) -> World {
    let dir_tmp = tempfile::tempdir().unwrap();
    let dir = dir_tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = "[gateway]\nlisten = \"198.18.0.1:51820\"\nprivate_key_file = \"gateway.key\"\nstate_dir = \"state\"\n"
        .to_string();
    for (id, pool, gw) in pools {
        text.push_str(&format!(
            "[[tenant]]\nid = \"{id}\"\naddress_pool = \"{pool}\"\ngateway_address = \"{gw}\"\n"
        ));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    PrivateKey::generate()
        .write_new_file(&dir.join("gateway.key"))
        .unwrap();
    let gw = Arc::new(FakeGateway {
        path,
        reloads: AtomicUsize::new(0),
        peers: Mutex::new(Vec::new()),
    });
    let svc = Service::new(
        gw.clone(),
        crate::enroll::audit::AuditLog::Spool(dir.join("state")),
    )
    .unwrap();
    World {
        dir,
        _tmp: dir_tmp,
        gw,
        svc,
    }
}

fn acme() -> World {
    world(&[("acme", "100.96.0.0/24", "100.96.0.1")])
}

impl World {
    fn cfg(&self) -> Config {
        Config::load(&self.gw.path).unwrap()
    }

    fn token(&self, f: impl FnOnce(&mut TokenRequest)) -> (String, PublicId) {
        let mut req = TokenRequest {
            tenant: "acme".into(),
            user: None,
            groups: vec!["eng".into()],
            max_uses: Some(1),
            ttl: Duration::from_secs(3600),
            ephemeral: None,
            preapproved: true,
            note: String::new(),
        };
        f(&mut req);
        let t =
            admin::create_token(&self.cfg(), None, req, "test", unix_now(), &self.spool()).unwrap();
        (t.token, t.row.id)
    }

    fn enroll(&self, token: &str, key: &PeerKey) -> Result<(Enrolled, DeviceReply), ApiError> {
        self.enroll_as(token, key, None)
    }

    fn enroll_as(
        &self,
        token: &str,
        key: &PeerKey,
        device_id: Option<&str>,
    ) -> Result<(Enrolled, DeviceReply), ApiError> {
        self.svc.enroll(
            &EnrollRequest {
                token: token.into(),
                public_key: key.to_string(),
                name: Some("laptop".into()),
                device_id: device_id.map(str::to_string),
                ..Default::default()
            },
            &origin(),
            unix_now(),
        )
    }

    fn spool(&self) -> crate::enroll::audit::AuditLog {
        crate::enroll::audit::AuditLog::Spool(self.dir.join("state"))
    }

    fn store_devices(&self) -> Vec<DeviceRow> {
        admin::devices(&self.dir.join("state")).unwrap()
    }

    fn events(&self, kind: &str) -> usize {
        crate::enroll::audit::spooled(&self.dir.join("state"))
            .iter()
            .filter(|r| r.event.as_str() == kind)
            .count()
    }
}

fn unix_now() -> i64 {
    crate::enroll::unix_now()
}

fn origin() -> Origin {
    Origin {
        source: "198.18.1.2".parse().unwrap(),
        host: Some("198.18.0.1".into()),
    }
}

fn key() -> PeerKey {
    PrivateKey::generate().public_key()
}

fn code(r: Result<(Enrolled, DeviceReply), ApiError>) -> ErrorCode {
    r.expect_err("should be refused").error
}

#[test]
fn an_enrolled_device_is_in_the_config_with_its_tokens_tenant_and_groups() {
    let w = acme();
    let (token, id) = w.token(|_| {});
    let k = key();
    let (how, reply) = w.enroll(&token, &k).unwrap();
    assert_eq!(how, Enrolled::Created);
    assert_eq!(reply.device.state, DeviceState::Active);
    assert_eq!(
        reply.interface.addresses,
        vec!["100.96.0.2/32".parse::<IpNet>().unwrap()]
    );
    assert_eq!(reply.peers[0].endpoint, "198.18.0.1:51820");
    assert_eq!(
        reply.peers[0].allowed_ips,
        vec!["100.96.0.0/24".parse::<IpNet>().unwrap()]
    );
    assert!(reply.device_token.as_deref().unwrap().starts_with("rpd1_"));
    let cfg = w.cfg();
    let d = &cfg.tenant("acme").unwrap().devices[0];
    assert_eq!(
        (d.name.as_str(), d.public_key, d.origin),
        ("laptop", k, DeviceOrigin::Token)
    );
    assert_eq!(d.groups, vec!["eng".to_string()]);
    assert_eq!(d.user.to_string(), format!("token-{id}"));
    assert_eq!(
        w.gw.reloads.load(Ordering::SeqCst),
        1,
        "the running gateway applied it"
    );
    assert_eq!(w.events("device_enrolled"), 1);
    let dev = w.svc.authenticate(reply.device_token.as_deref()).unwrap();
    assert_eq!(dev.public_key, k);
    assert_eq!(
        w.svc.current(&dev, &origin()).unwrap().config_version,
        reply.config_version
    );
}

#[test]
fn concurrent_enrollments_take_exactly_the_uses_a_token_has() {
    let w = acme();
    let (token, id) = w.token(|r| r.max_uses = Some(3));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| w.enroll(&token, &key())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| e.error == ErrorCode::TokenUsedUp));
    let devices = w.store_devices();
    assert_eq!(devices.len(), 3);
    let addrs: HashSet<IpAddr> = devices.iter().map(|d| d.address).collect();
    assert_eq!(addrs.len(), 3, "distinct addresses");
    let names: HashSet<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, HashSet::from(["laptop", "laptop-2", "laptop-3"]));
    let t = admin::list_tokens(&w.dir.join("state")).unwrap();
    assert_eq!(t.iter().find(|t| t.id == id).unwrap().used, 3);
}

#[test]
fn a_retry_with_the_same_key_is_the_same_device_and_costs_no_use() {
    let w = acme();
    let (token, _) = w.token(|_| {});
    let k = key();
    let (_, first) = w.enroll(&token, &k).unwrap();
    let (how, again) = w.enroll(&token, &k).unwrap();
    assert_eq!(how, Enrolled::Retried);
    assert_eq!(again.device, first.device);
    assert_eq!(again.interface, first.interface);
    assert_ne!(again.device_token, first.device_token);
    assert!(
        w.svc.authenticate(first.device_token.as_deref()).is_err(),
        "old device token replaced"
    );
    assert!(w.svc.authenticate(again.device_token.as_deref()).is_ok());
    assert_eq!(
        code(w.enroll(&token, &key())),
        ErrorCode::TokenUsedUp,
        "another key is a new device"
    );
    assert_eq!(w.store_devices().len(), 1);
}

#[test]
fn wrong_secrets_lock_the_token_even_for_the_right_one() {
    let w = acme();
    let (token, _) = w.token(|_| {});
    let (other, _) = w.token(|_| {});
    // Same id, other secret.
    let forged = format!("{}{}", &token[..22], "A".repeat(43));
    for i in 0..5 {
        assert_eq!(
            code(w.enroll(&forged, &key())),
            ErrorCode::TokenInvalid,
            "attempt {i}"
        );
    }
    let e = w.enroll(&token, &key()).unwrap_err();
    assert_eq!(e.error, ErrorCode::TokenLocked);
    assert!(e.retry_after.unwrap() > 800, "{e:?}");
    assert!(
        w.enroll(&other, &key()).is_ok(),
        "other tokens are not locked"
    );
    assert_eq!(w.events("token_locked"), 1);
    assert_eq!(w.store_devices().len(), 1);
}

#[test]
fn expired_revoked_and_malformed_tokens_create_nothing() {
    let w = acme();
    let (expired, _) = w.token(|r| r.ttl = Duration::from_secs(1));
    let later = unix_now() + 5;
    let e = w
        .svc
        .enroll(
            &EnrollRequest {
                token: expired,
                public_key: key().to_string(),
                ..Default::default()
            },
            &origin(),
            later,
        )
        .unwrap_err();
    assert_eq!(e.error, ErrorCode::TokenExpired);
    let (revoked, id) = w.token(|_| {});
    admin::revoke_token(&w.cfg(), None, id.as_str(), "test", unix_now(), &w.spool()).unwrap();
    assert_eq!(code(w.enroll(&revoked, &key())), ErrorCode::TokenRevoked);
    for bad in [
        "",
        "rpe1_",
        "rpd1_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "hello",
    ] {
        assert_eq!(
            code(w.enroll(bad, &key())),
            ErrorCode::TokenInvalid,
            "{bad:?}"
        );
    }
    let unknown = Credential::generate(Kind::Enrollment, None).expose();
    assert_eq!(code(w.enroll(&unknown, &key())), ErrorCode::TokenInvalid);
    assert!(w.store_devices().is_empty());
    assert_eq!(w.gw.reloads.load(Ordering::SeqCst), 0);
    assert_eq!(w.events("enroll_refused"), 7);
}

#[test]
fn a_full_pool_refuses_and_keeps_the_tokens_use() {
    let w = world(&[("acme", "100.96.0.0/30", "100.96.0.1")]);
    let (token, id) = w.token(|r| r.max_uses = Some(2));
    w.enroll(&token, &key()).unwrap();
    assert_eq!(code(w.enroll(&token, &key())), ErrorCode::AddressPoolFull);
    let t = admin::list_tokens(&w.dir.join("state")).unwrap();
    assert_eq!(t.iter().find(|t| t.id == id).unwrap().used, 1);
    assert_eq!(w.store_devices().len(), 1);
}

#[test]
fn a_known_key_is_refused() {
    let w = acme();
    let (token, _) = w.token(|r| r.max_uses = None);
    let k = key();
    w.enroll(&token, &k).unwrap();
    let (other, _) = w.token(|_| {});
    assert_eq!(code(w.enroll(&other, &k)), ErrorCode::KeyInUse);
    assert_eq!(
        code(w.enroll(&other, &w.gw.config().tenants[0].devices[0].public_key)),
        ErrorCode::KeyInUse
    );
}

#[test]
fn pending_devices_hold_an_address_but_reach_the_config_only_when_approved() {
    let w = acme();
    let (token, _) = w.token(|r| {
        r.preapproved = false;
        r.max_uses = Some(2)
    });
    let (_, a) = w.enroll(&token, &key()).unwrap();
    assert_eq!(a.device.state, DeviceState::Pending);
    assert!(
        w.cfg().tenants[0].devices.is_empty(),
        "a pending device is not in the data path's config"
    );
    assert_eq!(w.gw.reloads.load(Ordering::SeqCst), 0);
    let dev = w.svc.authenticate(a.device_token.as_deref()).unwrap();
    assert_eq!(
        w.svc.current(&dev, &origin()).unwrap_err().error,
        ErrorCode::PendingApproval
    );
    let (_, b) = w.enroll(&token, &key()).unwrap();
    assert_ne!(
        a.interface.addresses, b.interface.addresses,
        "the pending device's address is taken"
    );
    admin::approve_device(
        &w.cfg(),
        "acme",
        &a.device.name,
        "test",
        unix_now(),
        &w.spool(),
    )
    .unwrap();
    let cfg = w.cfg();
    let names: Vec<&str> = cfg.tenants[0]
        .devices
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, vec![a.device.name.as_str()]);
    assert!(admin::approve_device(
        &w.cfg(),
        "acme",
        &a.device.name,
        "test",
        unix_now(),
        &w.spool()
    )
    .is_err());
    assert_eq!(w.events("device_approved"), 1);
}

#[test]
fn the_same_device_id_and_token_replace_the_key_of_the_same_device() {
    let w = acme();
    let (token, _) = w.token(|r| r.max_uses = None);
    let (k1, k2) = (key(), key());
    let (_, first) = w.enroll_as(&token, &k1, Some("SN-1")).unwrap();
    let (how, second) = w.enroll_as(&token, &k2, Some("SN-1")).unwrap();
    assert_eq!(how, Enrolled::Reenrolled);
    assert_eq!(second.device.id, first.device.id);
    assert_eq!(second.interface.addresses, first.interface.addresses);
    let devices = w.store_devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].public_key, k2);
    assert!(w.svc.authenticate(first.device_token.as_deref()).is_err());
    let (other, _) = w.token(|_| {});
    assert_eq!(
        code(w.enroll_as(&other, &key(), Some("SN-1"))),
        ErrorCode::DeviceIdInUse
    );
}

#[test]
fn two_tenants_at_once_each_get_their_tokens_tenant() {
    let w = world(&[
        ("acme", "100.96.0.0/24", "100.96.0.1"),
        ("globex", "100.97.0.0/24", "100.97.0.1"),
    ]);
    let (a, _) = w.token(|r| r.max_uses = Some(4));
    let (g, _) = w.token(|r| {
        r.tenant = "globex".into();
        r.max_uses = Some(4)
    });
    let replies: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let t = if i % 2 == 0 { a.clone() } else { g.clone() };
                let w = &w;
                s.spawn(move || (i, w.enroll(&t, &key()).unwrap().1))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in replies {
        let (tenant, net) = if i % 2 == 0 {
            ("acme", "100.96.0.0/24")
        } else {
            ("globex", "100.97.0.0/24")
        };
        assert_eq!(r.device.tenant, tenant);
        let net: IpNet = net.parse().unwrap();
        assert!(net.contains(&r.interface.addresses[0].addr()), "{r:?}");
    }
    let cfg = w.cfg();
    assert_eq!(cfg.tenant("acme").unwrap().devices.len(), 4);
    assert_eq!(cfg.tenant("globex").unwrap().devices.len(), 4);
}

#[test]
fn rotation_keeps_device_and_address_and_leaving_removes_it() {
    let w = acme();
    let (token, _) = w.token(|_| {});
    let (_, r) = w.enroll(&token, &key()).unwrap();
    let dev = w.svc.authenticate(r.device_token.as_deref()).unwrap();
    let k2 = key();
    let rotated = w
        .svc
        .rotate(
            &dev,
            &KeyRequest {
                public_key: k2.to_string(),
            },
            &origin(),
            unix_now(),
        )
        .unwrap();
    assert_eq!(rotated.device, r.device);
    assert_eq!(rotated.interface, r.interface);
    assert_eq!(w.cfg().tenants[0].devices[0].public_key, k2);
    let dev = w.svc.authenticate(r.device_token.as_deref()).unwrap();
    assert_eq!(dev.public_key, k2, "the device token still works");
    w.svc.leave(&dev, &origin()).unwrap();
    assert!(w.cfg().tenants[0].devices.is_empty());
    assert!(w.svc.authenticate(r.device_token.as_deref()).is_err());
    assert_eq!(w.events("device_key_rotated"), 1);
    assert_eq!(w.events("device_left"), 1);
}

#[test]
fn the_first_handshake_proves_a_device_and_ephemeral_ones_expire_unseen() {
    let w = acme();
    let (token, _) = w.token(|r| {
        r.max_uses = None;
        r.ephemeral = Some(Duration::from_secs(60))
    });
    let (k1, k2) = (key(), key());
    let (_, a) = w.enroll(&token, &k1).unwrap();
    let (_, b) = w.enroll(&token, &k2).unwrap();
    let now = unix_now();
    let peer = |k: PeerKey, hs: Option<u64>, rx: u64| PeerStatus {
        tenant: crate::config::TenantId::parse("acme").unwrap(),
        name: DeviceName::parse("x").unwrap(),
        public_key: k,
        endpoint: None,
        last_handshake_secs: hs,
        rx_bytes: rx,
        tx_bytes: 0,
    };
    let mut rx = HashMap::new();
    w.svc
        .observe(
            || vec![peer(k1, None, 0), peer(k2, Some(0), 100)],
            &mut rx,
            now,
        )
        .unwrap();
    let devs = w.store_devices();
    let da = devs.iter().find(|d| d.api_id() == a.device.id).unwrap();
    let db = devs.iter().find(|d| d.api_id() == b.device.id).unwrap();
    assert_eq!(da.proven_at, None, "no handshake, not proven");
    assert!(db.proven_at.is_some());
    assert_eq!(w.events("device_proven"), 1);
    // 50 s later b still sends (rx grows), a is silent; at 70 s a is gone, b stays.
    w.svc
        .observe(
            || vec![peer(k1, None, 0), peer(k2, Some(50), 200)],
            &mut rx,
            now + 50,
        )
        .unwrap();
    w.svc
        .observe(
            || vec![peer(k1, None, 0), peer(k2, Some(70), 200)],
            &mut rx,
            now + 70,
        )
        .unwrap();
    let left: Vec<String> = w.store_devices().iter().map(|d| d.api_id()).collect();
    assert_eq!(left, vec![b.device.id.clone()]);
    assert_eq!(w.events("device_expired"), 1);
    assert_eq!(w.events("device_proven"), 1, "proven once");
}
