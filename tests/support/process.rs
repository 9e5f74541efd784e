//! Child processes with deadlines: one-shot commands (`run`) and guarded background processes
//! (`Proc`) that are always stopped, by their own PID, when the guard drops (also on panic).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The outcome of a one-shot command.
#[derive(Debug)]
pub struct Ran {
    pub desc: String,
    /// `None` when the command was killed at its deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Stdout of a command that must have succeeded; panics with everything it printed otherwise.
    pub fn expect_ok(self) -> String {
        if !self.success() {
            panic!("command failed: {self}");
        }
        self.stdout
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "`{}` exited with {s}", self.desc)?,
            None => write!(f, "`{}` timed out and was killed", self.desc)?,
        }
        write!(
            f,
            "\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; kills it at `timeout`. Panics only if it cannot be started.
pub fn run(cmd: &mut Command, timeout: Duration) -> Ran {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{desc}`: {e}"));
    let out = child.stdout.take().map(drain_in_thread);
    let err = child.stderr.take().map(drain_in_thread);
    let status = wait_deadline(&mut child, timeout);
    let status = match status {
        Some(s) => Some(s),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    let collect = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    Ran {
        desc,
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

fn drain_in_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    }
}

/// A background process we started. Stdout goes to `<dir>/<name>.out`, stderr is appended to
/// `<dir>/<name>.log`. Dropping the guard stops it (SIGTERM, then SIGKILL) and reaps it.
pub struct Proc {
    name: String,
    child: Option<Child>,
    exited: Option<ExitStatus>,
    pub stdout_path: PathBuf,
    pub log_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let stdout_path = dir.join(format!("{name}.out"));
        let log_path = dir.join(format!("{name}.log"));
        let out = File::create(&stdout_path).expect("create stdout file");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open log file");
        let desc = describe(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{desc}`: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            exited: None,
            stdout_path,
            log_path,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The exit status if the process has exited (it is reaped then).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.exited = Some(s);
                }
            }
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exit_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to this process only, if it has not been reaped.
    pub fn signal(&mut self, signal: &str) {
        if self.is_running() {
            // The shell's builtin `kill`, so no extra package is needed.
            let pid = self.pid().to_string();
            let _ = run(
                Command::new("sh").args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal, &pid]),
                Duration::from_secs(5),
            );
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut() {
            if self.exited.is_none() {
                let _ = c.kill();
                self.exited = c.wait().ok();
            }
        }
        self.exited
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        self.kill()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls stdout until it contains `needle`; panics if the process exits first or at timeout.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return;
            }
            if let Some(s) = self.exit_status() {
                panic!(
                    "{} exited ({s}) before printing {needle:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.stdout(),
                    tail(&self.log(), 40)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print {needle:?} within {timeout:?}\n--- stderr ---\n{}",
                    self.name,
                    tail(&self.log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a self-terminating process (bounded by `timeout`) and returns its stdout;
    /// panics with its stderr if it fails or overruns.
    pub fn finish(&mut self, timeout: Duration) -> String {
        match self.wait_timeout(timeout) {
            Some(s) if s.success() => self.stdout(),
            Some(s) => panic!(
                "{} failed ({s})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.name,
                self.stdout(),
                tail(&self.log(), 40)
            ),
            None => {
                self.kill();
                panic!(
                    "{} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.stdout(),
                    tail(&self.log(), 40)
                )
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `probe` every `every` until it returns `Some`, for at most `timeout`; panics naming
/// `what` otherwise. Returns the value and how long it took.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return (v, start.elapsed());
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}

/// Like `wait_until` but returns `None` instead of panicking.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(every);
    }
}
