//! The running appliance: finds its ESP, booted slot and disk ([`Appliance::detect`]), reports the status of its
//! slots, and installs a signed update into the inactive slot (verify, disarm, write, read back through the
//! verifier, copy kernel and initramfs, arm the entry). Must never write the running slot, a slot on another disk,
//! or anything before the signature verified.
#![deny(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use super::payload::{locate_root, RootImage};
use super::signature::{find_signature, stream_root, verify_root, UpdateKey, UPDATE_PUBKEY};
use super::slots::{entry_text, next_boot, read_entries, BootEntry, Slot, SlotState};
use super::status::{SlotStatus, SystemStatus};
use super::*;

pub(super) struct Appliance {
    esp: PathBuf,
    booted: Option<Slot>,
    /// The disk holding the running root, e.g. "vda"; slots are only ever looked up on it.
    disk: Option<String>,
}

impl Appliance {
    pub(super) fn detect(esp: &Path) -> Result<Appliance, SystemError> {
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

    pub(super) fn status(&self) -> anyhow::Result<SystemStatus> {
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

    pub(super) fn update(
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
    use super::super::tests::temp_dir;
    use super::*;

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
