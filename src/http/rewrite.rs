//! Pure request/response rewriting between the device's connection and the origin's: hop-by-hop headers,
//! the request target and `Host`, and the normal forms of host and path that policy matches on.
#![deny(unsafe_code)]

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Uri, Version};

/// Hop-by-hop headers (RFC 9110 7.6.1 plus the usual legacy ones); never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The protocol name of an `Upgrade` entry (`websocket` of `WebSocket/13`), in lower case.
pub fn upgrade_name(entry: &str) -> String {
    entry
        .split('/')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The protocols an `Upgrade` header lists (all its values, comma-separated).
fn upgrade_entries(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Limits a request's protocol switch to `allowed` (lower-case protocol names): other `Upgrade` entries are
/// removed, and without any left the request is a plain one (`Upgrade` and the `upgrade` connection option
/// gone), as RFC 9110 lets an intermediary do. `HTTP2-Settings` (h2c) is always removed. Returns the
/// protocols still asked for.
pub fn limit_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> Option<String> {
    headers.remove("http2-settings");
    if !headers.contains_key(header::UPGRADE) {
        return None;
    }
    let asked = is_upgrade(headers);
    let kept: Vec<String> = upgrade_entries(headers)
        .into_iter()
        .filter(|e| allowed.contains(&upgrade_name(e)))
        .collect();
    if asked && !kept.is_empty() {
        let v = kept.join(", ");
        headers.insert(header::UPGRADE, HeaderValue::from_str(&v).ok()?);
        return Some(v);
    }
    headers.remove(header::UPGRADE);
    let options: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
        .collect();
    headers.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&options.join(", ")) {
        if !options.is_empty() {
            headers.insert(header::CONNECTION, v);
        }
    }
    None
}

/// The protocol a `101 Switching Protocols` switched to, if it is one of `asked` (the request's `Upgrade`).
pub fn switched_protocol(response: &HeaderMap, asked: &str) -> Option<String> {
    let asked: Vec<String> = asked.split(',').map(upgrade_name).collect();
    let entries = upgrade_entries(response);
    match entries.as_slice() {
        [one] if asked.contains(&upgrade_name(one)) => Some(upgrade_name(one)),
        _ => None,
    }
}

/// Removes hop-by-hop headers (and those `Connection` names). With `upgrade`, `Connection: upgrade` and
/// `Upgrade` are kept, as a protocol switch needs them end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    if upgrade {
        if let Some(v) = upgrade_value {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, v);
        }
    }
}

/// The authority the device asked for: the URI's (HTTP/2 `:authority`, absolute-form) or `Host`.
pub fn request_authority(parts: &request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|a| !a.is_empty())
}

/// Lower case, without port, brackets or trailing dot: the form host rules match.
pub fn normalize_host(authority: &str) -> String {
    let a = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => a,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Why a request path is refused instead of forwarded: origins disagree on what it means, so a path rule
/// could not know what the origin will serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmbiguousPath {
    #[error("it contains a backslash (\\ or %5C), which some servers read as '/'")]
    Backslash,
    #[error(
        "it contains an encoded separator (%2F or %3B), which some servers decode before routing"
    )]
    EncodedSeparator,
    #[error("it contains a double-encoded escape (%25 followed by hex digits)")]
    DoubleEncoded,
    #[error("it contains an encoded control character or NUL")]
    Control,
    #[error("it contains a '%' that is not followed by two hex digits")]
    BadEscape,
    #[error("its percent-escapes are not UTF-8 (overlong or invalid sequences)")]
    NotUtf8,
    #[error("a ';' parameter follows an empty or dot segment (such as \"..;\"), which some servers resolve")]
    DotParameter,
    #[error(
        "a ';' parameter appears before the last segment, which some servers strip before routing"
    )]
    InnerParameter,
}

/// The one form of a request path that policy matches and the origin is sent: percent-escapes of unreserved
/// characters decoded and the others in upper case, empty and `.` segments dropped, `..` resolved (a
/// trailing `.`/`..` keeps the trailing slash). Paths origins read in different ways are refused
/// ([`AmbiguousPath`]): `\`, `%5C`, `%2F`, `%3B`, `%25XX`, encoded controls, malformed or non-UTF-8 escapes,
/// and `;` parameters anywhere but on the last, named segment (servlet containers drop them, so
/// `/public/..;/admin` is `/admin` to Tomcat). `path` is the request target's path (no query); `*`
/// (`OPTIONS *`) stays as it is.
///
/// What is left means the same to every origin up to case (`case_insensitive` rules) and a final `;param`
/// (after the segment name, so prefixes still match).
pub fn canonical_path(path: &str) -> Result<String, AmbiguousPath> {
    if path == "*" {
        return Ok(path.to_string());
    }
    let bytes = path.as_bytes();
    // `text`: the path with unreserved escapes decoded and every other byte kept (escapes as written);
    // `decoded`: every escape decoded, to check that the escapes form UTF-8.
    let mut text = Vec::with_capacity(bytes.len());
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err(AmbiguousPath::Backslash);
        }
        if b != b'%' {
            text.push(b);
            decoded.push(b);
            i += 1;
            continue;
        }
        let v = match (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (Some(h), Some(l)) => h << 4 | l,
            _ => return Err(AmbiguousPath::BadEscape),
        };
        i += 3;
        match v {
            b'\\' => return Err(AmbiguousPath::Backslash),
            b'/' | b';' => return Err(AmbiguousPath::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(AmbiguousPath::Control),
            v if unreserved(v) => text.push(v),
            v => text.extend_from_slice(format!("%{v:02X}").as_bytes()),
        }
        decoded.push(v);
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(AmbiguousPath::NotUtf8);
    }
    // Checked on the result: a decoded `%32` after a kept `%25` spells `%252` too.
    if text
        .windows(5)
        .any(|w| w[..3] == *b"%25" && hex(w[3]).is_some() && hex(w[4]).is_some())
    {
        return Err(AmbiguousPath::DoubleEncoded);
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let raw: Vec<&[u8]> = text.split(|b| *b == b'/').collect();
    let mut trailing = false;
    for (n, seg) in raw.iter().enumerate() {
        let last = n + 1 == raw.len();
        if let Some(semi) = seg.iter().position(|b| *b == b';') {
            if matches!(&seg[..semi], b"" | b"." | b"..") {
                return Err(AmbiguousPath::DotParameter);
            }
            if !last {
                return Err(AmbiguousPath::InnerParameter);
            }
        }
        match *seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
        trailing = last && matches!(*seg, b"" | b"." | b"..");
    }
    let mut out = String::with_capacity(text.len() + 1);
    for s in &segments {
        out.push('/');
        for &b in *s {
            // Bytes outside ASCII (allowed raw by some clients) are sent as escapes.
            if b.is_ascii() {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

/// How the origin connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginProto {
    Http1,
    Http2,
}

/// Prepares a device request for the origin: request target in the form the origin connection needs
/// (origin-form + `Host` for HTTP/1.1, absolute URI without `Host` for HTTP/2) with `path` (the
/// [`canonical_path`] policy matched) and the device's query, version set to the origin's, hop-by-hop headers
/// stripped (kept for a protocol switch).
pub fn to_origin(
    parts: &mut request::Parts,
    proto: OriginProto,
    scheme: &str,
    authority: &str,
    path: &str,
) -> Result<(), http::Error> {
    let upgrade = parts.version == Version::HTTP_11 && is_upgrade(&parts.headers);
    // `te: trailers` is the one TE value HTTP/2 allows; gRPC needs it end to end.
    let te_trailers = parts
        .headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if te_trailers && proto == OriginProto::Http2 {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    if parts.method == Method::CONNECT {
        parts.uri = Uri::builder().authority(authority).build()?;
    } else {
        match proto {
            OriginProto::Http1 => {
                parts.uri = Uri::builder().path_and_query(pq).build()?;
            }
            OriginProto::Http2 => {
                parts.uri = Uri::builder()
                    .scheme(scheme)
                    .authority(authority)
                    .path_and_query(pq)
                    .build()?;
            }
        }
    }
    match proto {
        OriginProto::Http1 => {
            parts.version = Version::HTTP_11;
            parts
                .headers
                .insert(header::HOST, HeaderValue::from_str(authority)?);
        }
        OriginProto::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How the most permissive origins read a path: every escape decoded, `\\` as `/`, `;params` dropped from
    /// each segment (servlet containers), dot segments resolved, case folded (IIS); `tests/tools/http_origin.py
    /// --lenient` in the end-to-end tests does the same.
    fn lenient(path: &str) -> String {
        let mut bytes = Vec::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let esc = (b[i] == b'%')
                .then(|| Some(hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?))
                .flatten();
            match esc {
                Some(v) => {
                    bytes.push(v);
                    i += 3;
                }
                None => {
                    bytes.push(b[i]);
                    i += 1;
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        for seg in text.split('/') {
            match seg.split(';').next().unwrap_or("") {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/")).to_lowercase()
    }

    fn forwarded(path_and_query: &str, proto: OriginProto) -> Option<String> {
        let (mut parts, ()) = http::Request::get(path_and_query)
            .body(())
            .ok()?
            .into_parts();
        let path = canonical_path(parts.uri.path()).ok()?;
        to_origin(&mut parts, proto, "https", "a.example", &path).ok()?;
        assert_eq!(
            parts.uri.path(),
            path,
            "forwarded path differs from the matched one"
        );
        Some(path)
    }

    proptest! {
        /// What policy matched is exactly what the origin is sent, it is canonical (a second pass changes
        /// nothing), and no permissive origin reads it as an admin path unless a case-insensitive prefix rule
        /// on `/admin` matches it too.
        #[test]
        fn the_forwarded_path_is_the_matched_path(
            p in "(/|a|d|m|i|n|A|x|\\.|\\.\\.|;|;x|%2f|%2F|%5c|\\\\|%2e|%2E|%61|%41|%3b|%25|%252f|%32|%00|%c0%af|%c3%a9|%e9|%|%g1|//|\\?q=/admin){1,12}"
        ) {
            for proto in [OriginProto::Http1, OriginProto::Http2] {
                let Some(path) = forwarded(&p, proto) else { continue };
                prop_assert!(path.starts_with('/'), "{path}");
                prop_assert!(!path.contains("//") && !path.contains("/./") && !path.contains("/../"), "{path}");
                prop_assert_eq!(canonical_path(&path), Ok(path.clone()));
                let seen = lenient(&path);
                prop_assert!(
                    !seen.starts_with("/admin") || path.to_ascii_lowercase().starts_with("/admin"),
                    "{p:?} is forwarded as {path:?}, which a lenient origin reads as {seen:?}"
                );
            }
        }

        #[test]
        fn dot_segments_and_encoding_do_not_hide_a_prefix(
            junk in "[a-z]{1,6}",
            rest in "(/[a-z0-9]{1,4}){0,3}",
            dots in 0usize..3,
        ) {
            let evasive = format!("/{junk}/..{}/%61dmin{rest}", "/.".repeat(dots));
            prop_assert!(canonical_path(&evasive).unwrap().starts_with("/admin"), "{evasive}");
        }
    }

    #[test]
    fn paths_are_canonical_or_refused() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("//admin/./x", "/admin/x"),
            ("/x/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/", "/a/"),
            ("", "/"),
            ("*", "*"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/100%25", "/100%25"),
            ("/app/page.jsp;jsessionid=1", "/app/page.jsp;jsessionid=1"),
        ] {
            assert_eq!(canonical_path(raw).as_deref(), Ok(want), "{raw}");
        }
        use AmbiguousPath::*;
        for (raw, why) in [
            ("/%2fadmin", EncodedSeparator),
            ("/public/..%2Fadmin", EncodedSeparator),
            ("/admin%3bx/panel", EncodedSeparator),
            ("/%5cadmin", Backslash),
            ("/public\\..\\admin", Backslash),
            ("/public/..;/admin", DotParameter),
            ("/public/.;/admin", DotParameter),
            ("/;x/admin", DotParameter),
            ("/public/%2e%2e;/admin", DotParameter),
            ("/admin;x/panel", InnerParameter),
            ("/%252fadmin", DoubleEncoded),
            ("/%25%32f", DoubleEncoded),
            ("/admin%00.html", Control),
            ("/%", BadEscape),
            ("/%6", BadEscape),
            ("/%g1", BadEscape),
            ("/%c0%afadmin", NotUtf8),
            ("/%e0%80%af", NotUtf8),
            ("/%e9", NotUtf8),
        ] {
            assert_eq!(canonical_path(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:443"), "::1");
        assert_eq!(normalize_host("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_unless_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn only_allowed_upgrades_survive_and_h2c_never() {
        let allowed = ["websocket".to_string()];
        let headers = |upgrade: &str, connection: &str| {
            let mut h = HeaderMap::new();
            h.insert("upgrade", HeaderValue::from_str(upgrade).unwrap());
            h.insert("connection", HeaderValue::from_str(connection).unwrap());
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAAQAAP__"),
            );
            h.insert("x-keep", HeaderValue::from_static("1"));
            h
        };
        let mut h = headers("WebSocket", "Upgrade");
        assert_eq!(
            limit_upgrade(&mut h, &allowed).as_deref(),
            Some("WebSocket")
        );
        assert!(is_upgrade(&h) && h.get("http2-settings").is_none());
        for (upgrade, connection) in [
            ("h2c", "Upgrade, HTTP2-Settings"),
            ("h2c", "Upgrade"),
            ("x-tunnel", "keep-alive, Upgrade"),
            ("websocket", "keep-alive"),
        ] {
            let mut h = headers(upgrade, connection);
            assert_eq!(limit_upgrade(&mut h, &allowed), None, "{upgrade}");
            assert!(!is_upgrade(&h) && h.get("upgrade").is_none(), "{upgrade}");
            assert!(h.get("http2-settings").is_none() && h.get("x-keep").is_some());
            let conn = h.get("connection").map(|v| v.to_str().unwrap().to_string());
            assert!(!conn.unwrap_or_default().to_lowercase().contains("upgrade"));
        }
        let mut h = headers("h2c, websocket", "Upgrade");
        assert_eq!(
            limit_upgrade(&mut h, &allowed).as_deref(),
            Some("websocket")
        );
        let mut resp = HeaderMap::new();
        resp.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(
            switched_protocol(&resp, "websocket").as_deref(),
            Some("websocket")
        );
        resp.insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(switched_protocol(&resp, "websocket"), None);
        resp.remove("upgrade");
        assert_eq!(switched_protocol(&resp, "websocket"), None);
    }

    #[test]
    fn requests_are_shaped_for_the_origin_protocol() {
        let (mut parts, ()) = http::Request::get("https://a.example/x?y")
            .version(Version::HTTP_2)
            .body(())
            .unwrap()
            .into_parts();
        to_origin(&mut parts, OriginProto::Http1, "https", "a.example", "/x").unwrap();
        assert_eq!(parts.uri.to_string(), "/x?y");
        assert_eq!(parts.headers.get("host").unwrap(), "a.example");
        assert_eq!(parts.version, Version::HTTP_11);
        let (mut parts, ()) = http::Request::get("/x")
            .header("host", "a.example:8443")
            .body(())
            .unwrap()
            .into_parts();
        to_origin(
            &mut parts,
            OriginProto::Http2,
            "https",
            "a.example:8443",
            "/x",
        )
        .unwrap();
        assert_eq!(parts.uri.to_string(), "https://a.example:8443/x");
        assert!(parts.headers.get("host").is_none());
        // gRPC's `te: trailers` survives towards an HTTP/2 origin only.
        for (proto, kept) in [(OriginProto::Http2, true), (OriginProto::Http1, false)] {
            let (mut parts, ()) = http::Request::post("/svc/M")
                .header("te", "trailers")
                .body(())
                .unwrap()
                .into_parts();
            to_origin(&mut parts, proto, "https", "a", "/svc/M").unwrap();
            assert_eq!(parts.headers.get("te").is_some(), kept);
        }
    }
}
