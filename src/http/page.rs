//! The pages the inspector answers with instead of the origin: blocked by a rule (403), origin not trusted or
//! unreachable (502), bad request (400). Each names the rule (or reason) and a reference id that finds the
//! request's audit record.
#![deny(unsafe_code)]

use http::StatusCode;

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The HTML body of a page. `rule` is the rule id or built-in reason, `detail` a sentence for the user.
pub fn render(status: StatusCode, rule: &str, ref_id: &str, host: &str, detail: &str) -> String {
    let title = match status {
        StatusCode::FORBIDDEN => "Blocked by policy",
        StatusCode::BAD_GATEWAY => "The site cannot be reached safely",
        StatusCode::MISDIRECTED_REQUEST => "Misdirected request",
        StatusCode::SERVICE_UNAVAILABLE => "Temporarily refused",
        _ => "Request refused",
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body>\n\
         <h1>{title}</h1>\n<p>{detail}</p>\n<p>Host: <code>{host}</code></p>\n\
         <p>Rule: <code id=\"rule\">{rule}</code></p>\n<p>Reference: <code id=\"ref\">{ref_id}</code></p>\n\
         <p>Give the reference to your administrator if you think this is a mistake.</p>\n\
         <hr><small>rampart gateway ({code})</small>\n</body></html>\n",
        title = title,
        detail = escape(detail),
        host = escape(host),
        rule = escape(rule),
        ref_id = escape(ref_id),
        code = status.as_u16(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_rule_and_reference_and_escapes() {
        let p = render(
            StatusCode::FORBIDDEN,
            "no-admin",
            "abc123",
            "<evil>",
            "This path is blocked.",
        );
        assert!(p.contains("Rule: <code id=\"rule\">no-admin</code>"));
        assert!(p.contains("abc123"));
        assert!(p.contains("&lt;evil&gt;") && !p.contains("<evil>"));
    }
}
