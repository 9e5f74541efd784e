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
