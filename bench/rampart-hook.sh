#!/usr/bin/env bash
# bench/rampart-hook.sh - GW_CONFIG_HOOK for ../shared/bench/baseline.sh with Rampart in the GATEWAY SLOT.
#
# baseline.sh runs GW_CONFIG_HOOK (inside ns gw, after starting the gateway) for EVERY impl once it is set, so
# this hook first tells the two apart:
# - an anchor (wireguard-go, boringtun-cli: they have a UAPI socket, and no live rampart-gw.pid): configure it
#   exactly as baseline.sh's configure_gw does without a hook (same `wg set` line);
# - Rampart (bench/rampart-gw.sh wrote its PID, now rampart's, to $RUN_DIR/rampart-gw.pid): it took its whole
#   config from the file rampart-gw.sh wrote, so there is nothing to push. The hook then
#  1. waits until Rampart's UDP socket (:51820) and admin endpoint are up;
#  2. starts a short, bounded "primer" in the background: once each leaf's wireguard-go interface has its
#     address (baseline.sh configures the leaves after this hook), the leaf pings the gateway address
#     100.96.0.1 twice. Rampart learns a device's endpoint only from the device's own authenticated traffic,
#     and the leaves have no persistent keepalive, so without this the dev side (which otherwise only ever
#     answers) would stay unknown and the cli -> dev warm-up ping would be dropped as DestinationOffline.
#     The primer finishes within PRIMER_MAX seconds, long before the measured iperf3 runs.
set -euo pipefail
NS_CLI="${NS_PREFIX:-}cli"; NS_DEV="${NS_PREFIX:-}dev"
PRIMER_MAX="${PRIMER_MAX:-20}"
LOG="${RUN_DIR:?}/primer.log"

IF_GW=wggw
pid="$(cat "$RUN_DIR/rampart-gw.pid" 2>/dev/null || true)"
comm="$(cat "/proc/${pid:-0}/comm" 2>/dev/null || true)"   # rampart-gw.sh until it execs rampart
if [[ -z "$pid" || ( "$comm" != rampart && "$comm" != rampart-gw.sh ) ]]; then
  # anchor: baseline.sh's own configuration (configure_gw without GW_CONFIG_HOOK)
  for _ in $(seq 1 100); do [[ -S "/var/run/wireguard/$IF_GW.sock" ]] && break; sleep 0.05; done
  [[ -S "/var/run/wireguard/$IF_GW.sock" ]] || { echo "rampart-hook: no UAPI socket for $IF_GW" >&2; exit 1; }
  wg set "$IF_GW" private-key <(echo "$K_GW") listen-port 51820 \
    peer "$P_CLI" allowed-ips 100.96.0.2/32 endpoint 198.18.1.2:51821 \
    peer "$P_DEV" allowed-ips 100.96.0.3/32 endpoint 198.18.2.2:51822
  exit 0
fi

ok=0
for _ in $(seq 1 100); do
  if ss -lunH 'sport = :51820' 2>/dev/null | grep -q . \
     && (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then ok=1; break; fi
  sleep 0.1
done
(( ok )) || { echo "rampart-hook: gateway not listening on :51820 / admin :8080 after 10 s" >&2; exit 1; }

prime() { # ns ifname addr
  local ns="$1" ifn="$2" addr="$3" t0=$SECONDS
  while (( SECONDS - t0 < PRIMER_MAX )); do
    if ip -n "$ns" -br addr show dev "$ifn" 2>/dev/null | grep -q "$addr/" \
       && ip -n "$ns" link show "$ifn" 2>/dev/null | grep -q ',UP'; then
      if ip netns exec "$ns" ping -c 2 -i 0.2 -W 2 -q 100.96.0.1 >/dev/null 2>&1; then
        echo "$(date +%T) primer: $ns reached 100.96.0.1 after $((SECONDS - t0)) s"; return 0
      fi
    fi
    sleep 0.1
  done
  echo "$(date +%T) primer: $ns did NOT reach 100.96.0.1 within ${PRIMER_MAX} s"
}
(
  prime "$NS_DEV" wgdev 100.96.0.3 &
  prime "$NS_CLI" wgcli 100.96.0.2 &
  wait
) </dev/null >>"$LOG" 2>&1 &
echo "$!" >>"$RUN_DIR/primer.pids"

exit 0
