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
    /// Normalized (see `rewrite::normalize_path`).
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

fn rule_matches(r: &HttpRule, who: &Identity<'_>, req: &RequestFacts<'_>) -> bool {
    identity_matches(r, who)
        && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.matches(req.host)))
        && (r.methods.is_empty() || req.method.is_some_and(|m| r.methods.iter().any(|x| x == m)))
        && (r.paths.is_empty()
            || req
                .path
                .is_some_and(|p| r.paths.iter().any(|x| p.starts_with(x.as_str()))))
}

/// The first matching rule's verdict. `CONNECT` (a tunnel the inspector cannot see into) is refused unless
/// the deciding rule allows it and names `CONNECT` explicitly.
pub fn classify_request(rules: &[HttpRule], who: &Identity<'_>, req: &RequestFacts<'_>) -> Verdict {
    let hit = rules.iter().find(|r| rule_matches(r, who, req));
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

/// What is known about a TLS connection from its ClientHello.
#[derive(Debug, Clone, Copy)]
pub struct TlsFacts<'a> {
    /// Lower-cased server name indication.
    pub sni: Option<&'a str>,
    /// The original destination address.
    pub dst: IpAddr,
    /// False when the client offered ALPN protocols but neither `h2` nor `http/1.1` (not HTTP: it cannot be
    /// decrypted and served).
    pub alpn_http: bool,
}

/// Why a TLS connection is not decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDecrypt {
    /// The tenant does not decrypt (`tls_decrypt` off).
    Disabled,
    /// The server name or destination is on `do_not_inspect`.
    DoNotInspect,
    /// The client does not speak HTTP over this TLS connection (ALPN).
    NotHttp,
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
    /// Refuse with a TLS alert (`access_denied`): a block rule matched the server name.
    Reject { rule: String },
}

/// Whether `do_not_inspect` covers this server name or destination.
pub fn do_not_inspect(http: &TenantHttp, facts: &TlsFacts<'_>) -> bool {
    http.do_not_inspect.iter().any(|e| match e {
        NoInspect::Host(h) => facts.sni.is_some_and(|s| h.matches(s)),
        NoInspect::Net(n) => n.contains(&facts.dst),
    })
}

pub fn classify_tls(http: &TenantHttp, who: &Identity<'_>, facts: &TlsFacts<'_>) -> TlsAction {
    let why = if !http.tls_decrypt {
        Some(NoDecrypt::Disabled)
    } else if do_not_inspect(http, facts) {
        Some(NoDecrypt::DoNotInspect)
    } else if !facts.alpn_http {
        Some(NoDecrypt::NotHttp)
    } else {
        None
    };
    let Some(why) = why else {
        return TlsAction::Decrypt;
    };
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
        (HttpAction::Block, Some(rule)) => TlsAction::Reject { rule },
        (_, rule) => TlsAction::Passthrough { why, rule },
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
        let facts = |sni| TlsFacts {
            sni: Some(sni),
            dst: "10.9.1.1".parse().unwrap(),
            alpn_http: true,
        };
        assert_eq!(
            classify_tls(&http, &w, &facts("social.example")),
            TlsAction::Reject {
                rule: "no-social".into()
            }
        );
        // The path rule cannot match without decryption.
        assert_eq!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Passthrough {
                why: NoDecrypt::Disabled,
                rule: None
            }
        );
        http.tls_decrypt = true;
        assert_eq!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Decrypt
        );
        http.do_not_inspect = vec![NoInspect::Net("10.9.0.0/16".parse().unwrap())];
        assert!(matches!(
            classify_tls(&http, &w, &facts("news.example")),
            TlsAction::Passthrough {
                why: NoDecrypt::DoNotInspect,
                ..
            }
        ));
        // Blocking on the name still applies to hosts that are never decrypted.
        assert!(matches!(
            classify_tls(&http, &w, &facts("social.example")),
            TlsAction::Reject { .. }
        ));
    }
}
