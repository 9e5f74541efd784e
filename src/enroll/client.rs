//! The device side of enrollment (`rampart enroll`): makes the key pair here, talks to the enrollment listener
//! over TLS pinned to the URL's `pin=sha256:...`, and writes the wg-quick file atomically with mode 0600.
//!
//! The file carries what later calls need as comment lines (wg-quick ignores them): the listener URL with its
//! pin, the device token and the config version (`rampart-url`, `rampart-device-token`,
//! `rampart-config-version`; in a fleet also `rampart-fleet-url`, one per live node). `refresh`, `rotate`,
//! `leave` and the failover watcher (`failover`) read them back.
//!
//! Never: send the private key anywhere, talk to a server whose certificate does not match the pin, or
//! write the config where another user can read it.
#![deny(unsafe_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, IF_NONE_MATCH};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use super::api::{ApiError, DeviceReply, DeviceState, EnrollRequest, KeyRequest};
use super::tls::{parse_pin, PinVerifier};
use crate::keys::PrivateKey;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_REPLY: usize = 1 << 20;
/// The default listener port when a URL names none.
pub const DEFAULT_PORT: u16 = 8443;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Url(String),
    #[error(
        "the enrollment server's certificate does not match the pin in the URL ({0}); refusing to send \
         anything. Check the URL with the gateway's admin (`rampart token pin` on the gateway prints the \
         right pin): either it is wrong, or someone is intercepting the connection"
    )]
    PinMismatch(String),
    #[error("cannot reach the enrollment server at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("the enrollment server refused: {error} (HTTP {status})")]
    Api { status: u16, error: ApiError },
    #[error("unexpected reply from the enrollment server (HTTP {status}): {message}")]
    BadReply { status: u16, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// An enrollment URL: `rampart://HOST[:PORT]/?t=TOKEN&pin=sha256:HEX` (or `https://...`; without `pin` the
/// server must have a certificate from a public CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollUrl {
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
    pub pin: Option<[u8; 32]>,
}

impl EnrollUrl {
    pub fn parse(s: &str) -> Result<EnrollUrl, ClientError> {
        let bad = |why: &str| {
            ClientError::Url(format!(
                "{why}; an enrollment URL looks like rampart://gw.example:8443/?pin=sha256:<64 hex>"
            ))
        };
        let s = s.trim();
        let (rest, default_port) = if let Some(r) = s.strip_prefix("rampart://") {
            (r, DEFAULT_PORT)
        } else if let Some(r) = s.strip_prefix("https://") {
            (r, 443)
        } else {
            return Err(bad("the URL must start with rampart:// or https://"));
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a.trim_end_matches('/'), q),
            None => (rest.trim_end_matches('/'), ""),
        };
        if authority.contains('/') || authority.contains('@') || authority.is_empty() {
            return Err(bad("the URL has no host, or a path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number"))?,
            None => default_port,
        };
        let mut url = EnrollUrl {
            host,
            port,
            token: None,
            pin: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "t" => url.token = Some(v.to_string()),
                "pin" => {
                    let v = v.replace("%3A", ":").replace("%3a", ":");
                    url.pin = Some(
                        parse_pin(&v).ok_or_else(|| bad("pin= must be sha256:<64 hex digits>"))?,
                    );
                }
                _ => {}
            }
        }
        if url.pin.is_none() && s.starts_with("rampart://") {
            return Err(bad(
                "the URL has no pin=sha256:...; copy the whole URL the admin gave you",
            ));
        }
        Ok(url)
    }

    /// `host:port` as it goes into `Host:` and URLs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL without its token (what goes into the config file).
    pub fn without_token(&self) -> String {
        match &self.pin {
            Some(p) => super::admin::enrollment_url(
                &self.authority(),
                &format!("sha256:{}", super::tls::hex(p)),
                None,
            ),
            None => format!("https://{}/", self.authority()),
        }
    }
}

/// The comment lines of a config file that later calls read back.
pub fn meta_comments(reply: &DeviceReply, url: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(u) = url {
        s.push_str(&format!("# rampart-url = {u}\n"));
    }
    if let Some(t) = &reply.device_token {
        s.push_str(&format!("# rampart-device-token = {t}\n"));
    }
    for u in &reply.enroll_urls {
        s.push_str(&format!("# rampart-fleet-url = {u}\n"));
    }
    s.push_str(&format!(
        "# rampart-config-version = {}\n",
        reply.config_version
    ));
    s
}

/// What a config file written by enrollment holds besides the WireGuard settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMeta {
    pub url: Option<String>,
    pub device_token: Option<String>,
    pub config_version: Option<String>,
    pub private_key: Option<String>,
    /// Fleet mode: every live node's enrollment URL when the file was last written (failover Mode A).
    pub fleet_urls: Vec<String>,
    /// The gateway's public key (the first `[Peer]`).
    pub peer_public_key: Option<String>,
}

impl FileMeta {
    pub fn parse(text: &str) -> FileMeta {
        let mut m = FileMeta::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(c) = line.strip_prefix('#') {
                if let Some((k, v)) = c.split_once('=') {
                    let v = Some(v.trim().to_string());
                    match k.trim() {
                        "rampart-url" => m.url = v,
                        "rampart-device-token" => m.device_token = v,
                        "rampart-config-version" => m.config_version = v,
                        "rampart-fleet-url" => m.fleet_urls.extend(v),
                        _ => {}
                    }
                }
            } else if let Some((k, v)) = line.split_once('=') {
                if k.trim().eq_ignore_ascii_case("privatekey") {
                    m.private_key = Some(v.trim().to_string());
                } else if k.trim().eq_ignore_ascii_case("publickey") && m.peer_public_key.is_none()
                {
                    m.peer_public_key = Some(v.trim().to_string());
                }
            }
        }
        m
    }
}

/// The whole config file for `reply`.
pub fn render_file(reply: &DeviceReply, key: &PrivateKey, url: Option<&str>) -> String {
    format!(
        "{}{}{}",
        reply.header(),
        meta_comments(reply, url),
        reply.wg_quick(key)
    )
}

/// Writes `text` to `path` so that no reader ever sees a partial file and nobody else can read it: a temp file
/// (mode 0600) in the same directory, fsync, rename, fsync of the directory.
pub fn write_private(path: &Path, text: &str) -> Result<(), ClientError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| file_err(path, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        super::secret::PublicId::random()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(path, e));
    }
    Ok(())
}

fn client_config(pin: Option<[u8; 32]>) -> Result<rustls::ClientConfig, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(super::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Url(e.to_string()))?;
    let mut c = match pin {
        Some(p) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(p)))
            .with_no_client_auth(),
        None => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

struct Reply {
    status: StatusCode,
    body: Bytes,
}

fn is_pin_failure(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure
                )
            )
        })
}

/// One HTTPS request on its own connection.
async fn call(
    url: &EnrollUrl,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    if_none_match: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Reply, ClientError> {
    let target = url.authority();
    let connect_err = |message: String| ClientError::Connect {
        target: target.clone(),
        message,
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    .map_err(|_| connect_err("timed out".into()))?
    .map_err(|e| connect_err(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(url.pin)?));
    let name = ServerName::try_from(url.host.clone())
        .map_err(|_| ClientError::Url(format!("{:?} is not a host name", url.host)))?;
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Err(_) => return Err(connect_err("TLS handshake timed out".into())),
        Ok(Err(e)) if is_pin_failure(&e) => {
            return Err(ClientError::PinMismatch(
                url.pin
                    .map(|p| format!("sha256:{}", super::tls::hex(&p)))
                    .unwrap_or_default(),
            ))
        }
        Ok(Err(e)) => return Err(connect_err(format!("TLS: {e}"))),
        Ok(Ok(s)) => s,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, target.as_str())
        .header(ACCEPT, "application/json");
    if let Some(b) = bearer {
        req = req.header(AUTHORIZATION, format!("Bearer {b}"));
    }
    if let Some(v) = if_none_match {
        req = req.header(IF_NONE_MATCH, format!("\"{v}\""));
    }
    if body.is_some() {
        req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| connect_err(e.to_string()))?;
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| connect_err(format!("reading the reply: {e}")))?
            .to_bytes();
        Ok(Reply { status, body })
    })
    .await
    .map_err(|_| connect_err("no reply in time".into()))?;
    driver.abort();
    result
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Connect {
            target: String::new(),
            message: e.to_string(),
        })
}

/// A 2xx device reply, or the server's error.
fn device_reply(r: Reply) -> Result<DeviceReply, ClientError> {
    if r.status.is_success() {
        serde_json::from_slice(&r.body).map_err(|e| ClientError::BadReply {
            status: r.status.as_u16(),
            message: e.to_string(),
        })
    } else {
        Err(api_error(r))
    }
}

fn api_error(r: Reply) -> ClientError {
    match serde_json::from_slice::<ApiError>(&r.body) {
        Ok(error) => ClientError::Api {
            status: r.status.as_u16(),
            error,
        },
        Err(_) => ClientError::BadReply {
            status: r.status.as_u16(),
            message: String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned(),
        },
    }
}

/// What to enroll as.
#[derive(Debug, Clone, Default)]
pub struct EnrollOptions {
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub device_id: Option<String>,
}

/// A finished enrollment: the config file text (with the private key) and the reply it came from.
pub struct Enrollment {
    pub text: String,
    pub reply: DeviceReply,
}

/// Makes a key pair here and enrolls it with `token`.
pub fn enroll(
    url: &EnrollUrl,
    token: &str,
    opts: &EnrollOptions,
) -> Result<Enrollment, ClientError> {
    let key = PrivateKey::generate();
    let req = EnrollRequest {
        token: token.trim().to_string(),
        public_key: key.public_key().to_string(),
        name: opts.name.clone(),
        os: Some(std::env::consts::OS.to_string()),
        hostname: opts.hostname.clone(),
        device_id: opts.device_id.clone(),
    };
    let body = serde_json::to_vec(&req).map_err(|e| ClientError::Url(e.to_string()))?;
    let reply = runtime()?.block_on(call(
        url,
        Method::POST,
        "/v1/enroll",
        None,
        None,
        Some(body),
    ))?;
    let reply = device_reply(reply)?;
    let text = render_file(&reply, &key, Some(&url.without_token()));
    Ok(Enrollment { text, reply })
}

/// The file's saved state, or a clear error naming what is missing.
struct Saved {
    url: EnrollUrl,
    token: String,
    key: PrivateKey,
    meta: FileMeta,
}

fn saved(path: &Path) -> Result<Saved, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let meta = FileMeta::parse(&text);
    let missing = |what: &str| {
        file_err(
            path,
            format!("has no {what}; it was not written by enrollment (enroll again with a token)"),
        )
    };
    let url = EnrollUrl::parse(
        meta.url
            .as_deref()
            .ok_or_else(|| missing("`# rampart-url =` line"))?,
    )?;
    let token = meta
        .device_token
        .clone()
        .ok_or_else(|| missing("`# rampart-device-token =` line"))?;
    let key: PrivateKey = meta
        .private_key
        .as_deref()
        .ok_or_else(|| missing("PrivateKey"))?
        .parse()
        .map_err(|e| file_err(path, format!("PrivateKey: {e}")))?;
    Ok(Saved {
        url,
        token,
        key,
        meta,
    })
}

/// What `refresh` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The file was current (304).
    Unchanged,
    /// The file was rewritten.
    Updated(Box<DeviceReply>),
}

fn with_token(mut reply: DeviceReply, token: String) -> DeviceReply {
    reply.device_token = Some(token);
    reply
}

/// Fetches the device's config from the enrollment listener at `url` (another node of the fleet) and rewrites
/// `path` with it, naming `url` as the device's listener from now on.
pub fn refresh_from(path: &Path, url: &EnrollUrl) -> Result<DeviceReply, ClientError> {
    let s = saved(path)?;
    let r = runtime()?.block_on(call(
        url,
        Method::GET,
        "/v1/devices/self",
        Some(&s.token),
        None,
        None,
    ))?;
    let reply = with_token(device_reply(r)?, s.token);
    write_private(
        path,
        &render_file(&reply, &s.key, Some(&url.without_token())),
    )?;
    Ok(reply)
}

/// Fetches the device's current config and rewrites `path` if it changed.
pub fn refresh(path: &Path) -> Result<Refreshed, ClientError> {
    let s = saved(path)?;
    let r = runtime()?.block_on(call(
        &s.url,
        Method::GET,
        "/v1/devices/self",
        Some(&s.token),
        s.meta.config_version.as_deref(),
        None,
    ))?;
    if r.status == StatusCode::NOT_MODIFIED {
        return Ok(Refreshed::Unchanged);
    }
    let reply = with_token(device_reply(r)?, s.token);
    write_private(
        path,
        &render_file(&reply, &s.key, Some(&s.url.without_token())),
    )?;
    Ok(Refreshed::Updated(Box::new(reply)))
}

/// Makes a new key pair here, registers it for the same device and rewrites `path`.
pub fn rotate(path: &Path) -> Result<DeviceReply, ClientError> {
    let s = saved(path)?;
    let key = PrivateKey::generate();
    let body = serde_json::to_vec(&KeyRequest {
        public_key: key.public_key().to_string(),
    })
    .map_err(|e| ClientError::Url(e.to_string()))?;
    let r = runtime()?.block_on(call(
        &s.url,
        Method::PUT,
        "/v1/devices/self/key",
        Some(&s.token),
        None,
        Some(body),
    ))?;
    let reply = with_token(device_reply(r)?, s.token);
    write_private(
        path,
        &render_file(&reply, &key, Some(&s.url.without_token())),
    )?;
    Ok(reply)
}

/// Removes this device from the gateway, then the file.
pub fn leave(path: &Path) -> Result<(), ClientError> {
    let s = saved(path)?;
    let r = runtime()?.block_on(call(
        &s.url,
        Method::DELETE,
        "/v1/devices/self",
        Some(&s.token),
        None,
        None,
    ))?;
    if !r.status.is_success() {
        return Err(api_error(r));
    }
    std::fs::remove_file(path).map_err(|e| file_err(path, e))
}

/// The headless (MDM) settings file, `/etc/rampart/enroll.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Headless {
    /// The enrollment URL (may carry the pin; should not carry the token).
    pub url: String,
    /// `sha256:<hex>`, when the URL has no `pin=`.
    pub pin: Option<String>,
    /// File holding the enrollment token (a reusable one, for a fleet).
    pub token_file: PathBuf,
    /// Stable id of this machine (MDM serial, `/etc/machine-id`): enrolling again replaces its key.
    pub device_id: Option<String>,
    pub name: Option<String>,
    /// Where the wg-quick file goes.
    pub out: Option<PathBuf>,
}

impl Headless {
    pub fn load(path: &Path) -> Result<Headless, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        let h: Headless = toml::from_str(&text).map_err(|e| file_err(path, e.message()))?;
        Ok(h)
    }

    pub fn url(&self) -> Result<EnrollUrl, ClientError> {
        let mut url = match (&self.pin, self.url.contains("pin=")) {
            (Some(p), false) => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                let base = if self.url.contains('?') {
                    self.url.clone()
                } else {
                    format!("{}/", self.url.trim_end_matches('/'))
                };
                EnrollUrl::parse(&format!("{base}{sep}pin={p}"))?
            }
            _ => EnrollUrl::parse(&self.url)?,
        };
        if url.token.take().is_some() {
            tracing::warn!("the url in enroll.toml carries a token; use token_file instead");
        }
        Ok(url)
    }
}

/// Whether the device is waiting for approval (for messages).
pub fn is_pending(reply: &DeviceReply) -> bool {
    reply.device.state == DeviceState::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let u =
            EnrollUrl::parse(&format!("rampart://198.18.0.1:8443/?t=rpe1_x&pin={pin}")).unwrap();
        assert_eq!(u.host, "198.18.0.1");
        assert_eq!(u.port, 8443);
        assert_eq!(u.token.as_deref(), Some("rpe1_x"));
        assert_eq!(u.pin, Some([0xab; 32]));
        assert_eq!(
            u.without_token(),
            format!("rampart://198.18.0.1:8443/?pin={pin}")
        );
        let v6 = EnrollUrl::parse(&format!("rampart://[fd00::1]/?pin={pin}")).unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("fd00::1", DEFAULT_PORT));
        assert_eq!(v6.authority(), "[fd00::1]:8443");
        let https = EnrollUrl::parse("https://enroll.example").unwrap();
        assert_eq!((https.port, https.pin), (443, None));
        for bad in [
            "http://x/?pin=sha256:00",
            "rampart://x:8443/",
            "rampart://x:99999/?pin=sha256:00",
            "rampart://x/?pin=sha256:zz",
            "rampart://user@x/?pin=sha256:00",
        ] {
            assert!(EnrollUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_meta_round_trips() {
        let reply: DeviceReply = serde_json::from_value(serde_json::json!({
            "device": {"id": "dev_0123456789abcdef", "name": "l", "tenant": "acme", "state": "active"},
            "device_token": "rpd1_x",
            "interface": {"addresses": ["100.96.0.2/32"], "dns": [], "mtu": 1420},
            "peers": [{"public_key": "k", "endpoint": "e:1", "allowed_ips": ["100.96.0.0/24"], "persistent_keepalive": 25}],
            "config_version": "v1"
        }))
        .unwrap();
        let key = PrivateKey::generate();
        let text = render_file(&reply, &key, Some("rampart://h:1/?pin=sha256:00"));
        let m = FileMeta::parse(&text);
        assert_eq!(m.url.as_deref(), Some("rampart://h:1/?pin=sha256:00"));
        assert_eq!(m.device_token.as_deref(), Some("rpd1_x"));
        assert_eq!(m.config_version.as_deref(), Some("v1"));
        assert_eq!(m.private_key, Some(key.to_base64()));
        assert_eq!(m.peer_public_key.as_deref(), Some("k"));
        assert!(m.fleet_urls.is_empty(), "a single gateway lists no fleet");
        // In a fleet every live node's URL is kept, in order.
        let fleet = DeviceReply {
            enroll_urls: vec![
                "rampart://a:1/?pin=sha256:00".into(),
                "rampart://b:1/?pin=sha256:11".into(),
            ],
            ..reply
        };
        let m = FileMeta::parse(&render_file(&fleet, &key, None));
        assert_eq!(m.fleet_urls, fleet.enroll_urls);
    }

    #[test]
    fn private_file_is_0600_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        let p = dir.join("wg").join("rampart.conf");
        write_private(&p, "one\n").unwrap();
        write_private(&p, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp files left"
        );
    }

    #[test]
    fn headless_file_adds_the_pin_and_drops_a_token() {
        let pin = format!("sha256:{}", "cd".repeat(32));
        let h: Headless = toml::from_str(&format!(
            "url = \"rampart://gw.example:8443\"\npin = \"{pin}\"\ntoken_file = \"/etc/rampart/token\"\ndevice_id = \"SN123\"\n"
        ))
        .unwrap();
        let u = h.url().unwrap();
        assert_eq!(u.pin, Some([0xcd; 32]));
        assert_eq!(u.host, "gw.example");
        assert!(
            toml::from_str::<Headless>("url = \"x\"\ntoken_file = \"t\"\nbogus = 1\n").is_err()
        );
    }
}
