//! The size quotas through the real pipeline: a fail-open store over `max_store_bytes` evicts its oldest closed
//! records (open flows and open SSH sessions stay), says so in the chain and still verifies; a forger's removal
//! elsewhere is still found; recordings over `max_recordings_bytes` go with their ended sessions; a fail-closed
//! gateway refuses new flows while over a quota and admits them again once there is room.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use russh::keys::ssh_key::PublicKey;

use super::pipeline_tests::{flow_start, http, options, tempdir};
use super::review::verify::{verify, VerifyReport};
use super::ssh_records::{
    file_sha256, ChannelClose, Command, CommandSource, CommandText, Confidence, RecordingFormat,
    RecordingInfo, SessionEnd, SessionKeys, SshEvent, SshRecord,
};
use super::*;
use crate::core::{EndReason, FlowSeq};

/// Flows 1..=OPEN start first and stay open; the closed ones follow.
const OPEN: u64 = 3;
const QUOTA: u64 = 256 << 10;

struct Store {
    dir: PathBuf,
    db: PathBuf,
    /// Holds `dir`: removed when the store drops, also after a failure.
    _tmp: tempfile::TempDir,
}

/// A counter as `/metrics` exports it (the audit counters' collector in a registry of their own).
fn scraped(counters: &Arc<AuditCounters>, name: &str) -> f64 {
    let mut reg = crate::metrics::MetricsRegistry::new();
    reg.collect(counters.clone());
    crate::metrics::exposition::value(&reg.encode(), name, &[])
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn quota_options(dir: &Path) -> PipelineOptions {
    PipelineOptions {
        checkpoint_every: 64,
        quota_check_interval: Duration::from_millis(20),
        max_store_bytes: QUOTA,
        ..options(dir)
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn end(seq: u64) -> FlowEvent {
    FlowEvent::End {
        seq: FlowSeq::new(seq),
        at: Instant::now(),
        packets: [1, 1],
        bytes: [10, 20],
        reason: EndReason::TcpFin,
    }
}

/// Offers closed flows (with an HTTP record each), in batches the writer keeps up with, until `done`. Paced on
/// the writer, not the clock: the next batch goes only once the writer has taken the last one (written or lost),
/// so the bounded queue never overflows however slow the machine is (`offer` never blocks; a full queue drops).
fn closed_flows(sink: &AuditSink, from: u64, mut done: impl FnMut() -> bool) -> u64 {
    let counters = sink.counters().clone();
    let taken = || {
        [RecordKind::Flow, RecordKind::Http]
            .into_iter()
            .map(|k| {
                counters.written_total(k)
                    + LossReason::ALL
                        .into_iter()
                        .map(|r| counters.lost_total(k, r))
                        .sum::<u64>()
            })
            .sum::<u64>()
    };
    let base = taken();
    let mut offered = 0;
    let mut seq = from;
    while !done() {
        for _ in 0..200 {
            sink.offer(flow_start("acme", seq));
            sink.http().emit(http("acme", "h.example", 1000, seq));
            sink.offer(end(seq));
            seq += 1;
            offered += 3;
        }
        wait("the writer to take a batch", || taken() >= base + offered);
        assert!(seq < 200_000, "the store never reached its quota");
    }
    seq
}

/// A fail-open store that went over its quota once: flows 1..=OPEN open, then closed flows until an eviction,
/// then flow 1 ends (after its start was evicted) and a few more closed flows follow.
fn evicted_store(tag: &str) -> Store {
    let dir_tmp = tempdir(tag);
    let dir = dir_tmp.path().to_path_buf();
    let opts = quota_options(&dir);
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    for i in 1..=OPEN {
        sink.offer(flow_start("acme", i));
    }
    let counters = sink.counters().clone();
    let next = closed_flows(&sink, OPEN + 1, || counters.evictions() > 0);
    sink.offer(end(1));
    for i in next..next + 20 {
        sink.offer(flow_start("acme", i));
        sink.offer(end(i));
    }
    writer.finish();
    Store {
        dir,
        db,
        _tmp: dir_tmp,
    }
}

fn pinned(dir: &Path) -> PublicKey {
    let text = std::fs::read_to_string(dir.join("audit_signing_key.pub")).unwrap();
    PublicKey::from_openssh(text.trim()).unwrap()
}

fn run_verify(s: &Store) -> VerifyReport {
    let conn = db::open_readonly(&s.db).unwrap();
    verify(&conn, &s.dir, &pinned(&s.dir), None).unwrap()
}

fn broken(r: &VerifyReport) -> String {
    r.first_break
        .as_ref()
        .map(|b| b.what.clone())
        .unwrap_or_else(|| panic!("verify passed: {r:?}"))
}

fn q<T: rusqlite::types::FromSql>(db: &Path, sql: &str) -> T {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn sql(db: &Path, sql: &str) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

fn eviction_bodies(db: &Path) -> Vec<serde_json::Value> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c
        .prepare("SELECT body FROM events WHERE kind = 'eviction' ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|b| serde_json::from_str(&b.unwrap()).unwrap())
        .collect();
    rows
}

#[test]
fn fail_open_at_the_quota_evicts_the_oldest_closed_records_says_so_in_the_chain_and_verifies() {
    let s = evicted_store("evict");
    let first: i64 = q(&s.db, "SELECT min(seq) FROM chain");
    assert!(first > 1, "nothing was evicted");
    let ev = eviction_bodies(&s.db);
    let last = ev.last().expect("an eviction record in the chain");
    assert_eq!(last["through_seq"], first - 1, "{last}");
    assert!(
        last["removed"]["flow.start"].as_u64().unwrap() > 0
            && last["removed"]["http"].as_u64().unwrap() > 0
            && last["rows"]["flows"].as_u64().unwrap() > 0,
        "{last}"
    );
    // The oldest closed flows are gone, the newest are there, and the open ones were kept.
    let min_closed: i64 = q(
        &s.db,
        &format!("SELECT min(seq) FROM flows WHERE seq > {OPEN}"),
    );
    assert!(
        min_closed > OPEN as i64 + 1,
        "the oldest closed flow is still there"
    );
    let open: i64 = q(
        &s.db,
        &format!("SELECT count(*) FROM flows WHERE seq <= {OPEN} AND start_chain < {first}"),
    );
    assert_eq!(open, OPEN as i64, "an open flow was evicted");
    let ended: String = q(&s.db, "SELECT end_reason FROM flows WHERE seq = 1");
    assert_eq!(
        ended, "tcp_fin",
        "an open flow kept across the eviction records its end"
    );
    assert!(quota::store_bytes(&db::open_readonly(&s.db).unwrap()).unwrap() <= QUOTA);

    let r = run_verify(&s);
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.evicted_through, Some(first as u64 - 1));
    assert!(r.evicted_records["flow.start"] > 0, "{r:?}");
}

#[test]
fn after_an_eviction_a_record_removed_elsewhere_a_deeper_cut_or_a_kept_row_changed_is_found() {
    type Attack = fn(&Path, i64) -> String;
    let attacks: [(&str, Attack, &str); 6] = [
        (
            "a record removed from the middle",
            |_, first| {
                format!(
                    "DELETE FROM http_requests WHERE chain_seq = (SELECT min(seq) FROM chain WHERE kind = 'http' AND seq > {first} + 10);
                     DELETE FROM chain WHERE seq = (SELECT min(seq) FROM chain WHERE kind = 'http' AND seq > {first} + 10);"
                )
            },
            "is missing",
        ),
        (
            "a cut deeper than the eviction record's",
            |_, first| {
                format!(
                    "DELETE FROM events WHERE seq < {first} + 5; DELETE FROM http_requests WHERE chain_seq < {first} + 5;
                     DELETE FROM flows WHERE seq > {OPEN}
                       AND max(start_chain, coalesce(est_chain, 0), coalesce(end_chain, 0)) < {first} + 5;
                     DELETE FROM chain WHERE seq < {first} + 5;"
                )
            },
            "without an eviction record saying so",
        ),
        (
            "a kept open flow changed",
            |_, _| "UPDATE flows SET dst = '198.18.9.9' WHERE seq = 2".into(),
            "kept open across the eviction",
        ),
        (
            "a kept open flow removed",
            |_, _| "DELETE FROM flows WHERE seq = 3".into(),
            "kept open across the eviction",
        ),
        (
            "a row added with an evicted entry's number",
            |_, first| {
                format!(
                    "INSERT INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, action,
                        rule, started_ms, start_chain) VALUES (1, 999999, 'acme', 'laptop', 'mallory', 6, '100.96.0.9',
                        1, '198.18.1.2', 22, 'allow', 'x', 0, {first} - 1)"
                )
            },
            "removed without keeping it",
        ),
        (
            "a flow after the cut given an entry from before it",
            |_, first| {
                format!("UPDATE flows SET est_chain = {first} - 1 WHERE seq = (SELECT max(seq) FROM flows)")
            },
            "entries are out of order",
        ),
    ];
    for (what, attack, expected) in attacks {
        let s = evicted_store("attack");
        let r = run_verify(&s);
        assert!(r.first_break.is_none(), "before {what}: {r:?}");
        let first: i64 = q(&s.db, "SELECT min(seq) FROM chain");
        sql(&s.db, &attack(&s.db, first));
        let why = broken(&run_verify(&s));
        assert!(why.contains(expected), "{what}: {why}");
    }
}

fn ssh(session: &str, i: u32, event: SshEvent) -> SshRecord {
    SshRecord {
        at_ms: 1_700_000_000_000 + i64::from(i),
        keys: SessionKeys {
            tenant: "acme".into(),
            session_id: session.into(),
            device: "laptop".into(),
            user: "alice".into(),
            target: "10.0.0.5:22".into(),
            login: "root".into(),
            cert_serial: None,
            rule: "ssh".into(),
        },
        channel_seq: Some(0),
        event,
    }
}

/// A session's recording (100 KiB) and the records of its channel: a command and the close naming the file.
fn ssh_channel(dir: &Path, sink: &AuditSink, session: &str) -> PathBuf {
    let rel = format!("recordings/acme/{session}/ch0.rec");
    let path = dir.join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![b'x'; 100 << 10]).unwrap();
    let (sha, size) = file_sha256(&path).unwrap();
    let out = sink.ssh();
    out.emit(ssh(
        session,
        1,
        SshEvent::Command(Command {
            seq: 0,
            source: CommandSource::Exec,
            confidence: Confidence::Exact,
            command: CommandText::new(b"id", None),
        }),
    ));
    out.emit(ssh(
        session,
        2,
        SshEvent::ChannelClose(ChannelClose {
            duration_ms: 1,
            exit_status: Some(0),
            exit_signal: None,
            core_dumped: false,
            error: None,
            bytes_in: 1,
            bytes_out: 1,
            recording: Some(RecordingInfo {
                path: rel,
                format: RecordingFormat::RampartRecV1,
                pty: false,
                sha256: Some(sha),
                size,
                complete: true,
                error: None,
            }),
        }),
    ));
    path
}

#[test]
fn recordings_over_their_quota_go_with_the_oldest_ended_session_and_open_sessions_stay() {
    let dir_tmp = tempdir("recq");
    let dir = dir_tmp.path().to_path_buf();
    let opts = PipelineOptions {
        quota_check_interval: Duration::from_millis(20),
        max_recordings_bytes: 250 << 10,
        ..options(&dir)
    };
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    let counters = sink.counters().clone();
    // Oldest first: an open session, an ended one, then one more ended session that goes over the quota.
    let open = ssh_channel(&dir, &sink, "s-open");
    let old = ssh_channel(&dir, &sink, "s-old");
    let ended = |sink: &AuditSink, s: &str| {
        sink.ssh().emit(ssh(
            s,
            3,
            SshEvent::SessionEnd(SessionEnd {
                started_ms: 0,
                duration_ms: 1,
                reason: crate::audit::ssh_records::SessionEndReason::ClientClosed,
                error: None,
                bytes_client_to_target: 1,
                bytes_target_to_client: 1,
                channels: 1,
            }),
        ))
    };
    ended(&sink, "s-old");
    wait("the records committed", || {
        counters.written_total(RecordKind::Ssh) == 5
    });
    assert_eq!(counters.evictions(), 0, "evicted under the quota");
    let newest = ssh_channel(&dir, &sink, "s-new");
    ended(&sink, "s-new");
    wait("an eviction", || counters.evictions() > 0);
    writer.finish();

    assert!(
        !old.exists(),
        "the ended session's recording is still there"
    );
    assert!(!dir.join("recordings/acme/s-old").exists());
    assert!(open.exists() && newest.exists());
    assert!(quota::dir_bytes(&dir.join("recordings")) <= 250 << 10);
    let sessions = |id: &str| -> i64 {
        q(
            &db,
            &format!("SELECT count(*) FROM ssh_log WHERE session_id = '{id}'"),
        )
    };
    assert_eq!(sessions("s-old"), 0);
    assert_eq!(sessions("s-open"), 2, "an open session lost rows");
    assert_eq!(sessions("s-new"), 3);
    assert_eq!(
        scraped(&counters, "rampart_audit_recordings_evicted_total"),
        1.0
    );
    let s = Store {
        dir,
        db,
        _tmp: dir_tmp,
    };
    let r = run_verify(&s);
    assert!(r.first_break.is_none(), "{r:?}");
    assert!(r.evicted_records["ssh"] >= 3, "{r:?}");
    // The open session's kept recording is still checked.
    std::fs::write(&open, b"changed").unwrap();
    let why = broken(&run_verify(&s));
    assert!(why.contains("s-open/ch0.rec was altered"), "{why}");
}

#[test]
fn fail_closed_over_a_quota_refuses_new_flows_and_admits_them_again_once_there_is_room() {
    let dir_tmp = tempdir("closedq");
    let dir = dir_tmp.path().to_path_buf();
    let opts = PipelineOptions {
        on_failure: FailurePolicy::FailClosed,
        max_recordings_bytes: 64 << 10,
        ..quota_options(&dir)
    };
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    assert!(sink.admits_new_flows());
    // The store: filled past its quota, nothing is evicted and new flows are refused ...
    let counters = sink.counters().clone();
    let s2 = sink.clone();
    let next = closed_flows(&sink, 1, || !s2.admits_new_flows());
    assert!(sink.over_quota());
    assert_eq!(counters.evictions(), 0);
    let lost = counters.lost_total(RecordKind::Flow, LossReason::Evicted);
    assert_eq!(lost, 0);
    let min_flow: i64 = q(&db, "SELECT min(seq) FROM flows");
    assert_eq!(min_flow, 1, "fail_closed evicted records");
    let sample = |name: &str| scraped(&counters, name);
    assert_eq!(sample("rampart_audit_over_quota"), 1.0);
    assert_eq!(sample("rampart_audit_quota_exceeded_total"), 1.0);
    // ... until the operator frees space (archived and pruned the store).
    // (What was queued is written first: fail-closed refuses new flows, not the records of admitted ones.)
    wait("the queue written", || {
        counters.written_total(RecordKind::Flow) == 2 * (next - 1)
    });
    assert!(!sink.admits_new_flows());
    sql(
        &db,
        "DELETE FROM http_requests; DELETE FROM flows; DELETE FROM events; DELETE FROM checkpoints;
         DELETE FROM chain;",
    );
    wait("new flows admitted again", || sink.admits_new_flows());
    assert_eq!(sample("rampart_audit_over_quota"), 0.0);
    // The recordings: the same, with their own quota.
    let rec = dir.join("recordings/acme/s1/ch0.rec");
    std::fs::create_dir_all(rec.parent().unwrap()).unwrap();
    std::fs::write(&rec, vec![0u8; 100 << 10]).unwrap();
    wait("the refusal", || !sink.admits_new_flows());
    assert!(rec.exists(), "fail_closed deleted a recording");
    std::fs::remove_file(&rec).unwrap();
    wait("new flows admitted again", || sink.admits_new_flows());
    assert_eq!(sample("rampart_audit_quota_exceeded_total"), 2.0);
    writer.finish();
}
