//! `rampart system`: the appliance's A/B root slots, their status and updates.
//!
//! The appliance disk (built by `firmware-image/`) has four GPT partitions: `esp`, `root_a`, `root_b` (read-only
//! squashfs roots) and `data`. The ESP is mounted read-only at `/boot/efi`; it holds systemd-boot, one kernel and
//! initramfs per slot (`/a`, `/b`) and one Type-1 boot entry per slot, `loader/entries/gateway-<slot>.conf`.
//! An entry named `gateway-<slot>+LEFT[-DONE].conf` is on trial: systemd-boot decrements LEFT on every boot of it,
//! sorts an entry with no tries left after all others, and otherwise boots the entry with the highest `version`,
//! which is an install generation (every update writes a higher one). The appliance's boot-check
//! (`firmware-image/rootfs/usr/lib/rampart/boot-check`) blesses a boot whose gateway answers `/health` by
//! dropping the counter, or reboots so the failed try is counted and, after the last, the other slot boots.
//!
//! `update` accepts only payloads signed with the vendor's update key (minisign format, ed25519 over the BLAKE2b-512
//! of the root squashfs; see [`verify_root`]): the key is embedded in every image at [`UPDATE_PUBKEY`], and the
//! signature is checked before anything is written. It then writes the slot that is not running, copies that slot's own kernel and initramfs to the ESP and arms
//! its entry with a counter. It never writes the running slot, nor a slot on another disk than the running root.
//! Off the appliance both commands fail with "not running on a Rampart appliance: ..." (`--esp` points `status`
//! at another ESP directory, e.g. for inspection).
//!
//! `firewall` prints the appliance's inbound nftables policy for a config ([`firewall::ruleset`]).
//!
//! Start reading at [`run`].
#![deny(unsafe_code)]

pub mod firewall;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use serde::Serialize;

/// Where the appliance mounts its EFI system partition.
pub const DEFAULT_ESP: &str = "/boot/efi";
const ENTRIES_DIR: &str = "loader/entries";
const SYS_BLOCK: &str = "/sys/class/block";
const HEALTH_FILE: &str = "/run/rampart/health";
const RELEASE_FILE: &str = "/etc/rampart-release";
const UPDATE_MOUNT: &str = "/run/rampart/update-root";

#[derive(clap::Subcommand, Debug)]
pub enum SystemCommand {
    /// Show A/B slots, versions, which slot booted, boot counters
    Status {
        /// The mounted EFI system partition.
        #[arg(long, default_value = DEFAULT_ESP)]
        esp: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the appliance's inbound nftables policy for a config (load it with `nft -f`)
    ///
    /// Default drop; open are loopback, established traffic, DHCP replies, IPv6 neighbour discovery, WireGuard
    /// (gateway.listen) and the admin, enrollment and UI listeners that are set to a non-loopback address. Without
    /// -c, the base policy that opens no service port. The appliance loads it at boot (firewall-up).
    Firewall {
        /// The gateway config whose listeners are opened.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Write IMAGE_OR_ROOTFS into the inactive slot and arm it with boot counting
    ///
    /// IMAGE_OR_ROOTFS is a root squashfs (`rampart-rootfs.sqfs` from `make image`) or a raw Rampart disk image
    /// (`rampart.img`, not the .zst), as a file or a block device. It must be signed with the vendor update key
    /// (/usr/share/rampart/update.pub): by IMAGE_OR_ROOTFS.minisig, --signature, or the signature `make image`
    /// embeds after the root in `rampart.img`. After a reboot the updated slot boots; if its gateway does not
    /// become healthy within the tries, the boot loader falls back to the current slot.
    Update {
        image: PathBuf,
        /// Minisign signature of the root squashfs (default: IMAGE_OR_ROOTFS.minisig if that file exists, else
        /// the signature embedded after the root).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// The mounted EFI system partition.
        #[arg(long, default_value = DEFAULT_ESP)]
        esp: PathBuf,
        /// Boot attempts the new slot gets before the boot loader falls back to the current one.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
        tries: u32,
        /// Update even though the running slot has not been blessed yet (this overwrites the only other slot,
        /// which may be the last known-good one).
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: SystemCommand) -> anyhow::Result<()> {
    match cmd {
        SystemCommand::Status { esp, json } => {
            let status = Appliance::detect(&esp)?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
        SystemCommand::Firewall { config } => {
            let cfg = match config {
                Some(path) => {
                    let text = fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    // Only the listeners matter: no need to open the registry in state_dir.
                    Some(
                        crate::config::Config::from_toml(&text, &path)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    )
                }
                None => None,
            };
            print!("{}", firewall::ruleset(cfg.as_ref()));
            Ok(())
        }
        SystemCommand::Update {
            image,
            signature,
            esp,
            tries,
            force,
        } => Appliance::detect(&esp)?.update(&image, signature.as_deref(), tries, force),
    }
}

/// Errors a caller (or the person at the console) acts on.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("not running on a Rampart appliance: no ESP found at {} ({reason}); on an appliance the ESP is mounted at {DEFAULT_ESP}, elsewhere pass --esp DIR", esp.display())]
    NotAppliance { esp: PathBuf, reason: String },
    #[error("cannot tell which slot is running: no rampart.slot=a|b on /proc/cmdline (not booted from a Rampart slot?)")]
    UnknownBootedSlot,
    #[error("slot {slot} is still on trial ({entry}): wait until this boot is blessed (the gateway answers /health), or pass --force to overwrite slot {other}, the last known-good slot")]
    RunningSlotOnTrial {
        slot: Slot,
        other: Slot,
        entry: String,
    },
    #[error("{}: {reason}", path.display())]
    BadPayload { path: PathBuf, reason: String },
    #[error("{}: refused, nothing was written: {reason}", path.display())]
    NotVendorSigned { path: PathBuf, reason: String },
    #[error("cannot read the vendor update key {}: {reason}; every Rampart image carries it (firmware-image/scripts/build.sh), so this root was not built by `make image`", path.display())]
    NoUpdateKey { path: PathBuf, reason: String },
}

// ---------------------------------------------------------------- slots and boot entries

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT partition name of the slot's root filesystem.
    pub fn partname(self) -> String {
        format!("root_{}", self.letter())
    }

    fn from_letter(c: &str) -> Option<Slot> {
        match c {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write!: the status table aligns slots with {:<5}.
        f.pad(self.letter().encode_utf8(&mut [0; 4]))
    }
}

/// The boot-counting part of an entry file name: `gateway-b+2-1.conf` is slot b, 2 tries left, 1 done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
}

impl EntryName {
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name.strip_prefix("gateway-")?.strip_suffix(".conf")?;
        let (slot, counter) = match stem.split_once('+') {
            Some((s, c)) => (s, Some(c)),
            None => (stem, None),
        };
        let slot = Slot::from_letter(slot)?;
        let (tries_left, tries_done) = match counter {
            None => (None, None),
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l, Some(d.parse().ok()?)),
                    None => (c, None),
                };
                (Some(left.parse().ok()?), done)
            }
        };
        Some(EntryName {
            slot,
            tries_left,
            tries_done,
        })
    }
}

/// One slot's boot entry as read from the ESP.
#[derive(Debug, Clone, Serialize)]
pub struct BootEntry {
    pub file: String,
    pub slot: Slot,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    /// The entry's `version`: the install generation systemd-boot orders by.
    pub generation: u64,
    /// Rampart release in the slot (`# rampart-version` comment).
    pub version: Option<String>,
    pub build: Option<String>,
}

impl BootEntry {
    fn parse(file: &str, text: &str) -> Option<BootEntry> {
        let name = EntryName::parse(file)?;
        let mut entry = BootEntry {
            file: file.to_string(),
            slot: name.slot,
            tries_left: name.tries_left,
            tries_done: name.tries_done,
            generation: 0,
            version: None,
            build: None,
        };
        for line in text.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("# rampart-version ") {
                entry.version = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("# rampart-build ") {
                entry.build = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("version ") {
                entry.generation = v.trim().parse().unwrap_or(0);
            }
        }
        Some(entry)
    }

    pub fn state(&self) -> SlotState {
        match self.tries_left {
            None => SlotState::Good,
            Some(0) => SlotState::Bad,
            Some(left) => SlotState::Trial {
                tries_left: left,
                tries_done: self.tries_done.unwrap_or(0),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SlotState {
    /// No boot entry: never installed, or an update was interrupted.
    Empty,
    /// Blessed: booted and became healthy.
    Good,
    /// Armed by an update, not yet blessed.
    Trial { tries_left: u32, tries_done: u32 },
    /// Tries used up without becoming healthy; the boot loader prefers the other slot.
    Bad,
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotState::Empty => write!(f, "empty"),
            SlotState::Good => write!(f, "good"),
            SlotState::Trial {
                tries_left,
                tries_done,
            } => write!(f, "trial ({tries_left} left, {tries_done} done)"),
            SlotState::Bad => write!(f, "bad (no tries left)"),
        }
    }
}

/// The slot systemd-boot will pick next: entries with tries left before those without, then the highest
/// generation (all our entries share one sort-key), then the file name, descending.
pub fn next_boot(entries: &[BootEntry]) -> Option<Slot> {
    entries
        .iter()
        .max_by(|x, y| {
            let usable = |e: &BootEntry| e.tries_left != Some(0);
            usable(x)
                .cmp(&usable(y))
                .then(x.generation.cmp(&y.generation))
                .then(x.file.cmp(&y.file))
        })
        .map(|e| e.slot)
}

/// Read every `gateway-*.conf` entry in `esp/loader/entries`.
pub fn read_entries(esp: &Path) -> anyhow::Result<Vec<BootEntry>> {
    let dir = esp.join(ENTRIES_DIR);
    let mut entries = Vec::new();
    for item in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let item = item?;
        let file = item.file_name().to_string_lossy().into_owned();
        if EntryName::parse(&file).is_none() {
            continue;
        }
        let text = fs::read_to_string(item.path())
            .with_context(|| format!("cannot read {}", item.path().display()))?;
        if let Some(e) = BootEntry::parse(&file, &text) {
            entries.push(e);
        }
    }
    entries.sort_by(|x, y| x.file.cmp(&y.file));
    Ok(entries)
}

// ---------------------------------------------------------------- update payloads

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

fn read_up_to<R: Read + Seek>(r: &mut R, at: u64, buf: &mut [u8]) -> Result<usize, String> {
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

fn u64_le(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

// ---------------------------------------------------------------- update signatures

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
fn stream_root<R: Read>(r: &mut R, len: u64, mut f: impl FnMut(&[u8])) -> Result<(), String> {
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

// ---------------------------------------------------------------- the appliance

/// `rampart system status`, also as JSON.
#[derive(Debug, Serialize)]
pub struct SystemStatus {
    pub esp: PathBuf,
    /// Slot this system booted from, if it booted from one (rampart.slot= on the kernel command line).
    pub booted_slot: Option<Slot>,
    pub running_version: Option<String>,
    pub running_build: Option<String>,
    /// Written by boot-check: waiting, healthy or failed.
    pub health: Option<String>,
    pub next_boot: Option<Slot>,
    pub slots: Vec<SlotStatus>,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub device: Option<PathBuf>,
    #[serde(flatten)]
    pub state: SlotState,
    pub entry: Option<BootEntry>,
}

impl fmt::Display for SystemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |s: Option<&str>| s.unwrap_or("-").to_string();
        match self.booted_slot {
            Some(s) => writeln!(
                f,
                "running: slot {s}, Rampart {} ({}), health: {}",
                or_dash(self.running_version.as_deref()),
                or_dash(self.running_build.as_deref()),
                or_dash(self.health.as_deref())
            )?,
            None => writeln!(f, "running: not booted from a Rampart slot")?,
        }
        match self.next_boot {
            Some(s) => writeln!(f, "next boot: slot {s}")?,
            None => writeln!(f, "next boot: no bootable entry in {}", self.esp.display())?,
        }
        writeln!(
            f,
            "{:<5} {:<14} {:<26} {:<30} {:>4}  ENTRY",
            "SLOT", "DEVICE", "STATE", "VERSION", "GEN"
        )?;
        for s in &self.slots {
            let mut state = s.state.to_string();
            if Some(s.slot) == self.booted_slot {
                state.push_str(" *booted");
            }
            let (version, generation, file) = match &s.entry {
                Some(e) => (
                    match (&e.version, &e.build) {
                        (Some(v), Some(b)) => format!("{v} ({b})"),
                        (Some(v), None) => v.clone(),
                        _ => "-".into(),
                    },
                    e.generation.to_string(),
                    e.file.clone(),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let device = s
                .device
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<5} {:<14} {:<26} {:<30} {:>4}  {}",
                s.slot, device, state, version, generation, file
            )?;
        }
        Ok(())
    }
}

struct Appliance {
    esp: PathBuf,
    booted: Option<Slot>,
    /// The disk holding the running root, e.g. "vda"; slots are only ever looked up on it.
    disk: Option<String>,
}

impl Appliance {
    fn detect(esp: &Path) -> Result<Appliance, SystemError> {
        let entries = esp.join(ENTRIES_DIR);
        if !entries.is_dir() {
            return Err(SystemError::NotAppliance {
                esp: esp.to_path_buf(),
                reason: format!("{} is not a directory", entries.display()),
            });
        }
        if !esp.join("a").is_dir() {
            return Err(SystemError::NotAppliance {
                esp: esp.to_path_buf(),
                reason: "it has no slot directory a/ (not a Rampart ESP)".into(),
            });
        }
        let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let booted = cmdline
            .split_whitespace()
            .find_map(|a| a.strip_prefix("rampart.slot="))
            .and_then(Slot::from_letter);
        let disk = booted.and_then(|_| root_disk());
        Ok(Appliance {
            esp: esp.to_path_buf(),
            booted,
            disk,
        })
    }

    fn slot_device(&self, slot: Slot) -> Option<PathBuf> {
        let disk = self.disk.as_deref()?;
        find_partition(Path::new(SYS_BLOCK), disk, &slot.partname())
    }

    fn status(&self) -> anyhow::Result<SystemStatus> {
        let entries = read_entries(&self.esp)?;
        let release = if self.booted.is_some() {
            read_release(Path::new(RELEASE_FILE))
        } else {
            Default::default()
        };
        let slots = Slot::ALL
            .iter()
            .map(|&slot| {
                let entry = entries.iter().find(|e| e.slot == slot).cloned();
                SlotStatus {
                    slot,
                    device: self.slot_device(slot),
                    state: entry.as_ref().map_or(SlotState::Empty, BootEntry::state),
                    entry,
                }
            })
            .collect();
        Ok(SystemStatus {
            esp: self.esp.clone(),
            booted_slot: self.booted,
            running_version: release.version,
            running_build: release.build,
            health: fs::read_to_string(HEALTH_FILE)
                .ok()
                .map(|s| s.trim().to_string()),
            next_boot: next_boot(&entries),
            slots,
        })
    }

    fn update(
        &self,
        payload: &Path,
        signature: Option<&Path>,
        tries: u32,
        force: bool,
    ) -> anyhow::Result<()> {
        let booted = self.booted.ok_or(SystemError::UnknownBootedSlot)?;
        let target = booted.other();
        let entries = read_entries(&self.esp)?;
        if let Some(running) = entries.iter().find(|e| e.slot == booted) {
            if running.tries_left.is_some() && !force {
                return Err(SystemError::RunningSlotOnTrial {
                    slot: booted,
                    other: target,
                    entry: running.file.clone(),
                }
                .into());
            }
        }
        let disk = self
            .disk
            .as_deref()
            .context("cannot find the disk of the running root (no squashfs mounted on / ?)")?;
        let device = find_partition(Path::new(SYS_BLOCK), disk, &target.partname())
            .with_context(|| format!("no partition named {} on /dev/{disk}", target.partname()))?;

        let bad = |reason: String| SystemError::BadPayload {
            path: payload.to_path_buf(),
            reason,
        };
        let mut src = File::open(payload).map_err(|e| bad(format!("cannot open: {e}")))?;
        let root = locate_root(&mut src).map_err(bad)?;
        let capacity = partition_bytes(&device)?;
        if root.len > capacity {
            return Err(bad(format!(
                "its root ({} MiB) does not fit slot {target} ({} MiB)",
                root.len >> 20,
                capacity >> 20
            ))
            .into());
        }
        // Nothing is written before this point, and nothing after it unless the vendor signed these bytes.
        let key = UpdateKey::load(Path::new(UPDATE_PUBKEY))?;
        let refused = |reason: String| SystemError::NotVendorSigned {
            path: payload.to_path_buf(),
            reason,
        };
        let sig = find_signature(payload, signature, &mut src, root).map_err(refused)?;
        eprintln!(
            "checking {}'s signature ({} MiB) against the vendor update key {}",
            payload.display(),
            root.len.div_ceil(1 << 20),
            key.id()
        );
        verify_root(&mut src, root, &key, &sig).map_err(refused)?;
        eprintln!(
            "signature ok: {} (key ID {})",
            sig.trusted_comment(),
            key.id()
        );

        let esp_rw = EspWritable::new(&self.esp)?;
        // Disarm first: a slot half written by an interrupted update must never be booted.
        for e in entries.iter().filter(|e| e.slot == target) {
            fs::remove_file(self.esp.join(ENTRIES_DIR).join(&e.file))
                .with_context(|| format!("cannot remove old entry {}", e.file))?;
        }
        sync();

        eprintln!(
            "writing {} MiB from {} to slot {target} ({})",
            root.len.div_ceil(1 << 20),
            payload.display(),
            device.display()
        );
        copy_verified(&mut src, root, &device, &key, &sig)?;

        let mounted = Mounted::squashfs(&device, Path::new(UPDATE_MOUNT))?;
        let new_root = mounted.dir.clone();
        let release = read_release(&new_root.join("etc/rampart-release"));
        let version = release.version.clone().with_context(|| {
            format!(
                "{}: the new root has no VERSION in /etc/rampart-release",
                payload.display()
            )
        })?;
        let cmdline_tmpl = fs::read_to_string(new_root.join("etc/rampart/kernel-cmdline"))
            .context("the new root has no /etc/rampart/kernel-cmdline")?;
        let slot_dir = self.esp.join(target.letter().to_string());
        fs::create_dir_all(&slot_dir)?;
        for (from, to) in [("boot/vmlinuz", "vmlinuz"), ("boot/initrd", "initrd")] {
            let tmp = slot_dir.join(format!("{to}.new"));
            fs::copy(new_root.join(from), &tmp).with_context(|| {
                format!("cannot copy /{from} of the new root to {}", tmp.display())
            })?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, slot_dir.join(to))?;
        }
        drop(mounted);

        let generation = entries.iter().map(|e| e.generation).max().unwrap_or(0) + 1;
        let file = format!("gateway-{target}+{tries}.conf");
        let text = entry_text(
            target,
            &version,
            release.build.as_deref(),
            generation,
            &cmdline_tmpl,
        );
        let dir = self.esp.join(ENTRIES_DIR);
        let tmp = dir.join(format!("gateway-{target}.tmp"));
        {
            let mut f =
                File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(&file))?;
        sync();
        drop(esp_rw);

        println!(
            "slot {target}: Rampart {version} written to {} and armed ({file}, {tries} tries).\n\
             Reboot to start it; if its gateway does not become healthy it falls back to slot {booted}.",
            device.display()
        );
        Ok(())
    }
}

/// The boot entry `update` writes; the initial image's entry (firmware-image/scripts/build.sh) has the same shape.
pub fn entry_text(
    slot: Slot,
    version: &str,
    build: Option<&str>,
    generation: u64,
    cmdline_tmpl: &str,
) -> String {
    let options = cmdline_tmpl.trim().replace("@SLOT@", &slot.to_string());
    format!(
        "# rampart-version {version}\n# rampart-build {build}\ntitle Rampart {version} (slot {slot})\n\
         sort-key rampart\nversion {generation}\nlinux /{slot}/vmlinuz\ninitrd /{slot}/initrd\noptions {options}\n",
        build = build.unwrap_or("unknown")
    )
}

#[derive(Debug, Default)]
struct Release {
    version: Option<String>,
    build: Option<String>,
}

fn read_release(path: &Path) -> Release {
    let mut r = Release::default();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some(v) = line.strip_prefix("VERSION=") {
            r.version = Some(v.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("BUILD_ID=") {
            r.build = Some(v.trim_matches('"').to_string());
        }
    }
    r
}

/// Disk of the squashfs mounted on `/`: "/dev/vda2" -> "vda" (via sysfs, so nvme0n1p2 -> nvme0n1 works too).
fn root_disk() -> Option<String> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let dev = mounts
        .lines()
        .rev()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[1] == "/" && f[2] == "squashfs").then(|| f[0].to_string())
        })
        .next()?;
    let part = dev.strip_prefix("/dev/")?;
    let parent = fs::canonicalize(Path::new(SYS_BLOCK).join(part).join("..")).ok()?;
    Some(parent.file_name()?.to_string_lossy().into_owned())
}

/// `/dev/<name>` of the partition of `disk` whose GPT name is `partname` (sysfs uevent PARTNAME=).
fn find_partition(sys_block: &Path, disk: &str, partname: &str) -> Option<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(sys_block.join(disk))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(disk))
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let uevent = fs::read_to_string(sys_block.join(disk).join(&n).join("uevent")).ok()?;
        let matches = uevent
            .lines()
            .any(|l| l.strip_prefix("PARTNAME=") == Some(partname));
        let devname = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
        matches.then(|| PathBuf::from("/dev").join(devname))
    })
}

fn partition_bytes(device: &Path) -> anyhow::Result<u64> {
    let name = device.file_name().context("device path")?;
    let sectors = fs::read_to_string(Path::new(SYS_BLOCK).join(name).join("size"))
        .with_context(|| format!("cannot read the size of {}", device.display()))?;
    Ok(sectors.trim().parse::<u64>()? * 512)
}

/// Copy `root` from `src` onto the block device, flush it, and read it back through the signature check: what
/// the slot holds is what the vendor signed, even if the payload changed after [`verify_root`] read it.
fn copy_verified(
    src: &mut File,
    root: RootImage,
    device: &Path,
    key: &UpdateKey,
    sig: &UpdateSignature,
) -> anyhow::Result<()> {
    let mut dst = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    src.seek(SeekFrom::Start(root.offset))?;
    let mut write_err = None;
    stream_root(src, root.len, |chunk| {
        if write_err.is_none() {
            write_err = dst.write_all(chunk).err();
        }
    })
    .map_err(anyhow::Error::msg)?;
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("write to {} failed", device.display()));
    }
    dst.sync_all()?;

    dst.seek(SeekFrom::Start(0))?;
    let written = RootImage {
        offset: 0,
        len: root.len,
    };
    verify_root(&mut dst, written, key, sig).map_err(|e| {
        anyhow::anyhow!(
            "{} reads back differently from the signed image (a write error, or the payload changed while it was \
             written): {e}; the slot stays disarmed",
            device.display()
        )
    })
}

/// Like read_exact, but a payload shorter than its 4 KiB-padded length reads as zeros at the end.
fn read_exact_or_zero<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<()> {
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

fn sync() {
    let _ = Command::new("sync").status();
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Remounts the ESP read-write while alive (if it is a read-only mount), and read-only again on drop.
struct EspWritable {
    esp: Option<PathBuf>,
}

impl EspWritable {
    fn new(esp: &Path) -> anyhow::Result<EspWritable> {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let target = esp.to_string_lossy();
        let read_only = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == target && f[3].split(',').any(|o| o == "ro")
        });
        if !read_only {
            return Ok(EspWritable { esp: None });
        }
        run_tool(Command::new("mount").args(["-o", "remount,rw"]).arg(esp))
            .context("cannot make the ESP writable")?;
        Ok(EspWritable {
            esp: Some(esp.to_path_buf()),
        })
    }
}

impl Drop for EspWritable {
    fn drop(&mut self) {
        if let Some(esp) = &self.esp {
            sync();
            if let Err(e) = run_tool(Command::new("mount").args(["-o", "remount,ro"]).arg(esp)) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// A read-only squashfs mount, unmounted on drop.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn squashfs(device: &Path, dir: &Path) -> anyhow::Result<Mounted> {
        fs::create_dir_all(dir)?;
        run_tool(
            Command::new("mount")
                .args(["-t", "squashfs", "-o", "ro"])
                .arg(device)
                .arg(dir),
        )
        .context("the written slot does not mount as squashfs")?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = run_tool(Command::new("umount").arg(&self.dir)) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn entry(file: &str, generation: u64) -> BootEntry {
        let mut e = BootEntry::parse(file, "").unwrap();
        e.generation = generation;
        e
    }

    #[test]
    fn entry_names_carry_boot_counters() {
        let p = |s| EntryName::parse(s);
        assert_eq!(p("gateway-a.conf").unwrap().tries_left, None);
        let t = p("gateway-b+2-1.conf").unwrap();
        assert_eq!(
            (t.slot, t.tries_left, t.tries_done),
            (Slot::B, Some(2), Some(1))
        );
        let t = p("gateway-a+3.conf").unwrap();
        assert_eq!((t.tries_left, t.tries_done), (Some(3), None));
        assert!(p("gateway-c.conf").is_none());
        assert!(p("other-a.conf").is_none());
        assert!(p("gateway-a+x.conf").is_none());
        assert!(p("gateway-a.tmp").is_none());
    }

    #[test]
    fn entry_file_yields_version_and_generation() {
        let text = entry_text(
            Slot::B,
            "1.2.3",
            Some("abc123"),
            7,
            "root=PARTLABEL=root_@SLOT@ rampart.slot=@SLOT@\n",
        );
        assert!(
            text.contains("options root=PARTLABEL=root_b rampart.slot=b\n"),
            "{text}"
        );
        assert!(text.contains("linux /b/vmlinuz\n"));
        let e = BootEntry::parse("gateway-b+3.conf", &text).unwrap();
        assert_eq!(e.generation, 7);
        assert_eq!(e.version.as_deref(), Some("1.2.3"));
        assert_eq!(e.build.as_deref(), Some("abc123"));
        assert_eq!(
            e.state(),
            SlotState::Trial {
                tries_left: 3,
                tries_done: 0
            }
        );
    }

    #[test]
    fn newest_install_with_tries_left_boots_next() {
        // Fresh update of b: b wins over the older, blessed a.
        assert_eq!(
            next_boot(&[entry("gateway-a.conf", 1), entry("gateway-b+2-1.conf", 2)]),
            Some(Slot::B)
        );
        // b used up its tries: fall back to a.
        assert_eq!(
            next_boot(&[entry("gateway-a.conf", 1), entry("gateway-b+0-3.conf", 2)]),
            Some(Slot::A)
        );
        // Only a bad entry left: systemd-boot still boots it.
        assert_eq!(next_boot(&[entry("gateway-a+0-3.conf", 1)]), Some(Slot::A));
        assert_eq!(next_boot(&[]), None);
    }

    fn squashfs(bytes_used: u64) -> Vec<u8> {
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

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rampart-system-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn host_without_esp_is_told_it_is_not_an_appliance() {
        let d = temp_dir("noesp");
        let err = Appliance::detect(&d).err().unwrap().to_string();
        assert!(
            err.starts_with("not running on a Rampart appliance: no ESP found at"),
            "{err}"
        );
        assert!(err.contains("--esp"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn status_reads_slots_from_an_esp_directory() {
        let esp = temp_dir("esp");
        fs::create_dir_all(esp.join(ENTRIES_DIR)).unwrap();
        fs::create_dir_all(esp.join("a")).unwrap();
        let tmpl = "root=PARTLABEL=root_@SLOT@ rampart.slot=@SLOT@";
        fs::write(
            esp.join(ENTRIES_DIR).join("gateway-a.conf"),
            entry_text(Slot::A, "0.1.0", Some("b1"), 1, tmpl),
        )
        .unwrap();
        fs::write(
            esp.join(ENTRIES_DIR).join("gateway-b+0-3.conf"),
            entry_text(Slot::B, "0.2.0", Some("b2"), 2, tmpl),
        )
        .unwrap();
        let app = Appliance {
            esp: esp.clone(),
            booted: None,
            disk: None,
        };
        let st = app.status().unwrap();
        assert_eq!(st.next_boot, Some(Slot::A));
        assert_eq!(st.slots[0].state, SlotState::Good);
        assert_eq!(st.slots[1].state, SlotState::Bad);
        let text = st.to_string();
        assert!(
            text.contains("\nb     -              bad (no tries left)"),
            "{text}"
        );
        assert!(text.contains("0.2.0 (b2)"), "{text}");
        assert!(text.contains("bad (no tries left)"), "{text}");
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["slots"][1]["state"], "bad");
        assert_eq!(json["next_boot"], "a");
        fs::remove_dir_all(&esp).unwrap();
    }

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
