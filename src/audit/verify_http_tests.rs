//! `audit verify` against forged HTTP records (issue 11, finding 15): every stored field of a request record
//! and of a TLS connection record, a record removed from the middle or the tail, rows added behind the
//! gateway's back (copies of a chained row, rows numbered outside the chain) and a record linked to another
//! flow's row. Each attack is checked against the untouched store first, and undone to show the store
//! verifies again. Stores from before the chain verify and name their HTTP rows as not covered.

use super::http_records::HttpRecord;
use super::pipeline_tests::{flow_start, http, options, tempdir};
use super::verify_tests::{broken, last_seq, run, sql, Store};
use super::*;
use crate::core::{EndReason, FlowSeq};

/// Flows 1..=3 with a plain request, a blocked one, a TLS connection passed through and a failed request,
/// the flows' ends, then one more request (the store's last record before `run.end`).
fn http_store(tag: &str) -> Store {
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
    for i in 1..=3 {
        sink.offer(flow_start("acme", i));
    }
    let h = sink.http();
    h.emit(HttpRecord {
        ref_id: "r-get".into(),
        path: "/a".into(),
        ..http("acme", "a.example", 1001, 1)
    });
    h.emit(HttpRecord {
        ref_id: "r-blocked".into(),
        path: "/admin/panel".into(),
        status: Some(403),
        decision: super::http_records::HttpDecision::Block,
        rule: Some("no-admin".into()),
        ..http("acme", "b.example", 1002, 2)
    });
    h.emit(HttpRecord {
        ref_id: "r-tls".into(),
        scheme: "tls".into(),
        sni: Some("c.example".into()),
        method: "-".into(),
        path: String::new(),
        status: None,
        req_bytes: 500,
        resp_bytes: 900,
        decision: super::http_records::HttpDecision::Passthrough,
        ..http("acme", "c.example", 1003, 3)
    });
    h.emit(HttpRecord {
        ref_id: "r-error".into(),
        status: None,
        decision: super::http_records::HttpDecision::Error,
        error: Some("upstream reset the connection".into()),
        ..http("acme", "a.example", 1004, 1)
    });
    for i in 1..=3 {
        sink.offer(FlowEvent::End {
            seq: FlowSeq::new(i),
            at: std::time::Instant::now(),
            packets: [1, 1],
            bytes: [10, 20],
            reason: EndReason::TcpFin,
        });
    }
    h.emit(HttpRecord {
        ref_id: "r-last".into(),
        path: "/last".into(),
        ..http("acme", "a.example", 1005, 1)
    });
    writer.finish();
    Store {
        dir,
        db: db.clone(),
        heads,
        _tmp: dir_tmp,
    }
}

fn query_i64(s: &Store, q: &str) -> i64 {
    rusqlite::Connection::open(&s.db)
        .unwrap()
        .query_row(q, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{q}: {e}"))
}

/// Row id and chain entry of the record with `ref_id`.
fn row_of(s: &Store, ref_id: &str) -> (i64, i64) {
    let id = query_i64(
        s,
        &format!("SELECT id FROM http_requests WHERE ref_id = '{ref_id}'"),
    );
    let seq = query_i64(
        s,
        &format!("SELECT chain_seq FROM http_requests WHERE id = {id}"),
    );
    (id, seq)
}

fn passes(s: &Store, context: &str) {
    let r = run(s, true);
    assert!(r.first_break.is_none(), "{context}: {r:?}");
}

/// Every column but the row id (what a forger copies into an added row).
const COLUMNS: &str = "at_ms, ref_id, flow_seq, flow_id, tenant, device, user, src, dst, scheme, sni, method, host, \
                       path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error, run_id";

#[test]
fn each_stored_field_of_an_http_or_tls_record_is_covered() {
    let s = http_store("http-fields");
    let r = run(&s, true);
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.by_kind["http"], 5, "{r:?}");
    for (ref_id, column, forged) in [
        ("r-blocked", "path", "'/public'"),
        ("r-blocked", "decision", "'allow'"),
        ("r-blocked", "status", "200"),
        ("r-blocked", "rule", "NULL"),
        ("r-get", "host", "'other.example'"),
        ("r-get", "method", "'POST'"),
        ("r-get", "at_ms", "at_ms + 1"),
        ("r-get", "user", "'mallory@example.com'"),
        ("r-get", "tenant", "'globex'"),
        ("r-get", "device", "'phone'"),
        ("r-get", "src", "'100.96.0.9:40000'"),
        ("r-get", "dst", "'198.18.1.9:80'"),
        ("r-get", "flow_rule", "'other'"),
        ("r-get", "flow_seq", "flow_seq + 1"),
        ("r-get", "flow_id", "NULL"),
        ("r-get", "run_id", "run_id + 1"),
        ("r-get", "ref_id", "'r-other'"),
        ("r-get", "duration_ms", "duration_ms + 1"),
        ("r-tls", "sni", "'d.example'"),
        ("r-tls", "scheme", "'https'"),
        ("r-tls", "status", "200"),
        ("r-tls", "req_bytes", "0"),
        ("r-tls", "resp_bytes", "resp_bytes - 1"),
        ("r-error", "error", "NULL"),
        ("r-error", "decision", "'allow'"),
    ] {
        let (id, seq) = row_of(&s, ref_id);
        let conn = rusqlite::Connection::open(&s.db).unwrap();
        let old: String = conn
            .query_row(
                &format!("SELECT quote({column}) FROM http_requests WHERE id = {id}"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        sql(
            &s.db,
            &format!("UPDATE http_requests SET {column} = {forged} WHERE id = {id}"),
        );
        let what = broken(&run(&s, true));
        assert!(
            what.contains(&format!("record {seq} (HTTP request ref "))
                && what.contains("was altered"),
            "{ref_id}.{column}: {what}"
        );
        sql(
            &s.db,
            &format!("UPDATE http_requests SET {column} = {old} WHERE id = {id}"),
        );
        passes(&s, &format!("{ref_id}.{column} restored"));
    }
}

#[test]
fn an_http_record_removed_from_the_middle_is_found() {
    let s = http_store("http-middle");
    passes(&s, "untouched");
    let (id, seq) = row_of(&s, "r-blocked");
    sql(&s.db, &format!("DELETE FROM http_requests WHERE id = {id}"));
    let what = broken(&run(&s, true));
    assert!(
        what.contains(&format!("record {seq} (http) was removed from its table")),
        "{what}"
    );
    // The row and its chain entry: the chain has a hole.
    sql(&s.db, &format!("DELETE FROM chain WHERE seq = {seq}"));
    let what = broken(&run(&s, true));
    assert!(what.contains(&format!("record {seq} is missing")), "{what}");
}

#[test]
fn a_removed_http_tail_is_found_with_the_exported_head() {
    let s = http_store("http-tail");
    passes(&s, "untouched");
    // The last HTTP record, what follows it (run.end) and the checkpoints naming them: consistent on its own.
    let (_, cut) = row_of(&s, "r-last");
    assert_eq!(
        cut,
        last_seq(&s.db) - 1,
        "r-last is followed by run.end only"
    );
    sql(
        &s.db,
        &format!(
            "DELETE FROM http_requests WHERE chain_seq >= {cut}; DELETE FROM events WHERE seq >= {cut};
             DELETE FROM chain WHERE seq >= {cut}; DELETE FROM checkpoints WHERE seq >= {cut};"
        ),
    );
    assert!(
        run(&s, false).first_break.is_none(),
        "the cut store is consistent on its own"
    );
    let what = broken(&run(&s, true));
    assert!(
        what.contains(&format!("the store ends at record {}", cut - 1))
            && what.contains("the tail was removed"),
        "{what}"
    );
}

#[test]
fn http_rows_added_behind_the_gateways_back_are_found() {
    let s = http_store("http-added");
    passes(&s, "untouched");
    let (_, seq) = row_of(&s, "r-blocked");
    let flow_start_seq = query_i64(&s, "SELECT min(seq) FROM chain WHERE kind = 'flow.start'");
    let beyond = last_seq(&s.db) + 10;
    for (what_row, chain_seq, path, expect) in [
        // A copy of a chained row, as is or changed (review shows both rows).
        ("an exact copy", seq.to_string(), "path", "a copy was added"),
        (
            "a changed copy",
            seq.to_string(),
            "'/forged'",
            "a copy was added",
        ),
        // Rows numbered where no HTTP entry is: before the chain's first record, on another kind's entry,
        // after its end, or not numbered at all.
        (
            "a row numbered 0",
            "0".into(),
            "'/forged'",
            "no HTTP entry of the chain vouches for",
        ),
        (
            "a negative number",
            "-1".into(),
            "'/forged'",
            "no HTTP entry of the chain vouches for",
        ),
        (
            "another kind's entry",
            flow_start_seq.to_string(),
            "'/forged'",
            "no HTTP entry of the chain vouches for",
        ),
        (
            "beyond the chain",
            beyond.to_string(),
            "'/forged'",
            "no HTTP entry of the chain vouches for",
        ),
        (
            "a number that is text",
            "'seven'".into(),
            "'/forged'",
            "no HTTP entry of the chain vouches for",
        ),
        (
            "an unnumbered row",
            "NULL".into(),
            "'/forged'",
            "outside the chain",
        ),
    ] {
        let select = COLUMNS.replace("path", path);
        sql(
            &s.db,
            &format!(
                "INSERT INTO http_requests ({COLUMNS}, chain_seq)
                 SELECT {select}, {chain_seq} FROM http_requests WHERE ref_id = 'r-blocked'"
            ),
        );
        let what = broken(&run(&s, true));
        assert!(
            what.contains(expect) && what.contains("http_requests"),
            "{what_row}: {what}"
        );
        sql(
            &s.db,
            "DELETE FROM http_requests WHERE id = (SELECT max(id) FROM http_requests)",
        );
        passes(&s, &format!("{what_row} removed again"));
    }
}

#[test]
fn an_http_record_linked_to_another_flows_row_is_found() {
    let s = http_store("http-link");
    passes(&s, "untouched");
    let f1 = query_i64(
        &s,
        "SELECT flow_id FROM http_requests WHERE ref_id = 'r-get'",
    );
    let f2 = query_i64(
        &s,
        "SELECT flow_id FROM http_requests WHERE ref_id = 'r-blocked'",
    );
    // Swapping two flow rows' ids would make `audit http --flow` and the review UI show the requests under the
    // other flow. Flow records hash their row id, so the first flow's own record breaks first (entries from
    // before that are still caught by the HTTP record's own (run, flow seq), `check_http_rows`).
    sql(
        &s.db,
        &format!(
            "UPDATE flows SET id = -1 WHERE id = {f1}; UPDATE flows SET id = {f1} WHERE id = {f2};
             UPDATE flows SET id = {f2} WHERE id = -1;"
        ),
    );
    let what = broken(&run(&s, true));
    assert!(
        what.contains("was altered") && what.contains(&format!("(flow row {f2})")),
        "{what}"
    );
    // Renumbered away: the link leads nowhere while the flow's row is still there.
    sql(
        &s.db,
        &format!(
            "UPDATE flows SET id = -1 WHERE id = {f1}; UPDATE flows SET id = {f1} WHERE id = {f2};
             UPDATE flows SET id = {f2} WHERE id = -1; UPDATE flows SET id = 1000 WHERE id = {f1};"
        ),
    );
    let what = broken(&run(&s, true));
    assert!(
        what.contains("was altered") && what.contains("(flow row 1000)"),
        "{what}"
    );
    sql(
        &s.db,
        &format!("UPDATE flows SET id = {f1} WHERE id = 1000"),
    );
    passes(&s, "flow rows numbered back");
}

#[test]
fn a_store_from_before_the_chain_verifies_and_names_its_http_rows_as_not_covered() {
    let dir_tmp = tempdir("http-legacy");
    let dir = dir_tmp.path().to_path_buf();
    let db = dir.join("audit.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(db::SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        for (i, path) in ["/old-1", "/old-2"].iter().enumerate() {
            c.execute(
                "INSERT INTO http_requests (at_ms, ref_id, flow_seq, tenant, device, user, src, dst, scheme, method,
                    host, path, status, req_bytes, resp_bytes, duration_ms, flow_rule, decision)
                 VALUES (?1, 'old', 1, 'acme', 'laptop', 'alice@example.com', '100.96.0.2:40000', '198.18.1.2:80',
                    'http', 'GET', 'a.example', ?2, 200, 0, 10, 3, 'web', 'allow')",
                rusqlite::params![500 + i as i64, path],
            )
            .unwrap();
        }
    }
    let (sink, writer) = start(options(&dir)).unwrap();
    sink.offer(flow_start("acme", 1));
    sink.http().emit(http("acme", "a.example", 1001, 1));
    writer.finish();
    let s = Store {
        dir: dir.clone(),
        db: db.clone(),
        heads: dir.join("no-heads"),
        _tmp: dir_tmp,
    };
    let r = run(&s, false);
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.by_kind["http"], 1, "{r:?}");
    assert_eq!(r.unchained_rows, 2, "{r:?}");
    assert_eq!(r.unchained_by_table.get("http_requests"), Some(&2), "{r:?}");
    // Not covered means what it says: a changed old row is not found ...
    sql(
        &db,
        "UPDATE http_requests SET path = '/changed' WHERE path = '/old-1'",
    );
    assert!(run(&s, false).first_break.is_none());
    // ... but one more row outside the chain is.
    sql(
        &db,
        &format!(
            "INSERT INTO http_requests ({COLUMNS}) SELECT {COLUMNS} FROM http_requests WHERE path = '/old-2'"
        ),
    );
    let what = broken(&run(&s, false));
    assert!(what.contains("outside the chain"), "{what}");
}
