//! Conformance with `../shared/testdata/ssh-log-cli/` (every vector: decode == `expected/`, re-encode with the
//! vector's ephemeral key == `capture.bin`), round trips with random keys, and malformed input.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/testdata/ssh-log-cli"
);

/// The vectors the README lists; each must be present (more are tested too).
const KNOWN: [&str; 11] = [
    "pty_session",
    "exec_nopty",
    "large_pty",
    "edge_split_records",
    "edge_empty_block",
    "edge_no_exit_zero_len",
    "edge_out_of_order",
    "edge_f32_timing",
    "trailer_error",
    "trailer_core_dumped",
    "trailer_signal_only",
];

/// The vector directory; every test using vectors fails here, with this message, when it is missing.
fn root() -> &'static Path {
    let root = Path::new(VECTORS);
    assert!(
        root.join("reviewer_key").is_file(),
        "ssh-log-cli conformance vectors not found at {VECTORS}: the shared/ directory must sit next to the \
         checkout (CI copies it there); these tests must not pass without them"
    );
    root
}

fn vectors() -> Vec<PathBuf> {
    let root = root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("capture.bin").is_file())
        .collect();
    dirs.sort();
    for name in KNOWN {
        assert!(
            dirs.contains(&root.join(name)),
            "vector {name} missing from {VECTORS}"
        );
    }
    dirs
}

fn reviewer_key() -> ReviewerKey {
    ReviewerKey::read_file(&root().join("reviewer_key")).unwrap()
}

fn recipient_key() -> RecipientKey {
    let text = std::fs::read_to_string(root().join("reviewer_key.pub")).unwrap();
    RecipientKey::from_base64(&text).unwrap()
}

fn name(dir: &Path) -> &str {
    dir.file_name().unwrap().to_str().unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    hex_decode(s).unwrap()
}

#[test]
fn vector_keys_match() {
    let _ = vectors();
    assert_eq!(reviewer_key().public(), recipient_key());
    let text = std::fs::read_to_string(root().join("reviewer_key")).unwrap();
    assert_eq!(text.len(), 44);
    assert!(matches!(
        ReviewerKey::from_base64(&format!("{text}\n")),
        Err(KeyError::Whitespace)
    ));
}

#[test]
fn vectors_decode_like_ssh_log_cli() {
    let key = reviewer_key();
    let dirs = vectors();
    for dir in &dirs {
        let decoded = decode_file(&dir.join("capture.bin"), &key)
            .unwrap_or_else(|e| panic!("{}: {e}", name(dir)));
        let output = decoded.reader_output().unwrap();
        let mut expected_names: Vec<String> = std::fs::read_dir(dir.join("expected"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        expected_names.sort();
        let mut produced: Vec<&str> = output.files().iter().map(|(n, _)| *n).collect();
        produced.sort();
        assert_eq!(produced, expected_names, "{}: output files", name(dir));
        for (file, bytes) in output.files() {
            let expected = std::fs::read(dir.join("expected").join(file)).unwrap();
            assert!(
                bytes == expected.as_slice(),
                "{}/{file} differs:\n--- ours\n{}\n--- ssh-log-cli\n{}",
                name(dir),
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&expected)
            );
        }
        // The quirks that shaped the output are reported, and only there.
        let expected_anomalies = match name(dir) {
            "edge_empty_block" => vec![Anomaly::StoppedAtEmptyBlock {
                block: 1,
                more_follows: true,
            }],
            "edge_out_of_order" => vec![Anomaly::OriginTimeWentBack {
                record: 1,
                previous_us: 2_000_000,
                elapsed_us: 1_000_000,
            }],
            _ => vec![],
        };
        assert_eq!(decoded.anomalies, expected_anomalies, "{}", name(dir));
    }
    eprintln!("{} ssh-log-cli vectors decoded byte for byte", dirs.len());
}

#[test]
fn header_only_fields_are_exposed() {
    let key = reviewer_key();
    let open = |v: &str| decode_file(&root().join(v).join("capture.bin"), &key).unwrap();
    let exec = open("exec_nopty");
    assert!(!exec.is_pty());
    assert_eq!(exec.exit_status(), Some(7));
    assert_eq!(exec.exit().unwrap().timestamp, 1_714_817_002);
    let core = open("trailer_core_dumped");
    assert_eq!(
        (core.exit_signal(), core.core_dumped(), core.exit_status()),
        (Some("SEGV"), true, None)
    );
    let term = open("trailer_signal_only");
    assert_eq!(
        (term.exit_signal(), term.core_dumped()),
        (Some("TERM"), false)
    );
    let err = open("trailer_error");
    assert_eq!(err.error_msg(), Some("upstream connection lost"));
    assert_eq!(err.exit_status(), Some(1));
    let unfinished = open("edge_no_exit_zero_len");
    assert!(unfinished.exit().is_none());
    assert_eq!(unfinished.header.pty.as_ref().unwrap().term, None);
}

struct Layout {
    ikm: [u8; 32],
    blocks: Vec<Option<Vec<u8>>>,
    records: Vec<Value>,
}

fn layout(dir: &Path) -> Layout {
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("layout.json")).unwrap()).unwrap();
    let ikm = hex(v["ephemeral_ikm_hex"].as_str().unwrap())
        .try_into()
        .unwrap();
    let blocks = v["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["plaintext_hex"].as_str().map(hex))
        .collect();
    Layout {
        ikm,
        blocks,
        records: v["records"].as_array().unwrap().clone(),
    }
}

fn metadata(dir: &Path) -> Header {
    serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap()
}

fn new_writer(meta: &Header, ikm: &[u8; 32]) -> CaptureWriter<Cursor<Vec<u8>>> {
    let mut w = CaptureWriter::with_ephemeral_ikm(
        Cursor::new(Vec::new()),
        &recipient_key(),
        meta.started_at,
        meta.pty.clone(),
        ikm,
    )
    .unwrap();
    w.set_block_target(usize::MAX);
    w
}

fn finish(w: CaptureWriter<Cursor<Vec<u8>>>, meta: &Header) -> Vec<u8> {
    let mut out = Vec::new();
    let (summary, _) = w.finish(meta.exit_data.clone(), &mut out).unwrap();
    assert_eq!(summary.data_size, meta.data_size);
    assert_eq!(summary.file_size, out.len() as u64);
    out
}

/// `large_pty`'s records, rebuilt from the README's formula: (source, elapsed_us, data, starts a new block).
fn large_pty_records() -> Vec<(Source, u64, Vec<u8>, bool)> {
    let mut elapsed = 0u64;
    (0..300u64)
        .map(|i| {
            elapsed += 1000 + (7919 * i) % 900_000;
            let (source, data) = if i % 25 == 24 {
                (Source::Client, format!("ls -la /srv/{i:03}\r"))
            } else {
                let lines = (0..50 + i % 7).map(|j| {
                    format!(
                        "{i:03}/{j:02} the quick brown fox jumps over the lazy dog äöü ß € ✓\r\n"
                    )
                });
                (Source::Origin, lines.collect())
            };
            (source, elapsed, data.into_bytes(), i % 10 != 9)
        })
        .collect()
}

#[test]
fn vectors_reencode_byte_for_byte() {
    let mut raw = 0;
    let mut via_records = 0;
    for dir in vectors() {
        let capture = std::fs::read(dir.join("capture.bin")).unwrap();
        let meta = metadata(&dir);
        let layout = layout(&dir);
        let ours = if layout.blocks.iter().all(Option::is_some) {
            // The block plaintexts as given, sealed in order (also the malformed ones: split records, empty block).
            let mut w = new_writer(&meta, &layout.ikm);
            for block in layout.blocks.iter().flatten() {
                w.seal(block).unwrap();
            }
            raw += 1;
            finish(w, &meta)
        } else {
            // large_pty ships without plaintexts: rebuild its records from the README and write them through the
            // record API, checking them against the layout on the way.
            assert_eq!(name(&dir), "large_pty");
            let records = large_pty_records();
            assert_eq!(records.len(), layout.records.len());
            let mut w = new_writer(&meta, &layout.ikm);
            for (i, ((source, elapsed, data, new_block), lr)) in
                records.iter().zip(&layout.records).enumerate()
            {
                assert_eq!(lr["elapsed_us"].as_u64(), Some(*elapsed), "record {i}");
                assert_eq!(
                    lr["data_len"].as_u64(),
                    Some(data.len() as u64),
                    "record {i}"
                );
                assert_eq!(
                    lr["source"].as_u64(),
                    Some(u64::from(source.byte())),
                    "record {i}"
                );
                if *new_block {
                    w.flush_block().unwrap();
                }
                w.record(*source, CODE_DATA, *elapsed, data).unwrap();
            }
            via_records += 1;
            finish(w, &meta)
        };
        assert!(
            ours == capture,
            "{}: re-encoded capture differs from capture.bin",
            name(&dir)
        );

        // Well-formed vectors also come out identical through the record API (whole records, grouped by block).
        let well_formed = layout
            .blocks
            .iter()
            .all(|b| b.as_ref().is_some_and(|b| !b.is_empty()))
            && layout
                .records
                .iter()
                .all(|r| r["first_block"] == r["last_block"])
            && layout
                .records
                .windows(2)
                .all(|p| p[0]["elapsed_us"].as_u64() <= p[1]["elapsed_us"].as_u64());
        if well_formed {
            let mut w = new_writer(&meta, &layout.ikm);
            let mut block = 0;
            for r in &layout.records {
                let first = r["first_block"].as_u64().unwrap();
                if first != block {
                    w.flush_block().unwrap();
                    block = first;
                }
                let data = match (r["data_utf8"].as_str(), r["data_hex"].as_str()) {
                    (Some(s), _) => s.as_bytes().to_vec(),
                    (None, Some(h)) => hex(h),
                    _ => panic!("{}: record without data", name(&dir)),
                };
                let source = Source::from_byte(r["source"].as_u64().unwrap() as u8).unwrap();
                let code = r["code"].as_u64().unwrap() as u32;
                w.record(source, code, r["elapsed_us"].as_u64().unwrap(), &data)
                    .unwrap();
            }
            assert!(
                finish(w, &meta) == capture,
                "{}: record API output differs",
                name(&dir)
            );
            via_records += 1;
        }
    }
    assert!(
        raw >= 10 && via_records >= 7,
        "raw {raw}, via records {via_records}"
    );
}

fn sample_pty() -> PtyInfo {
    PtyInfo {
        term: Some("xterm-256color".into()),
        width: 100,
        height: 30,
        modes: vec![("ECHO".into(), 1)],
    }
}

#[test]
fn round_trip_with_a_random_key() {
    let (private, public) = generate_key_pair().unwrap();
    let key = ReviewerKey::from_base64(&private).unwrap();
    let recipient = RecipientKey::from_base64(&public).unwrap();
    let big: Vec<u8> = (0..MAX_RECORD_DATA + 12_345)
        .map(|i| (i % 251) as u8)
        .collect();
    for pty in [Some(sample_pty()), None] {
        let mut w = CaptureWriter::new(
            Cursor::new(Vec::new()),
            &recipient,
            1_700_000_000,
            pty.clone(),
        )
        .unwrap();
        w.set_block_target(1000);
        w.record(Source::Origin, CODE_DATA, 10, b"$ ").unwrap();
        w.record(Source::Client, CODE_DATA, 20, b"cat big\r")
            .unwrap();
        w.record(Source::Origin, CODE_DATA, 30, &big).unwrap();
        w.flush_block().unwrap();
        w.flush_block().unwrap(); // nothing pending: no empty block
        w.record(
            Source::Origin,
            CODE_STDERR,
            25,
            b"late stamp, raised to 30\n",
        )
        .unwrap();
        w.record(Source::Origin, CODE_DATA, 40, b"").unwrap();
        let exit = ExitInfo {
            timestamp: 1_700_000_003,
            status: None,
            signal: Some("KILL".into()),
            core_dumped: false,
            error_msg: None,
        };
        let mut file = Vec::new();
        let (summary, _) = w.finish(Some(exit.clone()), &mut file).unwrap();
        assert_eq!(summary.file_size, file.len() as u64);

        let d = decode(&file[..], &key).unwrap();
        assert_eq!(d.anomalies, vec![]);
        assert_eq!(d.exit(), Some(&exit));
        assert_eq!(d.header.pty, pty);
        assert_eq!(d.header.data_size, summary.data_size);
        assert_eq!(d.blocks_opened, summary.blocks);
        let mut origin = b"$ ".to_vec();
        origin.extend_from_slice(&big);
        origin.extend_from_slice(b"late stamp, raised to 30\n");
        assert_eq!(d.data_from(Source::Origin), origin);
        assert_eq!(d.data_from(Source::Client), b"cat big\r");
        // The big write became two records with one timestamp; the late stamp was raised.
        let stamps: Vec<u64> = d.records.iter().map(|r| r.elapsed_us).collect();
        assert_eq!(stamps, [10, 20, 30, 30, 30, 40]);
        assert!(d.records.iter().all(|r| r.data.len() <= MAX_RECORD_DATA));
        match d.reader_output().unwrap() {
            ReaderOutput::Pty {
                term_data,
                term_times,
            } => {
                assert!(term_data.starts_with(
                    b"Session started on 2023-11-14 22:13:20+00 [TERM=\"xterm-256color\""
                ));
                assert!(term_data.ends_with(
                    b"\nScript done on 2023-11-14 22:13:23+00 [COMMAND_EXIT_CODE=\"0\"]\n"
                ));
                assert_eq!(
                    String::from_utf8(term_times).unwrap(),
                    format!(
                        "0.000010 2\n0.000020 {}\n0.000000 12345\n0.000000 25\n0.000010 0\n",
                        MAX_RECORD_DATA
                    )
                );
            }
            ReaderOutput::Raw {
                data_from_server, ..
            } => assert_eq!(data_from_server, origin),
        }
        // Another reviewer's key does not open it.
        let (other, _) = generate_key_pair().unwrap();
        assert!(matches!(
            decode(&file[..], &ReviewerKey::from_base64(&other).unwrap()),
            Err(CaptureError::WrongKey)
        ));
    }
}

#[test]
fn each_capture_gets_its_own_ephemeral_key() {
    let recipient = recipient_key();
    let enc = || {
        let w = CaptureWriter::new(Cursor::new(Vec::new()), &recipient, 0, None).unwrap();
        w.header().encapsulated_key.clone()
    };
    assert_ne!(enc(), enc());
}

#[test]
fn capture_file_spool_is_readable_before_finish() {
    let dir_tmp = tempfile::tempdir().unwrap();
    let dir = dir_tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("session.cap");
    let _ = std::fs::remove_file(&path);
    let mut cap =
        CaptureFile::create(&path, &recipient_key(), 1_714_816_800, Some(sample_pty())).unwrap();
    cap.writer()
        .record(Source::Origin, CODE_DATA, 5, b"hello\r\n")
        .unwrap();
    cap.writer().flush_block().unwrap();
    cap.writer()
        .record(Source::Origin, CODE_DATA, 6, b"not flushed")
        .unwrap();
    assert!(
        CaptureFile::create(&path, &recipient_key(), 0, None).is_err(),
        "second writer on one path"
    );

    // As after a crash: the spool alone decodes to what was flushed, with no termination data.
    let spool = decode_file(cap.spool_path(), &reviewer_key()).unwrap();
    match spool.reader_output().unwrap() {
        ReaderOutput::Pty { term_data, .. } => {
            assert!(term_data.ends_with(b"hello\r\n\nSession has no termination data\n"))
        }
        other => panic!("{other:?}"),
    }

    let spool_path = cap.spool_path().to_path_buf();
    let exit = ExitInfo {
        timestamp: 1_714_816_801,
        status: Some(0),
        ..ExitInfo::default()
    };
    let summary = cap.finish(Some(exit)).unwrap();
    assert!(!spool_path.exists());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), summary.file_size);
    let d = decode_file(&path, &reviewer_key()).unwrap();
    assert_eq!(d.data_from(Source::Origin), b"hello\r\nnot flushed");
    assert_eq!(d.exit_status(), Some(0));
    let mut cast = Vec::new();
    write_asciicast(&d, &mut cast).unwrap();
    let cast = String::from_utf8(cast).unwrap();
    let lines: Vec<&str> = cast.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"env":{"TERM":"xterm-256color"},"height":30,"timestamp":1714816800,"version":2,"width":100}"#,
            r#"[5e-6,"o","hello\r\n"]"#,
            r#"[6e-6,"o","not flushed"]"#,
        ]
    );
}

#[test]
fn asciicast_of_a_vector_parses() {
    let d = decode_file(&root().join("pty_session/capture.bin"), &reviewer_key()).unwrap();
    let mut cast = Vec::new();
    write_asciicast(&d, &mut cast).unwrap();
    let text = String::from_utf8(cast).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let header = lines.next().unwrap();
    assert_eq!(
        (header["version"].as_u64(), header["width"].as_u64()),
        (Some(2), Some(120))
    );
    let mut output = String::new();
    let mut last = 0.0;
    for event in lines {
        let t = event[0].as_f64().unwrap();
        assert!(t >= last);
        last = t;
        assert_eq!(event[1], "o");
        output.push_str(event[2].as_str().unwrap());
    }
    assert_eq!(output.as_bytes(), d.data_from(Source::Origin));
    let exec = decode_file(&root().join("exec_nopty/capture.bin"), &reviewer_key()).unwrap();
    assert!(matches!(
        write_asciicast(&exec, &mut Vec::new()),
        Err(CaptureError::Unsupported(_))
    ));
}

/// Offsets where each block ends (the file prefixes that are valid captures), parsed from the framing.
fn block_ends(file: &[u8]) -> Vec<usize> {
    let meta = u32::from_be_bytes(file[..4].try_into().unwrap()) as usize;
    let mut at = 4 + meta;
    let mut ends = vec![at];
    while at < file.len() {
        at += 4 + u32::from_be_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        ends.push(at);
    }
    ends
}

#[test]
fn truncated_and_bit_flipped_captures_fail_cleanly() {
    let key = reviewer_key();
    for v in ["pty_session", "exec_nopty", "edge_split_records"] {
        let file = std::fs::read(root().join(v).join("capture.bin")).unwrap();
        let full = decode(&file[..], &key).unwrap();
        let ends = block_ends(&file);
        let header_end = ends[0];
        // Truncation: undetectable exactly at block boundaries (a weakness of the format), an error elsewhere.
        for len in 0..file.len() {
            match decode(&file[..len], &key) {
                Ok(d) => {
                    assert!(ends.contains(&len), "{v}: truncated to {len} decoded");
                    assert!(d.records.len() <= full.records.len());
                }
                Err(CaptureError::Corrupt(_)) => {
                    assert!(!ends.contains(&len) || v == "edge_split_records")
                }
                Err(e) => panic!("{v}: truncated to {len}: unexpected {e:?}"),
            }
        }
        // One flipped bit anywhere behind the header is always detected; in the header it may not be
        // (unauthenticated metadata), but it never panics.
        for i in 0..file.len() {
            for bit in [0, 7] {
                let mut bad = file.clone();
                bad[i] ^= 1 << bit;
                let r = decode(&bad[..], &key);
                if i >= header_end {
                    assert!(r.is_err(), "{v}: flip at byte {i} bit {bit} went unnoticed");
                }
            }
        }
        // Anything after the last block fails the whole capture, as in the reference.
        for tail in [&[0u8, 0, 0, 0][..], &[0], &[1, 2, 3]] {
            let mut long = file.clone();
            long.extend_from_slice(tail);
            assert!(matches!(
                decode(&long[..], &key),
                Err(CaptureError::Corrupt(_))
            ));
        }
    }
}

#[test]
fn garbage_never_panics() {
    let key = reviewer_key();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid = std::fs::read(root().join("edge_split_records/capture.bin")).unwrap();
    let header_end = block_ends(&valid)[0];
    for _ in 0..2000 {
        let len = (next() % 200) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if next() % 2 == 0 {
            // A valid header with garbage blocks reaches the block and record parsers.
            bytes.splice(0..0, valid[..header_end].iter().copied());
        }
        let _ = decode(&bytes[..], &key);
    }
    // Forged lengths must not allocate what the file does not hold.
    let mut huge = valid[..header_end].to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        decode(&huge[..], &key),
        Err(CaptureError::Corrupt(Corruption::TruncatedBlock { .. }))
    ));
    let mut huge_header = u32::MAX.to_be_bytes().to_vec();
    huge_header.extend_from_slice(b"abcd");
    assert!(matches!(
        decode(&huge_header[..], &key),
        Err(CaptureError::Corrupt(Corruption::TruncatedHeader))
    ));
}

#[test]
fn split_length_prefix_over_three_blocks_behaves_like_the_reference() {
    // The second record's length prefix split 2|2 across blocks decodes: the reference's one read call gets the
    // 2 bytes left in the current block plus 2 from the next. Split 1|2|1 that call gets only 3 bytes, zero-fills
    // the fourth and fails.
    let meta = metadata(&root().join("exec_nopty"));
    let mut stream = Vec::new();
    record::encode_into(&mut stream, Source::Client, CODE_DATA, 1, b"x");
    let first = stream.len();
    record::encode_into(&mut stream, Source::Client, CODE_DATA, 2, b"abc");
    let write = |cuts: &[usize]| {
        let mut w = new_writer(&meta, &[7; 32]);
        let mut at = 0;
        for &c in cuts.iter().chain([&stream.len()]) {
            w.seal(&stream[at..c]).unwrap();
            at = c;
        }
        finish_any(w)
    };
    let ok = decode(&write(&[first + 2])[..], &reviewer_key()).unwrap();
    assert_eq!(ok.data_from(Source::Client), b"xabc");
    assert_eq!(ok.anomalies, vec![]);
    let bad = decode(&write(&[first + 1, first + 3])[..], &reviewer_key());
    assert!(
        matches!(
            bad,
            Err(CaptureError::Corrupt(Corruption::ShortRecord {
                index: 1,
                len: 0
            }))
        ),
        "{bad:?}"
    );
}

fn finish_any(w: CaptureWriter<Cursor<Vec<u8>>>) -> Vec<u8> {
    let mut out = Vec::new();
    w.finish(None, &mut out).unwrap();
    out
}
