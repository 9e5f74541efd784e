//! TLS of the enrollment listener and the pins devices check it with.
//!
//! The certificate is either the operator's chain (`[enroll] tls_cert`/`tls_key`) or a self-signed ECDSA P-256
//! certificate minted on first use under `state_dir/enroll/tls/` (`cert.pem`, `key.pem` mode 0600) and kept
//! from then on. A fresh appliance has no name a public CA would vouch for, so devices pin the certificate
//! instead (the kubeadm `discovery-token-ca-cert-hash` idea):
//!
//! - `pin=sha256:<hex>` in enrollment URLs: SHA-256 of the leaf certificate (DER), checked by `rampart enroll`;
//! - `sha256//<base64>`: SHA-256 of the leaf's SubjectPublicKeyInfo, what `curl --pinnedpubkey` checks.
//!
//! Pinned clients verify the handshake signature against the pinned certificate, so a man in the middle
//! needs its private key. Never: accept a certificate whose pin differs (no fallback to "trust on first use").
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, ServerConfig, SignatureScheme};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot mint the enrollment certificate: {0}")]
    Mint(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the certificate is not X.509 DER: {0}")]
    NotX509(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Where the self-signed certificate lives.
pub fn self_signed_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("enroll").join("tls")
}

/// The two pins of a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    /// SHA-256 of the certificate DER.
    pub cert_sha256: [u8; 32],
    /// SHA-256 of its SubjectPublicKeyInfo DER.
    pub spki_sha256: [u8; 32],
}

impl Pins {
    pub fn of(leaf: &CertificateDer<'_>) -> Result<Pins, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| TlsError::NotX509(e.to_string()))?;
        Ok(Pins {
            cert_sha256: Sha256::digest(leaf.as_ref()).into(),
            spki_sha256: Sha256::digest(cert.tbs_certificate.subject_pki.raw).into(),
        })
    }

    /// `sha256:<hex>`, the `pin` of enrollment URLs.
    pub fn url_pin(&self) -> String {
        format!("sha256:{}", hex(&self.cert_sha256))
    }

    /// `sha256//<base64>`, for `curl --pinnedpubkey`.
    pub fn curl_pin(&self) -> String {
        use base64::Engine as _;
        format!(
            "sha256//{}",
            base64::engine::general_purpose::STANDARD.encode(self.spki_sha256)
        )
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses `sha256:<64 hex>` (the form in URLs and `enroll.toml`).
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let h = s.trim().strip_prefix("sha256:")?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The listener's certificate chain and key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub pins: Pins,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("chain", &self.chain.len())
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The operator's chain when configured, else the self-signed certificate of `state_dir` (minted now if
    /// there is none; `names` go into its subjectAltName).
    pub fn load(
        state_dir: &Path,
        operator: Option<&(PathBuf, PathBuf)>,
        names: &[String],
    ) -> Result<Identity, TlsError> {
        let (cert_path, key_path) = match operator {
            Some((c, k)) => (c.clone(), k.clone()),
            None => mint_if_missing(state_dir, names)?,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| file_err(&cert_path, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&cert_path, e))?;
        let Some(leaf) = chain.first() else {
            return Err(file_err(&cert_path, "no CERTIFICATE in the file"));
        };
        let pins = Pins::of(leaf)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        Ok(Identity { chain, key, pins })
    }

    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// Mints the self-signed certificate unless it exists. Written into a fresh directory that is renamed into
/// place, so a concurrent minter (CLI and gateway at once) never leaves a certificate with another's key.
fn mint_if_missing(state_dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = self_signed_dir(state_dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let parent = dir.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(|e| file_err(parent, e))?;
    let tmp = parent.join(format!("tls.tmp-{}", super::secret::PublicId::random()));
    std::fs::create_dir(&tmp).map_err(|e| file_err(&tmp, e))?;
    let result = (|| {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut sans = vec![SanType::DnsName("rampart-enroll".try_into()?)];
        for n in names {
            match n.parse::<std::net::IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => {
                    if let Ok(dns) = n.clone().try_into() {
                        sans.push(SanType::DnsName(dns));
                    }
                }
            }
        }
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Rampart enrollment");
        dn.push(DnType::OrganizationName, "Rampart gateway");
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let kp = KeyPair::generate()?;
        let c = params.self_signed(&kp)?;
        Ok::<_, TlsError>((c.pem(), kp.serialize_pem()))
    })()
    .and_then(|(cert_pem, key_pem)| {
        let kp = tmp.join("key.pem");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&kp)
            .map_err(|e| file_err(&kp, e))?;
        std::io::Write::write_all(&mut f, key_pem.as_bytes()).map_err(|e| file_err(&kp, e))?;
        f.sync_all().map_err(|e| file_err(&kp, e))?;
        let cp = tmp.join("cert.pem");
        std::fs::write(&cp, cert_pem).map_err(|e| file_err(&cp, e))?;
        std::fs::File::open(&cp)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_err(&cp, e))?;
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Someone else minted it first: keep theirs.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if !(cert.exists() && key.exists()) {
        return Err(file_err(
            &dir,
            "exists but lacks cert.pem or key.pem; move the directory aside to mint a new certificate \
             (devices must then use the new pin)",
        ));
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    tracing::info!(path = %dir.display(), "minted the enrollment listener's self-signed certificate");
    Ok((cert, key))
}

/// Accepts exactly the server certificate whose SHA-256 is `pin`, and checks the handshake signature against it.
#[derive(Debug)]
pub struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    pub fn new(pin: [u8; 32]) -> PinVerifier {
        PinVerifier {
            pin,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if bool::from(got.ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_once_and_pins_are_stable() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        let a = Identity::load(&dir, None, &["198.18.0.1".into(), "gw.example".into()]).unwrap();
        let b = Identity::load(&dir, None, &[]).unwrap();
        assert_eq!(a.pins, b.pins, "the certificate is kept, not minted again");
        assert_ne!(a.pins.cert_sha256, a.pins.spki_sha256);
        assert_eq!(parse_pin(&a.pins.url_pin()), Some(a.pins.cert_sha256));
        assert!(a.pins.curl_pin().starts_with("sha256//"));
        assert!(a.server_config().is_ok());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(self_signed_dir(&dir).join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_operator_chain_is_used_as_given() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        std::fs::create_dir_all(&dir).unwrap();
        let kp = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["enroll.example".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let (c, k) = (dir.join("chain.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, kp.serialize_pem()).unwrap();
        let id = Identity::load(&dir, Some(&(c.clone(), k.clone())), &[]).unwrap();
        assert_eq!(id.pins, Pins::of(cert.der()).unwrap());
        assert!(id.server_config().is_ok());
        assert!(
            !self_signed_dir(&dir).exists(),
            "nothing minted when the operator gives a chain"
        );
        std::fs::write(&c, "not pem").unwrap();
        let e = Identity::load(&dir, Some(&(c.clone(), k)), &[]).unwrap_err();
        assert!(e.to_string().contains("chain.pem"), "{e}");
    }

    #[test]
    fn parse_pin_rejects_other_forms() {
        assert!(parse_pin("sha256:00").is_none());
        assert!(parse_pin(&format!("sha1:{}", "0".repeat(64))).is_none());
        assert!(parse_pin(&format!("sha256:{}", "g".repeat(64))).is_none());
        assert_eq!(
            parse_pin(&format!("sha256:{}", "ab".repeat(32))),
            Some([0xab; 32])
        );
    }
}
