//! The A/B root slots and their systemd-boot entries on the ESP (`loader/entries/gateway-<slot>[+LEFT[-DONE]].conf`):
//! parsing entry names and files, the state of a slot (good, on trial, bad, empty), which slot boots next, and the
//! entry text `update` writes. Pure: reads a directory at most, never writes.
#![deny(unsafe_code)]

use std::fmt;
use std::fs;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use super::ENTRIES_DIR;

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

    pub(super) fn from_letter(c: &str) -> Option<Slot> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
