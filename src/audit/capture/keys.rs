//! Reviewer keys as `ssh-log-cli generate-key-pair` writes them: standard padded base64 of the raw 32-byte X25519
//! key, 44 bytes, no trailing newline. The public half ([`RecipientKey`], in `keys::recipient` so the config can
//! check it) is configured on the gateway per tenant; the private half ([`ReviewerKey`]) stays with the reviewer.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hpke::{Deserializable, Kem as _, Serializable};

use super::{CaptureError, Kem};

use crate::keys::recipient::decode32;
pub use crate::keys::recipient::{KeyError, RecipientKey};

/// A reviewer's private key, needed only to decode. `Debug` never prints it.
#[derive(Clone)]
pub struct ReviewerKey(<Kem as hpke::Kem>::PrivateKey);

impl ReviewerKey {
    pub fn from_base64(text: &str) -> Result<ReviewerKey, KeyError> {
        let raw = decode32(text)?;
        // Any 32 bytes are an X25519 secret (clamped on the way in).
        <Kem as hpke::Kem>::PrivateKey::from_bytes(&raw)
            .map(ReviewerKey)
            .map_err(|_| KeyError::Length(raw.len()))
    }

    /// Reads a key file as `ssh-log-cli generate-key-pair` writes it.
    pub fn read_file(path: &Path) -> Result<ReviewerKey, CaptureError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(ReviewerKey::from_base64(&text)?)
    }

    /// The matching public key (what the gateway is configured with).
    pub fn public(&self) -> RecipientKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(&Kem::sk_to_pk(&self.0).to_bytes());
        RecipientKey::from_bytes(out)
    }

    pub(super) fn hpke(&self) -> &<Kem as hpke::Kem>::PrivateKey {
        &self.0
    }
}

impl fmt::Debug for ReviewerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReviewerKey(<private; public {}>)", self.public())
    }
}

/// A new reviewer key pair `(private, public)`, each standard padded base64 of 32 bytes with no newline. Like
/// `ssh-log-cli` (RFC 9180 `DeriveKeyPair` of 32 random bytes), the private key is written clamped.
pub fn generate_key_pair() -> Result<(String, String), CaptureError> {
    let mut ikm = [0u8; 32];
    super::os_random(&mut ikm)?;
    let (sk, pk) = Kem::derive_keypair(&ikm);
    ikm.fill(0);
    Ok((
        STANDARD.encode(sk.to_bytes()),
        STANDARD.encode(pk.to_bytes()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_matches_and_is_clamped() {
        let (private, public) = generate_key_pair().unwrap();
        assert_eq!((private.len(), public.len()), (44, 44));
        let sk = ReviewerKey::from_base64(&private).unwrap();
        assert_eq!(sk.public().to_string(), public);
        let raw = STANDARD.decode(&private).unwrap();
        assert_eq!(raw[0] & 7, 0);
        assert_eq!(raw[31] & 0xc0, 0x40);
        assert!(!format!("{sk:?}").contains(&private));
    }

    #[test]
    fn malformed_keys_are_rejected_with_the_fix() {
        let (private, _) = generate_key_pair().unwrap();
        assert_eq!(
            ReviewerKey::from_base64(&format!("{private}\n")).unwrap_err(),
            KeyError::Whitespace
        );
        assert_eq!(
            RecipientKey::from_base64(&private[..40]).unwrap_err(),
            KeyError::Length(30)
        );
        assert_eq!(
            RecipientKey::from_base64("not a key!").unwrap_err(),
            KeyError::Whitespace
        );
        assert_eq!(
            RecipientKey::from_base64("%%%%").unwrap_err(),
            KeyError::NotBase64
        );
        // Unpadded, as the reference also accepts.
        assert!(ReviewerKey::from_base64(private.trim_end_matches('=')).is_ok());
    }
}
