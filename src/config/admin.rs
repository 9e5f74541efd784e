//! The admin listener's access rule (`gateway.admin_listen`, `gateway.admin_token_file`): plain HTTP without
//! authentication only on a loopback address; a token file turns on HTTPS and `Authorization: Bearer`, and
//! any other address needs one. The token is read here, at load (and at every reload, which rotates it).
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::validate::resolve;
use super::Collector;

/// Shortest token accepted (characters).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The bearer token of the admin listener and the file it came from.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub file: PathBuf,
    secret: String,
}

impl AdminToken {
    pub fn secret(&self) -> &[u8] {
        self.secret.as_bytes()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Whether `listen` may serve `/metrics` and `/health` without TLS and a token.
pub fn admin_listen_is_local(listen: SocketAddr) -> bool {
    listen.ip().to_canonical().is_loopback()
}

const MAKE_TOKEN: &str = "umask 077; openssl rand -hex 32 > FILE";

pub(super) fn validate_admin_token(
    listen: SocketAddr,
    token_file: Option<&str>,
    base: &Path,
    c: &mut Collector<'_>,
) -> Option<AdminToken> {
    let Some(file) = token_file else {
        if !admin_listen_is_local(listen) {
            c.push(
                "gateway.admin_listen",
                format!(
                    "{listen} is not a loopback address, so /metrics and /health would be open to the network \
                     without TLS or authentication; add `admin_token_file = \"/etc/rampart/admin.token\"` under \
                     [gateway] (a file of mode 0600 holding a random token: `{}`), which makes the listener serve \
                     HTTPS and require `Authorization: Bearer <token>`, or listen on 127.0.0.1",
                    MAKE_TOKEN.replace("FILE", "/etc/rampart/admin.token")
                ),
            );
        }
        return None;
    };
    let file = resolve(base, file);
    let make = MAKE_TOKEN.replace("FILE", &file.display().to_string());
    let key = "gateway.admin_token_file";
    let text = super::validate::read_private_file(&file, key, "admin token", &make, c)?;
    let secret = text.trim();
    if secret.len() < MIN_ADMIN_TOKEN_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        c.push(
            key,
            format!(
                "{} does not hold a usable token: write one line of at least {MIN_ADMIN_TOKEN_LEN} printable \
                 characters without spaces: `{make}`",
                file.display()
            ),
        );
        return None;
    }
    Some(AdminToken {
        file,
        secret: secret.to_string(),
    })
}
