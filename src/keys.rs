//! WireGuard key material: parsing and printing keys the way `wg genkey` / `wg pubkey` do (standard base64 of
//! 32 bytes), generating new ones from the OS RNG, and reading/writing the gateway's private key file.
//!
//! `keys::openssh`: OpenSSH Ed25519 keys (new, written 0600), for the SSH inspector and the audit signing key.
//! `keys::recipient`: a tenant's audit recipient key (X25519), checked by `config`, sealed to by `audit::capture`.
//!
//! Private keys never appear in `Debug` output or logs.
#![deny(unsafe_code)]

pub mod recipient;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519;

/// A peer's (or the gateway's) static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub [u8; 32]);

/// A static private key. `Debug` prints a placeholder.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not valid base64 (expected 44 characters as `wg genkey` prints)")]
    Base64,
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))
}

impl FromStr for PeerKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PeerKey)
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

impl serde::Serialize for PeerKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PeerKey {
    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as `wg genkey` does.
    pub fn generate() -> PrivateKey {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("the OS random source is unavailable");
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        PrivateKey(b)
    }

    pub fn public_key(&self) -> PeerKey {
        PeerKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }

    pub fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }

    /// Base64, as `wg genkey` prints it. Only for writing key files and client configs.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn read_file(path: &Path) -> anyhow::Result<PrivateKey> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read private key file {}", path.display()))?;
        let key = decode32(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; write a key with `rampart keygen > {}` or `wg genkey`",
                path.display(),
                path.display()
            )
        })?;
        Ok(PrivateKey(key))
    }

    /// Writes the key with mode 0600, refusing to overwrite an existing file.
    pub fn write_new_file(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(f, "{}", self.to_base64())?;
        f.sync_all()
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PrivateKey)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// OpenSSH Ed25519 keys (the SSH inspector's CAs and host key, the audit signing key): new ones, and writing
/// them with mode 0600. Here, in a leaf, so `audit` and `ssh` both use it without importing each other.
pub mod openssh {
    use std::io::Write as _;
    use std::path::{Path, PathBuf};

    use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey};

    #[derive(Debug, thiserror::Error)]
    pub enum OpensshKeyError {
        #[error("{path}: {msg}")]
        File { path: PathBuf, msg: String },
        #[error("{0}")]
        Key(String),
    }

    fn key_err(e: impl std::fmt::Display) -> OpensshKeyError {
        OpensshKeyError::Key(e.to_string())
    }

    /// A fresh Ed25519 key.
    pub fn new_ed25519(comment: &str) -> Result<PrivateKey, OpensshKeyError> {
        let mut rng = rand::rng();
        let mut k = PrivateKey::random(&mut rng, Algorithm::Ed25519).map_err(key_err)?;
        k.set_comment(comment);
        Ok(k)
    }

    /// Writes an OpenSSH private key with mode 0600 (atomically) and its `.pub` beside it.
    pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), OpensshKeyError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file_err = |e: std::io::Error| OpensshKeyError::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(file_err)?;
        }
        let text = key.to_openssh(LineEnding::LF).map_err(key_err)?;
        let tmp = with_suffix(path, ".tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(file_err)?;
        f.write_all(text.as_bytes()).map_err(file_err)?;
        f.sync_all().map_err(file_err)?;
        std::fs::rename(&tmp, path).map_err(file_err)?;
        let public = key.public_key().to_openssh().map_err(key_err)?;
        std::fs::write(with_suffix(path, ".pub"), format!("{public}\n")).map_err(file_err)?;
        Ok(())
    }

    fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_wg_pubkey_vector() {
        // Vector produced by `wg genkey | tee k | wg pubkey` (wireguard-tools).
        let sk: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            sk.public_key().to_string(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn rejects_bad_keys_with_reason() {
        assert_eq!("not base64!".parse::<PeerKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PeerKey>(), Err(KeyError::Length(3)));
    }

    #[test]
    fn generated_keys_round_trip() {
        let sk = PrivateKey::generate();
        let again: PrivateKey = sk.to_base64().parse().unwrap();
        assert_eq!(sk.public_key(), again.public_key());
        assert_ne!(sk.public_key(), PrivateKey::generate().public_key());
    }
}
