//! A real S3 protocol server per test: `s3s-fs` (the s3s project's filesystem-backed S3 server, from
//! crates.io; SigV4 checked, conditional puts, multipart), built once by `make s3s-fs` into
//! `target/s3s-fs/bin/`. It runs inside a namespace the test created (usually the gateway's), on
//! 127.0.0.1 and a private port, over a private directory: bucket `B` is the directory `data/B`, an object
//! the file under it, so a test can look at (and tamper with) what the gateway uploaded. Only the PID this
//! guard started is ever signalled; dropping it stops the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::netns::Netns;
use super::process::{poll_until, run, Proc};
use super::tmp::{tempdir, TempDir};

pub const ACCESS_KEY: &str = "AKRAMPARTTEST";
pub const SECRET_KEY: &str = "rampart-test-s3-secret";
pub const BUCKET: &str = "recordings";

pub fn bin() -> PathBuf {
    let b = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3s-fs/bin/s3s-fs");
    assert!(
        b.exists(),
        "{} is missing; `make s3s-fs` builds it (cargo install --locked s3s-fs, once, cached under target/)",
        b.display()
    );
    b
}

pub struct S3 {
    dir: TempDir,
    ns: Option<String>,
    /// The address it listens on: 127.0.0.1, or 0.0.0.0 to be reached from a namespace linked to its own.
    pub host: String,
    pub port: u16,
    proc: Option<Proc>,
}

impl S3 {
    /// Creates the directories (bucket [`BUCKET`] included) and the credential files; the server starts with
    /// [`S3::start_in`] (the namespace may not exist yet: write the config first).
    pub fn prepare(tag: &str) -> S3 {
        let dir = tempdir(&format!("s3-{tag}"));
        std::fs::create_dir_all(dir.path().join("data").join(BUCKET)).unwrap();
        // Any fixed port: the server runs in a namespace the test created, where nothing else listens.
        let s = S3 {
            dir,
            ns: None,
            host: "127.0.0.1".into(),
            port: 19000,
            proc: None,
        };
        s.credential_files();
        s
    }

    /// Starts the server in `ns`.
    pub fn start_in(&mut self, ns: &Netns) {
        self.ns = Some(ns.name().to_owned());
        self.start();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where bucket [`BUCKET`]'s objects are files.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(BUCKET)
    }

    /// Files holding credentials, for `[fleet.objects]`.
    pub fn credential_files(&self) -> (PathBuf, PathBuf) {
        let id = self.dir.path().join("s3.id");
        let secret = self.dir.path().join("s3.secret");
        std::fs::write(&id, format!("{ACCESS_KEY}\n")).unwrap();
        std::fs::write(&secret, format!("{SECRET_KEY}\n")).unwrap();
        (id, secret)
    }

    /// `[fleet.objects]` for this server.
    pub fn objects_toml(&self) -> String {
        let (id, secret) = self.credential_files();
        format!(
            "\n[fleet.objects]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nregion = \"us-east-1\"\n\
             access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint(),
            id.display(),
            secret.display()
        )
    }

    /// Starts the server (again) on the same port and directory; waits until it answers HTTP.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "s3s-fs already running");
        let ns = self.ns.clone().expect("start_in names the namespace first");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(bin())
            .args(["--host", &self.host, "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path().join("data"));
        self.proc = Some(Proc::spawn("s3s-fs", cmd, self.dir.path()));
        let url = format!("{}/", self.endpoint());
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            if let Some(p) = self.proc.as_mut() {
                assert!(p.is_running(), "s3s-fs exited; log:\n{}", p.log());
            }
            let r = run(
                std::process::Command::new("ip").args([
                    "netns",
                    "exec",
                    &ns,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ]),
                Duration::from_secs(10),
            );
            (r.stdout.trim() != "000" && !r.stdout.trim().is_empty()).then_some(())
        });
        assert!(up.is_some(), "s3s-fs did not answer on {url}");
    }

    /// Kills the server (SIGKILL to the PID this guard started) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Freezes the server (SIGSTOP to the PID this guard started): it keeps its sockets but answers nothing.
    pub fn pause(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.signal("STOP");
        }
    }

    /// The parts of multipart uploads the server holds (`.upload_id-<id>.part-<n>` files, written whole
    /// then renamed into place, so a listed part has fully arrived).
    pub fn upload_parts(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.dir.path().join("data"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload_id-") && n.contains(".part-"))
            .collect();
        out.sort();
        out
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// Every file under the bucket (relative paths), sorted.
    pub fn objects(&self) -> Vec<String> {
        let base = self.bucket_dir();
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(&base).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}
