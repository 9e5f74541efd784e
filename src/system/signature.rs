//! Update signatures: the vendor key (`UPDATE_PUBKEY`), where a payload's minisign signature comes from
//! (`--signature`, `PAYLOAD.minisig`, or the block after the root), and [`verify_root`] (prehashed minisign over
//! the root squashfs). Reads only; a root is never written before it verified.
#![deny(unsafe_code)]

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::payload::{read_exact_or_zero, read_up_to, u64_le, RootImage};
use super::SystemError;

/// The vendor's update key (a minisign public key file); `make image` embeds it in every root.
pub const UPDATE_PUBKEY: &str = "/usr/share/rampart/update.pub";
/// First line of the 4 KiB, zero-padded block `make image` writes right after the root squashfs in
/// `rampart.img`'s `root_a` partition; the root's minisign signature follows it. It lets `update` take a disk
/// image or a USB stick written from one without a separate signature file.
pub const SIG_BLOCK_MAGIC: &str = "rampart-update-signature v1\n";
const SIG_BLOCK_LEN: usize = 4096;

/// The key updates must be signed with, from a minisign `.pub` file.
pub struct UpdateKey {
    key: minisign_verify::PublicKey,
    id: String,
}

impl UpdateKey {
    pub fn parse(text: &str) -> Result<UpdateKey, String> {
        let key = minisign_verify::PublicKey::decode(text)
            .map_err(|e| format!("not a minisign public key ({e})"))?;
        let id = text
            .lines()
            .nth(1)
            .and_then(|l| minisign_key_id(l, 42))
            .ok_or("not a minisign public key")?;
        Ok(UpdateKey { key, id })
    }

    pub fn load(path: &Path) -> Result<UpdateKey, SystemError> {
        let no_key = |reason: String| SystemError::NoUpdateKey {
            path: path.to_path_buf(),
            reason,
        };
        UpdateKey::parse(&fs::read_to_string(path).map_err(|e| no_key(e.to_string()))?)
            .map_err(no_key)
    }

    /// Key ID as minisign prints it (`minisign public key 60E12015FE14E499`).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A minisign signature of an update's root squashfs, with where it came from.
pub struct UpdateSignature {
    sig: minisign_verify::Signature,
    key_id: String,
    source: String,
}

impl UpdateSignature {
    pub fn parse(text: &str, source: &str) -> Result<UpdateSignature, String> {
        let bad = |e: String| format!("{source} is not a minisign signature ({e})");
        let sig = minisign_verify::Signature::decode(text).map_err(|e| bad(e.to_string()))?;
        let key_id = text
            .lines()
            .nth(1)
            .and_then(|l| minisign_key_id(l, 74))
            .ok_or_else(|| bad("no key ID".into()))?;
        Ok(UpdateSignature {
            sig,
            key_id,
            source: source.to_string(),
        })
    }

    /// The signed comment (`make image` puts the release and build id there).
    pub fn trusted_comment(&self) -> &str {
        self.sig.trusted_comment()
    }
}

/// Bytes 2..10 of a minisign key or signature line (after the 2-byte algorithm) are the key ID, which minisign
/// prints as a little-endian u64 in hex.
fn minisign_key_id(b64_line: &str, len: usize) -> Option<String> {
    use base64::Engine as _;
    let bin = base64::engine::general_purpose::STANDARD
        .decode(b64_line.trim())
        .ok()?;
    (bin.len() == len).then(|| format!("{:016X}", u64_le(&bin[2..10])))
}

/// The payload's signature: `--signature`, else `PAYLOAD.minisig` next to a payload file, else the block `make
/// image` writes right after the root. Never a trust decision: [`verify_root`] decides.
pub fn find_signature<R: Read + Seek>(
    payload: &Path,
    explicit: Option<&Path>,
    r: &mut R,
    root: RootImage,
) -> Result<UpdateSignature, String> {
    let from_file = |p: &Path| -> Result<UpdateSignature, String> {
        let text = fs::read_to_string(p)
            .map_err(|e| format!("cannot read the signature {}: {e}", p.display()))?;
        UpdateSignature::parse(&text, &p.display().to_string())
    };
    if let Some(p) = explicit {
        return from_file(p);
    }
    let mut beside = payload.as_os_str().to_owned();
    beside.push(".minisig");
    let beside = PathBuf::from(beside);
    if payload.is_file() && beside.is_file() {
        return from_file(&beside);
    }
    let mut block = vec![0u8; SIG_BLOCK_LEN];
    let n = read_up_to(r, root.offset + root.len, &mut block)?;
    if let Some(rest) = block[..n].strip_prefix(SIG_BLOCK_MAGIC.as_bytes()) {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..end]);
        return UpdateSignature::parse(&text, "the signature embedded after the root");
    }
    let beside = if payload.is_file() {
        format!(", no {} beside it,", beside.display())
    } else {
        String::new()
    };
    Err(format!(
        "is not signed: no --signature{beside} and no signature embedded after its root; only images signed with \
         the vendor update key are installed (`make image` writes rampart-rootfs.sqfs.minisig and embeds the \
         signature in rampart.img)"
    ))
}

/// Check that the root squashfs `root` in `r` is signed by `key`: minisign's prehashed mode, an ed25519
/// signature over the BLAKE2b-512 of exactly the root's bytes (`rampart-rootfs.sqfs`, padded to 4 KiB as
/// mksquashfs writes it), so `minisign -V -p update.pub -m rampart-rootfs.sqfs` checks the same thing.
pub fn verify_root<R: Read + Seek>(
    r: &mut R,
    root: RootImage,
    key: &UpdateKey,
    sig: &UpdateSignature,
) -> Result<(), String> {
    if sig.key_id != key.id {
        return Err(format!(
            "{} is made with another key (key ID {}), not with the vendor update key (key ID {}, {UPDATE_PUBKEY})",
            sig.source, sig.key_id, key.id
        ));
    }
    let mut verifier = key.key.verify_stream(&sig.sig).map_err(|e| match e {
        minisign_verify::Error::UnsupportedLegacyMode => format!(
            "{} is a legacy minisign signature (not prehashed); sign with minisign 0.10 or newer, without -l",
            sig.source
        ),
        e => format!("{}: {e}", sig.source),
    })?;
    r.seek(SeekFrom::Start(root.offset))
        .map_err(|e| e.to_string())?;
    stream_root(r, root.len, |chunk| verifier.update(chunk))?;
    verifier.finalize().map_err(|_| {
        format!(
            "{} does not match the image: it was modified, truncated or corrupted after signing",
            sig.source
        )
    })
}

/// Feed `len` bytes of `r` (from its position) to `f` in 1 MiB chunks; past the end reads as zeros (a squashfs
/// shorter than its 4 KiB-padded length).
pub(super) fn stream_root<R: Read>(
    r: &mut R,
    len: u64,
    mut f: impl FnMut(&[u8]),
) -> Result<(), String> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        read_exact_or_zero(r, &mut buf[..n]).map_err(|e| e.to_string())?;
        f(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::payload::tests::squashfs;
    use super::super::tests::temp_dir;
    use super::*;
    use crate::system::payload::locate_root;
    use std::fs::File;
    use std::io::Cursor;

    // Made with Debian's minisign 0.11 (`minisign -G -W`, `minisign -S -t "rampart test payload"`) over
    // `signed_payload()`; the secret keys were thrown away.
    const VENDOR_PUB: &str = "untrusted comment: minisign public key 60E12015FE14E499\nRWSZ5BT+FSDhYPEdW74YfJbNE2Yw0g2CEP5ITY75Cob07arbtwW3q8lp\n";
    const VENDOR_SIG: &str = "untrusted comment: signature from minisign secret key\nRUSZ5BT+FSDhYDo21rhng4Nq/kfiXZo8ntHrnEdeSr+bGBpLGPZiHk9IWYZeoD94rQVwbE7Zuk3urs2nwfirFLyThtfKkwEdVgs=\ntrusted comment: rampart test payload\nXCVrpJqjQV/PQT11LMdCi3l/DQdMpRaBelf3x7CVnGQei7U30j0OzsOxf4zUcWTgeEAERTbmlx82oB47JoBVAg==\n";
    const OTHER_SIG: &str = "untrusted comment: signature from minisign secret key\nRUSyLImfZmuEw7jrQYi+5x/OXGmEYMbNPVaDZULyOEym2atO345ZV8cD/9/RZbGWTdKKb8FhiRx1dE7oJ0kaVDPTD+0HIK0zUA8=\ntrusted comment: rampart test payload\nPEeNVC/Rs/BKiyh9hnQgbhhD4lCXu5nf6PswJ2d1mOt3kOngwI6mqorp9WU8Xb8zZGZqy6F93bfA6VNauyZkDw==\n";

    /// A squashfs-shaped payload: 5000 bytes used, padded to 8 KiB.
    fn signed_payload() -> Vec<u8> {
        let mut p = squashfs(5000);
        for (i, b) in p.iter_mut().enumerate().take(5000).skip(96) {
            *b = (i * 7) as u8;
        }
        p
    }

    fn check(payload: &[u8], sig: &str) -> Result<(), String> {
        let key = UpdateKey::parse(VENDOR_PUB).unwrap();
        let mut r = Cursor::new(payload);
        let root = locate_root(&mut r)?;
        let sig = UpdateSignature::parse(sig, "test.minisig")?;
        verify_root(&mut r, root, &key, &sig)
    }

    #[test]
    fn vendor_signed_root_verifies() {
        assert_eq!(
            UpdateKey::parse(VENDOR_PUB).unwrap().id(),
            "60E12015FE14E499"
        );
        check(&signed_payload(), VENDOR_SIG).unwrap();
        let sig = UpdateSignature::parse(VENDOR_SIG, "x").unwrap();
        assert_eq!(sig.trusted_comment(), "rampart test payload");
    }

    #[test]
    fn root_signed_with_another_key_is_refused() {
        let err = check(&signed_payload(), OTHER_SIG).unwrap_err();
        assert!(
            err.contains("another key (key ID C3846B669F892CB2)")
                && err.contains("vendor update key (key ID 60E12015FE14E499"),
            "{err}"
        );
    }

    #[test]
    fn other_key_claiming_the_vendor_key_id_is_refused() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines: Vec<String> = OTHER_SIG.lines().map(String::from).collect();
        let mut bin = b64.decode(&lines[1]).unwrap();
        let vendor = b64.decode(VENDOR_PUB.lines().nth(1).unwrap()).unwrap();
        bin[2..10].copy_from_slice(&vendor[2..10]);
        lines[1] = b64.encode(&bin);
        let err = check(&signed_payload(), &lines.join("\n")).unwrap_err();
        assert!(err.contains("does not match the image"), "{err}");
    }

    #[test]
    fn modified_root_is_refused() {
        let mut p = signed_payload();
        p[4000] ^= 1;
        let err = check(&p, VENDOR_SIG).unwrap_err();
        assert!(err.contains("does not match the image"), "{err}");
        // The padding is signed too.
        let mut p = signed_payload();
        p[8000] = 1;
        assert!(check(&p, VENDOR_SIG).is_err());
    }

    #[test]
    fn truncated_root_is_refused() {
        let p = signed_payload();
        let err = check(&p[..4096], VENDOR_SIG).unwrap_err();
        assert!(err.contains("is truncated"), "{err}");
        assert!(err.contains("ends 904 bytes short"), "{err}");
        // Cut inside the padding only: the missing zeros are what was signed.
        check(&p[..6000], VENDOR_SIG).unwrap();
    }

    #[test]
    fn garbage_signature_is_not_a_signature() {
        let err = check(&signed_payload(), "untrusted comment: x\nAAAA\n").unwrap_err();
        assert!(
            err.contains("test.minisig is not a minisign signature"),
            "{err}"
        );
        assert!(UpdateKey::parse("hello\n").is_err());
    }

    #[test]
    fn signature_is_found_beside_embedded_or_nowhere() {
        let d = temp_dir("sig");
        let payload = d.join("rampart-rootfs.sqfs");
        fs::write(&payload, signed_payload()).unwrap();
        let key = UpdateKey::parse(VENDOR_PUB).unwrap();
        let open = || {
            let mut f = File::open(&payload).unwrap();
            let root = locate_root(&mut f).unwrap();
            (f, root)
        };

        // Nothing: refused, saying what is missing.
        let (mut f, root) = open();
        let err = find_signature(&payload, None, &mut f, root).err().unwrap();
        assert!(
            err.starts_with("is not signed: no --signature, no "),
            "{err}"
        );
        assert!(
            err.contains("rampart-rootfs.sqfs.minisig beside it"),
            "{err}"
        );

        // Embedded after the root (as in rampart.img's root_a).
        let mut with_block = signed_payload();
        let mut block = format!("{SIG_BLOCK_MAGIC}{VENDOR_SIG}\n").into_bytes();
        block.resize(SIG_BLOCK_LEN, 0);
        with_block.extend_from_slice(&block);
        fs::write(&payload, &with_block).unwrap();
        let (mut f, root) = open();
        let sig = find_signature(&payload, None, &mut f, root).unwrap();
        assert_eq!(sig.source, "the signature embedded after the root");
        verify_root(&mut f, root, &key, &sig).unwrap();

        // A .minisig beside the file wins over the embedded one; --signature wins over both.
        let beside = d.join("rampart-rootfs.sqfs.minisig");
        fs::write(&beside, OTHER_SIG).unwrap();
        let (mut f, root) = open();
        let sig = find_signature(&payload, None, &mut f, root).unwrap();
        assert!(sig.source.ends_with("rampart-rootfs.sqfs.minisig"));
        assert!(verify_root(&mut f, root, &key, &sig).is_err());
        let explicit = d.join("good.minisig");
        fs::write(&explicit, VENDOR_SIG).unwrap();
        let (mut f, root) = open();
        let sig = find_signature(&payload, Some(&explicit), &mut f, root).unwrap();
        verify_root(&mut f, root, &key, &sig).unwrap();
        let err = find_signature(&payload, Some(&d.join("missing")), &mut f, root)
            .err()
            .unwrap();
        assert!(err.contains("cannot read the signature"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_update_key_names_the_path() {
        let err = UpdateKey::load(Path::new("/nonexistent/update.pub"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("cannot read the vendor update key /nonexistent/update.pub"),
            "{err}"
        );
    }
}
