//! The pipeline end to end in-process: records of every kind through one queue and one writer into a real
//! SQLite store, read back with the review queries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http_records::HttpRecord;
use super::review::flows::{FlowFilter, FlowStore};
use super::review::http::{query, HttpFilter};
use super::*;
use crate::config::{Action, DeviceName, TenantId, UserName};
use crate::core::{EndReason, FlowSeq, FlowStart};

/// A temp dir, removed when the guard drops (also after a failure).
pub(crate) fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("rampart-audit-{tag}-"))
        .tempdir()
        .unwrap()
}

pub(crate) fn options(dir: &std::path::Path) -> PipelineOptions {
    PipelineOptions {
        commit_interval: Duration::from_millis(20),
        ..PipelineOptions::new(dir.join("audit.db"), dir.join("audit_signing_key"))
    }
}

pub(crate) fn flow_start(tenant: &str, seq: u64) -> FlowEvent {
    FlowEvent::Start(Box::new(FlowStart {
        seq: FlowSeq::new(seq),
        tenant: TenantId::parse(tenant).unwrap(),
        device: DeviceName::parse("laptop").unwrap(),
        user: UserName::parse("alice@example.com").unwrap(),
        protocol: 6,
        src: "100.96.0.2".parse().unwrap(),
        sport: 40000,
        dst: "198.18.1.2".parse().unwrap(),
        dport: 80,
        action: Action::InspectHttp,
        rule: Arc::from("web"),
        dst_device: None,
        at: Instant::now(),
    }))
}

pub(crate) fn http(tenant: &str, host: &str, at_ms: i64, flow_seq: u64) -> HttpRecord {
    HttpRecord {
        at_ms,
        ref_id: "r1".into(),
        flow_seq,
        tenant: tenant.into(),
        device: "laptop".into(),
        user: "alice@example.com".into(),
        src: "100.96.0.2:40000".into(),
        dst: "198.18.1.2:80".into(),
        scheme: "http".into(),
        method: "GET".into(),
        host: host.into(),
        path: "/x".into(),
        status: Some(200),
        req_bytes: 0,
        resp_bytes: 10,
        duration_ms: 3,
        flow_rule: "web".into(),
        decision: super::http_records::HttpDecision::Allow,
        ..Default::default()
    }
}

fn all_http(db: &std::path::Path) -> Vec<review::http::HttpRow> {
    query(
        db,
        &HttpFilter {
            limit: 100,
            ..Default::default()
        },
    )
    .unwrap()
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn records_of_every_kind_commit_and_an_http_record_links_to_its_flow_at_once() {
    let dir_tmp = tempdir("kinds");
    let dir = dir_tmp.path().to_path_buf();
    let opts = options(&dir);
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    sink.offer(flow_start("acme", 7));
    // Offered right after its flow's start: linked without waiting for another writer.
    sink.http().emit(http("acme", "a.example", 1000, 7));
    sink.http().emit(http("acme", "b.example", 2000, 99));
    sink.offer(FlowEvent::End {
        seq: FlowSeq::new(7),
        at: Instant::now(),
        packets: [3, 4],
        bytes: [300, 400],
        reason: EndReason::TcpFin,
    });
    writer.finish();
    let flows = FlowStore::open(&db)
        .unwrap()
        .flows(&FlowFilter {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].end_reason.as_deref(), Some("tcp_fin"));
    assert_eq!(flows[0].bytes_in, 400);
    let rows = all_http(&db);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].record.host, "a.example");
    assert_eq!(rows[1].flow_id, Some(flows[0].id));
    assert_eq!(rows[0].flow_id, None, "flow 99 was never recorded");
    let only = query(
        &db,
        &HttpFilter {
            host: Some("A.example".into()),
            since_ms: Some(500),
            limit: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(sink.counters().written_total(RecordKind::Http), 2);
    assert_eq!(sink.counters().written_total(RecordKind::Flow), 2);
}

#[test]
fn an_http_record_never_links_to_a_previous_runs_flow() {
    let dir_tmp = tempdir("runs");
    let dir = dir_tmp.path().to_path_buf();
    let opts = options(&dir);
    let db = opts.db.clone();
    let (sink, writer) = start(opts.clone()).unwrap();
    sink.offer(flow_start("acme", 1));
    writer.finish();
    // The next run numbers flows from 1 again; its flow 1's start was lost (say, a full queue).
    let (sink, writer) = start(opts).unwrap();
    sink.http().emit(http("acme", "a.example", 1000, 1));
    writer.finish();
    let rows = all_http(&db);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].flow_id, None, "linked to the previous run's flow 1");
}

#[test]
fn a_failing_store_marks_the_sink_unhealthy_until_writes_succeed_again() {
    let dir_tmp = tempdir("health");
    let dir = dir_tmp.path().to_path_buf();
    let opts = options(&dir);
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    let http_sink = sink.http();
    http_sink.emit(http("acme", "a.example", 1000, 1));
    wait("the first record", || all_http(&db).len() == 1);
    assert!(http_sink.healthy());
    let other = rusqlite::Connection::open(&db).unwrap();
    other.busy_timeout(Duration::from_secs(5)).unwrap();
    other
        .execute_batch("ALTER TABLE http_requests RENAME TO held_aside")
        .unwrap();
    http_sink.emit(http("acme", "b.example", 2000, 1));
    wait("the sink to notice the failure", || !http_sink.healthy());
    assert!(
        sink.admits_new_flows(),
        "fail-open keeps admitting new flows"
    );
    other
        .execute_batch("ALTER TABLE held_aside RENAME TO http_requests")
        .unwrap();
    wait("the held record to be written", || {
        all_http(&db).len() == 2 && http_sink.healthy()
    });
    assert_eq!(http_sink.dropped(), 0);
    writer.finish();
}

#[test]
fn a_fail_closed_pipeline_refuses_new_flows_while_the_store_fails() {
    let dir_tmp = tempdir("closed");
    let dir = dir_tmp.path().to_path_buf();
    let opts = PipelineOptions {
        on_failure: FailurePolicy::FailClosed,
        ..options(&dir)
    };
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    assert!(sink.admits_new_flows());
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch("ALTER TABLE flows RENAME TO held_aside")
        .unwrap();
    sink.offer(flow_start("acme", 1));
    wait("the refusal", || !sink.admits_new_flows());
    other
        .execute_batch("ALTER TABLE held_aside RENAME TO flows")
        .unwrap();
    wait("new flows admitted again", || sink.admits_new_flows());
    writer.finish();
}

#[test]
fn a_full_queue_drops_and_counts_per_kind() {
    let dir_tmp = tempdir("full");
    let dir = dir_tmp.path().to_path_buf();
    let opts = PipelineOptions {
        queue: 4,
        on_overflow: OverflowPolicy::BlockNewFlows,
        ..options(&dir)
    };
    let (sink, writer) = start(opts).unwrap();
    // Hold the writer: it cannot commit while another connection holds the write lock.
    let other = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let c = sink.counters().clone();
    let mut seq = 0;
    // The writer soon waits for the lock with its batch; then the queue fills.
    wait("a dropped record", || {
        seq += 1;
        sink.offer(FlowEvent::Established {
            seq: FlowSeq::new(seq),
            at: Instant::now(),
        });
        c.lost_total(RecordKind::Flow, LossReason::QueueFull) > 0
    });
    assert!(
        !sink.admits_new_flows(),
        "block_new_flows with a full queue"
    );
    other.execute_batch("COMMIT").unwrap();
    writer.finish();
}

#[test]
fn review_pages_are_scoped_before_the_limit_and_follow_their_cursor() {
    let dir_tmp = tempdir("pages");
    let dir = dir_tmp.path().to_path_buf();
    let opts = options(&dir);
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    // Interleaved tenants: a scope applied after the limit would return short or empty pages.
    for seq in 1..=6 {
        let tenant = if seq % 2 == 0 { "acme" } else { "beta" };
        sink.offer(flow_start(tenant, seq));
        sink.http()
            .emit(http(tenant, "a.example", 1000 * seq as i64, seq));
    }
    writer.finish();
    let store = FlowStore::open(&db).unwrap();
    let acme = |before| FlowFilter {
        tenant_in: Some(vec!["acme".into()]),
        before,
        limit: 2,
        ..Default::default()
    };
    let first = store.flows(&acme(None)).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|f| f.tenant == "acme"));
    let last = &first[1];
    let second = store
        .flows(&acme(Some((last.started_ms, last.id))))
        .unwrap();
    assert_eq!(second.len(), 1, "the third acme flow, after the cursor");
    assert!(second[0].id < last.id && second[0].tenant == "acme");
    // Each acme flow has its HTTP request linked; no SSH session on an HTTP flow.
    let links = store.links(&first[0]).unwrap();
    assert_eq!((links.http_requests, links.ssh_session), (1, None));
    let page = |before| {
        query(
            &db,
            &HttpFilter {
                tenant_in: Some(vec!["beta".into()]),
                before,
                limit: 2,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let p1 = page(None);
    assert_eq!(
        p1.iter().map(|r| r.record.at_ms).collect::<Vec<_>>(),
        [5000, 3000]
    );
    let p2 = page(Some((p1[1].record.at_ms, p1[1].id)));
    assert_eq!(
        p2.iter().map(|r| r.record.at_ms).collect::<Vec<_>>(),
        [1000]
    );
}

/// The shutdown's bounded drain: what was queued before it is committed, and the writer stops.
#[test]
fn finish_within_commits_what_is_queued_and_stops_the_writer() {
    let dir_tmp = tempdir("finish-within");
    let opts = options(dir_tmp.path());
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    for host in ["a.example", "b.example", "c.example"] {
        sink.http().emit(http("acme", host, 1000, 1));
    }
    assert!(writer.finish_within(Duration::from_secs(30)));
    let hosts: Vec<String> = all_http(&db).into_iter().map(|r| r.record.host).collect();
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    // After the stop, a record is refused (counted), not committed.
    sink.http().emit(http("acme", "late.example", 2000, 1));
    assert_eq!(all_http(&db).len(), 3);
    assert!(sink.http().dropped() >= 1);
}
