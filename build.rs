//! Embeds the review UI: our own pages, scripts and styles (`ui/src/`) and the third-party assets that
//! `make ui` installs from npm with the lockfile (`ui/node_modules/`, never committed). Bare module specifiers
//! of the HPKE library (`@hpke/common`) are rewritten to the paths the UI serves them at, so the browser needs
//! no import map (which the CSP would refuse as inline script).
//!
//! Without `ui/node_modules` the build still succeeds (other work does not need npm) and prints a warning; the
//! UI then answers its vendor paths with "run `make ui`".

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// (directory under ui/node_modules, URL prefix under /ui/vendor/, file suffixes to take)
const VENDOR: &[(&str, &str, &[&str])] = &[
    (
        "asciinema-player/dist/bundle",
        "asciinema-player",
        &["asciinema-player.min.js", "asciinema-player.css"],
    ),
    ("asciinema-player", "asciinema-player", &["LICENSE"]),
    ("@xterm/xterm/lib", "xterm", &["xterm.mjs"]),
    ("@xterm/xterm/css", "xterm", &["xterm.css"]),
    ("@xterm/xterm", "xterm", &["LICENSE"]),
    ("@hpke/core/esm", "hpke-core", &[".js"]),
    ("@hpke/core", "hpke-core", &["LICENSE"]),
    ("@hpke/common/esm", "hpke-common", &[".js"]),
    ("@hpke/common", "hpke-common", &["LICENSE"]),
    (
        "@hpke/chacha20poly1305/esm",
        "hpke-chacha20poly1305",
        &[".js"],
    ),
    (
        "@hpke/chacha20poly1305",
        "hpke-chacha20poly1305",
        &["LICENSE"],
    ),
];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=ui/src");
    println!("cargo:rerun-if-changed=ui/package-lock.json");
    println!("cargo:rerun-if-changed=ui/node_modules/.package-lock.json");
    let mut gen = String::new();

    let mut own = Vec::new();
    walk(&root.join("ui/src"), &mut own);
    gen.push_str("pub static OWN: &[(&str, &[u8])] = &[\n");
    for f in &own {
        let rel = f
            .strip_prefix(root.join("ui/src"))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        println!("cargo:rerun-if-changed={}", f.display());
        writeln!(
            gen,
            "    ({rel:?}, include_bytes!({:?})),",
            f.display().to_string()
        )
        .unwrap();
    }
    gen.push_str("];\n");

    let modules = root.join("ui/node_modules");
    let built = modules.join("asciinema-player").exists()
        && modules.join("@xterm/xterm").exists()
        && modules.join("@hpke/core").exists();
    if !built {
        println!("cargo:warning=ui/node_modules is missing: the review UI will lack its player, terminal and HPKE library; run `make ui`");
    }
    let vendor_out = out_dir.join("vendor");
    let _ = std::fs::remove_dir_all(&vendor_out);
    gen.push_str("pub static VENDOR: &[(&str, &[u8])] = &[\n");
    if built {
        for (dir, prefix, suffixes) in VENDOR {
            let base = modules.join(dir);
            let mut files = Vec::new();
            if suffixes.len() == 1 && suffixes[0] == "LICENSE" {
                files.push(base.join("LICENSE"));
            } else {
                walk(&base, &mut files);
            }
            for f in files {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                if !suffixes.iter().any(|s| name.ends_with(s)) || name.ends_with(".d.ts") {
                    continue;
                }
                let rel = f
                    .strip_prefix(&base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let url = format!("{prefix}/{rel}");
                let mut data = std::fs::read(&f).unwrap();
                if name.ends_with(".js") && prefix.starts_with("hpke") {
                    let text = String::from_utf8(data).unwrap();
                    data = text
                        .replace(
                            "from \"@hpke/common\"",
                            "from \"/ui/vendor/hpke-common/mod.js\"",
                        )
                        .replace(
                            "from \"@hpke/core\"",
                            "from \"/ui/vendor/hpke-core/mod.js\"",
                        )
                        .into_bytes();
                }
                let dst = vendor_out.join(&url);
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                std::fs::write(&dst, data).unwrap();
                writeln!(
                    gen,
                    "    ({url:?}, include_bytes!({:?})),",
                    dst.display().to_string()
                )
                .unwrap();
            }
        }
    }
    gen.push_str("];\n");
    writeln!(gen, "pub const VENDOR_BUILT: bool = {built};").unwrap();
    std::fs::write(out_dir.join("ui_assets.rs"), gen).unwrap();
}
