//! The review UI's files, embedded at build time (`build.rs`): our pages, scripts and styles (`ui/src/`) and
//! the npm packages `make ui` installs (asciinema-player, @xterm/xterm, the HPKE library).
#![deny(unsafe_code)]

use http::StatusCode;

use super::headers::{full, Resp};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "text/plain; charset=utf-8",
    }
}

fn find(table: &'static [(&'static str, &'static [u8])], path: &str) -> Option<&'static [u8]> {
    table.iter().find(|(p, _)| *p == path).map(|(_, d)| *d)
}

/// `/ui/assets/<path>`: our scripts and styles.
pub fn own(path: &str) -> Resp {
    match find(embedded::OWN, path).filter(|_| !path.ends_with(".html")) {
        Some(d) => full(StatusCode::OK, content_type(path), d),
        None => full(StatusCode::NOT_FOUND, "text/plain", "no such asset\n"),
    }
}

/// `/ui/vendor/<path>`: the npm packages.
pub fn vendor(path: &str) -> Resp {
    if !embedded::VENDOR_BUILT {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "this build has no third-party UI assets: run `make ui`, then build again\n",
        );
    }
    match find(embedded::VENDOR, path) {
        Some(d) => full(StatusCode::OK, content_type(path), d),
        None => full(StatusCode::NOT_FOUND, "text/plain", "no such asset\n"),
    }
}

/// `/ui/<page>`: one of the HTML pages.
pub fn page(name: &str) -> Resp {
    let file = match name {
        "login" | "sessions" | "session" | "flows" | "http" | "live" | "devices" => {
            format!("{name}.html")
        }
        _ => return full(StatusCode::NOT_FOUND, "text/plain", "no such page\n"),
    };
    match find(embedded::OWN, &file) {
        Some(d) => full(StatusCode::OK, "text/html; charset=utf-8", d),
        None => full(StatusCode::NOT_FOUND, "text/plain", "no such page\n"),
    }
}
