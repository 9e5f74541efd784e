//! `rampart fleet ...`: the fleet's nodes as PostgreSQL knows them.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Every node of the fleet: its address, the config version it applied, its lag behind the fleet's
    /// version, and how old its heartbeat is (STALE past --stale-after).
    Status {
        #[arg(short, long, default_value = super::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// A heartbeat older than this many seconds marks the node STALE (default: 3 heartbeat intervals).
        #[arg(long)]
        stale_after: Option<u64>,
    },
}

pub fn run(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Status {
            config,
            json,
            stale_after,
        } => status(&config, json, stale_after),
    }
}

fn status(config: &Path, json: bool, stale_after: Option<u64>) -> anyhow::Result<()> {
    let cfg = super::load(config)?;
    let (rt, client) = super::audit::fleet_client(&cfg)?;
    let stale_after = match (stale_after, &cfg.fleet) {
        (Some(s), _) => Duration::from_secs(s),
        (None, Some(f)) => f.heartbeat_interval * 3,
        (None, None) => Duration::from_secs(15),
    };
    let (version, nodes) = rt
        .block_on(crate::fleet::state::status(&client, stale_after))
        .map_err(|e| anyhow::anyhow!("reading the fleet's nodes: {e:#}"))?;
    if json {
        for n in &nodes {
            let mut v = serde_json::to_value(n)?;
            v["fleet_version"] = version.into();
            println!("{v}");
        }
        return Ok(());
    }
    println!("fleet config version {version}");
    println!(
        "{:<20} {:<24} {:>8} {:>5} {:>10}  STATE",
        "NODE", "ADDRESS", "APPLIED", "LAG", "HEARTBEAT"
    );
    let dash = || "-".to_string();
    for n in &nodes {
        println!(
            "{:<20} {:<24} {:>8} {:>5} {:>10}  {}",
            n.node,
            n.address.clone().unwrap_or_else(dash),
            n.applied_version
                .map(|v| v.to_string())
                .unwrap_or_else(dash),
            n.lag.map(|v| v.to_string()).unwrap_or_else(dash),
            n.heartbeat_age_secs
                .map(|a| format!("{a:.0}s ago"))
                .unwrap_or_else(|| "never".into()),
            if n.stale { "STALE" } else { "ok" }
        );
    }
    Ok(())
}
