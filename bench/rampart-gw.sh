#!/usr/bin/env bash
# bench/rampart-gw.sh IFNAME - Rampart in the GATEWAY SLOT of ../shared/bench/baseline.sh (impl `custom`).
#
# baseline.sh runs this as `ip netns exec gw nice -n -15 bash -c "exec bench/rampart-gw.sh wggw"` with the
# benchmark keys exported (K_GW, P_CLI, P_DEV); bench/relay.sh exports RAMPART_BIN and RUN_DIR.
# It writes Rampart's config for the relay topology, creates a plain placeholder TUN named IFNAME (Rampart
# needs no TUN; baseline.sh waits for the interface and assigns 100.96.0.1/24 to it; it carries no traffic and
# disappears with namespace gw at `topo.sh down`), then execs rampart, so the PID baseline.sh CPU-accounts is
# the gateway itself (all its threads).
set -euo pipefail
IFN="${1:-wggw}"
: "${K_GW:?K_GW not exported (run via bench/relay.sh)}" "${P_CLI:?}" "${P_DEV:?}"
: "${RAMPART_BIN:?}" "${RUN_DIR:?}"
NS_GW="${NS_PREFIX:-}gw"

# Safety: only ever act inside the benchmark's gw namespace, never in the root namespace.
here="$(ip netns identify $$ 2>/dev/null || true)"
if [[ "$here" != "$NS_GW" ]]; then
  echo "rampart-gw: refusing to run outside namespace $NS_GW (in: '${here:-root}')" >&2
  exit 1
fi

# Fresh state for every start: no last-known endpoints carried over from a previous scenario/rep, so every
# run starts the same way (devices announce themselves with their first packet).
rm -rf "$RUN_DIR/state"
mkdir -p "$RUN_DIR/state"
(umask 077; printf '%s\n' "$K_GW" >"$RUN_DIR/gateway.key")
write_config() { # with_policy(1|0)
  cat <<TOML
# written by bench/rampart-gw.sh for ../shared/bench/baseline.sh relay:custom
[gateway]
listen = "0.0.0.0:51820"
private_key_file = "$RUN_DIR/gateway.key"
state_dir = "$RUN_DIR/state"
admin_listen = "127.0.0.1:8080"

[[tenant]]
id = "bench"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
TOML
  if [[ "$1" == 1 ]]; then
    # Policy denies anything unmatched: allow all device-to-device traffic of the tenant (the benchmark
    # measures the relay path, flow tracking and audit included, not policy misses).
    cat <<TOML

[[tenant.rule]]
id = "bench-allow-all"
action = "allow"
dst = ["100.96.0.0/24", "gateway"]
proto = "any"
TOML
  fi
  cat <<TOML

[[tenant.device]]
name = "cli"
public_key = "$P_CLI"
address = "100.96.0.2"
user = "bench"

[[tenant.device]]
name = "dev"
public_key = "$P_DEV"
address = "100.96.0.3"
user = "bench"
TOML
}
# Revisions before per-flow policy reject the `rule` key (unknown keys are errors): fall back to no rules.
write_config 1 >"$RUN_DIR/rampart.toml"
if ! "$RAMPART_BIN" check-config -c "$RUN_DIR/rampart.toml" >&2 2>"$RUN_DIR/check-config.err"; then
  if grep -q "rule" "$RUN_DIR/check-config.err"; then
    echo "rampart-gw: this revision has no [[tenant.rule]]; running without policy rules" >&2
    write_config 0 >"$RUN_DIR/rampart.toml"
    "$RAMPART_BIN" check-config -c "$RUN_DIR/rampart.toml" >&2
  else
    cat "$RUN_DIR/check-config.err" >&2; exit 1
  fi
fi

echo "$$" >"$RUN_DIR/rampart-gw.pid"   # the PID stays the same across exec: rampart's (see rampart-hook.sh)
ip link show "$IFN" >/dev/null 2>&1 || ip tuntap add dev "$IFN" mode tun
exec "$RAMPART_BIN" run -c "$RUN_DIR/rampart.toml"
