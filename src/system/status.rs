//! `rampart system status`: what it reports (slots, versions, boot counters, health), as a table or JSON.
#![deny(unsafe_code)]

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::slots::{BootEntry, Slot, SlotState};

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
