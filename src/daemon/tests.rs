//! `rampart run`'s assembly: the one metrics registry as `/metrics` serves it.

use super::*;
use crate::metrics::exposition;

/// `/metrics` as the daemon builds it: every part's families are in one exposition that parses, with the
/// names and labels dashboards read.
#[test]
fn the_registry_exports_every_part_and_parses() {
    let dir = tempfile::tempdir().unwrap();
    let opts = crate::audit::PipelineOptions::new(
        dir.path().join("audit.db"),
        dir.path().join("audit_signing_key"),
    );
    let (audit, writer) = crate::audit::start(opts).unwrap();
    let core = Arc::new(Metrics::default());
    let acme = core.tenant(&crate::config::TenantId::parse("acme").unwrap());
    acme.rx_bytes.add(1500);
    acme.count_drop(crate::core::DropReason::PolicyDenied);
    core.global.handoffs_dropped.add(1);
    let offramp = crate::offramp::OfframpCounters::default();
    offramp.udp_queue_full.inc();
    let http = crate::http::HttpServices::new(audit.http());
    http.count_decision("allow");
    let ssh =
        crate::ssh::SshServices::new(dir.path(), audit.ssh(), crate::ssh::SshLimits::default());
    audit.counters().lost(
        crate::audit::RecordKind::Ssh,
        crate::audit::LossReason::QueueFull,
        2,
    );
    let registry = metrics_registry(&core, audit.counters(), &offramp, &http, &ssh);
    let text = registry.encode();
    let (families, _) = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let has = |name: &str, kind: &str| families.iter().any(|(f, k)| f == name && k == kind);
    let counters = [
        // core, per tenant
        "rampart_handshakes_total",
        "rampart_rx_packets_total",
        "rampart_rx_bytes_total",
        "rampart_tx_packets_total",
        "rampart_tx_bytes_total",
        "rampart_flows_started_total",
        "rampart_dropped_packets_total",
        // core, gateway-wide
        "rampart_datagrams_received_total",
        "rampart_datagrams_sent_total",
        "rampart_udp_receive_calls_total",
        "rampart_udp_send_calls_total",
        "rampart_udp_send_trains_total",
        "rampart_udp_send_train_datagrams_total",
        "rampart_udp_gso_fallbacks_total",
        "rampart_udp_receive_trains_total",
        "rampart_udp_receive_train_datagrams_total",
        "rampart_datapath_wakeups_total",
        "rampart_cookie_replies_total",
        "rampart_send_errors_total",
        "rampart_tun_write_errors_total",
        "rampart_udp_receive_errors_total",
        "rampart_refusals_unrecorded_total",
        "rampart_handoffs_dropped_total",
        "rampart_onramp_accepted_total",
        "rampart_onramp_closed_bad_packets_total",
        "rampart_onramp_datagrams_total",
        // off-ramp
        "rampart_offramp_tcp_connections_total",
        "rampart_offramp_tcp_connect_failures_total",
        "rampart_offramp_udp_flows_total",
        "rampart_offramp_unknown_slot_total",
        "rampart_offramp_flows_cut_total",
        "rampart_offramp_udp_queue_full_total",
        // inspectors
        "rampart_http_connections_total",
        "rampart_http_decisions_total",
        "rampart_ssh_connections_total",
        "rampart_ssh_preauth_timeouts_total",
        "rampart_ssh_trust_unavailable_total",
        // audit
        "rampart_audit_records_written_total",
        "rampart_audit_records_lost_total",
        "rampart_audit_gap_records_total",
        "rampart_audit_checkpoints_total",
        "rampart_audit_evictions_total",
        "rampart_audit_recordings_evicted_total",
        "rampart_audit_quota_exceeded_total",
        "rampart_audit_records_dropped_total",
    ];
    let gauges = [
        "rampart_peers",
        "rampart_peers_connected",
        "rampart_flows",
        "rampart_udp_gso_enabled",
        "rampart_udp_gro_enabled",
        "rampart_nat_slots",
        "rampart_nat_slots_closing",
        "rampart_peers_timed",
        "rampart_onramp_connections",
        "rampart_audit_over_quota",
    ];
    for f in counters {
        assert!(has(f, "counter"), "no counter family {f}:\n{text}");
    }
    for f in gauges {
        assert!(has(f, "gauge"), "no gauge family {f}:\n{text}");
    }
    assert_eq!(
        families.len(),
        counters.len() + gauges.len(),
        "a family without a check here:\n{text}"
    );
    let v = |name: &str, labels: &[(&str, &str)]| exposition::value(&text, name, labels);
    assert_eq!(
        v("rampart_rx_bytes_total", &[("tenant", "acme")]),
        Some(1500.0)
    );
    assert_eq!(
        v(
            "rampart_dropped_packets_total",
            &[("tenant", "acme"), ("reason", "policy_denied")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "rampart_dropped_packets_total",
            &[("tenant", ""), ("reason", "no_route")]
        ),
        Some(0.0)
    );
    assert_eq!(v("rampart_handoffs_dropped_total", &[]), Some(1.0));
    assert_eq!(
        v("rampart_http_decisions_total", &[("decision", "allow")]),
        Some(1.0)
    );
    assert_eq!(v("rampart_offramp_udp_queue_full_total", &[]), Some(1.0));
    assert_eq!(
        v(
            "rampart_audit_records_lost_total",
            &[("kind", "ssh"), ("reason", "queue_full")]
        ),
        Some(2.0)
    );
    assert_eq!(v("rampart_audit_records_dropped_total", &[]), Some(2.0));
    // Help texts end with one period (the registry adds one to what parts register).
    for l in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(l.ends_with('.') && !l.ends_with(".."), "{l}");
    }
    drop((audit, http, ssh));
    writer.finish();
}
