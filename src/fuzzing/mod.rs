//! Fuzz target bodies, shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/`, built with the `fuzzing`
//! feature) and the corpus replay (`cargo test`: every file under `fuzz/corpus/<target>/` runs through the same
//! function on the stable toolchain).
//!
//! Each target takes arbitrary bytes, must never panic on them, and asserts a property with an independent
//! oracle where there is one (etherparse for checksums, a second decode for codecs, chunking for streaming
//! parsers). A panic here is a finding: fix the code under test, then commit the input to the target's corpus.
//!
//! Never: call anything that does IO outside the process (sockets, files outside a temp dir), or keep state
//! that makes an input's outcome depend on an earlier input in ways the target does not reset.
//!
//! Start reading at [`TARGETS`]; `docs/security.md` (Fuzzing) has the commands and the recorded runs.
#![allow(clippy::missing_panics_doc)]

mod files;
mod gateway;
mod inspect;
mod oracle;
mod packet;
#[cfg(test)]
mod seeds;

/// A target's body: arbitrary bytes in, a panic on a finding.
pub type Body = fn(&[u8]);

/// Every target: its name (`fuzz/fuzz_targets/<name>.rs`, `fuzz/corpus/<name>/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("packet", packet::packet),
    ("nat", packet::nat),
    ("core_inner", gateway::core_inner),
    ("datagram", gateway::datagram),
    ("endpoints", gateway::endpoints),
    ("config", files::config),
    ("registry", files::registry),
    ("netns_proto", files::netns_proto),
    ("onramp_context", files::onramp_context),
    ("onramp_gue", files::onramp_gue),
    ("tls_client_hello", inspect::tls_client_hello),
    ("http_request", inspect::http_request),
    ("http_path", inspect::http_path),
    ("ssh_input_line", inspect::ssh_input_line),
    ("sftp", inspect::sftp),
    ("capture", inspect::capture),
];

/// Runs the target called `name` on `data` (what each fuzz binary does).
pub fn run(name: &str, data: &[u8]) {
    let Some((_, body)) = TARGETS.iter().find(|(n, _)| *n == name) else {
        panic!("no fuzz target {name:?}");
    };
    body(data);
}

/// A cursor over the fuzzer's bytes that never fails: past the end it yields zeros and empty slices, so every
/// input decodes to some scenario and the fuzzer's mutations stay meaningful.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// One of `n` choices (`n > 0`).
    pub(crate) fn pick(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n
    }

    /// Up to `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A chunk with a one-byte length prefix (0..=255 bytes).
    pub(crate) fn short(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.bytes(n)
    }

    /// A chunk with a two-byte length prefix, at most `max` bytes.
    pub(crate) fn chunk(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()) % (max + 1);
        self.bytes(n)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Splits `data` into pieces at the cut points `cuts` chooses (for chunking-invariance properties).
pub(crate) fn split_by<'a>(data: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    for &c in cuts {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(c) % rest.len()).max(1);
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::{Path, PathBuf};

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    /// Every committed corpus file (seeds and regression inputs of fixed crashes) runs through its target on the
    /// stable toolchain, as the fuzz binaries would run it.
    #[test]
    fn every_corpus_input_replays_without_panic() {
        let mut failures = Vec::new();
        let mut total = 0;
        for (name, body) in TARGETS {
            let dir = fuzz_dir().join("corpus").join(name);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            assert!(
                !files.is_empty(),
                "target {name} has no seed corpus in {}",
                dir.display()
            );
            for f in files {
                let data = std::fs::read(&f).unwrap();
                total += 1;
                if let Err(e) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: {msg}", f.display()));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {total} corpus inputs failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// The fuzz crate builds one binary per target, each calling [`run`] with its own name, and nothing else.
    #[test]
    fn fuzz_binaries_match_the_target_table() {
        let names: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names.len(), TARGETS.len(), "duplicate target names");
        let dir = fuzz_dir().join("fuzz_targets");
        let mut bins = BTreeSet::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.contains(&format!("rampart::fuzzing::run(\"{name}\", data)")),
                "{} must call rampart::fuzzing::run(\"{name}\", data)",
                p.display()
            );
            bins.insert(name);
        }
        assert_eq!(bins, names, "fuzz/fuzz_targets/ vs fuzzing::TARGETS");
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for n in &names {
            assert!(
                manifest.contains(&format!("path = \"fuzz_targets/{n}.rs\"")),
                "fuzz/Cargo.toml has no [[bin]] for {n}"
            );
        }
    }

    #[test]
    fn input_yields_zeros_past_the_end() {
        let mut i = Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0102);
        assert_eq!(i.u32(), 0x0300_0000);
        assert!(i.is_empty());
        assert_eq!(i.short(), b"");
        assert_eq!(
            split_by(b"abcdef", &[2, 0, 200]),
            vec![&b"ab"[..], b"c", b"de", b"f"]
        );
    }
}

/// Runs one input file through a target: `RAMPART_FUZZ=target:path cargo test --lib fuzzing::replay_one --
/// --ignored --nocapture` (a crash found by a fuzz run, with a backtrace and the debug build's checks).
#[cfg(test)]
#[test]
#[ignore = "set RAMPART_FUZZ=target:path"]
fn replay_one() {
    let spec = std::env::var("RAMPART_FUZZ").expect("RAMPART_FUZZ=target:path");
    let (target, path) = spec.split_once(':').expect("target:path");
    run(target, &std::fs::read(path).expect("input file"));
}
