//! A real wireguard-go client in its own namespace, configured only from the wg-quick config
//! that `rampart device add` printed (the way a user would import it).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::netns::Netns;
use super::process::{run, tail, wait_until, Proc, Ran};

/// The parts of a wg-quick client config the harness needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Exactly what `rampart device add` printed.
    pub text: String,
    pub private_key: String,
    pub addresses: Vec<String>,
    pub mtu: Option<u16>,
    pub peer_public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u16>,
}

/// wg-quick keys that `wg setconf` does not understand; the harness applies them itself.
const WG_QUICK_ONLY: [&str; 3] = ["address", "mtu", "dns"];

impl ClientConfig {
    pub fn parse(text: &str) -> Result<ClientConfig, String> {
        let mut section = String::new();
        let mut sections = Vec::new();
        let mut private_key = None;
        let mut addresses = Vec::new();
        let mut mtu = None;
        let mut peer_public_key = None;
        let mut endpoint = None;
        let mut allowed_ips = Vec::new();
        let mut persistent_keepalive = None;
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                section = line.to_ascii_lowercase();
                sections.push(section.clone());
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("not `key = value`: {raw:?}"))?;
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            let list = || -> Vec<String> {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            match (section.as_str(), k.as_str()) {
                ("[interface]", "privatekey") => private_key = Some(v.clone()),
                ("[interface]", "address") => addresses.extend(list()),
                ("[interface]", "mtu") => {
                    mtu = Some(v.parse().map_err(|e| format!("MTU {v:?}: {e}"))?)
                }
                ("[peer]", "publickey") => peer_public_key = Some(v.clone()),
                ("[peer]", "endpoint") => endpoint = Some(v.clone()),
                ("[peer]", "allowedips") => allowed_ips.extend(list()),
                ("[peer]", "persistentkeepalive") => {
                    persistent_keepalive = Some(
                        v.parse()
                            .map_err(|e| format!("PersistentKeepalive {v:?}: {e}"))?,
                    )
                }
                _ => {}
            }
        }
        if sections != ["[interface]", "[peer]"] {
            return Err(format!(
                "expected one [Interface] then one [Peer] section, got {sections:?}"
            ));
        }
        Ok(ClientConfig {
            text: text.to_string(),
            private_key: private_key.ok_or("no PrivateKey")?,
            addresses,
            mtu,
            peer_public_key: peer_public_key.ok_or("no [Peer] PublicKey")?,
            endpoint: endpoint.ok_or("no Endpoint")?,
            allowed_ips,
            persistent_keepalive,
        })
    }

    /// The config for `wg setconf`: the printed text minus the wg-quick-only lines.
    pub fn setconf_text(&self) -> String {
        let mut out = String::new();
        for line in self.text.lines() {
            let key = line
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if line.contains('=') && WG_QUICK_ONLY.contains(&key.as_str()) {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// The device's (first) IPv4 tunnel address.
    pub fn address(&self) -> Ipv4Addr {
        self.addresses
            .iter()
            .find_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
            .unwrap_or_else(|| panic!("no IPv4 Address in client config:\n{}", self.text))
    }
}

impl ClientConfig {
    /// The device's IPv6 tunnel address (dual-stack tenants).
    pub fn address_v6(&self) -> Ipv6Addr {
        self.addresses
            .iter()
            .find_map(|a| a.split('/').next()?.parse::<Ipv6Addr>().ok())
            .unwrap_or_else(|| panic!("no IPv6 Address in client config:\n{}", self.text))
    }
}

/// A running wireguard-go client in its own namespace.
pub struct WgClient {
    pub tenant: String,
    pub name: String,
    pub ifname: String,
    pub config: ClientConfig,
    /// Underlay address of the client's first link.
    pub underlay: Ipv4Addr,
    /// Index of the client's underlay links (198.18.<link>.0/24; a second link for roaming
    /// uses 198.18.<link + 100>.0/24).
    pub link: u8,
    wggo: Option<Proc>,
    // Dropped after the wireguard-go process (fields drop in declaration order).
    pub ns: Netns,
}

impl WgClient {
    /// Starts `wireguard-go -f IFNAME` in `ns` (as our own child) and applies `config` the way
    /// wg-quick would: `wg setconf` with the wg-quick-only lines stripped, the Address on the
    /// interface, MTU, and a route for every AllowedIPs entry.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ns: Netns,
        tenant: &str,
        name: &str,
        ifname: &str,
        config: ClientConfig,
        underlay: Ipv4Addr,
        link: u8,
        dir: &Path,
    ) -> WgClient {
        assert!(
            ifname.len() <= 15,
            "interface name {ifname} longer than 15 chars"
        );
        // A stale UAPI socket can only be left by an earlier run of this very harness (the
        // name contains our PID); wireguard-go refuses to start next to it.
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = ns.exec("wireguard-go");
        cmd.env("LOG_LEVEL", "verbose").args(["-f", ifname]);
        let wggo = Proc::spawn(&format!("wg-{name}"), cmd, dir);
        let mut client = WgClient {
            tenant: tenant.to_string(),
            name: name.to_string(),
            ifname: ifname.to_string(),
            config,
            underlay,
            link,
            wggo: Some(wggo),
            ns,
        };
        wait_until(
            &format!("wireguard-go {ifname} to create its UAPI socket"),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                client.assert_running();
                (sock.exists() && client.wg(&["show", ifname]).success()).then_some(())
            },
        );
        let conf_path = dir.join(format!("{name}.setconf"));
        std::fs::write(&conf_path, client.config.setconf_text()).unwrap();
        client
            .wg(&["setconf", ifname, conf_path.to_str().unwrap()])
            .expect_ok();
        for a in client.config.addresses.clone() {
            if a.contains(':') {
                // No duplicate address detection on a point-to-point tunnel: usable at once.
                client.ns.ip(&["addr", "add", &a, "dev", ifname, "nodad"]);
            } else {
                client.ns.ip(&["addr", "add", &a, "dev", ifname]);
            }
        }
        if let Some(mtu) = client.config.mtu {
            client
                .ns
                .ip(&["link", "set", ifname, "mtu", &mtu.to_string()]);
        }
        client.ns.ip(&["link", "set", ifname, "up"]);
        for net in client.config.allowed_ips.clone() {
            client.ns.ip(&["route", "add", &net, "dev", ifname]);
        }
        client
    }

    /// `wg ARGS...` inside the client namespace.
    pub fn wg(&self, args: &[&str]) -> Ran {
        self.ns.run("wg", args, Duration::from_secs(10))
    }

    pub fn address(&self) -> Ipv4Addr {
        self.config.address()
    }

    pub fn address_v6(&self) -> Ipv6Addr {
        self.config.address_v6()
    }

    /// Unix time of the latest handshake wireguard-go completed with the gateway (0 = never).
    pub fn latest_handshake(&self) -> u64 {
        let out = self
            .wg(&["show", &self.ifname, "latest-handshakes"])
            .expect_ok();
        out.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    /// Panics with the wireguard-go log if the process died.
    pub fn assert_running(&mut self) {
        let wggo = self.wggo.as_mut().expect("wireguard-go stopped");
        if let Some(s) = wggo.exit_status() {
            panic!(
                "wireguard-go for {} exited ({s}):\n{}{}",
                self.name,
                tail(&wggo.log(), 20),
                tail(&wggo.stdout(), 20)
            );
        }
    }

    /// wireguard-go's log (it logs to stdout; the banner and fatal errors go to stderr).
    pub fn log(&self) -> String {
        self.wggo
            .as_ref()
            .map(|p| format!("{}{}", p.log(), p.stdout()))
            .unwrap_or_default()
    }

    /// Stops wireguard-go (its TUN device goes away with it).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.wggo.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// A `Command` for `program` inside the client namespace.
    pub fn exec(&self, program: &str) -> Command {
        self.ns.exec(program)
    }

    /// Runs `program ARGS` in the client namespace with a deadline.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Ran {
        run(self.exec(program).args(args), timeout)
    }
}

impl Drop for WgClient {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- wireguard-go log of {}/{} ({}), last 30 lines ---\n{}",
                self.tenant,
                self.name,
                self.ifname,
                tail(&self.log(), 30)
            );
            if let Ok(r) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.wg(&["show", &self.ifname])
            })) {
                eprintln!("--- wg show {} ---\n{}", self.ifname, r.stdout);
            }
        }
        self.stop();
    }
}

#[test]
fn parses_and_strips_a_wg_quick_config() {
    let text = "# device laptop of tenant acme\n[Interface]\nPrivateKey = cHJpdg==\n\
                Address = 100.96.0.2/32\nMTU = 1420\nDNS = 100.96.0.1\n\n[Peer]\n\
                PublicKey = cHVi\nEndpoint = 198.18.0.1:51820\nAllowedIPs = 100.96.0.0/24\n\
                PersistentKeepalive = 25\n";
    let c = ClientConfig::parse(text).unwrap();
    assert_eq!(c.address(), Ipv4Addr::new(100, 96, 0, 2));
    assert_eq!(c.mtu, Some(1420));
    assert_eq!(c.allowed_ips, ["100.96.0.0/24"]);
    assert_eq!(c.persistent_keepalive, Some(25));
    let s = c.setconf_text();
    assert!(!s.contains("Address") && !s.contains("MTU") && !s.contains("DNS"));
    assert!(s.contains("PrivateKey = cHJpdg==") && s.contains("Endpoint = 198.18.0.1:51820"));
}
