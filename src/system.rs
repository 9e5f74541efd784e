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
//! `update` writes the slot that is not running, copies that slot's own kernel and initramfs to the ESP and arms
//! its entry with a counter. It never writes the running slot, nor a slot on another disk than the running root.
//! Off the appliance both commands fail with "not running on a Rampart appliance: ..." (`--esp` points `status`
//! at another ESP directory, e.g. for inspection).
//!
//! Start reading at [`run`].
#![deny(unsafe_code)]

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
    /// Write IMAGE_OR_ROOTFS into the inactive slot and arm it with boot counting
    ///
    /// IMAGE_OR_ROOTFS is a root squashfs (`rampart-rootfs.sqfs` from `make image`) or a raw Rampart disk image
    /// (`rampart.img`, not the .zst), as a file or a block device. After a reboot the updated slot boots; if its
    /// gateway does not become healthy within the tries, the boot loader falls back to the current slot.
    Update {
        image: PathBuf,
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
        SystemCommand::Update {
            image,
            esp,
            tries,
            force,
        } => Appliance::detect(&esp)?.update(&image, tries, force),
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

    fn update(&self, payload: &Path, tries: u32, force: bool) -> anyhow::Result<()> {
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
        copy_verified(&mut src, root, &device)?;

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

/// Copy `root` from `src` onto the block device, flush it, and read it back to compare.
fn copy_verified(src: &mut File, root: RootImage, device: &Path) -> anyhow::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut dst = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    let mut buf = vec![0u8; CHUNK];
    src.seek(SeekFrom::Start(root.offset))?;
    let mut left = root.len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        read_exact_or_zero(src, &mut buf[..n])?;
        dst.write_all(&buf[..n])
            .with_context(|| format!("write to {} failed", device.display()))?;
        left -= n as u64;
    }
    dst.sync_all()?;

    let mut back = vec![0u8; CHUNK];
    src.seek(SeekFrom::Start(root.offset))?;
    dst.seek(SeekFrom::Start(0))?;
    let mut left = root.len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        read_exact_or_zero(src, &mut buf[..n])?;
        dst.read_exact(&mut back[..n])?;
        if buf[..n] != back[..n] {
            bail!(
                "verification of {} failed: the written data reads back differently",
                device.display()
            );
        }
        left -= n as u64;
    }
    Ok(())
}

/// Like read_exact, but a payload shorter than its 4 KiB-padded length reads as zeros at the end.
fn read_exact_or_zero(r: &mut File, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..])?;
        if k == 0 {
            buf[n..].fill(0);
            break;
        }
        n += k;
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
}
