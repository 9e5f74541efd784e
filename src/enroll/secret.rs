//! Wire forms of the two enrollment credentials, and how they are checked.
//!
//! - enrollment token `rpe1_<id>_<secret>` (what an admin hands out), and
//! - device token `rpd1_<id>_<secret>` (what a device keeps to refresh, rotate its key and leave).
//!
//! `<id>` is 16 lower-case hex digits (8 random bytes, public, named in logs and audit records); `<secret>` is
//! 32 random bytes in unpadded base64url (43 characters; it may contain `_`, so the parser goes by length, not by
//! splitting). Only SHA-256 of the secret is stored: the secret is 256 random bits, so no slow hash is needed.
//! Hashes are compared in constant time. The prefixes are fixed so secret scanners can match a leaked token.
//!
//! Never: log, `Debug`-print or store a secret.
#![deny(unsafe_code)]

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

const ID_LEN: usize = 16;
const SECRET_LEN: usize = 43;

/// Which credential a wire string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `rpe1_`: enrolls a device (one-off or reusable).
    Enrollment,
    /// `rpd1_`: one enrolled device's own credential.
    Device,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Enrollment => "rpe1_",
            Kind::Device => "rpd1_",
        }
    }
}

/// The public id of a token or device: 16 lower-case hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PublicId(String);

impl PublicId {
    pub fn random() -> PublicId {
        let b: [u8; ID_LEN / 2] = rand::random();
        PublicId(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// Accepts exactly 16 hex digits (either case; kept lower case).
    pub fn parse(s: &str) -> Option<PublicId> {
        (s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| PublicId(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicId({})", self.0)
    }
}

/// SHA-256 of a secret: what the store keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Constant-time comparison (the time taken does not depend on where the hashes differ).
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// Why a string is not a credential. Callers answer all of them the same way (`token_invalid`): the
/// distinction is only for the CLI, which checks what an admin pasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("does not start with {0}")]
    Prefix(&'static str),
    #[error("has the wrong length or characters")]
    Shape,
}

/// A parsed credential: its public id and its secret.
#[derive(Clone)]
pub struct Credential {
    kind: Kind,
    id: PublicId,
    secret: [u8; 32],
}

impl Credential {
    /// A new credential with a random secret (`id` random too unless given: devices reuse their own id).
    pub fn generate(kind: Kind, id: Option<PublicId>) -> Credential {
        Credential {
            kind,
            id: id.unwrap_or_else(PublicId::random),
            secret: rand::random(),
        }
    }

    pub fn parse(kind: Kind, s: &str) -> Result<Credential, Malformed> {
        let s = s.trim();
        let rest = s
            .strip_prefix(kind.prefix())
            .ok_or(Malformed::Prefix(kind.prefix()))?;
        if rest.len() != ID_LEN + 1 + SECRET_LEN || !rest.is_char_boundary(ID_LEN) {
            return Err(Malformed::Shape);
        }
        let (id, secret) = rest.split_at(ID_LEN);
        let id = PublicId::parse(id).ok_or(Malformed::Shape)?;
        let secret = secret.strip_prefix('_').ok_or(Malformed::Shape)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| Malformed::Shape)?;
        let secret: [u8; 32] = bytes.try_into().map_err(|_| Malformed::Shape)?;
        Ok(Credential { kind, id, secret })
    }

    pub fn id(&self) -> &PublicId {
        &self.id
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash(Sha256::digest(self.secret).into())
    }

    /// The full wire form. Shown once, to whoever the credential is for.
    pub fn expose(&self) -> String {
        format!(
            "{}{}_{}",
            self.kind.prefix(),
            self.id,
            URL_SAFE_NO_PAD.encode(self.secret)
        )
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", masked(self.kind, &self.id))
    }
}

/// How a credential is shown after creation: `rpe1_<id>_…`.
pub fn masked(kind: Kind, id: &PublicId) -> String {
    format!("{}{id}_…", kind.prefix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hash_matches() {
        for kind in [Kind::Enrollment, Kind::Device] {
            let c = Credential::generate(kind, None);
            let wire = c.expose();
            assert!(wire.starts_with(kind.prefix()), "{wire}");
            assert_eq!(wire.len(), 5 + 16 + 1 + 43);
            let back = Credential::parse(kind, &format!(" {wire}\n")).unwrap();
            assert_eq!(back.id(), c.id());
            assert!(back.hash().matches(&c.hash()));
            assert!(!Credential::generate(kind, None).hash().matches(&c.hash()));
        }
    }

    #[test]
    fn secrets_with_underscores_parse() {
        // A secret whose base64url form starts and ends with '_' (bytes 0xff...).
        let c = Credential {
            kind: Kind::Enrollment,
            id: PublicId::parse("0123456789abcdef").unwrap(),
            secret: [0xff; 32],
        };
        let wire = c.expose();
        assert!(wire.contains("__"), "{wire}");
        assert!(Credential::parse(Kind::Enrollment, &wire)
            .unwrap()
            .hash()
            .matches(&c.hash()));
    }

    #[test]
    fn rejects_malformed() {
        let good = Credential::generate(Kind::Enrollment, None).expose();
        assert_eq!(
            Credential::parse(Kind::Device, &good).unwrap_err(),
            Malformed::Prefix("rpd1_")
        );
        for bad in [
            "",
            "rpe1_",
            &good[..good.len() - 1],
            &format!("{good}A"),
            &good.replace("rpe1_", "rpe1_zz"),
            "rpe1_0123456789abcdeg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rpe1_0123456789abcdef-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rpe1_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA!",
            "rpe1_0123456789abcdé_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                Credential::parse(Kind::Enrollment, bad).is_err(),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential::generate(Kind::Enrollment, None);
        let wire = c.expose();
        let secret = &wire[wire.len() - 43..];
        assert!(!format!("{c:?}").contains(secret));
        assert_eq!(format!("{c:?}"), format!("rpe1_{}_…", c.id()));
    }
}
