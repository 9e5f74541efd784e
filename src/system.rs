//! `rampart system`: A/B slot status and updates on the appliance image. (Being written; see issue 7.)
#![deny(unsafe_code)]

#[derive(clap::Subcommand, Debug)]
pub enum SystemCommand {
    /// Show A/B slots, versions, which slot booted, boot counters
    Status,
}

pub fn run(cmd: SystemCommand) -> anyhow::Result<()> {
    match cmd {
        SystemCommand::Status => anyhow::bail!("not running on a Rampart appliance"),
    }
}
