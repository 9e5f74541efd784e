//! Keyed GUE sites: the private data of each packet is an RCX1 context ([`crate::onramp::context`]) with
//! `KEY_ID`, `COUNTER` and `AUTH_TAG`. The tag is HMAC-SHA256, truncated to 16 bytes, over the GUE header word,
//! the context with the tag's 16 bytes zeroed, and the inner packet. The counter must be new within a
//! 2048-packet sliding window (WireGuard's bitmap), checked before the MAC and recorded only after it verified,
//! so forged packets cannot move the window. Pure: no IO, no clock.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::onramp::context::{Context, Field};

/// Bytes of the tag on the wire.
pub const TAG_LEN: usize = 16;
/// Counters this far below the highest one seen are still accepted once.
pub const REPLAY_WINDOW: u64 = 2048;

/// Why a keyed site's packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No context, a malformed one, one without key id, counter and tag, a key id that is not the site's,
    /// or a tenant or site name that is not the site's.
    BadContext,
    /// The tag does not verify.
    BadTag,
    /// The counter was seen before or is older than the window.
    Replayed,
}

/// A site's key, ready to use (the HMAC's padded key blocks are computed once).
#[derive(Clone)]
pub struct SiteKey {
    pub id: u32,
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SiteKey {
    pub fn new(id: u32, secret: &[u8; 32]) -> SiteKey {
        SiteKey {
            id,
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// The tag of a packet: `header` is the GUE header word, `private` the context with the tag's value at
    /// `tag_at` (treated as zeros), `inner` the packet.
    pub fn tag(&self, header: &[u8], private: &[u8], tag_at: usize, inner: &[u8]) -> [u8; TAG_LEN] {
        let mut m = self.mac.clone();
        m.update(header);
        m.update(&private[..tag_at]);
        m.update(&[0u8; TAG_LEN]);
        m.update(&private[tag_at + TAG_LEN..]);
        m.update(inner);
        let full = m.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }

    /// Checks a keyed packet for the site `site` of tenant `tenant` against `window`, and records its counter
    /// when it verifies.
    pub fn verify(
        &self,
        window: &mut ReplayWindow,
        tenant: &str,
        site: &str,
        header: &[u8],
        private: &[u8],
        inner: &[u8],
    ) -> Result<(), AuthError> {
        let (ctx, len) = Context::parse(private).map_err(|_| AuthError::BadContext)?;
        let (Some(key_id), Some(tag), Some(counter)) = (ctx.key_id, ctx.auth_tag, ctx.counter)
        else {
            return Err(AuthError::BadContext);
        };
        if len != private.len()
            || key_id != self.id
            || ctx.tenant.is_some_and(|t| t != tenant)
            || ctx.site.is_some_and(|s| s != site)
        {
            return Err(AuthError::BadContext);
        }
        if !window.check(counter) {
            return Err(AuthError::Replayed);
        }
        let at = Context::value_offset(private, Field::AuthTag).ok_or(AuthError::BadContext)?;
        let want = self.tag(header, private, at, inner);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &tag[..])) {
            return Err(AuthError::BadTag);
        }
        window.update(counter);
        Ok(())
    }

    /// Writes the private data of a keyed packet (a sender's side: tests and the documentation's example).
    /// Returns its length; `header` must already say that length (`data_header`).
    pub fn seal(&self, counter: u64, header: &[u8], inner: &[u8], buf: &mut [u8]) -> Option<usize> {
        let ctx = Context {
            key_id: Some(self.id),
            counter: Some(counter),
            auth_tag: Some([0; TAG_LEN]),
            ..Context::default()
        };
        let n = ctx.emit(buf).ok()?;
        let at = Context::value_offset(&buf[..n], Field::AuthTag)?;
        let t = self.tag(header, &buf[..n], at, inner);
        buf[at..at + TAG_LEN].copy_from_slice(&t);
        Some(n)
    }

    /// Bytes of private data [`seal`](Self::seal) writes.
    pub fn sealed_len() -> usize {
        Context {
            key_id: Some(0),
            counter: Some(0),
            auth_tag: Some([0; TAG_LEN]),
            ..Context::default()
        }
        .buffer_len()
    }
}

/// Counters seen recently: the highest, and a bitmap of the [`REPLAY_WINDOW`] below it.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    top: Option<u64>,
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn bit(n: u64) -> (usize, u64) {
        let i = n % REPLAY_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `n` would be accepted (not seen, not too old).
    pub fn check(&self, n: u64) -> bool {
        let Some(top) = self.top else { return true };
        if n > top {
            return true;
        }
        if top - n >= REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Self::bit(n);
        self.bits[w] & b == 0
    }

    /// Records `n` (after [`check`](Self::check) passed and the packet verified).
    pub fn update(&mut self, n: u64) {
        match self.top {
            Some(top) if n <= top => {}
            Some(top) if n - top < REPLAY_WINDOW => {
                for c in top + 1..=n {
                    let (w, b) = Self::bit(c);
                    self.bits[w] &= !b;
                }
                self.top = Some(n);
            }
            _ => {
                self.bits = Default::default();
                self.top = Some(n);
            }
        }
        let (w, b) = Self::bit(n);
        self.bits[w] |= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V4: [u8; 20] = [
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 7, 0, 2, 10, 0, 0, 1,
    ];

    fn sealed(k: &SiteKey, counter: u64) -> (Vec<u8>, Vec<u8>) {
        let len = SiteKey::sealed_len();
        let header = super::super::header::data_header(4, len).unwrap().to_vec();
        let mut p = vec![0u8; len];
        assert_eq!(k.seal(counter, &header, &V4, &mut p), Some(len));
        (header, p)
    }

    #[test]
    fn good_tag_passes_bad_tag_and_replay_do_not() {
        let k = SiteKey::new(7, &[9; 32]);
        let mut w = ReplayWindow::default();
        let (h, p) = sealed(&k, 1);
        // Positive control first.
        assert_eq!(k.verify(&mut w, "acme", "b7", &h, &p, &V4), Ok(()));
        // The same packet again: replayed.
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &h, &p, &V4),
            Err(AuthError::Replayed)
        );
        // A new counter with a flipped bit in the inner packet, the tag, or a wrong key.
        let (h, p) = sealed(&k, 2);
        let mut inner = V4;
        inner[19] ^= 1;
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &h, &p, &inner),
            Err(AuthError::BadTag)
        );
        let mut bad = p.clone();
        let at = Context::value_offset(&bad, Field::AuthTag).unwrap();
        bad[at] ^= 1;
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &h, &bad, &V4),
            Err(AuthError::BadTag)
        );
        let other = SiteKey::new(7, &[8; 32]);
        assert_eq!(
            other.verify(&mut w, "acme", "b7", &h, &p, &V4),
            Err(AuthError::BadTag)
        );
        // Forged packets did not burn counter 2.
        assert_eq!(k.verify(&mut w, "acme", "b7", &h, &p, &V4), Ok(()));
        // Another key id, or no context at all.
        let k8 = SiteKey::new(8, &[9; 32]);
        let (h8, p8) = sealed(&k8, 3);
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &h8, &p8, &V4),
            Err(AuthError::BadContext)
        );
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &[0, 4, 0, 0], &[], &V4),
            Err(AuthError::BadContext)
        );
    }

    #[test]
    fn a_context_naming_another_tenant_or_site_is_refused() {
        let k = SiteKey::new(7, &[9; 32]);
        let mut w = ReplayWindow::default();
        let ctx = Context {
            tenant: Some("globex"),
            key_id: Some(7),
            counter: Some(1),
            auth_tag: Some([0; TAG_LEN]),
            ..Context::default()
        };
        let mut p = vec![0u8; ctx.buffer_len()];
        let n = ctx.emit(&mut p).unwrap();
        let h = super::super::header::data_header(4, n).unwrap();
        let at = Context::value_offset(&p, Field::AuthTag).unwrap();
        let t = k.tag(&h, &p, at, &V4);
        p[at..at + TAG_LEN].copy_from_slice(&t);
        assert_eq!(
            k.verify(&mut w, "acme", "b7", &h, &p, &V4),
            Err(AuthError::BadContext)
        );
        // Control: the same context is fine for the tenant it names.
        assert_eq!(k.verify(&mut w, "globex", "b7", &h, &p, &V4), Ok(()));
    }

    #[test]
    fn window_slides() {
        let mut w = ReplayWindow::default();
        w.update(5000);
        assert!(!w.check(5000));
        assert!(w.check(4999) && w.check(5000 - REPLAY_WINDOW + 1));
        assert!(!w.check(5000 - REPLAY_WINDOW));
        w.update(5000 + REPLAY_WINDOW * 3);
        assert!(w.check(5000 + REPLAY_WINDOW * 3 - 1));
        assert!(!w.check(5000));
    }

    proptest! {
        /// Against a model: a counter is accepted iff it was never accepted before and is within the window
        /// below the highest accepted one.
        #[test]
        fn window_matches_the_model(seq in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut top: Option<u64> = None;
            for n in seq {
                let want = !seen.contains(&n) && top.is_none_or(|t| n > t || t - n < REPLAY_WINDOW);
                prop_assert_eq!(w.check(n), want, "counter {}", n);
                if want {
                    w.update(n);
                    seen.insert(n);
                    top = Some(top.map_or(n, |t| t.max(n)));
                }
            }
        }
    }
}
