//! The on-ramp context (RCX1): whose packets a tunnel carries. A connected on-ramp (Unix `SOCK_SEQPACKET`)
//! sends it once, as its first datagram; an unconnected one (GUE) carries it in every packet's private data.
//! One format and one parser for both (`/work/shared/design/onramps.md` §3.1; `docs/onramps.md` byte by byte).
//!
//! ```text
//!  0        1        2                 4
//! +--------+--------+-----------------+------------------------------------------+
//! | ver=1  | flags=0| total_len (BE)  | TLVs: type u8, len u8, value[len] ...    |
//! +--------+--------+-----------------+------------------------------------------+
//! ```
//! `total_len` counts the whole context, header included: at least 4, a multiple of 4, at most [`MAX_LEN`].
//! Type 0 is a one-byte pad (no length byte) and may only fill the space after the last TLV. A type below 0x80
//! is critical: a parser that does not know it refuses the context. From 0x80 up a type is optional and an
//! unknown one is skipped (IPv6 options do the same with their high bits). A known type may appear once.
//!
//! [`Context::parse`] checks everything once and returns a view that borrows the bytes (no allocation);
//! [`Context::emit`] writes the canonical form (types in ascending order, zero padding), which parses back to
//! the same value.

use std::fmt;

/// The only version this code reads and writes.
pub const VERSION: u8 = 1;
/// The largest context accepted: generous for names and labels, small enough to bound a parser's work.
pub const MAX_LEN: usize = 512;
/// Names (tenant, site, device) follow the config's id rules: 1-64 letters, digits, '-', '_' or '.'.
pub const MAX_NAME: usize = 64;
/// The labels value, `key=value;...`, at most this many bytes.
pub const MAX_LABELS: usize = 200;

const HEADER: usize = 4;
const PAD: u8 = 0;
const OPTIONAL: u8 = 0x80;

/// The value types this version knows. Numbers are the wire's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Field {
    /// The tenant id as written in the config (`[[tenant]] id`).
    Tenant = 1,
    /// The branch site's name (`[[onramp.gue.site]] name`).
    Site = 2,
    /// The device or peer the terminator authenticated, by name.
    Device = 3,
    /// 16 bytes the sender chooses to correlate its own logs with the gateway's records.
    Correlation = 4,
    /// A virtual network number (u16) inside the tenant.
    Vnet = 5,
    /// `key=value` pairs separated by `;`, UTF-8, at most [`MAX_LABELS`] bytes.
    Labels = 6,
    /// The key a GUE site's authentication tag was made with (u32).
    KeyId = 32,
    /// A GUE packet's authentication tag (16 bytes), computed with this value zeroed.
    AuthTag = 33,
    /// A GUE packet's replay counter (u64).
    Counter = 34,
}

impl Field {
    fn from_wire(t: u8) -> Option<Field> {
        Some(match t {
            1 => Field::Tenant,
            2 => Field::Site,
            3 => Field::Device,
            4 => Field::Correlation,
            5 => Field::Vnet,
            6 => Field::Labels,
            32 => Field::KeyId,
            33 => Field::AuthTag,
            34 => Field::Counter,
            _ => return None,
        })
    }
}

/// Why a context was refused. Every variant names what the sender must fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("context truncated: it needs {need} bytes, {have} arrived")]
    Truncated { need: usize, have: usize },
    #[error("context version {0} is not supported (this gateway speaks version {VERSION})")]
    Version(u8),
    #[error("context flags {0:#04x} are not defined in version {VERSION} (send 0)")]
    Flags(u8),
    #[error("context length {0} is invalid (at least 4, a multiple of 4, at most {MAX_LEN})")]
    Length(usize),
    #[error("context type {0} is critical and unknown to this gateway")]
    UnknownCritical(u8),
    #[error("context field {0:?} appears twice")]
    Duplicate(Field),
    #[error(
        "context field {0:?} has an invalid value (wrong size, or not a valid name or label list)"
    )]
    BadValue(Field),
    #[error("context padding is followed by a field (pad bytes may only end the context)")]
    PadThenField,
    #[error("context does not fit: {need} bytes needed, the buffer has {have}")]
    NoRoom { need: usize, have: usize },
}

/// A checked context. Names and labels borrow the parsed bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context<'a> {
    pub tenant: Option<&'a str>,
    pub site: Option<&'a str>,
    pub device: Option<&'a str>,
    pub correlation: Option<[u8; 16]>,
    pub vnet: Option<u16>,
    pub labels: Option<&'a str>,
    pub key_id: Option<u32>,
    pub auth_tag: Option<[u8; 16]>,
    pub counter: Option<u64>,
}

impl<'a> Context<'a> {
    /// Checks the context at the start of `buf` and returns it with its length (`buf` may hold more after it:
    /// a GUE packet's inner packet, for example; a SEQPACKET on-ramp requires the two lengths to be equal).
    pub fn parse(buf: &'a [u8]) -> Result<(Context<'a>, usize), ContextError> {
        if buf.len() < HEADER {
            return Err(ContextError::Truncated {
                need: HEADER,
                have: buf.len(),
            });
        }
        if buf[0] != VERSION {
            return Err(ContextError::Version(buf[0]));
        }
        if buf[1] != 0 {
            return Err(ContextError::Flags(buf[1]));
        }
        let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if total < HEADER || total % 4 != 0 || total > MAX_LEN {
            return Err(ContextError::Length(total));
        }
        if buf.len() < total {
            return Err(ContextError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        let mut c = Context::default();
        let mut seen = 0u64;
        let mut rest = &buf[HEADER..total];
        while let Some((&t, after)) = rest.split_first() {
            if t == PAD {
                if after.iter().any(|&b| b != PAD) {
                    return Err(ContextError::PadThenField);
                }
                break;
            }
            let Some((&len, after)) = after.split_first() else {
                return Err(ContextError::Truncated {
                    need: total + 1,
                    have: total,
                });
            };
            let len = usize::from(len);
            if after.len() < len {
                return Err(ContextError::Truncated {
                    need: total + len - after.len(),
                    have: total,
                });
            }
            let (value, after) = after.split_at(len);
            rest = after;
            let Some(field) = Field::from_wire(t) else {
                if t & OPTIONAL == 0 {
                    return Err(ContextError::UnknownCritical(t));
                }
                continue;
            };
            let bit = 1u64 << (field as u8 % 64);
            if seen & bit != 0 {
                return Err(ContextError::Duplicate(field));
            }
            seen |= bit;
            c.set(field, value).ok_or(ContextError::BadValue(field))?;
        }
        Ok((c, total))
    }

    fn set(&mut self, field: Field, v: &'a [u8]) -> Option<()> {
        match field {
            Field::Tenant => self.tenant = Some(name(v)?),
            Field::Site => self.site = Some(name(v)?),
            Field::Device => self.device = Some(name(v)?),
            Field::Correlation => self.correlation = Some(v.try_into().ok()?),
            Field::Vnet => self.vnet = Some(u16::from_be_bytes(v.try_into().ok()?)),
            Field::Labels => self.labels = Some(labels(v)?),
            Field::KeyId => self.key_id = Some(u32::from_be_bytes(v.try_into().ok()?)),
            Field::AuthTag => self.auth_tag = Some(v.try_into().ok()?),
            Field::Counter => self.counter = Some(u64::from_be_bytes(v.try_into().ok()?)),
        }
        Some(())
    }

    /// Where the value of `field` starts in `buf`, a context [`parse`](Self::parse) accepted (a GUE MAC is
    /// computed with the tag's value zeroed, so the verifier must find it in the bytes as sent).
    pub fn value_offset(buf: &[u8], field: Field) -> Option<usize> {
        let total = usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])).min(buf.len());
        let mut at = HEADER;
        while at + 2 <= total && buf[at] != PAD {
            if buf[at] == field as u8 {
                return Some(at + 2);
            }
            at += 2 + usize::from(buf[at + 1]);
        }
        None
    }

    /// The labels as `(key, value)` pairs, in the order sent.
    pub fn label_pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.labels
            .into_iter()
            .flat_map(|l| l.split(';'))
            .filter_map(|kv| kv.split_once('='))
    }

    /// The bytes [`emit`](Self::emit) writes.
    pub fn buffer_len(&self) -> usize {
        let body: usize = self.fields().map(|(_, v)| 2 + v.len()).sum();
        (HEADER + body).div_ceil(4) * 4
    }

    /// Writes the canonical form into `buf` and returns its length. Fails (writing nothing) when a value is
    /// not one `parse` accepts or the context would exceed [`MAX_LEN`] or `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, ContextError> {
        for (field, v) in self.fields() {
            let ok = match field {
                Field::Tenant | Field::Site | Field::Device => name(v.as_slice()).is_some(),
                Field::Labels => labels(v.as_slice()).is_some(),
                _ => true,
            };
            if !ok {
                return Err(ContextError::BadValue(field));
            }
        }
        let total = self.buffer_len();
        if total > MAX_LEN {
            return Err(ContextError::Length(total));
        }
        if buf.len() < total {
            return Err(ContextError::NoRoom {
                need: total,
                have: buf.len(),
            });
        }
        buf[0] = VERSION;
        buf[1] = 0;
        buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let mut at = HEADER;
        for (field, v) in self.fields() {
            let v = v.as_slice();
            buf[at] = field as u8;
            buf[at + 1] = v.len() as u8;
            buf[at + 2..at + 2 + v.len()].copy_from_slice(v);
            at += 2 + v.len();
        }
        buf[at..total].fill(PAD);
        Ok(total)
    }

    /// Every present field with its wire value, in ascending type order (the canonical order).
    fn fields(&self) -> impl Iterator<Item = (Field, Value<'a>)> {
        let s = |f, v: Option<&'a str>| v.map(|v| (f, Value::Borrowed(v.as_bytes())));
        [
            s(Field::Tenant, self.tenant),
            s(Field::Site, self.site),
            s(Field::Device, self.device),
            self.correlation
                .map(|v| (Field::Correlation, Value::fixed(&v))),
            self.vnet
                .map(|v| (Field::Vnet, Value::fixed(&v.to_be_bytes()))),
            s(Field::Labels, self.labels),
            self.key_id
                .map(|v| (Field::KeyId, Value::fixed(&v.to_be_bytes()))),
            self.auth_tag.map(|v| (Field::AuthTag, Value::fixed(&v))),
            self.counter
                .map(|v| (Field::Counter, Value::fixed(&v.to_be_bytes()))),
        ]
        .into_iter()
        .flatten()
    }
}

/// A field's wire value while emitting: borrowed names and labels, or a fixed-size value (at most 16 bytes)
/// held inline, so emitting never allocates.
enum Value<'a> {
    Borrowed(&'a [u8]),
    Fixed([u8; 16], usize),
}

impl Value<'_> {
    fn fixed(b: &[u8]) -> Value<'static> {
        let mut v = [0u8; 16];
        v[..b.len()].copy_from_slice(b);
        Value::Fixed(v, b.len())
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Value::Borrowed(b) => b,
            Value::Fixed(v, len) => &v[..*len],
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

fn name(v: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(v).ok()?;
    crate::config::valid_ident(s, MAX_NAME).then_some(s)
}

/// `key=value` pairs separated by ';': keys are ids, values printable ASCII without ';'; empty list refused.
fn labels(v: &[u8]) -> Option<&str> {
    if v.is_empty() || v.len() > MAX_LABELS {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?;
    s.split(';')
        .all(|kv| {
            kv.split_once('=').is_some_and(|(k, val)| {
                crate::config::valid_ident(k, MAX_NAME)
                    && val.bytes().all(|b| b.is_ascii_graphic() && b != b';')
            })
        })
        .then_some(s)
}

/// The on-ramp's answer to a SEQPACKET client's context: `ver, status, 0, 0, session id (u64 BE)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// The gateway's id for the connection (0 when refused); flow records name it.
    pub session: u64,
}

/// Whether a context was accepted, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::Display)]
#[repr(u8)]
pub enum Status {
    #[strum(to_string = "accepted")]
    Accepted = 0,
    #[strum(to_string = "malformed context")]
    Malformed = 1,
    #[strum(to_string = "this client's uid/gid may not use the on-ramp")]
    NotPermitted = 2,
    #[strum(to_string = "this client may not claim that tenant")]
    TenantNotAllowed = 3,
    #[strum(to_string = "unknown tenant")]
    UnknownTenant = 4,
    #[strum(to_string = "too many connections")]
    TooManyConnections = 5,
    #[strum(to_string = "this client may not claim that site or device")]
    ClaimNotAllowed = 6,
}

impl Reply {
    pub const LEN: usize = 12;

    pub fn to_bytes(self) -> [u8; Reply::LEN] {
        let mut b = [0u8; Reply::LEN];
        b[0] = VERSION;
        b[1] = self.status as u8;
        b[4..].copy_from_slice(&self.session.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Option<Reply> {
        if b.len() != Reply::LEN || b[0] != VERSION || b[2..4] != [0, 0] {
            return None;
        }
        let status = match b[1] {
            0 => Status::Accepted,
            1 => Status::Malformed,
            2 => Status::NotPermitted,
            3 => Status::TenantNotAllowed,
            4 => Status::UnknownTenant,
            5 => Status::TooManyConnections,
            6 => Status::ClaimNotAllowed,
            _ => return None,
        };
        Some(Reply {
            status,
            session: u64::from_be_bytes(b[4..].try_into().ok()?),
        })
    }
}

impl fmt::Display for Context<'_> {
    /// For logs: names only, never the tag.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenant={} site={} device={}",
            self.tenant.unwrap_or("-"),
            self.site.unwrap_or("-"),
            self.device.unwrap_or("-")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn emit(c: &Context<'_>) -> Vec<u8> {
        let mut b = vec![0u8; MAX_LEN];
        let n = c.emit(&mut b).unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn a_tenant_context_is_twelve_bytes_on_the_wire() {
        let c = Context {
            tenant: Some("acme"),
            ..Context::default()
        };
        assert_eq!(emit(&c), [1, 0, 0, 12, 1, 4, b'a', b'c', b'm', b'e', 0, 0]);
        let b = emit(&c);
        assert_eq!(Context::parse(&b), Ok((c, 12)));
    }

    #[test]
    fn refusals_name_the_problem() {
        let ok = emit(&Context {
            tenant: Some("acme"),
            ..Context::default()
        });
        let changed = |i: usize, v: u8| {
            let mut b = ok.clone();
            b[i] = v;
            b
        };
        let parse = |b: &[u8]| Context::parse(b).map(|(c, _)| c).err();
        assert_eq!(parse(&changed(0, 2)), Some(ContextError::Version(2)));
        assert_eq!(parse(&changed(1, 1)), Some(ContextError::Flags(1)));
        assert_eq!(parse(&changed(3, 6)), Some(ContextError::Length(6)));
        assert_eq!(
            parse(&changed(3, 16)),
            Some(ContextError::Truncated { need: 16, have: 12 })
        );
        assert_eq!(
            parse(&changed(4, 7)),
            Some(ContextError::UnknownCritical(7))
        );
        // An unknown optional type is skipped: the context then has no tenant.
        let skipped = changed(4, 0x81);
        assert_eq!(Context::parse(&skipped), Ok((Context::default(), 12)));
        assert_eq!(
            parse(&changed(6, b'-')),
            Some(ContextError::BadValue(Field::Tenant))
        );
        assert_eq!(
            parse(&changed(5, 9)),
            Some(ContextError::Truncated { need: 15, have: 12 })
        );
        assert_eq!(parse(&changed(11, 1)), Some(ContextError::PadThenField));
        assert!(Context::parse(&ok[..3]).is_err());
        // The same field twice.
        let twice = [1, 0, 0, 12, 1, 1, b'a', 1, 1, b'b', 0, 0];
        assert_eq!(
            Context::parse(&twice),
            Err(ContextError::Duplicate(Field::Tenant))
        );
        // A fixed-size value of the wrong size.
        let short = [1, 0, 0, 8, 5, 1, 7, 0];
        assert_eq!(
            Context::parse(&short),
            Err(ContextError::BadValue(Field::Vnet))
        );
    }

    #[test]
    fn emit_refuses_what_parse_would_refuse() {
        let mut b = [0u8; MAX_LEN];
        let bad = Context {
            tenant: Some("no spaces"),
            ..Context::default()
        };
        assert_eq!(bad.emit(&mut b), Err(ContextError::BadValue(Field::Tenant)));
        let c = Context {
            tenant: Some("acme"),
            ..Context::default()
        };
        assert_eq!(
            c.emit(&mut b[..8]),
            Err(ContextError::NoRoom { need: 12, have: 8 })
        );
    }

    #[test]
    fn labels_read_as_pairs() {
        let c = Context {
            labels: Some("site=berlin;rack=7"),
            ..Context::default()
        };
        let b = emit(&c);
        let (back, _) = Context::parse(&b).unwrap();
        let pairs: Vec<_> = back.label_pairs().collect();
        assert_eq!(pairs, [("site", "berlin"), ("rack", "7")]);
        for bad in ["", "k", "=v", "k=v;", "k=a b"] {
            assert!(labels(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn replies_round_trip_and_reject_garbage() {
        let r = Reply {
            status: Status::TenantNotAllowed,
            session: 0x0102_0304_0506_0708,
        };
        assert_eq!(Reply::parse(&r.to_bytes()), Some(r));
        assert_eq!(Reply::parse(&[1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Reply::parse(&r.to_bytes()[..11]), None);
    }

    fn ident() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,20}"
    }

    proptest! {
        #[test]
        fn emit_then_parse_is_the_identity(
            tenant in proptest::option::of(ident()),
            site in proptest::option::of(ident()),
            device in proptest::option::of(ident()),
            correlation in proptest::option::of(any::<[u8; 16]>()),
            vnet in proptest::option::of(any::<u16>()),
            labels in proptest::option::of(proptest::collection::vec((ident(), "[!-:<-~]{0,8}"), 1..4)),
            key_id in proptest::option::of(any::<u32>()),
            auth_tag in proptest::option::of(any::<[u8; 16]>()),
            counter in proptest::option::of(any::<u64>()),
        ) {
            let labels = labels.map(|l| l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";"));
            let c = Context {
                tenant: tenant.as_deref(),
                site: site.as_deref(),
                device: device.as_deref(),
                correlation,
                vnet,
                labels: labels.as_deref(),
                key_id,
                auth_tag,
                counter,
            };
            let b = emit(&c);
            prop_assert_eq!(b.len(), c.buffer_len());
            prop_assert_eq!(b.len() % 4, 0);
            let (back, len) = Context::parse(&b).unwrap();
            prop_assert_eq!(back, c);
            prop_assert_eq!(len, b.len());
        }

        #[test]
        fn any_bytes_parse_or_refuse_and_what_parses_is_canonical_after_one_emit(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            crate::fuzzing::run("onramp_context", &bytes);
        }
    }
}
