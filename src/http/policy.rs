//! The pure half of HTTP policy: which `[[tenant.http_rule]]` decides a request, and what happens to a TLS
//! connection before (or instead of) decryption. No IO, no clocks; the shell (`proxy`, `tls`) gathers the
//! facts and acts on the verdicts.
//!
//! Semantics: rules are ordered, the first match decides, no match allows (the flow rule that chose
//! `inspect_http` already allowed the flow). Every list a rule gives must match; an empty list matches
//! anything. Without decryption only the server name is known, so rules that name `paths` or `methods`
//! never match a TLS connection that is not decrypted.
#![deny(unsafe_code)]

use std::net::IpAddr;

use crate::config::{DeviceName, HttpAction, HttpRule, NoInspect, TenantHttp, UserName};

/// Rule id recorded when a `CONNECT` request is refused because no allow rule names `CONNECT`.
pub const CONNECT_REFUSED: &str = "connect-not-allowed";
/// Rule id recorded when a request is refused because origins read its path in different ways
/// (`rewrite::canonical_path`).
pub const AMBIGUOUS_PATH: &str = "ambiguous-path";

/// Who sent the request (from the WireGuard identity, never from the request).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub user: &'a UserName,
    pub device: &'a DeviceName,
    pub groups: &'a [String],
}

/// What is known about a request. `method`/`path` are `None` for a TLS connection seen only by its
/// ClientHello.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Lower case, without port or trailing dot (see `rewrite::normalize_host`).
    pub host: &'a str,
    /// Canonical (see `rewrite::canonical_path`): exactly what the origin is sent.
    pub path: Option<&'a str>,
    /// Upper case.
    pub method: Option<&'a str>,
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: HttpAction,
    /// The deciding rule; `None`: nothing matched (allowed).
    pub rule: Option<String>,
}

fn identity_matches(r: &HttpRule, who: &Identity<'_>) -> bool {
    (r.users.is_empty() || r.users.contains(who.user))
        && (r.devices.is_empty() || r.devices.contains(who.device))
        && (r.groups.is_empty() || r.groups.iter().any(|g| who.groups.contains(g)))
}

/// `lower_path`: the path in ASCII lower case, for `case_insensitive` rules (whose prefixes are stored in
/// lower case).
fn rule_matches(
    r: &HttpRule,
    who: &Identity<'_>,
    req: &RequestFacts<'_>,
    lower_path: Option<&str>,
) -> bool {
    let path = if r.case_insensitive {
        lower_path
    } else {
        req.path
    };
    identity_matches(r, who)
        && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.matches(req.host)))
        && (r.methods.is_empty() || req.method.is_some_and(|m| r.methods.iter().any(|x| x == m)))
        && (r.paths.is_empty()
            || path.is_some_and(|p| r.paths.iter().any(|x| p.starts_with(x.as_str()))))
}

/// The first matching rule's verdict. `CONNECT` (a tunnel the inspector cannot see into) is refused unless
/// the deciding rule allows it and names `CONNECT` explicitly.
pub fn classify_request(rules: &[HttpRule], who: &Identity<'_>, req: &RequestFacts<'_>) -> Verdict {
    let lower = req.path.map(str::to_ascii_lowercase);
    let hit = rules
        .iter()
        .find(|r| rule_matches(r, who, req, lower.as_deref()));
    let verdict = match hit {
        Some(r) => Verdict {
            action: r.action,
            rule: Some(r.id.clone()),
        },
        None => Verdict {
            action: HttpAction::Allow,
            rule: None,
        },
    };
    if req.method == Some("CONNECT")
        && verdict.action != HttpAction::Block
        && !hit.is_some_and(|r| r.methods.iter().any(|m| m == "CONNECT"))
    {
        return Verdict {
            action: HttpAction::Block,
            rule: Some(CONNECT_REFUSED.to_string()),
        };
    }
    verdict
}

/// Rule id recorded when TLS without a usable server name is refused on a tenant whose HTTP rules name hosts.
pub const SNI_REQUIRED: &str = "sni-required";
/// Rule id recorded when a decrypting tenant refuses a ClientHello that offers only non-HTTP protocols
/// not on its `tls_passthrough_alpn` list.
pub const ALPN_NOT_ALLOWED: &str = "alpn-not-allowed";
/// Rule id recorded for a connection relayed because its protocols are on `tls_passthrough_alpn`.
pub const ALLOWED_ALPN: &str = "allowed-alpn";
/// Rule id recorded for a connection relayed because of `do_not_inspect`.
pub const DO_NOT_INSPECT: &str = "do-not-inspect";

/// What is known about a TLS connection from its ClientHello.
#[derive(Debug, Clone, Copy)]
pub struct TlsFacts<'a> {
    /// The lower-cased server name indication, if it is a DNS name (an IP literal or none: `None`).
    pub sni: Option<&'a str>,
    /// The original destination address.
    pub dst: IpAddr,
    /// The ALPN protocols offered; `None` without the extension.
    pub alpn: Option<&'a [Vec<u8>]>,
}

/// Whether an ALPN protocol is one the inspector serves after decryption.
pub fn is_http_alpn(p: &[u8]) -> bool {
    p == b"h2" || p == b"http/1.1"
}

/// Why a TLS connection is not decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDecrypt {
    /// The tenant does not decrypt (`tls_decrypt` off).
    Disabled,
    /// The destination is on `do_not_inspect` (by address; or by name, once the origin proved the name).
    DoNotInspect,
    /// Every protocol the client offered is on `tls_passthrough_alpn`.
    AllowedAlpn,
}

/// The TLS alert a refused connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAlert {
    AccessDenied,
    NoApplicationProtocol,
}

/// The decision for a TLS connection, taken before any decryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsAction {
    /// Decrypt with a leaf from the tenant CA; rules apply per request.
    Decrypt,
    /// Relay the bytes untouched (`rule`: the rule that matched the server name, if any).
    Passthrough {
        why: NoDecrypt,
        rule: Option<String>,
    },
    /// The server name is on `do_not_inspect`, but the name is only the device's word: relay untouched only
    /// if the origin, connected to first, presents a certificate valid for it; otherwise do `otherwise`
    /// (what the connection would get without the name on the list).
    PassthroughIfOriginProvesName {
        rule: Option<String>,
        otherwise: Box<TlsAction>,
    },
    /// Refuse with a TLS alert.
    Reject { rule: String, alert: TlsAlert },
}

/// Whether `do_not_inspect` lists the destination address.
fn do_not_inspect_addr(http: &TenantHttp, dst: IpAddr) -> bool {
    http.do_not_inspect.iter().any(|e| match e {
        NoInspect::Net(n) => n.contains(&dst),
        NoInspect::Host(_) => false,
    })
}

/// Whether `do_not_inspect` lists the server name.
fn do_not_inspect_name(http: &TenantHttp, sni: Option<&str>) -> bool {
    http.do_not_inspect.iter().any(|e| match e {
        NoInspect::Host(h) => sni.is_some_and(|s| h.matches(s)),
        NoInspect::Net(_) => false,
    })
}

/// Decides a TLS connection from its ClientHello, in this order:
/// 1. no usable server name while the tenant's HTTP rules name hosts: refused (`sni-required`);
/// 2. not decrypted (tenant without `tls_decrypt`; destination address on `do_not_inspect`; every offered
///    protocol on `tls_passthrough_alpn`): a block rule on the server name refuses it, else it is relayed;
/// 3. server name on `do_not_inspect`: relayed once the origin proves the name, else as if not listed;
/// 4. only non-HTTP protocols offered (not all on the list): refused (`alpn-not-allowed`);
/// 5. decrypted.
pub fn classify_tls(http: &TenantHttp, who: &Identity<'_>, facts: &TlsFacts<'_>) -> TlsAction {
    if facts.sni.is_none() && http.names_hosts() {
        return TlsAction::Reject {
            rule: SNI_REQUIRED.to_string(),
            alert: TlsAlert::AccessDenied,
        };
    }
    if !http.tls_decrypt {
        return relay(http, who, facts, NoDecrypt::Disabled, None);
    }
    if do_not_inspect_addr(http, facts.dst) {
        return relay(
            http,
            who,
            facts,
            NoDecrypt::DoNotInspect,
            Some(DO_NOT_INSPECT),
        );
    }
    let by_protocol = decide_protocols(http, who, facts);
    if do_not_inspect_name(http, facts.sni) {
        return match relay(
            http,
            who,
            facts,
            NoDecrypt::DoNotInspect,
            Some(DO_NOT_INSPECT),
        ) {
            TlsAction::Passthrough { rule, .. } => TlsAction::PassthroughIfOriginProvesName {
                rule,
                otherwise: Box::new(by_protocol),
            },
            refused => refused,
        };
    }
    by_protocol
}

/// A decrypting tenant's decision on the offered protocols: HTTP (or none) is decrypted; only non-HTTP
/// protocols, all on `tls_passthrough_alpn`, are relayed; any other is refused.
fn decide_protocols(http: &TenantHttp, who: &Identity<'_>, facts: &TlsFacts<'_>) -> TlsAction {
    let Some(offered) = facts.alpn else {
        return TlsAction::Decrypt;
    };
    if offered.iter().any(|p| is_http_alpn(p)) {
        return TlsAction::Decrypt;
    }
    let allowed = !offered.is_empty()
        && offered.iter().all(|p| {
            http.passthrough_alpn
                .iter()
                .any(|a| a.as_bytes() == p.as_slice())
        });
    if allowed {
        relay(http, who, facts, NoDecrypt::AllowedAlpn, Some(ALLOWED_ALPN))
    } else {
        TlsAction::Reject {
            rule: ALPN_NOT_ALLOWED.to_string(),
            alert: TlsAlert::NoApplicationProtocol,
        }
    }
}

/// A connection that is not decrypted: refused if a block rule matches its server name, else relayed
/// (`rule`: the matching rule, else `default_rule`).
fn relay(
    http: &TenantHttp,
    who: &Identity<'_>,
    facts: &TlsFacts<'_>,
    why: NoDecrypt,
    default_rule: Option<&str>,
) -> TlsAction {
    let dst = facts.dst.to_string();
    let host = facts.sni.unwrap_or(&dst);
    let v = classify_request(
        &http.rules,
        who,
        &RequestFacts {
            host,
            path: None,
            method: None,
        },
    );
    match (v.action, v.rule) {
        (HttpAction::Block, Some(rule)) => TlsAction::Reject {
            rule,
            alert: TlsAlert::AccessDenied,
        },
        (_, rule) => TlsAction::Passthrough {
            why,
            rule: rule.or(default_rule.map(str::to_string)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPattern;

    fn rule(id: &str, action: HttpAction) -> HttpRule {
        HttpRule {
            id: id.into(),
            action,
            hosts: vec![],
            paths: vec![],
            methods: vec![],
            users: vec![],
            groups: vec![],
            devices: vec![],
            case_insensitive: false,
        }
    }

    fn who<'a>(user: &'a UserName, device: &'a DeviceName, groups: &'a [String]) -> Identity<'a> {
        Identity {
            user,
            device,
            groups,
        }
    }

    fn req<'a>(host: &'a str, method: &'a str, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            host,
            path: Some(path),
            method: Some(method),
        }
    }

    #[test]
    fn first_match_decides_and_no_match_allows() {
        let mut block_admin = rule("no-admin", HttpAction::Block);
        block_admin.paths = vec!["/admin".into()];
        block_admin.hosts = vec![HostPattern::parse("*.example.com").unwrap()];
        let mut log_posts = rule("log-posts", HttpAction::Log);
        log_posts.methods = vec!["POST".into()];
        let rules = vec![block_admin, log_posts];
        let (u, d) = (
            UserName::parse("alice").unwrap(),
            DeviceName::parse("laptop").unwrap(),
        );
        let w = who(&u, &d, &[]);
        let v = classify_request(&rules, &w, &req("a.example.com", "GET", "/admin/x"));
        assert_eq!(
            (v.action, v.rule.as_deref()),
            (HttpAction::Block, Some("no-admin"))
        );
        // The wildcard does not cover the apex.
        let v = classify_request(&rules, &w, &req("example.com", "GET", "/admin"));
        assert_eq!((v.action, v.rule), (HttpAction::Allow, None));
        let v = classify_request(&rules, &w, &req("example.com", "POST", "/x"));
        assert_eq!(
            (v.action, v.rule.as_deref()),
            (HttpAction::Log, Some("log-posts"))
        );
    }

    #[test]
    fn case_insensitive_rules_match_any_case() {
        let (u, d) = (
            UserName::parse("alice").unwrap(),
            DeviceName::parse("laptop").unwrap(),
        );
        let w = who(&u, &d, &[]);
        let mut exact = rule("exact", HttpAction::Block);
        exact.paths = vec!["/Admin".into()];
        let mut any_case = rule("any-case", HttpAction::Block);
        any_case.paths = vec!["/admin".into()];
        any_case.case_insensitive = true;
        let rules = [exact, any_case];
        for (path, want) in [
            ("/Admin/x", Some("exact")),
            ("/ADMIN/x", Some("any-case")),
            ("/admin", Some("any-case")),
            ("/public", None),
        ] {
            let v = classify_request(&rules, &w, &req("h", "GET", path));
            assert_eq!(v.rule.as_deref(), want, "{path}");
        }
    }

    #[test]
    fn identity_lists_must_all_match() {
        let mut r = rule("eng-only", HttpAction::Block);
        r.groups = vec!["eng".into()];
        r.users = vec![UserName::parse("alice").unwrap()];
        let rules = vec![r];
        let (alice, bob, d) = (
            UserName::parse("alice").unwrap(),
            UserName::parse("bob").unwrap(),
            DeviceName::parse("laptop").unwrap(),
        );
        let eng = ["eng".to_string()];
        let f = req("h", "GET", "/");
        assert_eq!(
            classify_request(&rules, &who(&alice, &d, &eng), &f).action,
            HttpAction::Block
        );
        assert_eq!(
            classify_request(&rules, &who(&bob, &d, &eng), &f).action,
            HttpAction::Allow
        );
        assert_eq!(
            classify_request(&rules, &who(&alice, &d, &[]), &f).action,
            HttpAction::Allow
        );
    }

    #[test]
    fn connect_needs_an_explicit_allow() {
        let (u, d) = (
            UserName::parse("alice").unwrap(),
            DeviceName::parse("laptop").unwrap(),
        );
        let w = who(&u, &d, &[]);
        let f = req("h", "CONNECT", "/");
        let v = classify_request(&[rule("all", HttpAction::Allow)], &w, &f);
        assert_eq!(v.rule.as_deref(), Some(CONNECT_REFUSED));
        let mut c = rule("tunnels", HttpAction::Allow);
        c.methods = vec!["CONNECT".into()];
        let v = classify_request(&[c], &w, &f);
        assert_eq!(
            (v.action, v.rule.as_deref()),
            (HttpAction::Allow, Some("tunnels"))
        );
    }

    #[test]
    fn tls_decisions_before_decryption() {
        let (u, d) = (
            UserName::parse("alice").unwrap(),
            DeviceName::parse("laptop").unwrap(),
        );
        let w = who(&u, &d, &[]);
        let mut block = rule("no-social", HttpAction::Block);
        block.hosts = vec![HostPattern::parse("social.example").unwrap()];
        let mut path_rule = rule("no-admin", HttpAction::Block);
        path_rule.paths = vec!["/admin".into()];
        let mut http = TenantHttp {
            rules: vec![path_rule, block],
            ..Default::default()
        };
        let h2 = [b"h2".to_vec()];
        let facts = |sni| TlsFacts {
            sni: Some(sni),
            dst: "10.9.1.1".parse().unwrap(),
            alpn: Some(&h2),
        };
        let reject = |rule: &str, alert| TlsAction::Reject {
            rule: rule.into(),
            alert,
        };
        assert_eq!(
            classify_tls(&http, &w, &facts("social.example")),
            reject("no-social", TlsAlert::AccessDenied)
        );
        // The path rule cannot match without decryption.
        assert_eq!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Passthrough {
                why: NoDecrypt::Disabled,
                rule: None
            }
        );
        // The rules name hosts: no server name, no connection (also when decrypting, below).
        let nameless = TlsFacts {
            sni: None,
            ..facts("x")
        };
        assert_eq!(
            classify_tls(&http, &w, &nameless),
            reject(SNI_REQUIRED, TlsAlert::AccessDenied)
        );
        http.tls_decrypt = true;
        assert_eq!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Decrypt
        );
        assert_eq!(
            classify_tls(&http, &w, &nameless),
            reject(SNI_REQUIRED, TlsAlert::AccessDenied)
        );
        // Without host rules, a nameless connection is decided on its address.
        let hostless = TenantHttp {
            rules: vec![http.rules[0].clone()],
            ..http.clone()
        };
        assert_eq!(classify_tls(&hostless, &w, &nameless), TlsAction::Decrypt);

        // Only non-HTTP protocols: refused unless every one is on the tenant's list.
        let alpn = |list: &[&str]| {
            list.iter()
                .map(|p| p.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        let with = |offered: &[Vec<u8>], http: &TenantHttp| {
            classify_tls(
                http,
                &w,
                &TlsFacts {
                    alpn: Some(offered),
                    ..facts("news.example")
                },
            )
        };
        let refused = reject(ALPN_NOT_ALLOWED, TlsAlert::NoApplicationProtocol);
        assert_eq!(with(&alpn(&["foo"]), &http), refused);
        assert_eq!(with(&alpn(&[]), &http), refused);
        assert_eq!(with(&alpn(&["foo", "http/1.1"]), &http), TlsAction::Decrypt);
        http.passthrough_alpn = vec!["imap".into()];
        assert_eq!(
            with(&alpn(&["imap"]), &http),
            TlsAction::Passthrough {
                why: NoDecrypt::AllowedAlpn,
                rule: Some(ALLOWED_ALPN.into())
            }
        );
        assert_eq!(with(&alpn(&["imap", "foo"]), &http), refused);

        // do_not_inspect: an address is trusted as it is; a name only once the origin proves it.
        http.do_not_inspect = vec![NoInspect::Net("10.9.0.0/16".parse().unwrap())];
        assert_eq!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Passthrough {
                why: NoDecrypt::DoNotInspect,
                rule: Some(DO_NOT_INSPECT.into())
            }
        );
        http.do_not_inspect = vec![NoInspect::Host(HostPattern::parse("bank.example").unwrap())];
        assert_eq!(
            classify_tls(&http, &w, &facts("bank.example")),
            TlsAction::PassthroughIfOriginProvesName {
                rule: Some(DO_NOT_INSPECT.into()),
                otherwise: Box::new(TlsAction::Decrypt)
            }
        );
        assert_eq!(
            with(&alpn(&["foo"]), &http),
            refused,
            "a name not on the list changes nothing"
        );
        let foo = alpn(&["foo"]);
        let bank_foo = TlsFacts {
            alpn: Some(&foo),
            ..facts("bank.example")
        };
        assert_eq!(
            classify_tls(&http, &w, &bank_foo),
            TlsAction::PassthroughIfOriginProvesName {
                rule: Some(DO_NOT_INSPECT.into()),
                otherwise: Box::new(refused.clone())
            }
        );
        // Blocking on the name still applies to hosts that are never decrypted.
        http.do_not_inspect.push(NoInspect::Host(
            HostPattern::parse("social.example").unwrap(),
        ));
        assert_eq!(
            classify_tls(&http, &w, &facts("social.example")),
            reject("no-social", TlsAlert::AccessDenied)
        );
    }
}
