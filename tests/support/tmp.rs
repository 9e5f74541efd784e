//! Temp dirs of the end-to-end tests (the `tempfile` crate): removed when their guard drops, also when the
//! test panics; kept when `RAMPART_E2E_KEEP` is set, for a look after a failure.

use std::ops::Deref;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// A temp dir, removed on drop. Derefs to its path, so `dir.join(..)` and `&dir` as `&Path` work.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

/// A fresh `rampart-e2e-<tag>-<random>` dir under the system temp dir. Mode 0755 (as `create_dir_all` under
/// umask 022 made them): a gateway that drops to `gateway.user` must still reach its state inside.
pub fn tempdir(tag: &str) -> TempDir {
    let keep = std::env::var_os("RAMPART_E2E_KEEP").is_some();
    let d = tempfile::Builder::new()
        .prefix(&format!("rampart-e2e-{tag}-"))
        .permissions(std::fs::Permissions::from_mode(0o755))
        .disable_cleanup(keep)
        .tempdir()
        .expect("cannot create a temp dir");
    if keep {
        eprintln!("keeping {}", d.path().display());
    }
    TempDir(d)
}

impl TempDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}
