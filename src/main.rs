//! Rampart: a WireGuard-terminating zero-trust gateway. See ARCHITECTURE.md for the module map.
#![deny(unsafe_code)]

use std::io::IsTerminal as _;

use clap::Parser as _;
use rampart::cli;

fn main() -> std::process::ExitCode {
    if let Some(code) = rampart::netns::helper::maybe_run_helper() {
        return code;
    }
    let cli = cli::Cli::parse();
    // Whatever rampart creates (keys, registry, stores, recordings, device configs) is private, files 0600 and
    // directories 0700, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|e| {
        eprintln!(
            "rampart: --log-level {:?} is not a valid filter ({e}); using info",
            cli.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // A panic in any thread (the data path, the namespace supervisor, an inspector task) ends the process:
    // a gateway with a dead part must not keep answering /health, and its supervisor restarts it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(%info, "panic; stopping the gateway so its supervisor restarts it");
        default_hook(info);
        std::process::abort();
    }));
    match cli::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
