//! Where the root squashfs is in an update payload: a bare squashfs (`rampart-rootfs.sqfs`) or a raw Rampart
//! disk image (its `root_a` partition, from the GPT). Reads only; a truncated or foreign payload is an error
//! that says what to do.
#![deny(unsafe_code)]

use std::io::{Read, Seek, SeekFrom};

const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Where the root squashfs sits inside an update payload, and how many bytes it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootImage {
    pub offset: u64,
    pub len: u64,
}

/// Find the root squashfs in a payload: a bare squashfs, or the `root_a` partition of a raw GPT disk image
/// (512-byte sectors), which is where `make image` puts the build.
pub fn locate_root<R: Read + Seek>(r: &mut R) -> Result<RootImage, String> {
    let mut head = [0u8; 1024];
    let n = read_up_to(r, 0, &mut head)?;
    let head = &head[..n];
    if head.starts_with(SQUASHFS_MAGIC) {
        return squashfs_at(r, 0);
    }
    if head.starts_with(&ZSTD_MAGIC) {
        return Err(
            "is zstd-compressed: decompress it first (zstd -d), or use rampart-rootfs.sqfs".into(),
        );
    }
    if head.len() >= 600 && &head[512..520] == GPT_SIGNATURE {
        let h = &head[512..];
        let table_lba = u64_le(&h[72..80]);
        let count = u32_le(&h[80..84]).min(256) as usize;
        let size = u32_le(&h[84..88]) as usize;
        if !(128..=4096).contains(&size) {
            return Err(format!("has a GPT with an odd partition entry size {size}"));
        }
        let mut table = vec![0u8; count * size];
        let got = read_up_to(r, table_lba * 512, &mut table)?;
        for e in table[..got].chunks_exact(size) {
            let name: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            if String::from_utf16_lossy(&name) == "root_a" {
                let first = u64_le(&e[32..40]);
                let last = u64_le(&e[40..48]);
                let root = squashfs_at(r, first * 512)?;
                if root.len > (last + 1 - first) * 512 {
                    return Err("root_a's squashfs is larger than its partition".into());
                }
                return Ok(root);
            }
        }
        return Err("is a GPT disk image without a root_a partition (not a Rampart image?)".into());
    }
    Err("is neither a root squashfs (rampart-rootfs.sqfs) nor a raw Rampart disk image (rampart.img)".into())
}

fn squashfs_at<R: Read + Seek>(r: &mut R, offset: u64) -> Result<RootImage, String> {
    let mut sb = [0u8; 96];
    if read_up_to(r, offset, &mut sb)? < sb.len() || &sb[..4] != SQUASHFS_MAGIC {
        return Err(format!("has no squashfs superblock at byte {offset}"));
    }
    let major = u16::from_le_bytes([sb[28], sb[29]]);
    if major != 4 {
        return Err(format!("has squashfs version {major}, expected 4"));
    }
    let bytes_used = u64_le(&sb[40..48]);
    let end = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if end < offset.saturating_add(bytes_used) {
        return Err(format!(
            "is truncated: its root squashfs needs {bytes_used} bytes from byte {offset}, but the payload ends {} bytes \
             short (an incomplete download or copy?)",
            offset.saturating_add(bytes_used) - end
        ));
    }
    // A squashfs image is padded to 4 KiB by mksquashfs; copy the padding too.
    let len = bytes_used.div_ceil(4096) * 4096;
    Ok(RootImage { offset, len })
}

pub(super) fn read_up_to<R: Read + Seek>(
    r: &mut R,
    at: u64,
    buf: &mut [u8],
) -> Result<usize, String> {
    r.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(n)
}

pub(super) fn u64_le(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

pub(super) fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Like read_exact, but a payload shorter than its 4 KiB-padded length reads as zeros at the end.
pub(super) fn read_exact_or_zero<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => {
                buf[n..].fill(0);
                break;
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    pub(crate) fn squashfs(bytes_used: u64) -> Vec<u8> {
        let mut sb = vec![0u8; 8192];
        sb[..4].copy_from_slice(SQUASHFS_MAGIC);
        sb[28..30].copy_from_slice(&4u16.to_le_bytes());
        sb[40..48].copy_from_slice(&bytes_used.to_le_bytes());
        sb
    }

    #[test]
    fn bare_squashfs_payload_is_copied_padded_to_4k() {
        let root = locate_root(&mut Cursor::new(squashfs(5000))).unwrap();
        assert_eq!(
            root,
            RootImage {
                offset: 0,
                len: 8192
            }
        );
    }

    fn put_gpt_entry(disk: &mut [u8], index: usize, name: &str, first: u64, last: u64) {
        let e = &mut disk[1024 + index * 128..1024 + (index + 1) * 128];
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (i, c) in name.encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
    }

    #[test]
    fn disk_image_payload_uses_root_a_partition() {
        let mut disk = vec![0u8; 64 * 512];
        disk[512..520].copy_from_slice(GPT_SIGNATURE);
        disk[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        put_gpt_entry(&mut disk, 0, "esp", 8, 15);
        put_gpt_entry(&mut disk, 1, "root_a", 16, 47);
        disk[16 * 512..16 * 512 + 8192].copy_from_slice(&squashfs(4096));
        let root = locate_root(&mut Cursor::new(&disk)).unwrap();
        assert_eq!(
            root,
            RootImage {
                offset: 16 * 512,
                len: 4096
            }
        );

        put_gpt_entry(&mut disk, 1, "root_x", 16, 47);
        let err = locate_root(&mut Cursor::new(&disk)).unwrap_err();
        assert!(err.contains("without a root_a partition"), "{err}");
    }

    #[test]
    fn compressed_or_foreign_payloads_say_what_to_do() {
        let err = locate_root(&mut Cursor::new(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0])).unwrap_err();
        assert!(err.contains("zstd -d"), "{err}");
        let err = locate_root(&mut Cursor::new(vec![0u8; 4096])).unwrap_err();
        assert!(err.contains("neither a root squashfs"), "{err}");
    }
}
