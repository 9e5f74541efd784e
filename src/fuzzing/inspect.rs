//! Targets for the inspectors' parsers: the TLS ClientHello reader (`tls_client_hello`), HTTP request-head
//! handling (`http_request`: what `http::proxy` does with a head hyper accepted) and the path normalizer
//! (`http_path`), SSH typed lines (`ssh_input_line`), SFTP requests (`sftp`) and the capture reader
//! (`capture`: raw files, and files sealed to the test reviewer key so inputs reach the record parser).
//!
//! The streaming parsers must give the same result however the stream is cut into reads.

use std::io::Cursor;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use http::header::{self, HeaderName, HeaderValue};
use http::{request, Method, Request, Uri, Version};

use super::{split_by, Input};
use crate::audit::capture::{
    self, CaptureWriter, ExitInfo, PtyInfo, RecipientKey, ReviewerKey, Source,
};
use crate::config::{Config, DeviceName, HttpAction, NoInspect, UserName};
use crate::http::policy::{self, Identity, RequestFacts, TlsAction, TlsFacts};
use crate::http::rewrite::{self, OriginProto};
use crate::http::tls::{HelloError, HelloReader};
use crate::ssh::input_line::{LineAssembler, MAX_LINE};
use crate::ssh::sftp::SftpParser;

/// A tenant with HTTP rules of every kind, decrypting TLS, with names and networks it does not inspect.
pub(crate) const HTTP_TENANT: &str = r#"
[gateway]
state_dir = "/nonexistent/rampart-fuzz"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
tls_decrypt = true
do_not_inspect = ["bank.example", "*.pinned.example", "10.9.0.0/16"]
[[tenant.rule]]
id = "web"
action = "inspect_http"
dst = ["10.0.0.0/8"]
proto = "tcp"
ports = ["80", "443"]
[[tenant.http_rule]]
id = "no-admin"
action = "block"
paths = ["/admin"]
[[tenant.http_rule]]
id = "intranet-writes"
action = "block"
hosts = ["*.intranet.example"]
methods = ["POST", "DELETE"]
[[tenant.http_rule]]
id = "tunnels"
action = "allow"
hosts = ["proxy.example"]
methods = ["CONNECT"]
[[tenant.http_rule]]
id = "contractors"
action = "log"
groups = ["contractors"]
"#;

fn http_config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        Config::from_toml(HTTP_TENANT, Path::new("/fuzz/gateway.toml")).expect("fuzz HTTP tenant")
    })
}

fn with_identity<R>(f: impl FnOnce(&Identity<'_>) -> R) -> R {
    let user = UserName::parse("alice").expect("literal");
    let device = DeviceName::parse("laptop").expect("literal");
    let groups = vec!["contractors".to_string()];
    f(&Identity {
        user: &user,
        device: &device,
        groups: &groups,
    })
}

/// `tls_client_hello`: `[cuts][bytes]`: the bytes arrive in reads cut where `cuts` says. A complete ClientHello
/// keeps every byte read; the decision does not depend on the cuts.
pub(crate) fn tls_client_hello(data: &[u8]) {
    let mut inp = Input::new(data);
    let cuts = inp.short();
    let dst: IpAddr = if inp.bool() {
        [10, 9, 0, 1]
    } else {
        [10, 20, 0, 5]
    }
    .into();
    let bytes = inp.rest();
    let chunked = read_hello(&split_by(bytes, cuts), dst);
    let whole = read_hello(&[bytes], dst);
    if bytes.len() <= 16 * 1024 {
        assert_eq!(
            chunked, whole,
            "the ClientHello decision depends on how the bytes were cut"
        );
    }
}

/// What the inspector learns from a ClientHello: (SNI, offered ALPN, the TLS decision), or the error's kind.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    Accepted(Option<String>, Option<Vec<Vec<u8>>>, policy::TlsAction),
    Incomplete,
    TooLarge,
    NotTls,
    Io,
}

fn read_hello(chunks: &[&[u8]], dst: IpAddr) -> Hello {
    let mut reader = HelloReader::default();
    let mut pushed = Vec::new();
    for c in chunks {
        pushed.extend_from_slice(c);
        match reader.push(c) {
            Ok(None) => assert_eq!(reader.seen(), &pushed[..], "bytes lost while reading"),
            Ok(Some(accepted)) => {
                assert_eq!(
                    reader.seen(),
                    &pushed[..],
                    "the ClientHello did not keep every byte"
                );
                let hello = accepted.client_hello();
                // As `http::inspect_tls` reads it.
                let sni = hello
                    .server_name()
                    .map(|s| s.to_ascii_lowercase())
                    .filter(|s| s.parse::<IpAddr>().is_err());
                let offered: Option<Vec<Vec<u8>>> =
                    hello.alpn().map(|l| l.map(<[u8]>::to_vec).collect());
                let tenant = &http_config().tenants[0];
                let facts = TlsFacts {
                    sni: sni.as_deref(),
                    dst,
                    alpn: offered.as_deref(),
                };
                let action = with_identity(|who| policy::classify_tls(&tenant.http, who, &facts));
                // A decrypting tenant relays untouched only what do_not_inspect lists (issue 11, finding 1):
                // the device cannot opt out by its choice of name or protocols.
                if !tenant
                    .http
                    .do_not_inspect
                    .iter()
                    .any(|e| matches!(e, NoInspect::Net(n) if n.contains(&dst)))
                {
                    let relayed = |a: &TlsAction| matches!(a, TlsAction::Passthrough { .. });
                    match &action {
                        TlsAction::PassthroughIfOriginProvesName { otherwise, .. } => {
                            assert!(
                                !relayed(otherwise),
                                "{sni:?} relayed untouched without proof: {action:?}"
                            )
                        }
                        a => assert!(!relayed(a), "{sni:?} {offered:?} relayed untouched: {a:?}"),
                    }
                }
                return Hello::Accepted(sni, offered, action);
            }
            Err(HelloError::TooLarge) => return Hello::TooLarge,
            Err(HelloError::NotTls(_)) => return Hello::NotTls,
            Err(HelloError::Io(_) | HelloError::Timeout(_)) => return Hello::Io,
        }
    }
    Hello::Incomplete
}

/// `http_request`: `[flags][sni][request head]`. A head that hyper's parser (httparse) accepts and that makes a
/// valid `http::Request` goes through what `proxy::handle` does before forwarding: authority, host and the
/// canonical path (or a refusal), the HTTP rules, and the rewrite for an HTTP/1.1 and an HTTP/2 origin.
/// Property (issue 11, finding 3): the origin is sent exactly the path the rules matched.
pub(crate) fn http_request(data: &[u8]) {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let sni = (flags & 1 != 0).then(|| String::from_utf8_lossy(inp.short()).into_owned());
    let head = inp.rest();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return;
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return;
    };
    let fields: Vec<(&str, &[u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    let build = || -> Option<request::Parts> {
        let mut b = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).ok()?)
            .uri(path.parse::<Uri>().ok()?)
            .version(if version == 0 {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            });
        for (n, v) in &fields {
            b = b.header(
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_bytes(v).ok()?,
            );
        }
        Some(b.body(()).ok()?.into_parts().0)
    };
    let Some(mut parts) = build() else {
        return; // hyper answers 400
    };
    let tenant = &http_config().tenants[0];
    // As `proxy::handle`: only HTTP/1.1 may switch protocols, every version has its Upgrade limited.
    let allowed = |v: Version| match v {
        Version::HTTP_11 => &tenant.http.allow_upgrade[..],
        _ => &[][..],
    };
    let upgrade_to = rewrite::limit_upgrade(&mut parts.headers, allowed(parts.version));
    if let Some(to) = &upgrade_to {
        for e in to.split(',') {
            let name = rewrite::upgrade_name(e);
            assert!(
                tenant.http.allow_upgrade.contains(&name),
                "upgrade to {name:?} not on the tenant's list"
            );
        }
    }
    assert!(
        !parts.headers.contains_key("http2-settings"),
        "h2c settings forwarded"
    );
    assert!(
        upgrade_to.is_none() || parts.version == Version::HTTP_11,
        "an HTTP/1.0 request may switch protocols"
    );
    assert!(
        upgrade_to.is_some() || !rewrite::is_upgrade(&parts.headers),
        "an upgrade the tenant does not allow is still asked for"
    );
    let dst: IpAddr = [10, 20, 0, 5].into();
    let authority = rewrite::request_authority(&parts)
        .or_else(|| sni.clone())
        .unwrap_or_else(|| dst.to_string());
    let host = rewrite::normalize_host(&authority);
    assert!(
        !host.bytes().any(|b| b.is_ascii_uppercase()),
        "host not lower case: {host:?}"
    );
    assert!(!host.ends_with('.'), "trailing dot kept: {host:?}");
    let connect = parts.method == Method::CONNECT;
    let matched = if connect {
        String::new()
    } else {
        match rewrite::canonical_path(parts.uri.path()) {
            Ok(p) => p,
            Err(_) => return, // refused with a 400 page
        }
    };
    if !connect {
        check_canonical(&matched);
    }
    let method = parts.method.as_str().to_ascii_uppercase();
    let verdict = with_identity(|who| {
        policy::classify_request(
            &tenant.http.rules,
            who,
            &RequestFacts {
                host: &host,
                path: Some(&matched),
                method: Some(&method),
            },
        )
    });
    if matched.starts_with("/admin") {
        assert_eq!(verdict.action, HttpAction::Block, "{matched} not blocked");
    }
    if connect && host != "proxy.example" {
        assert_eq!(
            verdict.action,
            HttpAction::Block,
            "CONNECT to {host} allowed"
        );
    }
    for proto in [OriginProto::Http1, OriginProto::Http2] {
        let mut p = build().expect("built once already");
        rewrite::limit_upgrade(&mut p.headers, allowed(p.version));
        let scheme = if flags & 2 != 0 { "https" } else { "http" };
        if rewrite::to_origin(&mut p, proto, scheme, &authority, &matched).is_err() {
            continue; // answered with a 400 page
        }
        let upgrade = upgrade_to.is_some();
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "trailer",
            "transfer-encoding",
            "proxy-authorization",
            "proxy-authenticate",
            "upgrade",
        ] {
            if upgrade && (name == "connection" || name == "upgrade") {
                continue;
            }
            assert!(!p.headers.contains_key(name), "hop-by-hop {name} forwarded");
        }
        match proto {
            OriginProto::Http1 => {
                assert_eq!(p.version, Version::HTTP_11);
                assert_eq!(
                    p.headers.get(header::HOST).map(|h| h.as_bytes()),
                    Some(authority.as_bytes())
                );
            }
            OriginProto::Http2 => {
                assert_eq!(p.version, Version::HTTP_2);
                assert!(!p.headers.contains_key(header::HOST));
            }
        }
        if !connect {
            assert_eq!(
                p.uri.path(),
                matched,
                "the origin is sent another path than the rules matched"
            );
            assert_eq!(p.uri.query(), parts.uri.query(), "the query changed");
        }
    }
}

/// The form rules match and origins are sent: absolute, no empty, `.` or `..` segments, no query or fragment,
/// nothing origins read differently (encoded separators, backslashes, double encoding, inner `;`), and stable.
fn check_canonical(n: &str) {
    if n == "*" {
        return;
    }
    assert!(n.starts_with('/'), "{n:?}");
    assert!(!n.contains("//"), "{n:?}");
    assert!(!n.contains(['?', '#', '\\']), "{n:?}");
    let upper = n.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%3B", "%00"] {
        assert!(!upper.contains(bad), "{bad} in {n:?}");
    }
    assert!(
        !upper
            .as_bytes()
            .windows(5)
            .any(|w| &w[..3] == b"%25" && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit()),
        "double encoding in {n:?}"
    );
    let segs: Vec<&str> = n.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        assert!(*seg != "." && *seg != "..", "{n:?}");
        assert!(
            i + 1 == segs.len() || !seg.contains(';'),
            "inner parameter in {n:?}"
        );
    }
    assert_eq!(
        rewrite::canonical_path(n).as_deref(),
        Ok(n),
        "canonical_path is not idempotent"
    );
}

/// `http_path`: a request path (the text up to `?`/`#`, and a URI's path when the bytes parse as one). Its
/// canonical form, if it has one, is canonical and stable.
pub(crate) fn http_path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // What a request target's path can be (the query and fragment are split off before).
    let path = text.split(['?', '#']).next().unwrap_or_default();
    if let Ok(c) = rewrite::canonical_path(path) {
        check_canonical(&c);
    }
    if let Ok(uri) = Uri::try_from(data) {
        if let Ok(c) = rewrite::canonical_path(uri.path()) {
            check_canonical(&c);
        }
    }
}

/// `ssh_input_line`: `[cuts][bytes typed]`. Lines are the same however the input is cut; each is non-empty,
/// at most `MAX_LINE` bytes, and free of control characters.
pub(crate) fn ssh_input_line(data: &[u8]) {
    let mut inp = Input::new(data);
    let cuts = inp.short();
    let bytes = inp.rest();
    let lines = |chunks: &[&[u8]]| {
        let mut a = LineAssembler::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        for c in chunks {
            a.push(c, |l| out.push(l.to_vec()));
        }
        out
    };
    let whole = lines(&[bytes]);
    assert_eq!(
        lines(&split_by(bytes, cuts)),
        whole,
        "lines depend on how the input was cut"
    );
    for l in &whole {
        assert!(!l.is_empty() && l.len() <= MAX_LINE);
        assert!(
            l.iter().all(|&b| b >= 0x20 && b != 0x7f),
            "control byte in {l:?}"
        );
    }
}

/// `sftp`: `[cuts][client bytes]`. Operations are the same however the stream is cut, and each can be described.
pub(crate) fn sftp(data: &[u8]) {
    let mut inp = Input::new(data);
    let cuts = inp.short();
    let bytes = inp.rest();
    let ops = |chunks: &[&[u8]]| {
        let mut p = SftpParser::default();
        chunks.iter().flat_map(|c| p.push(c)).collect::<Vec<_>>()
    };
    let whole = ops(&[bytes]);
    assert_eq!(
        ops(&split_by(bytes, cuts)),
        whole,
        "SFTP operations depend on how the stream was cut"
    );
    for op in &whole {
        let _ = op.describe();
    }
}

/// The reviewer key of the shared ssh-log-cli vectors (`../shared/testdata/ssh-log-cli/reviewer_key`), so the
/// vectors in the seed corpus decrypt.
const REVIEWER_KEY: &str = "IGfbFj/L3HtEp3RnJ/gaGoT4T6SytYgY5VRaczPnOFQ=";

fn reviewer() -> &'static (ReviewerKey, RecipientKey) {
    static KEYS: OnceLock<(ReviewerKey, RecipientKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let k = ReviewerKey::from_base64(REVIEWER_KEY).expect("vector key");
        let p = k.public();
        (k, p)
    })
}

/// `capture`: mode bit 0 clear: the bytes are a capture file. Set: a capture is written from the input (records,
/// raw sealed blocks, block flushes) to the test key, then read back; one written only with `record` reads back
/// exactly the bytes recorded per side.
pub(crate) fn capture(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let (key, recipient) = reviewer();
    let file = if mode & 1 == 0 {
        inp.rest().to_vec()
    } else {
        let pty = (mode & 2 != 0).then(|| PtyInfo {
            term: Some("xterm".into()),
            width: 80,
            height: 24,
            modes: vec![("ECHO".into(), 1)],
        });
        let Ok(mut w) = CaptureWriter::new(
            Cursor::new(Vec::new()),
            recipient,
            u64::from(inp.u32()),
            pty,
        ) else {
            return;
        };
        w.set_block_target(usize::from(inp.u16()));
        let mut wrote = [Vec::new(), Vec::new()];
        let mut well_formed = true;
        let mut ops = 0;
        while !inp.is_empty() && ops < 64 {
            ops += 1;
            let op = inp.u8();
            match op % 4 {
                0 | 1 => {
                    let source = if op & 4 == 0 {
                        Source::Client
                    } else {
                        Source::Origin
                    };
                    let elapsed = u64::from(inp.u32());
                    let body = inp.chunk(4096);
                    if w.record(source, capture::CODE_DATA, elapsed, body).is_err() {
                        return;
                    }
                    wrote[usize::from(source == Source::Origin)].extend_from_slice(body);
                }
                2 => {
                    if w.flush_block().is_err() {
                        return;
                    }
                }
                _ => {
                    // A block that is not whole records (what a foreign or broken writer could produce).
                    let raw = inp.chunk(512);
                    if w.flush_block().is_err() || w.seal(raw).is_err() {
                        return;
                    }
                    well_formed = false;
                }
            }
        }
        let exit = (mode & 4 != 0).then(|| ExitInfo {
            timestamp: 1,
            status: Some(0),
            ..ExitInfo::default()
        });
        let mut out = Vec::new();
        if w.finish(exit, &mut out).is_err() {
            return;
        }
        if well_formed {
            let d = capture::decode(&out[..], key).expect("a capture we wrote decodes");
            assert_eq!(
                d.data_from(Source::Client),
                wrote[0],
                "client bytes changed"
            );
            assert_eq!(
                d.data_from(Source::Origin),
                wrote[1],
                "origin bytes changed"
            );
            assert!(d.anomalies.is_empty(), "{:?}", d.anomalies);
        }
        out
    };
    if let Ok(d) = capture::decode(&file[..], key) {
        let _ = d.reader_output();
        let _ = capture::write_asciicast(&d, &mut Vec::new());
    }
}
