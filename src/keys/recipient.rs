//! A tenant's audit recipient key: the public X25519 half of a reviewer key pair (`rampart audit keygen`,
//! `ssh-log-cli generate-key-pair`), as `audit_recipient` in the config names it. Standard base64 of 32
//! bytes, 44 characters, no whitespace. Here, beside the WireGuard keys, rather than in `audit::capture`
//! (which seals recordings to it), so that `config` can check it without importing `audit`.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hpke::Deserializable as _;

/// The HPKE KEM the key belongs to (`audit::capture` seals with it).
pub(crate) type Kem = hpke::kem::X25519HkdfSha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the key ends with a newline or contains whitespace; write it as exactly 44 base64 characters with no \
         newline (ssh-log-cli rejects such a key file too; `printf %s KEY > FILE` writes it correctly)"
    )]
    Whitespace,
    #[error("the key is not base64; expected 44 characters as `rampart audit keygen` prints them")]
    NotBase64,
    #[error(
        "the key decodes to {0} bytes; an X25519 reviewer key is 32 bytes (44 base64 characters)"
    )]
    Length(usize),
    #[error("the public key is a low-order X25519 point that no one holds the private key for; generate a real one")]
    LowOrder,
}

/// 32 bytes from standard base64, with or without `=` padding (like the reference reader).
pub(crate) fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    if text.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(KeyError::Whitespace);
    }
    let bytes = STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .map_err(|_| KeyError::NotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// A tenant's reviewer public key: captures are encrypted to it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecipientKey([u8; 32]);

impl RecipientKey {
    pub fn from_base64(text: &str) -> Result<RecipientKey, KeyError> {
        decode32(text).map(RecipientKey)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> RecipientKey {
        RecipientKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn hpke(&self) -> Result<<Kem as hpke::Kem>::PublicKey, KeyError> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0)
            .map_err(|_| KeyError::Length(self.0.len()))
    }
}

impl fmt::Display for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecipientKey({self})")
    }
}

impl std::str::FromStr for RecipientKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        RecipientKey::from_base64(s)
    }
}
