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
//! `firewall` prints the appliance's nftables policy for a config ([`firewall::ruleset`]).
//!
//! Start reading at [`run`]. Modules: `slots` (boot entries and slot states), `payload` (where the root is in
//! an update payload), `signature` (the vendor key and [`verify_root`]), `status` (what `status` prints),
//! `appliance` (detecting the running appliance, status, installing an update), `firewall`.
#![deny(unsafe_code)]

mod appliance;
pub mod firewall;
mod payload;
mod signature;
mod slots;
mod status;

use appliance::Appliance;
pub use payload::{locate_root, RootImage};
pub use signature::{
    find_signature, verify_root, UpdateKey, UpdateSignature, SIG_BLOCK_MAGIC, UPDATE_PUBKEY,
};
pub use slots::{entry_text, next_boot, read_entries, BootEntry, EntryName, Slot, SlotState};
pub use status::{SlotStatus, SystemStatus};

use std::fs;
use std::path::PathBuf;

use anyhow::Context as _;

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
    /// Print the appliance's nftables policy for a config (load it with `nft -f`)
    ///
    /// Inbound default drop; open are loopback, established traffic, DHCP replies, IPv6 neighbour discovery,
    /// WireGuard (gateway.listen) and the admin, enrollment and UI listeners that are set to a non-loopback
    /// address. Nothing is forwarded. What gateway.user sends is limited to replies, WireGuard and each tenant's
    /// off-ramp networks through its egress.interface. Without -c, the base policy that opens no service port.
    /// The appliance loads it at boot (firewall-up).
    Firewall {
        /// The gateway config whose listeners are opened and whose off-ramps the gateway may reach.
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

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::path::PathBuf;

    /// A fresh, empty directory under the system temp dir for one test.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rampart-system-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
