//! One test's world: a temp dir, a gateway namespace running `rampart run`, and helpers to
//! attach wireguard-go clients and plain underlay hosts to it.
//!
//! Topology (all names carry `rpt<pid>x<n>`, so parallel runs and other users never collide):
//!
//! ```text
//!   <id>-<client> eth0 198.18.L.2/24 ---veth--- vL 198.18.L.1/24  <id>-gw
//!   (wireguard-go, tunnel address         (roaming: eth1 198.18.L+100.2 --- rL)
//!    from `rampart device add`)           lo 198.18.0.1/32: rampart listens here
//! ```
//!
//! Clients route only 198.18.0.1/32 over the underlay; the gateway namespace does not forward,
//! so the only path between devices is the gateway's userspace relay.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::gateway::{write_config_at, Gateway, TenantSpec, PORT, UNDERLAY_ADDR};
use super::netns::{link, Netns};
use super::process::tail;
use super::wg_client::{ClientConfig, WgClient};
use super::TempDir;

static LABS: AtomicU32 = AtomicU32::new(0);
static IFACES: AtomicU32 = AtomicU32::new(0);

/// apt packages providing the tools the harness runs.
pub const APT_PACKAGES: &str =
    "wireguard-go wireguard-tools iproute2 iputils-ping python3 curl nftables util-linux postgresql";

/// Fails loudly (never skips) when the harness cannot run here.
pub fn preflight() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "the end-to-end tests create network namespaces and TUN devices: run them as root \
         (they do not skip themselves when not root)"
    );
    let path = std::env::var("PATH").unwrap_or_default();
    for tool in [
        "wireguard-go",
        "wg",
        "ip",
        "python3",
        "curl",
        "ping",
        "sh",
        "kill",
        "nft",
        "nsenter",
    ] {
        let found = path.split(':').any(|d| Path::new(d).join(tool).is_file());
        assert!(
            found,
            "`{tool}` not found in PATH; the end-to-end tests need the apt packages: {APT_PACKAGES}"
        );
    }
}

/// A device's namespace before its tunnel exists (`Lab::device_ns`).
pub struct DeviceNs {
    pub ns: Netns,
    pub underlay: Ipv4Addr,
    pub link: u8,
}

/// A plain host on the underlay (e.g. an attacker), no WireGuard.
pub struct Host {
    pub ns: Netns,
    pub underlay: Ipv4Addr,
}

pub struct Lab {
    // Drop order matters: the gateway process stops before its namespace goes, the temp dir
    // (logs) goes last.
    pub gateway: Gateway,
    pub gw_ns: Netns,
    pub id: String,
    /// Namespaces of clients added from now on keep IPv6 on (see `Netns::create_with`).
    pub ipv6_clients: bool,
    /// The gateway's underlay address (`UNDERLAY_ADDR` unless made with `Lab::at_underlay`).
    pub underlay: String,
    next_link: u8,
    dir: TempDir,
}

impl Lab {
    /// A gateway namespace with `rampart run` serving `tenants`, healthy.
    pub fn new(tenants: &[TenantSpec]) -> Lab {
        Lab::with_settings(tenants, "")
    }

    /// Like `new`, with more gateway settings (`write_config_with`).
    pub fn with_settings(tenants: &[TenantSpec], extra: &str) -> Lab {
        Lab::with_listen(tenants, &format!("{UNDERLAY_ADDR}:{PORT}"), extra)
    }

    /// Like `with_settings`, with the WireGuard socket bound to `listen` (e.g. `[::]:PORT`, dual-stack); the
    /// gateway namespace keeps IPv6 on when `listen` is an IPv6 address.
    /// With `RAMPART_E2E_USER=nobody`, every lab's gateway drops to that user (`gateway.user`) and gets a
    /// 0666 TUN node of its own: runs a whole suite under the sandbox (`docs/security.md`, "Privileges").
    pub fn with_listen(tenants: &[TenantSpec], listen: &str, extra: &str) -> Lab {
        match std::env::var("RAMPART_E2E_USER") {
            Ok(user) if !user.is_empty() => Lab::with_setup(
                tenants,
                listen,
                &format!("user = \"{user}\"\n{extra}"),
                private_tun,
            ),
            _ => Lab::with_setup(tenants, listen, extra, |_| {}),
        }
    }

    /// Like `with_listen`, with `setup` applied to the gateway before it starts.
    pub fn with_setup(
        tenants: &[TenantSpec],
        listen: &str,
        extra: &str,
        setup: impl FnOnce(&mut Gateway),
    ) -> Lab {
        Lab::build(tenants, listen, UNDERLAY_ADDR, extra, setup)
    }

    /// A gateway on underlay address `underlay` (another 198.18.0.x/32), listening there: a second node of a
    /// fleet that one device namespace can reach next to the first (`Lab::link_device`).
    pub fn at_underlay(tenants: &[TenantSpec], underlay: &str, extra: &str) -> Lab {
        Lab::build(
            tenants,
            &format!("{underlay}:{PORT}"),
            underlay,
            extra,
            |_| {},
        )
    }

    fn build(
        tenants: &[TenantSpec],
        listen: &str,
        underlay: &str,
        extra: &str,
        setup: impl FnOnce(&mut Gateway),
    ) -> Lab {
        preflight();
        let id = format!(
            "rpt{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::SeqCst)
        );
        let dir = super::tempdir(&id);
        let gw_ns = Netns::create_with(&format!("{id}-gw"), listen.starts_with('['));
        gw_ns.ip(&["addr", "add", &format!("{underlay}/32"), "dev", "lo"]);
        let config = write_config_at(dir.path(), tenants, listen, underlay, extra);
        let mut gateway = Gateway::new(config, dir.path(), &gw_ns);
        let check = gateway.cli(&["check-config"], &[]);
        assert!(check.success(), "generated config rejected: {check}");
        setup(&mut gateway);
        gateway.start();
        Lab {
            gateway,
            gw_ns,
            id,
            ipv6_clients: false,
            underlay: underlay.to_string(),
            next_link: 1,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `host:port` clients use to reach the gateway.
    pub fn endpoint(&self) -> String {
        format!("{}:{PORT}", self.underlay)
    }

    fn take_link(&mut self) -> u8 {
        let l = self.next_link;
        assert!(l < 100, "too many underlay links in one lab");
        self.next_link += 1;
        l
    }

    /// A new namespace linked to the gateway namespace on 198.18.L.0/24 with a route to the
    /// gateway's underlay address only.
    fn underlay_ns(&mut self, role: &str) -> (Netns, Ipv4Addr, u8) {
        let l = self.take_link();
        let ns = Netns::create_with(&format!("{}-{role}", self.id), self.ipv6_clients);
        link(
            &ns,
            "eth0",
            &format!("198.18.{l}.2/24"),
            &self.gw_ns,
            &format!("v{l}"),
            &format!("198.18.{l}.1/24"),
        );
        ns.ip(&[
            "route",
            "add",
            &format!("{}/32", self.underlay),
            "via",
            &format!("198.18.{l}.1"),
        ]);
        (ns, Ipv4Addr::new(198, 18, l, 2), l)
    }

    /// Links `ns` (a device of another lab) to this gateway too, on 198.18.`subnet`.0/24 (pick one no lab
    /// uses: 200 and up), with a route to this gateway's underlay address only.
    pub fn link_device(&self, ns: &Netns, subnet: u8) {
        link(
            ns,
            &format!("eth{subnet}"),
            &format!("198.18.{subnet}.2/24"),
            &self.gw_ns,
            &format!("x{subnet}"),
            &format!("198.18.{subnet}.1/24"),
        );
        ns.ip(&[
            "route",
            "add",
            &format!("{}/32", self.underlay),
            "via",
            &format!("198.18.{subnet}.1"),
        ]);
    }

    /// Enrolls device `name` in `tenant` with `rampart device add` and brings up a wireguard-go
    /// client with exactly the printed config, in its own namespace.
    pub fn add_client(&mut self, tenant: &str, name: &str) -> WgClient {
        self.add_client_with(tenant, name, &[])
    }

    /// Like [`add_client`](Self::add_client), with more `device add` arguments (e.g. `--ssh-key FILE`).
    pub fn add_client_with(&mut self, tenant: &str, name: &str, extra: &[&str]) -> WgClient {
        let (ns, underlay, l) = self.underlay_ns(name);
        let config =
            self.gateway
                .device_add_with(tenant, name, &format!("{name}@{tenant}.example"), extra);
        assert_eq!(
            config.endpoint,
            self.endpoint(),
            "device add printed an Endpoint other than public_endpoint:\n{}",
            config.text
        );
        let ifname = format!(
            "rw{:x}n{}",
            std::process::id(),
            IFACES.fetch_add(1, Ordering::SeqCst)
        );
        WgClient::start(ns, tenant, name, &ifname, config, underlay, l, self.dir())
    }

    /// A namespace for a device that sets itself up (enrolls with a token, say) instead of `device add`.
    pub fn device_ns(&mut self, role: &str) -> DeviceNs {
        let (ns, underlay, link) = self.underlay_ns(role);
        DeviceNs { ns, underlay, link }
    }

    /// Starts a wireguard-go client in `dev` with `config` (as `add_client` does with what `device add`
    /// printed).
    pub fn start_device(
        &self,
        dev: DeviceNs,
        tenant: &str,
        name: &str,
        config: ClientConfig,
    ) -> WgClient {
        let ifname = format!(
            "rw{:x}n{}",
            std::process::id(),
            IFACES.fetch_add(1, Ordering::SeqCst)
        );
        WgClient::start(
            dev.ns,
            tenant,
            name,
            &ifname,
            config,
            dev.underlay,
            dev.link,
            self.dir(),
        )
    }

    /// A plain underlay host (no WireGuard) that can reach the gateway's UDP port.
    pub fn add_host(&mut self, role: &str) -> Host {
        let (ns, underlay, _) = self.underlay_ns(role);
        Host { ns, underlay }
    }

    /// Gives `client` a second underlay link (eth1, 198.18.L+100.2/24) without using it yet;
    /// returns the new address and its gateway-side next hop.
    pub fn add_second_link(&self, client: &WgClient) -> (Ipv4Addr, Ipv4Addr) {
        let l = client.link + 100;
        link(
            &client.ns,
            "eth1",
            &format!("198.18.{l}.2/24"),
            &self.gw_ns,
            &format!("r{}", client.link),
            &format!("198.18.{l}.1/24"),
        );
        (Ipv4Addr::new(198, 18, l, 2), Ipv4Addr::new(198, 18, l, 1))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}), last 120 lines ---\n{}",
                self.dir().join("gateway.log").display(),
                tail(&self.gateway.log(), 120)
            );
            if let Some(m) = self.gateway.http_get("/metrics") {
                eprintln!("--- /metrics ---\n{m}");
            }
        }
        // Stop the gateway explicitly, before its namespace is deleted.
        self.gateway.terminate(Duration::from_secs(10));
    }
}

/// Gives `g` a TUN device node of its own, mode 0666, bind-mounted over `/dev/net/tun` for it only (this
/// container's node is 0600, which an unprivileged gateway cannot open).
pub fn private_tun(g: &mut Gateway) {
    let node = g.dir.join("tun");
    let r = super::process::run(
        std::process::Command::new("mknod")
            .args(["-m", "0666"])
            .arg(&node)
            .args(["c", "10", "200"]),
        Duration::from_secs(10),
    );
    assert!(r.success(), "{r}");
    g.tun_node = Some(node);
}
