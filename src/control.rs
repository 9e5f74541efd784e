//! Local control channel between the CLI and a running gateway: a unix stream socket at
//! `state_dir/control.sock` (mode 0600, root only). One JSON request line, one JSON reply line.
//! `rampart device add/remove` and `rampart reload` use it so changes apply without a restart.
#![deny(unsafe_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::PeerStatus;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Re-read the config file and the device registry; apply if valid.
    Reload,
    /// Live state of every peer.
    Status,
    /// Test builds only: stall the data path for `secs` seconds.
    #[cfg(feature = "test-hooks")]
    DebugStall { secs: u64 },
    /// Test builds only: read the file at `path` from inside the gateway (what Landlock allows).
    #[cfg(feature = "test-hooks")]
    DebugReadFile { path: std::path::PathBuf },
    /// Test builds only: make a system call outside the seccomp allowlist (the gateway should die of it).
    #[cfg(feature = "test-hooks")]
    DebugForbiddenSyscall,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub peers: Vec<PeerStatusWire>,
}

/// `PeerStatus` as it travels over the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatusWire {
    pub tenant: String,
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl From<&PeerStatus> for PeerStatusWire {
    fn from(p: &PeerStatus) -> Self {
        PeerStatusWire {
            tenant: p.tenant.to_string(),
            name: p.name.to_string(),
            public_key: p.public_key.to_string(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            last_handshake_secs: p.last_handshake_secs,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        }
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Sends `req` to the gateway using `state_dir`. `Ok(None)` when no gateway is running there.
pub fn request(state_dir: &Path, req: &Request) -> anyhow::Result<Option<Reply>> {
    let path = socket_path(state_dir);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot reach the gateway at {}: {e}",
                path.display()
            ))
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
        anyhow::anyhow!("garbled reply from the gateway at {}: {e}", path.display())
    })?;
    Ok(Some(reply))
}

/// Accepts the next connection from root or the gateway's own user (`SO_PEERCRED`), whatever the socket file's
/// mode says; others are closed at once and logged.
pub async fn accept_authorized(
    listener: &tokio::net::UnixListener,
) -> std::io::Result<tokio::net::UnixStream> {
    let own = nix::unistd::geteuid().as_raw();
    loop {
        let (conn, _) = listener.accept().await?;
        match conn.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == own => return Ok(conn),
            Ok(c) => tracing::warn!(
                uid = c.uid(),
                pid = c.pid(),
                "control connection refused: neither root nor the gateway's user"
            ),
            Err(e) => tracing::warn!(error = %e, "control connection refused: no peer credentials"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;

    /// A client of another user reaches the socket (its file is world-writable here, as a mistake or a
    /// DAC-overriding process would make it) and is still refused; root's connection is accepted.
    #[tokio::test]
    async fn control_connections_from_other_users_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a client as another user");
            return;
        }
        let dir_tmp = tempfile::tempdir().unwrap();
        // Another user must reach the dir inside (tempfile makes it 0700).
        std::fs::set_permissions(dir_tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = dir_tmp.path().join("d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let server = tokio::spawn(async move {
            let conn = super::accept_authorized(&listener).await.unwrap();
            conn.peer_cred().unwrap().uid()
        });
        // The other user's client: connects (proof that the file let it), then waits for the server's answer.
        let script = "import socket,sys\n\
                      s=socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1]); print('connected')\n\
                      try:\n    s.sendall(b'{\"op\":\"status\"}\\n'); r=s.recv(1)\n\
                      except (BrokenPipeError, ConnectionResetError):\n    r=b''\n\
                      print('closed' if r == b'' else 'answered')";
        let out = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                std::process::Command::new("python3")
                    .args(["-c", script])
                    .arg(&path)
                    .uid(65534)
                    .gid(65534)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            ["connected", "closed"],
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !server.is_finished(),
            "the other user's connection was accepted"
        );
        // Positive control: root's connection is the one accepted.
        let _root = tokio::net::UnixStream::connect(&path).await.unwrap();
        let uid = tokio::time::timeout(std::time::Duration::from_secs(20), server)
            .await
            .expect("root's connection was not accepted")
            .unwrap();
        assert_eq!(uid, 0);
    }
}
