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

/// The path policy matches on: no query, percent-encoded unreserved characters decoded, empty and `.`
/// segments dropped, `..` resolved. So `/a/./b`, `//a/b`, `/%61/b` and `/x/../a/b` all match a rule on
/// `/a/b` (an audit aid against trivial evasion; origins may still interpret paths differently).
pub fn normalize_path(path_and_query: &str) -> String {
    let path = path_and_query.split(['?', '#']).next().unwrap_or("");
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex.filter(|b| unreserved(*b)) {
                decoded.push(b);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for s in decoded.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// How the origin connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginProto {
    Http1,
    Http2,
}

/// Prepares a device request for the origin: request target in the form the origin connection needs
/// (origin-form + `Host` for HTTP/1.1, absolute URI without `Host` for HTTP/2), version set to the origin's,
/// hop-by-hop headers stripped (kept for a protocol switch).
pub fn to_origin(
    parts: &mut request::Parts,
    proto: OriginProto,
    scheme: &str,
    authority: &str,
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
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
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

    proptest! {
        #[test]
        fn normalized_paths_are_canonical(p in "(/|[a-z]{1,3}|\\.|\\.\\.|%61|%2f|%|//|\\?q)*") {
            let n = normalize_path(&p);
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains("//") && !n.contains("/./") && !n.contains("/../") && !n.ends_with("/.."));
            prop_assert!(!n.contains('?'));
            prop_assert_eq!(normalize_path(&n), n);
        }

        #[test]
        fn dot_segments_and_encoding_do_not_hide_a_prefix(
            junk in "[a-z]{1,6}",
            rest in "(/[a-z0-9]{1,4}){0,3}",
            dots in 0usize..3,
        ) {
            let evasive = format!("/{junk}/..{}/%61dmin{rest}", "/.".repeat(dots));
            prop_assert!(normalize_path(&evasive).starts_with("/admin"), "{evasive}");
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
    fn paths_normalize_against_trivial_evasion() {
        assert_eq!(normalize_path("/admin?x=1"), "/admin");
        assert_eq!(normalize_path("//admin/./x"), "/admin/x");
        assert_eq!(normalize_path("/x/../admin"), "/admin");
        assert_eq!(normalize_path("/%61dmin"), "/admin");
        assert_eq!(normalize_path("/%2fadmin"), "/%2fadmin");
        assert_eq!(normalize_path(""), "/");
        assert_eq!(normalize_path("/a/"), "/a/");
        assert_eq!(normalize_path("/%"), "/%");
        assert_eq!(normalize_path("/%6"), "/%6");
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
    fn requests_are_shaped_for_the_origin_protocol() {
        let (mut parts, ()) = http::Request::get("https://a.example/x?y")
            .version(Version::HTTP_2)
            .body(())
            .unwrap()
            .into_parts();
        to_origin(&mut parts, OriginProto::Http1, "https", "a.example").unwrap();
        assert_eq!(parts.uri.to_string(), "/x?y");
        assert_eq!(parts.headers.get("host").unwrap(), "a.example");
        assert_eq!(parts.version, Version::HTTP_11);
        let (mut parts, ()) = http::Request::get("/x")
            .header("host", "a.example:8443")
            .body(())
            .unwrap()
            .into_parts();
        to_origin(&mut parts, OriginProto::Http2, "https", "a.example:8443").unwrap();
        assert_eq!(parts.uri.to_string(), "https://a.example:8443/x");
        assert!(parts.headers.get("host").is_none());
        // gRPC's `te: trailers` survives towards an HTTP/2 origin only.
        for (proto, kept) in [(OriginProto::Http2, true), (OriginProto::Http1, false)] {
            let (mut parts, ()) = http::Request::post("/svc/M")
                .header("te", "trailers")
                .body(())
                .unwrap()
                .into_parts();
            to_origin(&mut parts, proto, "https", "a").unwrap();
            assert_eq!(parts.headers.get("te").is_some(), kept);
        }
    }
}
