//! `rampart admin ...` (accounts of the review web UI, on the console) and `rampart audit admin` (its audit
//! records). The store and the rules are `admin::accounts`'.
#![deny(unsafe_code)]

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::admin::accounts::{AccountStore, Role, Scope};
use crate::config::Config;

const DEFAULT_CONFIG_PATH: &str = "/etc/rampart/gateway.toml";

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a review UI account. The password is asked for on the terminal (not echoed) or read from stdin
    /// with --password-stdin; there is no default password.
    Create {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        /// `admin` (also terminates sessions, manages devices and tokens) or `auditor` (reads).
        #[arg(long, default_value = "admin")]
        role: String,
        /// A tenant the account sees (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// The account sees every tenant.
        #[arg(long, conflicts_with = "tenants")]
        all_tenants: bool,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a new password (also unlocks the account).
    Passwd {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts.
    List {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove an account (its API tokens stop working; its browser sessions end at their next request).
    Remove {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Mint an API token for an account (printed once): `Authorization: Bearer rpa1_...` on /api/v1/.
    Token {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Revoke an API token by its id (the 16 hex digits after `rpa1_`).
    RevokeToken {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        id: String,
    },
}

fn store(config: &Path) -> anyhow::Result<(Config, AccountStore)> {
    let cfg = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::sandbox::act_as_state_owner(&cfg)?;
    std::fs::create_dir_all(&cfg.gateway.state_dir).with_context(|| {
        format!(
            "cannot create state_dir {}",
            cfg.gateway.state_dir.display()
        )
    })?;
    let s = AccountStore::open(&cfg.gateway.state_dir)?;
    Ok((cfg, s))
}

/// The password from stdin's first line, or asked for twice on the terminal with echo off.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let ask = |prompt: &str| -> anyhow::Result<String> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        let fd = std::io::stdin();
        let old = tcgetattr(&fd)?;
        let mut quiet = old.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&fd, SetArg::TCSANOW, &quiet)?;
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        tcsetattr(&fd, SetArg::TCSANOW, &old)?;
        eprintln!();
        r?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let a = ask("Password: ")?;
    let b = ask("Again: ")?;
    if a != b {
        anyhow::bail!("the two passwords differ; nothing changed");
    }
    Ok(a)
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    let now = crate::clock::unix_ms();
    match command {
        AdminCommand::Create {
            config,
            name,
            role,
            tenants,
            all_tenants,
            password_stdin,
        } => {
            let role: Role = role
                .parse()
                .map_err(|_| anyhow::anyhow!("--role is `admin` or `auditor`, not {role:?}"))?;
            let (cfg, s) = store(&config)?;
            for t in &tenants {
                if cfg.tenant(t).is_none() {
                    anyhow::bail!(
                        "no tenant {t:?} in {}; use the id of a [[tenant]]",
                        config.display()
                    );
                }
            }
            let scope = if all_tenants {
                Scope::All
            } else {
                Scope::Tenants(tenants)
            };
            let password = read_password(password_stdin)?;
            let a = s.create(&name, &password, role, scope, now)?;
            eprintln!(
                "created {} account {:?}; sign in at https://{}/ui/",
                a.role.as_str(),
                a.name,
                cfg.ui
                    .listen
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "<gateway.ui_listen>".into())
            );
            Ok(())
        }
        AdminCommand::Passwd {
            config,
            name,
            password_stdin,
        } => {
            let (_, s) = store(&config)?;
            let password = read_password(password_stdin)?;
            s.set_password(&name, &password)?;
            eprintln!("password of {name:?} changed");
            Ok(())
        }
        AdminCommand::List { config, json } => {
            let (_, s) = store(&config)?;
            let mut out = std::io::stdout().lock();
            for a in s.list()? {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&a)?)?;
                } else {
                    let scope = match &a.scope {
                        Scope::All => "*".to_string(),
                        Scope::Tenants(t) => t.join(","),
                    };
                    let locked = if a.locked_until_ms > now {
                        "  LOCKED"
                    } else {
                        ""
                    };
                    writeln!(out, "{:<24} {:<8} {scope}{locked}", a.name, a.role.as_str())?;
                }
            }
            Ok(())
        }
        AdminCommand::Remove { config, name } => {
            let (_, s) = store(&config)?;
            s.remove(&name)?;
            eprintln!("removed {name:?}");
            Ok(())
        }
        AdminCommand::Token { config, name } => {
            let (_, s) = store(&config)?;
            let (token, id) = s.create_token(&name, now)?;
            eprintln!("API token {id} for {name:?} (shown once; revoke with `rampart admin revoke-token {id}`):");
            println!("{token}");
            Ok(())
        }
        AdminCommand::RevokeToken { config, id } => {
            let (_, s) = store(&config)?;
            if !s.revoke_token(&id, now)? {
                anyhow::bail!("no active API token {id:?}");
            }
            eprintln!("revoked {id}");
            Ok(())
        }
    }
}

/// `rampart audit admin`: sign-ins, recording reads, live views, terminations from the review UI.
pub fn audit_admin(
    config: &Path,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let cfg = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::sandbox::act_as_state_owner(&cfg)?;
    let path = crate::audit::existing_store(&cfg)?;
    let since = crate::clock::since_arg(since, crate::clock::unix_ms())?;
    let rows = crate::audit::review::admin::query(path, since, limit)?;
    let mut out = std::io::stdout().lock();
    for r in rows.iter().rev() {
        if json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        } else {
            crate::inert_line!(
                out,
                "{}  {:<18} {:<16} {:<10} {:<36} {:<15} {}",
                crate::clock::format_ms(r.at_ms),
                r.event,
                r.actor,
                r.tenant.as_deref().unwrap_or("-"),
                r.session_id.as_deref().unwrap_or("-"),
                r.source.as_deref().unwrap_or("-"),
                r.detail
            )?;
        }
    }
    Ok(())
}
