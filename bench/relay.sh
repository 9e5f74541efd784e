#!/usr/bin/env bash
# bench/relay.sh - device-to-device relay benchmark: Rampart vs wireguard-go and boringtun-cli as relays,
# side by side in ONE invocation of the shared harness ../shared/bench/baseline.sh (its GATEWAY SLOT,
# impl `custom`). See docs/benchmarks.md for what is measured and the published numbers.
#
#   cli (wireguard-go 100.96.0.2) --UDP--> gw (relay) --UDP--> dev (wireguard-go 100.96.0.3, iperf3 -s)
#
# Scenarios (round-robin per rep, so drift is spread over all of them):
#   relay:wggo   wireguard-go in gw (kernel forwards between its 2 peers through its TUN)
#   relay:bt1    boringtun-cli --threads 1 in gw
#   relay:bt     boringtun-cli, default threads (4)
#   relay:custom Rampart in gw: decrypt from one peer, re-encrypt to the other, all in userspace, no TUN
#
# Usage (root):  bench/relay.sh                      # REPS=3 DUR=5 QUIET_WAIT=5: ~9-10 min (+ first build)
#                REPS=5 DUR=10 bench/relay.sh        # longer, less noisy (~30 min)
#                PERF=1 SCENARIOS="relay:bt1 relay:custom" bench/relay.sh   # + perf profile of gw during TCP 1
# Env: SHARED_BENCH (dir with baseline.sh; default <repo>/../shared/bench)
#      RAMPART_REV   git revision to benchmark (default HEAD): exported with `git archive` to
#                    $RUN_DIR/build/<sha> and built there with `cargo build --release --locked` (target dir
#                    $RUN_DIR/target, kept between runs), so uncommitted edits in the work tree never leak in;
#                    RAMPART_REV=worktree builds the work tree instead (`cargo build --release` in the repo)
#      RAMPART_BIN   use this binary as is (no build)
#      RESULTS (default <repo>/bench/results/relay-<UTC stamp>), RUN_DIR (gateway key/config/state, build;
#      default /tmp/rampart-bench), NS_PREFIX; everything else (DUR REPS SCENARIOS UDP_RATE UDP_RATE2 NICE
#      QUIET_WAIT QUIET_PCT PERF CRYPTO BT_BIN WGGO_BIN ...) is passed through to baseline.sh.
# Prints baseline.sh's summary plus a compact relay table with Rampart/anchor ratios (bench/relay_table.py),
# also saved as $RESULTS/relay-table.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$REPO/bench"
SHARED_BENCH="${SHARED_BENCH:-$REPO/../shared/bench}"
[[ -x "$SHARED_BENCH/baseline.sh" || -f "$SHARED_BENCH/baseline.sh" ]] \
  || { echo "relay.sh: no baseline.sh in SHARED_BENCH=$SHARED_BENCH" >&2; exit 2; }
SHARED_BENCH="$(cd "$SHARED_BENCH" && pwd)"
RAMPART_REV="${RAMPART_REV:-HEAD}"
export SCENARIOS="${SCENARIOS:-relay:wggo relay:bt1 relay:bt relay:custom}"
export REPS="${REPS:-3}" DUR="${DUR:-5}" CRYPTO="${CRYPTO:-0}" QUIET_WAIT="${QUIET_WAIT:-5}"
export RESULTS="${RESULTS:-$REPO/bench/results/relay-$(date -u +%Y%m%dT%H%M%SZ)}"
export RUN_DIR="${RUN_DIR:-/tmp/rampart-bench}"
export NS_PREFIX="${NS_PREFIX:-}"
RAMPART_DESC=""

log() { echo "[relay.sh $(date +%T)] $*" >&2; }
[[ $EUID -eq 0 ]] || { log "needs root (network namespaces)"; exit 2; }

# ---- one benchmark at a time; never tear down someone else's topology ---------------------------------------
exec 9>"/tmp/rampart-bench.${NS_PREFIX:-default}.lock"
flock -n 9 || { log "another bench/relay.sh with NS_PREFIX='${NS_PREFIX}' is running"; exit 2; }
for ns in cli gw dev up; do
  if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "${NS_PREFIX}$ns"; then
    log "namespace ${NS_PREFIX}$ns already exists (another benchmark running?). Refusing: topo.sh would tear it"
    log "down. Remove it with '$SHARED_BENCH/topo.sh down' if it is stale, or set NS_PREFIX."
    exit 2
  fi
done

# ---- tools ------------------------------------------------------------------------------------------------
need_apt=()
for c in wireguard-go:wireguard-go wg:wireguard-tools iperf3:iperf3 ip:iproute2 jq:jq python3:python3 ss:iproute2; do
  command -v "${c%%:*}" >/dev/null 2>&1 || need_apt+=("${c#*:}")
done
if ((${#need_apt[@]})); then
  log "installing: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [[ " $SCENARIOS " == *":bt"* ]]; then
  BT_BIN="${BT_BIN:-$(command -v boringtun-cli || echo "${HOME:-/root}/.cargo/bin/boringtun-cli")}"
  if [[ ! -x "$BT_BIN" ]]; then
    log "boringtun-cli missing: cargo install boringtun-cli --locked (~3 min)"
    cargo install boringtun-cli --locked >&2
    BT_BIN="${HOME:-/root}/.cargo/bin/boringtun-cli"
  fi
  export BT_BIN
fi
if [[ " $SCENARIOS " == *":custom"* ]]; then
  if [[ -n "${RAMPART_BIN:-}" ]]; then
    RAMPART_DESC="given binary $RAMPART_BIN"
  elif [[ "$RAMPART_REV" == worktree ]]; then
    log "cargo build --release (work tree)"
    (cd "$REPO" && cargo build --release >&2)
    RAMPART_BIN="$REPO/target/release/rampart"
    RAMPART_DESC="work tree at $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes')"
  else
    sha="$(git -C "$REPO" rev-parse --verify "$RAMPART_REV^{commit}")"
    src="$RUN_DIR/build/$sha"
    if [[ ! -f "$src/Cargo.toml" ]]; then
      rm -rf "$RUN_DIR/build"; mkdir -p "$src"
      git -C "$REPO" archive "$sha" | tar -x -C "$src"
    fi
    log "cargo build --release --locked of $RAMPART_REV ($sha) in $src"
    (cd "$src" && CARGO_TARGET_DIR="$RUN_DIR/target" cargo build --release --locked >&2)
    RAMPART_BIN="$RUN_DIR/target/release/rampart"
    RAMPART_DESC="commit $(git -C "$REPO" log -1 --format='%h %s' "$sha")"
  fi
  [[ -x "$RAMPART_BIN" ]] || { log "no rampart binary at $RAMPART_BIN"; exit 2; }
fi
export RAMPART_BIN="${RAMPART_BIN:-}"

mkdir -p "$RESULTS" "$RUN_DIR"
RESULTS="$(cd "$RESULTS" && pwd)"; export RESULTS
: >"$RUN_DIR/primer.pids"; : >"$RUN_DIR/primer.log"; rm -f "$RUN_DIR/rampart-gw.pid"

kill_tree() { # pid: the primer subshell and its children, by PID only
  local p="$1" c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do kill_tree "$c"; done
  kill "$p" 2>/dev/null || true
}
BASELINE_PID=""; MONITOR_PID=""
cleanup() {
  local p
  if [[ -n "$BASELINE_PID" ]]; then   # interrupted: baseline.sh's own trap stops its PIDs and the topology
    kill "$BASELINE_PID" 2>/dev/null || true
    wait "$BASELINE_PID" 2>/dev/null || true
  fi
  [[ -n "$MONITOR_PID" ]] && kill "$MONITOR_PID" 2>/dev/null || true
  while read -r p; do [[ -n "$p" ]] && kill_tree "$p"; done <"$RUN_DIR/primer.pids" 2>/dev/null || true
  NS_PREFIX="$NS_PREFIX" "$SHARED_BENCH/topo.sh" down >/dev/null 2>&1 || true
  cp -f "$RUN_DIR/primer.log" "$RESULTS/rampart-primer.log" 2>/dev/null || true
  cp -f "$RUN_DIR/rampart.toml" "$RESULTS/rampart.toml" 2>/dev/null || true
  rm -rf "$RUN_DIR/gateway.key" "$RUN_DIR/state" "$RUN_DIR/rampart-gw.pid"   # throwaway key of this run
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- what ran, and the background load ----------------------------------------------------------------------
{
  echo "repo: $REPO"
  if [[ -n "$RAMPART_BIN" ]]; then
    echo "rampart: $RAMPART_DESC; $("$RAMPART_BIN" --version 2>/dev/null | head -1 || echo '?'), binary $RAMPART_BIN built $(date -r "$RAMPART_BIN" -Is)"
  fi
  echo "shared bench: $SHARED_BENCH"
  echo "command: $(printf '%q ' "$0" "$@")"
  echo "env: SCENARIOS='$SCENARIOS' REPS=$REPS DUR=$DUR CRYPTO=$CRYPTO NICE=${NICE:--15} QUIET_WAIT=$QUIET_WAIT QUIET_PCT=${QUIET_PCT:-30} PERF=${PERF:-0}"
  echo "loadavg before: $(cat /proc/loadavg)"
  echo "top CPU users before (ps, %CPU since start):"
  ps -eo pid,ni,pcpu,etimes,comm --sort=-pcpu | head -8
} >"$RESULTS/rampart-env.txt"
cat "$RESULTS/rampart-env.txt" >&2

GW_CMD="$(printf '%q' "$HERE/rampart-gw.sh") {IF}"
GW_CONFIG_HOOK="$(printf '%q' "$HERE/rampart-hook.sh")"
export GW_CMD GW_CONFIG_HOOK

log "baseline.sh: SCENARIOS='$SCENARIOS' REPS=$REPS DUR=$DUR -> $RESULTS"
# Rampart's /metrics (drop counters by reason) every 5 s while a gateway runs, from outside the namespaces
# (ip netns exec gw curl), so the last scrape survives the gateway's stop: $RESULTS/rampart-metrics.startN.txt
# for the Nth Rampart start of this invocation (= relay:custom rep N with one custom scenario).
metrics_monitor() {
  local n=0 cur="" pid out="" last=-1000
  while kill -0 "$BASELINE_PID" 2>/dev/null; do
    pid="$(cat "$RUN_DIR/rampart-gw.pid" 2>/dev/null || true)"
    if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == rampart ]]; then
      if [[ "$pid" != "$cur" ]]; then cur="$pid"; n=$((n + 1)); out="$RESULTS/rampart-metrics.start$n.txt"; last=-1000; fi
      if (( SECONDS - last >= 5 )); then
        last=$SECONDS
        ip netns exec "${NS_PREFIX}gw" curl -fsS -m 2 http://127.0.0.1:8080/metrics >"$out.tmp" 2>/dev/null \
          && mv -f "$out.tmp" "$out"
      fi
    fi
    sleep 0.5
  done
  rm -f "$out.tmp"
}

rc=0
(cd "$RESULTS" && exec bash "$SHARED_BENCH/baseline.sh") &
BASELINE_PID=$!
MONITOR_PID=""
if [[ " $SCENARIOS " == *":custom"* ]] && command -v curl >/dev/null; then
  metrics_monitor &
  MONITOR_PID=$!
fi
wait "$BASELINE_PID" || rc=$?
BASELINE_PID=""
[[ -n "$MONITOR_PID" ]] && wait "$MONITOR_PID" 2>/dev/null || true
MONITOR_PID=""
echo "loadavg after: $(cat /proc/loadavg)" >>"$RESULTS/rampart-env.txt"

python3 "$HERE/relay_table.py" "$RESULTS" | tee "$RESULTS/relay-table.md"
log "results in $RESULTS"
exit "$rc"
