//! TLS for the HTTP inspector: reading a ClientHello without decrypting (server name, ALPN), the tenant TLS CA
//! (`rampart ca init --tenant T --tls`), leaf certificates minted per server name and cached, the rustls
//! configs towards the device and the origin, and telling an origin certificate error apart.
//!
//! Files: `state_dir/tls/<tenant>/ca.pem` (install it on devices) and `ca.key` (mode 0600, never leaves the
//! gateway). Leaves are valid for 7 days from an hour ago and share one P-256 key per tenant.
//! Never: decrypt without a verified origin (an origin certificate error becomes a block page), or trust
//! anything but the built-in web roots and the tenant's `tls_upstream_ca` towards origins.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{Accepted, Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::policy::TlsAlert;

/// Most ClientHello bytes read before giving up (a real one is a few hundred bytes to a few kB).
const MAX_HELLO: usize = 64 * 1024;
/// Leaves minted per tenant before the cache starts over.
const LEAF_CACHE: usize = 1024;
/// How long an origin that proved a `do_not_inspect` name is believed without asking again.
pub const PROVEN_FOR: Duration = Duration::from_secs(300);
/// Proven (destination, name) pairs kept per tenant before the cache starts over.
const PROVEN_CACHE: usize = 4096;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "tenant {0:?} has no TLS CA yet; run `rampart ca init --tenant {0} --tls` on the gateway and install \
         state_dir/tls/{0}/ca.pem on its devices"
    )]
    NoCa(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The crypto provider of every config here (aws-lc-rs, whatever else is compiled in).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// `state_dir/tls/<tenant>`.
pub fn ca_dir(state_dir: &Path, tenant: &str) -> PathBuf {
    state_dir.join("tls").join(tenant)
}

/// What `rampart ca init --tls` did.
#[derive(Debug)]
pub struct CaInit {
    pub cert_path: PathBuf,
    /// False when the CA already existed (it is never replaced).
    pub created: bool,
}

/// Creates the tenant's TLS CA unless it exists.
pub fn ca_init(state_dir: &Path, tenant: &str) -> Result<CaInit, TlsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = ca_dir(state_dir, tenant);
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok(CaInit {
            cert_path,
            created: false,
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("Rampart TLS inspection CA ({tenant})"),
    );
    dn.push(DnType::OrganizationName, "Rampart gateway");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let key_pem = ca.key().serialize_pem();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| file_err(&key_path, e))?;
    io::Write::write_all(&mut f, key_pem.as_bytes()).map_err(|e| file_err(&key_path, e))?;
    f.sync_all().map_err(|e| file_err(&key_path, e))?;
    std::fs::write(&cert_path, ca.pem()).map_err(|e| file_err(&cert_path, e))?;
    Ok(CaInit {
        cert_path,
        created: true,
    })
}

/// Placeholder resolver of the config template (each connection gets its own).
#[derive(Debug)]
struct NoCert;

impl ResolvesServerCert for NoCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// One tenant's loaded TLS material: CA, leaf key, leaf cache, and the config templates.
pub struct TenantTls {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaf_key: KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Destinations whose certificate was valid for a `do_not_inspect` name, and when that was checked
    /// (with this material's origin trust: it is dropped when the trust changes).
    proven: Mutex<HashMap<(SocketAddrV4, String), Instant>>,
    /// Shares the session-resumption store across connections.
    server_template: ServerConfig,
    client: ClientConfig,
}

impl std::fmt::Debug for TenantTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTls").finish_non_exhaustive()
    }
}

/// Roots trusted towards origins: the built-in web roots plus the CA certificates in `extra` (PEM).
pub fn origin_roots(extra: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra {
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(path, e))? {
            let cert = cert.map_err(|e| file_err(path, e))?;
            roots.add(cert).map_err(|e| file_err(path, e))?;
            n += 1;
        }
        if n == 0 {
            return Err(file_err(path, "no CERTIFICATE in the file"));
        }
    }
    Ok(roots)
}

/// A client config towards origins (ALPN is set per connection).
pub fn origin_client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(origin_roots(extra_ca)?)
        .with_no_client_auth())
}

impl TenantTls {
    /// Loads the tenant's CA (made by `ca_init`) and origin trust.
    pub fn load(
        state_dir: &Path,
        tenant: &str,
        upstream_ca: Option<&Path>,
    ) -> Result<TenantTls, TlsError> {
        let dir = ca_dir(state_dir, tenant);
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !cert_path.exists() || !key_path.exists() {
            return Err(TlsError::NoCa(tenant.to_string()));
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, e))?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&key_path, e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, ca_key).map_err(|e| file_err(&cert_path, e))?;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| file_err(&cert_path, e))?;
        let leaf_key = KeyPair::generate()?;
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(
            &PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )?;
        let server_template = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCert));
        Ok(TenantTls {
            issuer,
            ca_der,
            leaf_key,
            signing_key,
            leaves: Mutex::new(HashMap::new()),
            proven: Mutex::new(HashMap::new()),
            server_template,
            client: origin_client_config(upstream_ca)?,
        })
    }

    /// The leaf for `name` (a DNS name or an IP literal), minted on first use.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.leaves.lock().expect("leaf cache").get(&name) {
            return Ok(ck.clone());
        }
        // Minted outside the lock; a concurrent duplicate mint is harmless.
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.clone());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(7);
        let cert = params.signed_by(&self.leaf_key, &self.issuer)?;
        let ck = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            self.signing_key.clone(),
        ));
        let mut cache = self.leaves.lock().expect("leaf cache");
        if cache.len() >= LEAF_CACHE {
            cache.clear();
        }
        cache.insert(name, ck.clone());
        Ok(ck)
    }

    /// Whether the origin at `dst` presented a certificate valid for `name` within [`PROVEN_FOR`].
    pub fn proven(&self, dst: SocketAddrV4, name: &str) -> bool {
        self.proven
            .lock()
            .expect("proven cache")
            .get(&(dst, name.to_string()))
            .is_some_and(|at| at.elapsed() < PROVEN_FOR)
    }

    /// Notes that the origin at `dst` presented a certificate valid for `name` just now.
    pub fn remember_proven(&self, dst: SocketAddrV4, name: &str) {
        let mut cache = self.proven.lock().expect("proven cache");
        if cache.len() >= PROVEN_CACHE {
            cache.retain(|_, at| at.elapsed() < PROVEN_FOR);
            if cache.len() >= PROVEN_CACHE {
                cache.clear();
            }
        }
        cache.insert((dst, name.to_string()), Instant::now());
    }

    /// The config towards the device for one connection: this leaf, these ALPN protocols (preferred first).
    pub fn server_config(&self, leaf: Arc<CertifiedKey>, alpn: Vec<Vec<u8>>) -> Arc<ServerConfig> {
        let mut cfg = self.server_template.clone();
        cfg.cert_resolver = Arc::new(rustls::sign::SingleCertAndKey::from(leaf));
        cfg.alpn_protocols = alpn;
        Arc::new(cfg)
    }

    /// The config towards the origin offering `alpn`.
    pub fn client_config(&self, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
        let mut cfg = self.client.clone();
        cfg.alpn_protocols = alpn;
        Arc::new(cfg)
    }
}

/// Why no ClientHello could be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
    #[error("no ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("not a TLS ClientHello: {0}")]
    NotTls(rustls::Error),
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
}

/// The sans-IO half of [`read_client_hello`]: bytes in as the device sends them, the ClientHello out once it is
/// complete, every byte kept (a passthrough replays them to the origin).
#[derive(Default)]
pub struct HelloReader {
    acceptor: Acceptor,
    seen: Vec<u8>,
}

impl HelloReader {
    /// Feeds the next bytes from the device. `Ok(None)`: the ClientHello is not complete yet.
    pub fn push(&mut self, data: &[u8]) -> Result<Option<Accepted>, HelloError> {
        self.seen.extend_from_slice(data);
        if self.seen.len() > MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        let mut rd = data;
        while !rd.is_empty() {
            self.acceptor.read_tls(&mut rd)?;
        }
        match self.acceptor.accept() {
            Ok(accepted) => Ok(accepted),
            Err((e, _alert)) => Err(HelloError::NotTls(e)),
        }
    }

    /// Every byte pushed so far.
    pub fn seen(&self) -> &[u8] {
        &self.seen
    }

    pub fn into_seen(self) -> Vec<u8> {
        self.seen
    }
}

/// Reads the ClientHello (without answering it) and returns it with every byte read, so the connection
/// can still be relayed untouched.
pub async fn read_client_hello(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<(Accepted, Vec<u8>), HelloError> {
    let work = async {
        let mut reader = HelloReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Err(HelloError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            if let Some(accepted) = reader.push(&buf[..n])? {
                return Ok((accepted, reader.into_seen()));
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(HelloError::Timeout(timeout)))
}

/// Sends a fatal alert (plaintext, before any handshake) and closes.
pub async fn refuse(mut tcp: TcpStream, alert: TlsAlert) {
    let code = match alert {
        TlsAlert::AccessDenied => 49,
        TlsAlert::NoApplicationProtocol => 120,
    };
    let _ = tcp
        .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, code])
        .await;
    let _ = tcp.shutdown().await;
}

/// The server name to verify the origin against: the client's SNI, else the destination address.
pub fn origin_name(sni: Option<&str>, dst: IpAddr) -> ServerName<'static> {
    sni.and_then(|s| ServerName::try_from(s.to_string()).ok())
        .unwrap_or(ServerName::IpAddress(dst.into()))
}

/// The rustls error inside an IO error from a TLS connect, if any. (`io::Error::source` skips the wrapped
/// error, so the chain is walked with `get_ref`.)
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    let mut inner: &(dyn std::error::Error + 'static) = e.get_ref()?;
    loop {
        if let Some(r) = inner.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        inner = match inner.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref()?,
            None => inner.source()?,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_init_is_idempotent_and_leaves_chain_to_the_ca() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        let first = ca_init(&dir, "acme").unwrap();
        assert!(first.created);
        let pem = std::fs::read(&first.cert_path).unwrap();
        assert!(!ca_init(&dir, "acme").unwrap().created);
        assert_eq!(std::fs::read(&first.cert_path).unwrap(), pem);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(ca_dir(&dir, "acme").join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "CA key readable by others");
        assert!(matches!(
            TenantTls::load(&dir, "other", None),
            Err(TlsError::NoCa(_))
        ));
        let t = TenantTls::load(&dir, "acme", None).unwrap();
        let leaf = t.leaf("Web.Example").unwrap();
        assert!(Arc::ptr_eq(&leaf, &t.leaf("web.example").unwrap()));
        assert_eq!(leaf.cert.len(), 2);
        // A verifier trusting only the tenant CA accepts the leaf for its name.
        let mut roots = RootCertStore::empty();
        roots.add(t.ca_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &ServerName::try_from("web.example").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
        // A destination that proved a name is believed for that name only.
        let dst: SocketAddrV4 = "10.9.0.1:443".parse().unwrap();
        assert!(!t.proven(dst, "bank.example"));
        t.remember_proven(dst, "bank.example");
        assert!(t.proven(dst, "bank.example"));
        assert!(!t.proven(dst, "other.example"));
        assert!(!t.proven("10.9.0.2:443".parse().unwrap(), "bank.example"));
        let ip_leaf = t.leaf("10.9.0.1").unwrap();
        verifier
            .verify_server_cert(
                &ip_leaf.cert[0],
                &[],
                &ServerName::IpAddress("10.9.0.1".parse::<IpAddr>().unwrap().into()),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn client_hello_gives_name_and_alpn_and_keeps_every_byte() {
        let (c, mut s) = pair().await;
        let mut cfg = origin_client_config(None).unwrap();
        cfg.alpn_protocols = vec![ALPN_H2.to_vec(), b"x-other".to_vec()];
        let client = tokio::spawn(async move {
            let _ = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("Web.Example").unwrap(), c)
                .await;
        });
        let (accepted, seen) = read_client_hello(&mut s, Duration::from_secs(10))
            .await
            .unwrap();
        let hello = accepted.client_hello();
        assert_eq!(hello.server_name(), Some("web.example"));
        let alpn: Vec<&[u8]> = hello.alpn().unwrap().collect();
        assert_eq!(alpn, [ALPN_H2, b"x-other"]);
        assert_eq!(seen[0], 0x16);
        drop(s);
        let _ = client.await;
    }

    #[tokio::test]
    async fn garbage_truncation_and_silence_are_errors_not_hangs() {
        let cases: [&[u8]; 3] = [
            b"\x16\x03\x01\x00\x05hello",
            b"\x16\x03\x01\x02\x00\x01\x00",
            b"",
        ];
        for bytes in cases {
            let (mut c, mut s) = pair().await;
            c.write_all(bytes).await.unwrap();
            if !bytes.is_empty() {
                c.shutdown().await.unwrap();
            }
            let r = read_client_hello(&mut s, Duration::from_millis(300)).await;
            assert!(r.is_err(), "{bytes:?} accepted");
            drop(c);
        }
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let wrapped = io::Error::other(e);
        assert!(matches!(
            rustls_error(&wrapped),
            Some(rustls::Error::InvalidCertificate(_))
        ));
        assert!(rustls_error(&io::Error::other("plain")).is_none());
    }
}
