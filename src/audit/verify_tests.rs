//! `audit verify` against stores a forger changed: each attack the chain, the pinned key and the exported
//! head must catch, each with the untouched store passing first.

use std::path::{Path, PathBuf};
use std::time::Instant;

use russh::keys::ssh_key::PublicKey;

use super::pipeline_tests::{flow_start, http, options, tempdir};
use super::review::verify::{pick_head, verify, VerifyReport};
use super::tables::chain::{self, Checkpoint};
use super::*;
use crate::core::{EndReason, FlowSeq};

pub(super) struct Store {
    pub(super) dir: PathBuf,
    pub(super) db: PathBuf,
    pub(super) heads: PathBuf,
    /// Holds `dir`: removed when the store drops, also after a failure.
    pub(super) _tmp: tempfile::TempDir,
}

/// A store with flows, HTTP records and a few checkpoints, its heads exported to a file.
fn store(tag: &str) -> Store {
    store_with(tag, |_| {})
}

/// Like `store`, with more records from `extra` after the flows.
fn store_with(tag: &str, extra: impl FnOnce(&AuditSink)) -> Store {
    let dir_tmp = tempdir(tag);
    let dir = dir_tmp.path().to_path_buf();
    let heads = dir.join("elsewhere").join("heads.log");
    std::fs::create_dir_all(heads.parent().unwrap()).unwrap();
    let opts = PipelineOptions {
        checkpoint_every: 4,
        checkpoint_sink: CheckpointSink::File(heads.clone()),
        ..options(&dir)
    };
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    for i in 1..=6 {
        sink.offer(flow_start("acme", i));
        sink.http()
            .emit(http("acme", &format!("h{i}.example"), 1000 + i as i64, i));
        sink.offer(FlowEvent::End {
            seq: FlowSeq::new(i),
            at: Instant::now(),
            packets: [1, 1],
            bytes: [10, 20],
            reason: EndReason::TcpFin,
        });
    }
    extra(&sink);
    writer.finish();
    Store {
        dir,
        db,
        heads,
        _tmp: dir_tmp,
    }
}

fn pinned(s: &Store) -> PublicKey {
    let text = std::fs::read_to_string(s.dir.join("audit_signing_key.pub")).unwrap();
    PublicKey::from_openssh(text.trim()).unwrap()
}

pub(super) fn run(s: &Store, head: bool) -> VerifyReport {
    let conn = db::open_readonly(&s.db).unwrap();
    let key = pinned(s);
    let head: Option<Checkpoint> =
        head.then(|| pick_head(&std::fs::read_to_string(&s.heads).unwrap(), &key).unwrap());
    verify(&conn, &s.dir, &key, head.as_ref()).unwrap()
}

pub(super) fn broken(r: &VerifyReport) -> String {
    r.first_break
        .as_ref()
        .map(|b| b.what.clone())
        .unwrap_or_else(|| panic!("verify passed: {r:?}"))
}

pub(super) fn sql(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(sql).unwrap();
}

pub(super) fn last_seq(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT max(seq) FROM chain", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn an_untouched_store_verifies_with_the_pinned_key_and_its_head() {
    let s = store("ok");
    let r = run(&s, true);
    assert!(r.first_break.is_none(), "{r:?}");
    // chain.start, run.start, 6 flows x (start, end), 6 HTTP records, run.end.
    assert_eq!(r.records, 2 + 12 + 6 + 1);
    assert_eq!(r.by_kind["http"], 6);
    assert_eq!(r.unsigned_tail, 0, "finish signs the last records");
    assert_eq!(r.head_seq, Some(r.last_seq));
    assert!(r.checkpoints >= 2, "{r:?}");
}

#[test]
fn a_changed_byte_in_any_record_is_found() {
    for (table, change) in [
        ("http", "UPDATE http_requests SET path = '/y' WHERE chain_seq = (SELECT min(chain_seq) FROM http_requests)"),
        ("flow", "UPDATE flows SET bytes_in = bytes_in + 1 WHERE seq = 3"),
        ("event", "UPDATE events SET body = replace(body, 'true', 'false') WHERE kind = 'run.start'"),
    ] {
        let s = store(table);
        assert!(run(&s, true).first_break.is_none());
        sql(&s.db, change);
        let what = broken(&run(&s, true));
        assert!(what.contains("was altered"), "{table}: {what}");
    }
}

#[test]
fn a_record_removed_from_the_middle_is_found() {
    let s = store("middle");
    assert!(run(&s, false).first_break.is_none());
    // The row only, then the row and its chain entry.
    sql(
        &s.db,
        "DELETE FROM http_requests WHERE chain_seq = (SELECT min(chain_seq) FROM http_requests)",
    );
    let what = broken(&run(&s, false));
    assert!(what.contains("was removed from its table"), "{what}");
    sql(
        &s.db,
        "DELETE FROM chain WHERE seq = (SELECT min(seq) FROM chain WHERE kind = 'http')",
    );
    let what = broken(&run(&s, false));
    assert!(what.contains("is missing"), "{what}");
}

#[test]
fn a_removed_tail_is_found_with_the_exported_head() {
    let s = store("tail");
    assert!(run(&s, true).first_break.is_none());
    // Cut the last records and every checkpoint that named them: the store agrees with itself again.
    let cut = last_seq(&s.db) - 5;
    sql(
        &s.db,
        &format!(
            "DELETE FROM http_requests WHERE chain_seq > {cut}; DELETE FROM events WHERE seq > {cut};
             UPDATE flows SET end_chain = NULL, ended_ms = NULL, end_reason = NULL WHERE end_chain > {cut};
             DELETE FROM flows WHERE start_chain > {cut}; DELETE FROM chain WHERE seq > {cut};
             DELETE FROM checkpoints WHERE seq > {cut};"
        ),
    );
    assert!(
        run(&s, false).first_break.is_none(),
        "the cut store is consistent on its own"
    );
    let what = broken(&run(&s, true));
    assert!(what.contains("the tail was removed"), "{what}");
}

#[test]
fn a_store_re_signed_with_another_key_is_found() {
    let s = store("resign");
    assert!(run(&s, false).first_break.is_none());
    // The forger edits a record, recomputes the chain from there and signs it with a key of their own.
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    conn.execute_batch("UPDATE http_requests SET host = 'forged.example' WHERE chain_seq = (SELECT min(chain_seq) FROM http_requests)")
        .unwrap();
    let mut prev = vec![0u8; 32];
    for e in chain::entries_after(&conn, 0, 1000).unwrap() {
        let canonical = match e.kind.as_str() {
            tables::http::KIND => tables::http::canonical(&conn, e.seq),
            k if k.starts_with("flow.") => tables::flows::canonical(&conn, k, e.seq),
            _ => tables::events::canonical(&conn, e.seq),
        }
        .unwrap()
        .unwrap();
        let digest = chain::digest(&canonical);
        let hash = chain::entry_hash(&prev, e.seq, &e.kind, e.at_ms, &digest);
        conn.execute(
            "UPDATE chain SET digest = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
            rusqlite::params![e.seq as i64, digest, prev, hash],
        )
        .unwrap();
        prev = hash;
    }
    conn.execute_batch("DELETE FROM checkpoints").unwrap();
    let forger = crate::keys::openssh::new_ed25519("forger").unwrap();
    chain::checkpoint(&conn, &forger, 1).unwrap().unwrap();
    drop(conn);
    let what = broken(&run(&s, false));
    assert!(what.contains("not the pinned key"), "{what}");
}

#[test]
fn lost_records_leave_a_signed_gap_record_naming_them() {
    let dir_tmp = tempdir("gap");
    let dir = dir_tmp.path().to_path_buf();
    let opts = PipelineOptions {
        queue: 4,
        tenants: 2,
        ..options(&dir)
    };
    let db = opts.db.clone();
    let (sink, writer) = start(opts).unwrap();
    // Hold the writer on the lock so the queue fills.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let c = sink.counters().clone();
    let mut i = 0;
    while c.lost_total(RecordKind::Http, LossReason::TenantShare)
        + c.lost_total(RecordKind::Http, LossReason::QueueFull)
        == 0
    {
        i += 1;
        assert!(i < 1_000_000, "nothing was dropped");
        sink.http().emit(http("acme", "flood.example", i, 1));
    }
    other.execute_batch("COMMIT").unwrap();
    writer.finish();
    let lost = c.lost_total(RecordKind::Http, LossReason::TenantShare)
        + c.lost_total(RecordKind::Http, LossReason::QueueFull);
    let conn = db::open_readonly(&db).unwrap();
    let body: String = conn
        .query_row("SELECT body FROM events WHERE kind = 'gap'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["records_lost"].as_u64(), Some(lost), "{body}");
    assert!(body["lost"]["http"].is_object(), "{body}");
    let key = {
        let t = std::fs::read_to_string(dir.join("audit_signing_key.pub")).unwrap();
        PublicKey::from_openssh(t.trim()).unwrap()
    };
    let r = verify(&conn, &dir, &key, None).unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!((r.gaps, r.records_lost), (1, lost));
}

#[test]
fn an_unreadable_signing_key_is_an_error_not_a_new_key() {
    let dir_tmp = tempdir("key");
    let dir = dir_tmp.path().to_path_buf();
    let key = dir.join("audit_signing_key");
    std::fs::write(&key, "not a key").unwrap();
    let e = start(options(&dir)).err().unwrap().to_string();
    assert!(e.contains("restore it"), "{e}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key");
}

/// Every kind of record: the flows and HTTP records of `store`, a flow no HTTP record links to, an enrollment
/// record and a review UI record.
fn store_all_kinds(tag: &str) -> Store {
    store_with(tag, |sink| {
        sink.offer(flow_start("acme", 7));
        sink.enroll().emit(enroll_records::EnrollRecord {
            at_ms: 5000,
            event: enroll_records::EnrollEvent::TokenCreated,
            actor: "admin:root".into(),
            tenant: Some("acme".into()),
            device: None,
            device_name: None,
            token: Some("tok1".into()),
            source: None,
            detail: serde_json::json!({}),
        });
        sink.admin().emit(admin_records::AdminRecord {
            at_ms: 5001,
            event: admin_records::AdminEvent::LoginSucceeded,
            actor: "alice".into(),
            tenant: None,
            session_id: None,
            source: Some("127.0.0.1".into()),
            detail: serde_json::json!({}),
        });
    })
}

/// The break's record number and text.
fn break_of(r: &VerifyReport) -> (u64, String) {
    let b = r
        .first_break
        .as_ref()
        .unwrap_or_else(|| panic!("verify passed: {r:?}"));
    (b.seq, b.what.clone())
}

/// A store of every record kind verifies (the control); after `forge` (SQL) it breaks at a row "not in the
/// chain" named by `named`. `check` looks at the untouched store's report first.
fn forged_row_is_found(table: &str, forge: &str, named: &str, check: impl Fn(&VerifyReport)) {
    let s = store_all_kinds(&table.replace(' ', "-"));
    let r = run(&s, true);
    assert!(r.first_break.is_none(), "{table}: {r:?}");
    check(&r);
    sql(&s.db, forge);
    let (_, what) = break_of(&run(&s, true));
    assert!(
        what.contains("not in the chain") && what.contains(named),
        "{table}: {what}"
    );
}

#[test]
fn rows_numbered_below_the_chains_start_are_found() {
    for (table, forge, named) in [
        (
            "ssh_log",
            "INSERT INTO ssh_log (seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login,
                 cert_serial, rule, body)
             VALUES (0, 1, 'session.start', 'acme', 'forged', NULL, 'laptop', 'alice@example.com', '198.18.1.2:22',
                 'root', NULL, 'ssh', '{}')",
            "row 0 of table ssh_log",
        ),
        (
            "events",
            "INSERT INTO events (seq, at_ms, kind, body) VALUES (-3, 1, 'run.start', '{}')",
            "row -3 of table events",
        ),
        (
            "flows start",
            "INSERT INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, dst_device, action,
                 rule, started_ms, start_chain)
             SELECT run_id, 99, tenant, device, user, protocol, src, sport, dst, dport, dst_device, action, rule,
                 started_ms, 0 FROM flows WHERE seq = 1",
            "flow 99 of run",
        ),
        (
            "flows end",
            "UPDATE flows SET end_chain = 0, ended_ms = 1, end_reason = 'tcp_fin' WHERE seq = 7",
            "flow 7 of run",
        ),
        (
            "flows established",
            "UPDATE flows SET est_chain = -1, established_ms = 1 WHERE seq = 7",
            "flow 7 of run",
        ),
    ] {
        forged_row_is_found(table, forge, named, |_| {});
    }
}

#[test]
fn enrollment_and_review_ui_rows_outside_the_chain_are_found() {
    for (table, forge, named) in [
        (
            "enroll_log",
            "INSERT INTO enroll_log (chain_seq, at_ms, event, actor, tenant, detail)
             VALUES (100000, 1, 'device_revoked', 'admin:root', 'acme', '{}')",
            "row 100000 of table enroll_log",
        ),
        (
            "admin_log",
            // Numbered like a flow's chain entry: an entry exists, but not an admin one.
            "INSERT INTO admin_log (chain_seq, at_ms, event, actor, detail)
             SELECT min(start_chain), 1, 'session_read', 'mallory', '{}' FROM flows",
            "of table admin_log",
        ),
        (
            "enroll_log below the start",
            "INSERT INTO enroll_log (chain_seq, at_ms, event, actor, detail)
             VALUES (0, 1, 'token_created', 'admin:root', '{}')",
            "row 0 of table enroll_log",
        ),
    ] {
        forged_row_is_found(table, forge, named, |r| {
            assert_eq!((r.by_kind["enroll"], r.by_kind["admin"]), (1, 1), "{r:?}");
        });
    }
}

#[test]
fn a_renumbered_flow_row_is_found() {
    let s = store_all_kinds("renumber");
    assert!(run(&s, true).first_break.is_none());
    // Flow 7 has no HTTP record linking to it: only its own row knows its id, which review links and URLs use.
    let old: i64 = rusqlite::Connection::open(&s.db)
        .unwrap()
        .query_row("SELECT id FROM flows WHERE seq = 7", [], |r| r.get(0))
        .unwrap();
    sql(&s.db, "UPDATE flows SET id = 1000 WHERE seq = 7");
    let (_, what) = break_of(&run(&s, true));
    assert!(
        what.contains("was altered") && what.contains("flow row 1000"),
        "{what}"
    );
    // Numbered back: it verifies again.
    sql(&s.db, &format!("UPDATE flows SET id = {old} WHERE seq = 7"));
    assert!(run(&s, true).first_break.is_none(), "restored");
}
