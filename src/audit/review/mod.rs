//! The read side of the audit store: queries behind `rampart audit ...` and the review UI's API (`admin`), the
//! rendering of SSH sessions, and verification of the chain. Read-only: opens the store and recordings,
//! never writes them. Command-line parsing and output live in `cli`.
#![deny(unsafe_code)]

pub mod admin;
pub mod enroll;
mod eviction;
pub mod flows;
pub mod http;
pub mod ssh;
pub mod verify;

/// `s` made safe to print on a reviewer's terminal: control characters (C0, DEL, C1: the start of every
/// escape and OSC sequence) and bidirectional overrides are shown as `\u{..}` escapes instead of acting.
/// Review output passes every line through this, since most fields come from devices (logins, env names,
/// `TERM`, subsystems, forwarded hosts, HTTP hosts and paths).
pub fn inert(s: &str) -> std::borrow::Cow<'_, str> {
    let acts =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(acts) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if acts(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `writeln!` for review output: the formatted line goes through [`inert`] first.
#[macro_export]
macro_rules! inert_line {
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, "{}", $crate::audit::review::inert(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_and_osc_sequences_are_shown_not_run() {
        let evil = "root\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\r\u{202e}x";
        let shown = super::inert(evil);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            "root\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9b}31m\\u{d}\\u{202e}x"
        );
        assert_eq!(super::inert("plain é"), "plain é");
    }
}
