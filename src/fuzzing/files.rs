//! Targets for what the gateway reads from files and its helper: `config` (TOML that validates must apply to a
//! gateway, reload and allocate addresses without panicking), `registry` (`devices.json` merged into a config
//! and applied), `netns_proto` (the helper's control messages: decode, re-encode, decode again) and
//! `onramp_context` (the RCX1 context of the SEQPACKET and GUE on-ramps: parse, emit, parse again) and
//! `onramp_gue` (a GUE datagram: header check, then a keyed site's verification).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gateway::{config as harness_config, fixed_key};
use crate::config::{Config, DeviceOrigin};
use crate::core::{Gateway, Metrics, TxQueue};
use crate::enroll;
use crate::netns::proto::{Message, MAX_MESSAGE};
use crate::registry;

/// Applies `cfg` to a gateway as start and reloads would: first apply, the same config again (a no-op reload),
/// another config and back, a timer tick and shutdown. Then what `device add` does with each tenant.
fn apply_everywhere(cfg: &Config) {
    let now = Instant::now();
    let mut tx = TxQueue::new();
    let mut gw = Gateway::new(0, &fixed_key(0), Arc::new(Metrics::default()), now);
    let first = gw.apply(cfg, now, &mut tx);
    assert_eq!(first.removed, 0);
    assert_eq!(
        first.added + first.rejected,
        cfg.device_count(),
        "{first:?}"
    );
    let again = gw.apply(cfg, now + Duration::from_millis(1), &mut tx);
    assert_eq!(
        (again.added, again.removed, again.updated),
        (0, 0, 0),
        "a no-op reload changed peers"
    );
    let other = harness_config(0);
    gw.apply(&other, now + Duration::from_millis(2), &mut tx);
    gw.apply(cfg, now + Duration::from_millis(3), &mut tx);
    gw.handle_timeout(now + Duration::from_millis(4), &mut tx);
    let _ = gw.peer_status();
    gw.shutdown(now + Duration::from_millis(5));
    let _ = cfg.restart_only_differences(&other);
    for t in &cfg.tenants {
        if let Some(a) = enroll::allocate_address(t) {
            assert!(
                t.address_pool.contains(&a),
                "{a} outside {}",
                t.address_pool
            );
            assert_ne!(a, t.gateway_address);
            assert!(t.devices.iter().all(|d| d.address != a), "{a} already used");
            let _ = enroll::ClientConfig {
                tenant: t,
                device_name: "fuzz",
                private_key: None,
                address: a,
                gateway_key: fixed_key(0).public_key(),
                endpoint: "198.18.0.1:51820",
            }
            .render();
        }
    }
}

/// `config`: TOML text. A config that validates is applied everywhere; one that does not gets an error that
/// names the file.
pub(crate) fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, Path::new("/fuzz/gateway.toml")) {
        Ok(cfg) => apply_everywhere(&cfg),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/fuzz/gateway.toml"),
                "error does not name the file: {msg}"
            );
        }
    }
}

/// `registry`: a `devices.json`, merged into the harness config the way `Config::load` does, then applied.
/// A registry that parses also round-trips through the writer's format.
pub(crate) fn registry(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(devices) = registry::parse(text) else {
        return;
    };
    let round = registry::render(&devices).expect("a parsed registry serializes");
    assert_eq!(
        registry::parse(&round).expect("what we write parses"),
        devices
    );
    let mut cfg = harness_config(0);
    let file = "/fuzz/devices.json".to_string();
    match cfg.merge_enrolled(
        &[(&devices[..], DeviceOrigin::Enrolled, file.clone())],
        &file,
    ) {
        Ok(()) => apply_everywhere(&cfg),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/fuzz/devices.json"),
                "error does not name the file: {msg}"
            );
        }
    }
}

/// `netns_proto`: one control datagram. What decodes re-encodes to something that decodes to the same message,
/// and the descriptor count it demands is exactly what `check_fds` accepts.
pub(crate) fn netns_proto(data: &[u8]) {
    let Ok(msg) = Message::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_MESSAGE);
    let n = msg.expected_fds();
    assert!(msg.check_fds(n).is_ok());
    assert!(msg.check_fds(n + 1).is_err());
    if let Ok(bytes) = msg.encode() {
        assert_eq!(
            Message::decode(&bytes).expect("what we encode decodes"),
            msg
        );
    }
}

/// The on-ramp context: arbitrary bytes parse or are refused; what parses emits a canonical form that parses to
/// the same context, and emitting that again gives the same bytes.
pub(super) fn onramp_context(data: &[u8]) {
    use crate::onramp::context::{Context, MAX_LEN};
    let Ok((c, len)) = Context::parse(data) else {
        return;
    };
    assert!(len <= data.len() && len <= MAX_LEN && len % 4 == 0);
    let mut first = [0u8; MAX_LEN];
    let n = c.emit(&mut first).expect("a parsed context emits");
    assert!(n <= len, "canonical form {n} longer than the parsed {len}");
    let (back, m) = Context::parse(&first[..n]).expect("the canonical form parses");
    assert_eq!((back, m), (c, n));
    let mut second = [0u8; MAX_LEN];
    let n2 = back.emit(&mut second).expect("emits again");
    assert_eq!(&first[..n], &second[..n2]);
}

/// A GUE datagram: the header check stays inside the datagram, and a keyed site's verification never accepts
/// bytes it did not seal itself (a verified packet verifies once, and not with its inner packet changed) and
/// never panics.
pub(super) fn onramp_gue(data: &[u8]) {
    use crate::onramp::gue::auth::{ReplayWindow, SiteKey};
    use crate::onramp::gue::header::{self, Gue};
    let key = SiteKey::new(7, &[0x5a; 32]);
    let mut window = ReplayWindow::default();
    match header::parse(data) {
        Ok(Gue::Data {
            private, payload, ..
        }) => {
            assert!(payload < data.len());
            assert!(header::proto_of(&data[payload..]).is_some());
            if payload > 0 {
                let inner = &data[payload..];
                let ok = key.verify(&mut window, "acme", "b7", &data[..4], private, inner);
                if ok.is_ok() {
                    // Only a sealed packet verifies (the seed corpus has one): once, and not with any bit of
                    // the inner packet changed.
                    let again = key.verify(&mut window, "acme", "b7", &data[..4], private, inner);
                    assert!(again.is_err(), "a counter verified twice");
                    let mut changed = inner.to_vec();
                    changed[inner.len() - 1] ^= 1;
                    let mut fresh = ReplayWindow::default();
                    let forged =
                        key.verify(&mut fresh, "acme", "b7", &data[..4], private, &changed);
                    assert!(forged.is_err(), "a changed packet verified");
                }
            }
            // What the gateway would send back for this inner packet parses to the same packet.
            let inner = &data[payload..];
            let proto = header::proto_of(inner).expect("checked");
            let mut out = header::data_header(proto, 0)
                .expect("no private data")
                .to_vec();
            out.extend_from_slice(inner);
            assert_eq!(
                header::parse(&out),
                Ok(Gue::Data {
                    variant: 0,
                    proto,
                    private: &[],
                    payload: 4
                })
            );
        }
        Ok(Gue::Control { .. }) => assert_eq!(data[0] >> 5, 1),
        Err(_) => {}
    }
}
