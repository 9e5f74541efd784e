//! Network namespaces and veth links created for one test, deleted again when the guard drops.
//!
//! Safety rules: everything happens inside namespaces created here. A veth pair is created
//! inside one namespace with its peer placed directly into the other, so nothing ever appears
//! in the root namespace, and no route or address is ever added there.

use std::process::Command;
use std::time::Duration;

use super::process::{run, Ran};

const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// A network namespace owned by the test (deleted on drop).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up, no forwarding and no IPv6 (so nothing but the
    /// test's own IPv4 traffic enters the tunnels).
    pub fn create(name: &str) -> Netns {
        Netns::create_with(name, false)
    }

    /// Like `create`, but with IPv6 left on when `ipv6` (for the tests of IPv6 inside the tunnel;
    /// router solicitations and the like still go nowhere: a WireGuard client only sends to its
    /// AllowedIPs).
    pub fn create_with(name: &str, ipv6: bool) -> Netns {
        run(Command::new("ip").args(["netns", "add", name]), IP_TIMEOUT).expect_ok();
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sh("echo 0 > /proc/sys/net/ipv4/ip_forward");
        let off = if ipv6 { 0 } else { 1 };
        ns.sh(&format!(
            "echo {off} > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
             echo {off} > /proc/sys/net/ipv6/conf/default/disable_ipv6"
        ));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: the program runs (exec'd, same PID) inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace with a deadline.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Ran {
        run(self.exec(program).args(args), timeout)
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).expect_ok()
    }

    pub fn try_ip(&self, args: &[&str]) -> Ran {
        run(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            IP_TIMEOUT,
        )
    }

    /// A shell snippet inside the namespace (used for /proc/sys knobs of this namespace).
    pub fn sh(&self, script: &str) -> String {
        self.run("sh", &["-c", script], IP_TIMEOUT).expect_ok()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        );
        if !r.success() {
            eprintln!("warning: could not delete namespace {}: {r}", self.name);
        }
    }
}

/// Links namespace `a` and `b` with a veth pair: `a_if` with `a_cidr` in `a`, `b_if` with
/// `b_cidr` in `b`, both up.
pub fn link(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_cidr, "dev", a_if]);
    b.ip(&["addr", "add", b_cidr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}
