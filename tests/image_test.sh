#!/bin/bash
# Boot tests of the appliance image under QEMU (TCG, no KVM) with OVMF. Entry point: `make image-test`.
#
#   tests/image_test.sh [IMAGE_DIR]     (default build/image, as written by `make image`)
#
# The host side's `rampart enroll` is the image's own build: $IMAGE_TARGET/release/rampart (IMAGE_TARGET as in
# firmware-image/image.mk, default target/).
#
# Every VM runs inside a network namespace this script creates (rpimg<PID>): QEMU's user-mode network forwards
# 127.0.0.1:51820/udp and 127.0.0.1:8080/tcp of that namespace to the guest, and a wireguard-go client in the same
# namespace tunnels to the gateway in the VM (127.0.0.1:8443/tcp reaches the enrollment listener). Nothing is routed in the root namespace. One VM at a time.
# Serial logs are kept in build/image-test/. Closing line: "image-test: N passed, M failed".
set -uo pipefail
# With pipefail, `producer | grep -q` can fail although it matched: grep exits at the first match and a
# producer still writing (bash's echo writes line by line) dies of SIGPIPE. Output in variables is matched with
# here-strings (`grep -q RE <<<"$X"`), piped output with `grep RE >/dev/null`, which reads to the end.

repo=$(cd "$(dirname "$0")/.." && pwd)
img_dir=$(realpath "${1:-$repo/build/image}")
art=$repo/build/image-test
fw=$repo/firmware-image

# Deadlines are generous on purpose: under TCG on a loaded 2-core host a boot takes 15-60 s.
BOOT_TIMEOUT=${IMAGE_TEST_BOOT_TIMEOUT:-420}
CMD_TIMEOUT=120
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd

NS=rpimg$$
WGIF=rpw$$
work=$(mktemp -d /tmp/rpimg.XXXXXX)
VM_PID= WG_PID= VM_IN= VM_LOG= VM_NAME= GN=0
# The seeded config's admin listener is 0.0.0.0:8080 (QEMU forwards to the guest's address), so it serves HTTPS
# and wants this token (gateway.admin_token_file).
ADMIN_TOKEN=image-test-admin-$$-0123456789abcdef
# root is locked until a console password is seeded (data partition or ESP); the serial shell logs in with it.
CONSOLE_PW=image-test-console-$$-secret
HTTPD_PID=
declare -a results=()

log() { echo "image-test: $*"; }

cleanup() {
    [ -n "$WG_PID" ] && kill "$WG_PID" 2>/dev/null
    [ -n "$HTTPD_PID" ] && kill "$HTTPD_PID" 2>/dev/null
    if [ -n "$VM_PID" ] && kill -0 "$VM_PID" 2>/dev/null; then
        kill "$VM_PID" 2>/dev/null
        sleep 1
        kill -9 "$VM_PID" 2>/dev/null
    fi
    ip netns del "$NS" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- VM helpers

# vm_start NAME DISK FORMAT [PAYLOAD...]: boot DISK (virtio) with a fresh copy of the OVMF variables; each
# PAYLOAD is attached read-only as a further virtio disk (/dev/vdb, /dev/vdc, ...).
vm_start() {
    VM_NAME=$1
    local disk=$2 fmt=$3
    shift 3
    local extra=() p
    for p in "$@"; do extra+=(-drive "if=virtio,format=raw,readonly=on,file=$p"); done
    cp "$OVMF_VARS" "$work/$VM_NAME.vars"
    VM_LOG=$art/$VM_NAME.serial.log
    : >"$VM_LOG"
    rm -f "$work/$VM_NAME.in" "$work/qmp.sock"
    mkfifo "$work/$VM_NAME.in"
    # Held open read-write so QEMU's stdin never sees EOF; commands for the serial shell go here.
    exec {VM_IN}<>"$work/$VM_NAME.in"
    ip netns exec "$NS" nice qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults \
        -display none -serial stdio \
        -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE" \
        -drive "if=pflash,format=raw,unit=1,file=$work/$VM_NAME.vars" \
        -drive "if=virtio,format=$fmt,file=$disk" "${extra[@]}" \
        -netdev user,id=n0,hostfwd=udp:127.0.0.1:51820-:51820,hostfwd=tcp:127.0.0.1:8080-:8080,hostfwd=tcp:127.0.0.1:8443-:8443,hostfwd=tcp:127.0.0.1:9999-:9999 \
        -device virtio-net-pci,netdev=n0 -device virtio-rng-pci \
        -qmp "unix:$work/qmp.sock,server=on,wait=off" \
        <&"$VM_IN" >"$VM_LOG" 2>&1 &
    VM_PID=$!
    VM_MARK=0
    VM_T0=$SECONDS
    log "  [$VM_NAME] qemu pid $VM_PID started"
}

# The serial log since the last vm_mark, without carriage returns.
since_mark() { tail -c +$((VM_MARK + 1)) "$VM_LOG" | tr -d '\r'; }
vm_mark() { VM_MARK=$(stat -c %s "$VM_LOG"); }

# wait_for REGEX TIMEOUT: a serial line matching REGEX (extended) since the last vm_mark.
wait_for() {
    local pat=$1 deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        if since_mark | grep -aE -e "$pat" >/dev/null; then
            log "  [$VM_NAME] +$((SECONDS - VM_T0))s $(since_mark | grep -aE -e "$pat" | head -n 1)"
            return 0
        fi
        kill -0 "$VM_PID" 2>/dev/null || { log "  [$VM_NAME] qemu exited while waiting for /$pat/"; return 1; }
        sleep 1
    done
    log "  [$VM_NAME] timeout ($2 s) waiting for /$pat/"
    return 1
}

# guest_run CMD: run CMD in the serial maintenance shell; sets GUEST_OUT (its output) and GUEST_RC.
guest_run() {
    GN=$((GN + 1))
    local start deadline=$((SECONDS + CMD_TIMEOUT)) seg
    start=$(stat -c %s "$VM_LOG")
    # The markers are split with "" so the shell's echo of the typed line never matches them.
    printf 'echo @@""B%d; %s; echo @@""E%d rc=$?\n' "$GN" "$1" "$GN" >&"$VM_IN"
    while [ $SECONDS -lt $deadline ]; do
        seg=$(tail -c +$((start + 1)) "$VM_LOG" | tr -d '\r')
        if grep -aqE "^@@E$GN rc=[0-9]+" <<<"$seg"; then
            GUEST_OUT=$(echo "$seg" | sed -n "/^@@B$GN\$/,/^@@E$GN rc=/p" | sed '1d;$d')
            GUEST_RC=$(echo "$seg" | sed -n "s/^@@E$GN rc=\([0-9]*\).*/\1/p" | head -n 1)
            return 0
        fi
        kill -0 "$VM_PID" 2>/dev/null || break
        sleep 1
    done
    GUEST_OUT="(no answer from the serial shell)" GUEST_RC=255
    return 1
}

# expect_guest CMD REGEX...: CMD must exit 0 and its output match every REGEX.
expect_guest() {
    local cmd=$1 pat
    shift
    guest_run "$cmd"
    if [ "$GUEST_RC" != 0 ]; then
        log "  [$VM_NAME] '$cmd' exited $GUEST_RC:"
        echo "$GUEST_OUT" | sed 's/^/      /'
        return 1
    fi
    for pat in "$@"; do
        if ! grep -aqE -e "$pat" <<<"$GUEST_OUT"; then
            log "  [$VM_NAME] '$cmd' output lacks /$pat/:"
            echo "$GUEST_OUT" | sed 's/^/      /'
            return 1
        fi
    done
    return 0
}

# guest_send CMD: type CMD into the serial shell without waiting (for reboot).
guest_send() { printf '%s\n' "$1" >&"$VM_IN"; }


# wait_after OFFSET REGEX TIMEOUT: serial output after byte OFFSET matches REGEX (extended; a prompt without a
# newline counts).
wait_after() {
    local from=$1 pat=$2 deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        tail -c +$((from + 1)) "$VM_LOG" | tr -d '\r' | grep -aE -e "$pat" >/dev/null && return 0
        kill -0 "$VM_PID" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

# wait_shell: logs in as root on the serial console with the seeded console password (the documented way in;
# the positive control of console_refuses_root_without_password) and waits for the shell.
wait_shell() {
    local start
    start=$(stat -c %s "$VM_LOG")
    printf '\n' >&"$VM_IN"
    wait_after "$start" 'login: ' 90 || { log "  [$VM_NAME] no login prompt on ttyS0"; return 1; }
    start=$(stat -c %s "$VM_LOG")
    printf 'root\n' >&"$VM_IN"
    wait_after "$start" 'Password: ' 30 || { log "  [$VM_NAME] login did not ask root for a password"; return 1; }
    start=$(stat -c %s "$VM_LOG")
    printf '%s\n' "$CONSOLE_PW" >&"$VM_IN"
    wait_after "$start" 'Rampart maintenance shell' 30 ||
        { log "  [$VM_NAME] root with the console password did not get the shell"; return 1; }
    guest_run true && [ "$GUEST_RC" = 0 ] || { log "  [$VM_NAME] the shell does not answer after the login"; return 1; }
    log "  [$VM_NAME] logged in as root on ttyS0 with the console password"
}

# console_refuses_root_without_password: the attack of someone at the serial console without the password.
# (1) A command typed at the console must not run (the image once gave ttyS0 a root shell without a login):
# it must be taken as a login name, so login asks for a password. (2) root with an empty password is refused.
console_refuses_root_without_password() {
    local start n
    GN=$((GN + 1)) n=$GN
    start=$(stat -c %s "$VM_LOG")
    printf 'echo @@""PW%d; id -u\n' "$n" >&"$VM_IN"
    wait_after "$start" "^@@PW$n\$|Password: " 60 ||
        { log "  [$VM_NAME] the console neither ran the typed command nor asked for a password"; return 1; }
    if tail -c +$((start + 1)) "$VM_LOG" | tr -d '\r' | grep -aE "^@@PW$n\$" >/dev/null; then
        log "  [$VM_NAME] ATTACK WORKED: a command typed at the serial console ran without a login:"
        tail -c +$((start + 1)) "$VM_LOG" | tr -d '\r' | sed -n "/^@@PW$n\$/,+1p" | sed 's/^/      /'
        return 1
    fi
    log "  [$VM_NAME] a command typed at the console is taken as a login name (login asks for a password)"
    start=$(stat -c %s "$VM_LOG")
    printf '\n' >&"$VM_IN"
    wait_after "$start" 'Login incorrect' 30 || { log "  [$VM_NAME] no 'Login incorrect' after the made-up name"; return 1; }
    wait_after "$start" 'login: ' 60 || { log "  [$VM_NAME] no login prompt after the refusal"; return 1; }
    start=$(stat -c %s "$VM_LOG")
    printf 'root\n' >&"$VM_IN"
    wait_after "$start" 'Password: ' 30 || { log "  [$VM_NAME] login did not ask root for a password"; return 1; }
    start=$(stat -c %s "$VM_LOG")
    printf '\n' >&"$VM_IN"
    wait_after "$start" 'Login incorrect' 30 || { log "  [$VM_NAME] root with an empty password was not refused"; return 1; }
    wait_after "$start" 'login: ' 60 || { log "  [$VM_NAME] no login prompt after the refusal"; return 1; }
    log "  [$VM_NAME] root with an empty password: Login incorrect"
}

# ACPI power button via QMP; the guest must power off by itself and QEMU exit 0.
vm_powerdown() {
    local deadline=$((SECONDS + 120)) rc
    vm_mark
    printf '{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n' |
        socat -t 3 - "UNIX-CONNECT:$work/qmp.sock" >/dev/null
    while kill -0 "$VM_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
    if kill -0 "$VM_PID" 2>/dev/null; then
        log "  [$VM_NAME] still running 120 s after ACPI powerdown; killing it"
        kill -9 "$VM_PID"
        wait "$VM_PID" 2>/dev/null
        VM_PID=
        return 1
    fi
    wait "$VM_PID"
    rc=$?
    VM_PID=
    exec {VM_IN}>&-
    if [ "$rc" != 0 ]; then log "  [$VM_NAME] qemu exited $rc after powerdown"; return 1; fi
    since_mark | grep -a 'MARK shutdown-clean' >/dev/null || { log "  [$VM_NAME] no 'MARK shutdown-clean' before poweroff"; return 1; }
    log "  [$VM_NAME] powered off cleanly (qemu rc 0) at +$((SECONDS - VM_T0))s"
}

vm_kill() {
    if [ -n "$VM_PID" ]; then
        kill "$VM_PID" 2>/dev/null
        wait "$VM_PID" 2>/dev/null
        VM_PID=
    fi
    [ -n "$VM_IN" ] && exec {VM_IN}>&- 2>/dev/null
    VM_IN=
}

# ---------------------------------------------------------------- WireGuard client in the test namespace

# wg_check [CONF ADDR NET]: a fresh wireguard-go client with CONF (wg setconf form; default the seeded
# device's), tunnel address ADDR and route NET handshakes with the gateway in the VM and pings the tenant gateway.
wg_check() {
    local conf=${1:-$work/client.conf} addr=${2:-100.96.0.2/32} net=${3:-100.96.0.0/24}
    local deadline ok=1 hs
    ip netns exec "$NS" wireguard-go -f "$WGIF" >"$art/wireguard-go.log" 2>&1 &
    WG_PID=$!
    deadline=$((SECONDS + 20))
    until ip -n "$NS" link show "$WGIF" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { log "  wireguard-go did not create $WGIF"; wg_stop; return 1; }
        sleep 0.2
    done
    ip netns exec "$NS" wg setconf "$WGIF" "$conf" &&
        ip -n "$NS" addr add "$addr" dev "$WGIF" &&
        ip -n "$NS" link set "$WGIF" up &&
        ip -n "$NS" route add "$net" dev "$WGIF" || { wg_stop; return 1; }
    deadline=$((SECONDS + 90))
    while [ $SECONDS -lt $deadline ]; do
        if ip netns exec "$NS" ping -c 1 -W 3 100.96.0.1 >/dev/null 2>&1; then ok=0; break; fi
    done
    hs=$(ip netns exec "$NS" wg show "$WGIF" latest-handshakes | awk '{ print $2 }')
    if [ "$ok" = 0 ] && [ "${hs:-0}" -gt 0 ]; then
        ip netns exec "$NS" ping -c 3 -i 0.5 -W 3 100.96.0.1 >"$work/ping.out" 2>&1
        log "  wireguard-go handshake ok; ping 100.96.0.1: $(grep -o '[0-9]* received' "$work/ping.out")"
    else
        log "  no ping reply from 100.96.0.1 through the tunnel (latest handshake: ${hs:-none})"
        ok=1
    fi
    wg_stop
    return $ok
}

wg_stop() {
    [ -n "$WG_PID" ] && { kill "$WG_PID" 2>/dev/null; wait "$WG_PID" 2>/dev/null; }
    WG_PID=
}

health_check() {
    local body
    body=$(ip netns exec "$NS" curl -sk -H "Authorization: Bearer $ADMIN_TOKEN" --max-time 15 https://127.0.0.1:8080/health)
    [ "$body" = ok ] || { log "  GET /health through hostfwd answered '${body}'"; return 1; }
    log "  GET /health -> ok"
}

# wait_health TIMEOUT: polls GET /health until it answers ok.
wait_health() {
    local deadline=$((SECONDS + $1)) body
    while [ $SECONDS -lt $deadline ]; do
        body=$(ip netns exec "$NS" curl -sk -H "Authorization: Bearer $ADMIN_TOKEN" --max-time 5 https://127.0.0.1:8080/health)
        [ "$body" = ok ] && { log "  GET /health -> ok after $(($1 - deadline + SECONDS)) s"; return 0; }
        sleep 1
    done
    log "  GET /health never answered ok within $1 s (last: '${body}')"
    return 1
}

# crash_recovery: kill -9 of the gateway is restarted by init; /health, a fresh tunnel and the audit records
# committed before the crash are back.
crash_recovery() {
    local pid
    guest_run 'cat /run/rampart/gateway.pid' && pid=$(echo "$GUEST_OUT" | grep -aoE '^[0-9]+' | head -n 1)
    [ -n "$pid" ] || { log "  no gateway pid in /run/rampart/gateway.pid: $GUEST_OUT"; return 1; }
    vm_mark
    expect_guest "kill -9 $pid" || return 1
    wait_for 'gateway exited, restarting \(start #2\)' 60 &&
        wait_health 90 &&
        wg_check &&
        expect_guest 'rampart audit flows -c /data/config/gateway.toml --device laptop' 'laptop .*ping-gateway' &&
        guest_run 'cat /run/rampart/gateway.pid' &&
        { [ "$(echo "$GUEST_OUT" | grep -aoE '^[0-9]+' | head -n 1)" != "$pid" ] ||
            { log "  the gateway pid did not change after kill -9"; return 1; }; }
}

# gateway_runs_unprivileged: the gateway's process (gateway-run execs rampart run under the pid it records) runs
# as the image's rampart user with no-new-privs and its seccomp filter; its config is root's, readable by the
# group rampart; its key and state are rampart's.
gateway_runs_unprivileged() {
    expect_guest 'id rampart' '^uid=999\(rampart\) gid=999\(rampart\)' &&
        expect_guest 'grep -E "^(Uid|Gid|CapEff|NoNewPrivs|Seccomp):" /proc/$(cat /run/rampart/gateway.pid)/status' \
            '^Uid:[[:space:]]+999[[:space:]]+999[[:space:]]+999[[:space:]]+999$' \
            '^Gid:[[:space:]]+999[[:space:]]+999[[:space:]]+999[[:space:]]+999$' '^CapEff:[[:space:]]+0+$' \
            '^NoNewPrivs:[[:space:]]+1$' '^Seccomp:[[:space:]]+2$' &&
        expect_guest 'ls -ln /data/config' '^-rw-r----- +1 +0 +999 .* gateway\.toml$' \
            '^-rw------- +1 +999 +999 .* gateway\.key$' '^d[rwx-]{9} +[0-9]+ +999 +999 .* state$' || return 1
    log "  the gateway runs as rampart (uid 999, no capabilities, no-new-privs, seccomp); config root:rampart 0640"
    expect_guest 'grep -E "dropped privileges|landlock" /data/log/rampart.log | tail -n 2' 'dropped privileges' &&
        log "  gateway log: $(echo "$GUEST_OUT" | tail -n 2 | sed -E 's/.*(landlock[^"]*|dropped privileges.*)/\1/' | tr '\n' ' ' | cut -c1-200)"
}

# egress_as WHO: from the guest, as root or as the gateway's user rampart, GET the test namespace's web server
# (10.0.2.2:8099 through QEMU's user network; not an off-ramp of the seeded config). Sets GUEST_OUT.
egress_as() {
    local get='wget -q -O- http://10.0.2.2:8099/egress.txt 2>&1'
    case "$1" in
    root) guest_run "$get" ;;
    *) guest_run "su -s /bin/sh rampart -c '$get'" ;;
    esac
}

# probe_9999: what GET http://127.0.0.1:9999/ from the test namespace returns (through QEMU's hostfwd to the
# guest); empty when the guest never answers (QEMU accepts the host side, then gives up on the guest).
probe_9999() { ip netns exec "$NS" curl -s --max-time 10 http://127.0.0.1:9999/probe.txt; }

# firewall_check: the inbound policy is loaded (nft list ruleset) and opens WireGuard and the admin port of the
# seeded config only; a web server on 9999, a port the policy does not open, answers on the guest's loopback but
# not from the test namespace, while WireGuard still works. The control: with the table deleted the same request
# gets the page; the policy is loaded again afterwards and 9999 is closed again.
firewall_check() {
    local out
    expect_guest 'nft list ruleset' 'table inet rampart' 'hook input priority filter; policy drop;' \
        'iif "lo" accept' 'ct state established,related accept' 'udp dport 51820 accept' 'tcp dport 8080 accept' \
        'hook forward priority filter; policy drop;' 'meta skuid .*jump gateway_out' 'udp sport 51820 accept' \
        'counter packets [0-9]+ bytes [0-9]+ reject with icmpx admin-prohibited' ||
        return 1
    if grep -aqE 'dport (9999|8443)' <<<"$GUEST_OUT"; then
        log "  the ruleset opens a port it should not:"; echo "$GUEST_OUT" | sed 's/^/      /'; return 1
    fi
    expect_guest 'mkdir -p /run/probe && echo rampart-probe >/run/probe/probe.txt && httpd -p 9999 -h /run/probe && wget -q -O- http://127.0.0.1:9999/probe.txt' \
        '^rampart-probe' || return 1
    out=$(probe_9999)
    [ -z "$out" ] || { log "  port 9999 answered from outside despite the firewall: '$out'"; return 1; }
    log "  port 9999 (not in the policy): no answer from the test namespace; the guest's loopback gets the page"
    # Egress: the gateway's user reaches no address outside the off-ramps; root (the admin's tools) does.
    mkdir -p "$work/www" && echo rampart-egress >"$work/www/egress.txt"
    ip netns exec "$NS" busybox httpd -f -p 127.0.0.1:8099 -h "$work/www" &
    HTTPD_PID=$!
    egress_as root
    grep -aq '^rampart-egress' <<<"$GUEST_OUT" ||
        { log "  root in the guest cannot GET the test namespace's page: $GUEST_OUT"; return 1; }
    egress_as rampart
    if grep -aq 'rampart-egress' <<<"$GUEST_OUT" || ! grep -aq 'No route to host' <<<"$GUEST_OUT"; then
        log "  the gateway's user was not refused by the output policy: '$GUEST_OUT'"; return 1
    fi
    log "  egress: root gets the page from 10.0.2.2:8099, the gateway's user is refused ($(echo "$GUEST_OUT" | head -n 1))"
    wg_check || return 1
    expect_guest 'nft delete table inet rampart' || return 1
    out=$(probe_9999)
    [ "$out" = rampart-probe ] || { log "  control failed: without the policy, port 9999 answered '$out'"; return 1; }
    log "  control: without the policy, port 9999 answers from the test namespace"
    egress_as rampart
    grep -aq '^rampart-egress' <<<"$GUEST_OUT" ||
        { log "  control failed: without the policy the gateway's user still cannot GET the page: '$GUEST_OUT'"; return 1; }
    log "  control: without the policy, the gateway's user gets the page"
    expect_guest '/usr/lib/rampart/firewall-up' || return 1
    out=$(probe_9999)
    [ -z "$out" ] || { log "  port 9999 answered after firewall-up reloaded the policy: '$out'"; return 1; }
    egress_as rampart
    grep -aq 'No route to host' <<<"$GUEST_OUT" ||
        { log "  the gateway's user got through after firewall-up reloaded the policy: '$GUEST_OUT'"; return 1; }
    kill "$HTTPD_PID" 2>/dev/null; wait "$HTTPD_PID" 2>/dev/null; HTTPD_PID=
    log "  firewall-up reloaded the policy: port 9999 closed and the gateway's user refused again"
}

# ---------------------------------------------------------------- fixtures

# seeded_disk OUT: a raw copy of the image whose data partition already holds a gateway config with one static
# device (the test client) and the gateway key, as an operator would preconfigure it.
seeded_disk() {
    cp --sparse=always "$img_dir/rampart.img" "$1"
    local start size
    read -r start size < <(sfdisk -d "$1" | sed -n 's/.*start= *\([0-9]*\), size= *\([0-9]*\),.*name="data".*/\1 \2/p')
    [ -n "$start" ] || { log "no data partition in $1"; return 1; }
    dd if="$work/data.img" of="$1" bs=512 seek="$start" conv=notrunc,sparse status=none
}

setup() {
    local need
    for need in qemu-system-x86_64 socat wireguard-go wg curl sfdisk mkfs.ext4 unsquashfs mksquashfs minisign; do
        command -v "$need" >/dev/null || { log "missing $need: run 'make image-deps'"; return 1; }
    done
    [ "$(id -u)" = 0 ] || { log "needs root (network namespaces, wireguard-go)"; return 1; }
    for f in rampart.img rampart.qcow2 rampart-rootfs.sqfs rampart-rootfs.sqfs.minisig rampart-update.pub; do
        [ -f "$img_dir/$f" ] || { log "missing $img_dir/$f: run 'make image'"; return 1; }
    done
    mkdir -p "$art"
    ip netns add "$NS" && ip -n "$NS" link set lo up || return 1

    (umask 077 && wg genkey >"$work/client.key" && wg genkey >"$work/gateway.key") || return 1
    client_pub=$(wg pubkey <"$work/client.key")
    gateway_pub=$(wg pubkey <"$work/gateway.key")
    cat >"$work/client.conf" <<EOF
[Interface]
PrivateKey = $(cat "$work/client.key")

[Peer]
PublicKey = $gateway_pub
Endpoint = 127.0.0.1:51820
AllowedIPs = 100.96.0.0/24
EOF
    local seed=$work/seed
    mkdir -p "$seed/config/state" "$seed/log" "$seed/system"
    cp "$work/gateway.key" "$seed/config/gateway.key"
    chmod 600 "$seed/config/gateway.key"
    (umask 077 && echo "$ADMIN_TOKEN" >"$seed/config/admin.token" &&
        echo "$CONSOLE_PW" >"$seed/config/console-password") || return 1
    cat >"$seed/config/gateway.toml" <<EOF
[gateway]
listen = "0.0.0.0:51820"
user = "rampart"
private_key_file = "gateway.key"
state_dir = "state"
admin_listen = "0.0.0.0:8080"
admin_token_file = "admin.token"
public_endpoint = "127.0.0.1:51820"

[[tenant]]
id = "default"
name = "Default"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"

[[tenant.device]]
name = "laptop"
public_key = "$client_pub"
address = "100.96.0.2"
user = "alice"
groups = ["eng"]

# Zero trust: nothing passes without a rule. The test pings the tenant gateway address.
[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"
EOF
    local size_mb
    size_mb=$(sfdisk -d "$img_dir/rampart.img" | sed -n 's/.*size= *\([0-9]*\),.*name="data".*/\1/p')
    "$fw/scripts/mkdata.sh" "$seed" "$work/data.img" $((size_mb / 2048)) || return 1

    # The shipped root is signed with the key the image embeds, and Debian's minisign agrees.
    minisign -V -q -p "$img_dir/rampart-update.pub" -m "$img_dir/rampart-rootfs.sqfs" ||
        { log "minisign -V does not verify rampart-rootfs.sqfs with rampart-update.pub"; return 1; }
    # The test signs its own payloads with the key `make image` used (RAMPART_UPDATE_KEY or the development key).
    sign_key=${RAMPART_UPDATE_KEY:-$repo/target/update-key/rampart-dev.key}
    [ -f "$sign_key" ] || { log "no signing key $sign_key (set RAMPART_UPDATE_KEY as for make image)"; return 1; }
    (umask 077 && minisign -G -W -s "$work/other.key" -p "$work/other.pub" >/dev/null) || return 1

    # Update payloads derived from the built root: the same build with a new version, and one whose gateway
    # exits at once (rampart run fails; the other subcommands still work).
    base_version=$(unsquashfs -cat "$img_dir/rampart-rootfs.sqfs" etc/rampart-release | sed -n 's/^VERSION=//p')
    unsquashfs -q -n -d "$work/root2" "$img_dir/rampart-rootfs.sqfs" >/dev/null || return 1
    sed -i "s/^VERSION=.*/VERSION=$base_version+update/" "$work/root2/etc/rampart-release"
    mksquashfs "$work/root2" "$work/update.sqfs" -comp zstd -all-root -noappend -quiet -no-progress >/dev/null || return 1
    sed -i "s/^VERSION=.*/VERSION=$base_version+broken/" "$work/root2/etc/rampart-release"
    mv "$work/root2/usr/bin/rampart" "$work/root2/usr/bin/rampart.real"
    cat >"$work/root2/usr/bin/rampart" <<'EOF'
#!/bin/sh
# Deliberately broken gateway for the rollback test.
if [ "$1" = run ]; then echo "deliberately broken gateway: exiting" >&2; exit 1; fi
exec /usr/bin/rampart.real "$@"
EOF
    chmod 755 "$work/root2/usr/bin/rampart"
    mksquashfs "$work/root2" "$work/broken.sqfs" -comp zstd -all-root -noappend -quiet -no-progress >/dev/null || return 1
    rm -rf "$work/root2"

    # Signed payloads (squashfs + the signature block, attached as a disk): the positive controls. Then the
    # attacks: no signature, signed with another key, the broken root carrying the good root's signature, a
    # signed payload cut in half.
    sign_payload "$work/update.sqfs" "$sign_key" "$work/update.signed" &&
        sign_payload "$work/broken.sqfs" "$sign_key" "$work/broken.signed" &&
        sign_payload "$work/update.sqfs" "$work/other.key" "$work/other-key.signed" || return 1
    # (other-key.signed overwrote update.sqfs.minisig: sign the good one again for the check below.)
    sign_payload "$work/update.sqfs" "$sign_key" "$work/update.signed" || return 1
    cp "$work/update.sqfs" "$work/unsigned.sqfs"
    { cat "$work/broken.sqfs"; tail -c 4096 "$work/update.signed"; } >"$work/tampered.signed"
    cp "$work/update.signed" "$work/truncated.signed"
    truncate -s $(($(stat -c %s "$work/update.signed") / 8192 * 4096)) "$work/truncated.signed"
    # Debian's minisign draws the same line on the tampered root.
    if minisign -V -q -p "$img_dir/rampart-update.pub" -m "$work/broken.sqfs" -x "$work/update.sqfs.minisig" 2>/dev/null; then
        log "minisign -V accepts the broken root with the update's signature"; return 1
    fi
}

# sign_payload SQFS KEY OUT: OUT = SQFS followed by the 4 KiB signature block `make image` writes after the root
# (src/system/signature.rs SIG_BLOCK_MAGIC); SQFS.minisig is the detached signature.
sign_payload() {
    minisign -S -s "$2" -m "$1" -x "$1.minisig" -t "image test payload $(basename "$1")" >/dev/null || return 1
    { printf 'rampart-update-signature v1\n'; cat "$1.minisig"; } >"$work/sig-block"
    truncate -s 4096 "$work/sig-block"
    cat "$1" "$work/sig-block" >"$3"
}

# ---------------------------------------------------------------- tests

# self_enroll PIN: a token minted on the guest's console enrolls a device from the test namespace with
# `rampart enroll` against the pin the console showed (a wrong pin is refused first, creating nothing), and the
# enrolled device's tunnel pings the tenant gateway.
self_enroll() {
    local pin=$1 url token bad rampart=${IMAGE_TARGET:-$repo/target}/release/rampart
    expect_guest 'rampart token create -c /data/config/gateway.toml --tenant default --host 127.0.0.1:8443' \
        '^token +rpe1_' 'rampart://127\.0\.0\.1:8443/' || return 1
    url=$(echo "$GUEST_OUT" | grep -aoE "rampart://127\.0\.0\.1:8443/[^[:space:]']*" | head -n 1)
    case "$url" in *"pin=$pin"*) ;; *) log "  the token's URL ($url) does not carry the console's pin $pin"; return 1 ;; esac
    token=$(echo "$GUEST_OUT" | awk '$1 == "token" { print $2; exit }')
    (umask 077 && printf '%s\n' "$token" >"$work/token")
    # The wrong pin (last hex digit changed) must be refused before anything is sent.
    bad="rampart://127.0.0.1:8443/?pin=${pin%?}$([ "${pin#"${pin%?}"}" = 0 ] && echo 1 || echo 0)"
    if ip netns exec "$NS" "$rampart" enroll "$bad" --token-file "$work/token" --name kiosk \
        --out "$work/bad.conf" >"$work/bad-enroll.out" 2>&1; then
        log "  rampart enroll accepted a wrong pin:"; sed 's/^/      /' "$work/bad-enroll.out"; return 1
    fi
    grep -aqi 'pin' "$work/bad-enroll.out" || { log "  wrong pin refused without saying so:"; sed 's/^/      /' "$work/bad-enroll.out"; return 1; }
    [ ! -e "$work/bad.conf" ] || { log "  a config was written despite the wrong pin"; return 1; }
    ip netns exec "$NS" "$rampart" enroll "rampart://127.0.0.1:8443/?pin=$pin" --token-file "$work/token" \
        --name kiosk --out "$work/kiosk.conf" >"$work/enroll.out" 2>&1 ||
        { log "  rampart enroll failed:"; sed 's/^/      /' "$work/enroll.out"; return 1; }
    log "  rampart enroll with the console's pin: $(head -n 1 "$work/enroll.out")"
    local addr
    addr=$(sed -n 's/^Address *= *\([0-9.]*\/32\).*/\1/p' "$work/kiosk.conf" | head -n 1)
    grep -viE '^(Address|DNS|MTU) *=' "$work/kiosk.conf" >"$work/kiosk.setconf"
    [ -n "$addr" ] || { log "  no IPv4 Address in the enrolled config"; return 1; }
    wg_check "$work/kiosk.setconf" "$addr" 100.96.0.0/16
}

# The shipped qcow2 as a customer gets it (empty data partition), written to a disk, with the console password
# seeded on its ESP as README says (rampart/console-password, put there with mtools as from any OS).
test_first_boot_creates_config_and_prints_enrollment_hint() {
    local pin esp
    qemu-img convert -O raw "$img_dir/rampart.qcow2" "$work/first.img" || return 1
    esp=$(sfdisk -d "$work/first.img" | sed -n 's/.*start= *\([0-9]*\),.*name="esp".*/\1/p')
    echo "$CONSOLE_PW" >"$work/console-password"
    mmd -i "$work/first.img@@$((esp * 512))" ::/rampart &&
        mcopy -i "$work/first.img@@$((esp * 512))" "$work/console-password" ::/rampart/console-password || return 1
    vm_start first-boot "$work/first.img" raw
    wait_for 'MARK root-mounted slot=a' "$BOOT_TIMEOUT" &&
        wait_for 'MARK data-mounted .*boots=1' 120 &&
        wait_for 'MARK console-password set source=/boot/efi/rampart/console-password' 60 &&
        wait_for 'Rampart enrollment: first boot created /data/config/gateway.toml' 120 &&
        wait_for 'enrollment pin +sha256:[0-9a-f]{64}' 60 &&
        wait_for 'Self-enrollment listener: https://10\.0\.2\.15:8443' 10 &&
        wait_for 'rampart device add -c /data/config/gateway.toml --tenant default' 10 &&
        wait_for '--endpoint 10\.0\.2\.15:51820' 10 &&
        wait_for 'MARK first-boot-config created' 10 &&
        wait_for 'MARK firewall-up policy=config open=udp/51820 tcp/8443 uptime' 60 &&
        wait_for 'MARK boot-good slot=a' 180 &&
        pin=$(since_mark | grep -aoE 'enrollment pin +sha256:[0-9a-f]{64}' | head -n 1 | awk '{ print $3 }') &&
        wait_shell &&
        expect_guest 'rampart check-config -c /data/config/gateway.toml' ': ok' &&
        expect_guest 'ls /data/config' 'gateway.key' 'gateway.toml' &&
        expect_guest 'grep -E "^user" /data/config/gateway.toml' '^user = "rampart"$' &&
        gateway_runs_unprivileged &&
        expect_guest 'ls -A /boot/efi/rampart; grep -c "^root:[$]6[$]" /data/system/shadow; ls -l /etc/shadow' \
            '^1$' '/etc/shadow -> /data/system/shadow' &&
        { ! grep -q console-password <<<"$GUEST_OUT" || { log "  the password seed is still on the ESP"; false; }; } &&
        { ! grep -aqF "$CONSOLE_PW" "$VM_LOG" || { log "  the console password appeared on the serial console"; false; }; } &&
        expect_guest 'rampart system status' '^a +/dev/vda2 +good \*booted' '^b +/dev/vda3 +empty' \
            '^next boot: slot a' 'health: healthy' &&
        self_enroll "$pin" &&
        vm_powerdown || { vm_kill; return 1; }
}

# Also: the nftables policy keeps other ports closed (firewall_check); kill -9 of the gateway is recovered by
# init (crash_recovery).
test_gateway_serves_wireguard_and_health() {
    seeded_disk "$work/wg.img" || return 1
    # The shipped raw image rides along as a second disk (/dev/vdb): its partitions carry the same names, which
    # must not confuse the boot, and it is a payload for `rampart system update` (GPT path, no reboot here).
    vm_start wireguard "$work/wg.img" raw "$img_dir/rampart.img"
    wait_for 'MARK root-mounted slot=a dev=vda2' "$BOOT_TIMEOUT" &&
        wait_for 'MARK data-mounted dev=vda4' 60 &&
        wait_for 'MARK firewall-up policy=config open=udp/51820 tcp/8080 uptime' 60 &&
        wait_for 'MARK boot-good slot=a' 180 &&
        wg_check &&
        health_check &&
        console_refuses_root_without_password &&
        wait_shell &&
        gateway_runs_unprivileged &&
        firewall_check &&
        crash_recovery &&
        gateway_runs_unprivileged &&
        expect_guest 'rampart system status' '^a +/dev/vda2 +good \*booted' &&
        expect_guest 'ls /boot/efi/loader/entries' '^gateway-a\.conf' &&
        expect_guest 'rampart system update /dev/vdb' "signature ok: rampart $base_version .* root filesystem" \
            "slot b: Rampart $base_version .*/dev/vda3 .*gateway-b\\+3\\.conf" &&
        expect_guest 'rampart system status' '^b +/dev/vda3 +trial \(3 left, 0 done\)' '^next boot: slot b' &&
        expect_guest 'ls /boot/efi/b' 'initrd' 'vmlinuz' &&
        vm_powerdown || { vm_kill; return 1; }
}

# refuse_update DEV REGEX: `rampart system update DEV` fails and says REGEX.
refuse_update() {
    guest_run "rampart system update $1"
    if [ "$GUEST_RC" = 0 ]; then
        log "  [$VM_NAME] update from $1 was accepted:"; echo "$GUEST_OUT" | sed 's/^/      /'; return 1
    fi
    grep -aqE -e "$2" <<<"$GUEST_OUT" ||
        { log "  [$VM_NAME] update from $1 refused without /$2/:"; echo "$GUEST_OUT" | sed 's/^/      /'; return 1; }
    log "  refused $1: $(echo "$GUEST_OUT" | grep -aE -e "$2" | head -n 1 | cut -c1-220)"
}

# Slot b's first 4 MiB (where a write starts), its kernel directory and the boot entries.
SLOT_B_STATE='head -c 4194304 /dev/vda3 | md5sum; ls -l /boot/efi/b; ls /boot/efi/loader/entries'

# Signed updates: unsigned, foreign-key, tampered and truncated payloads are refused before anything is written
# (slot b and the ESP unchanged); the vendor-signed one is accepted and boots (the positive control), and a
# signed but broken one falls back to it.
test_signed_update_boots_slot_b_and_broken_slot_falls_back() {
    seeded_disk "$work/ab.img" || return 1
    vm_start ab-update "$work/ab.img" raw "$work/update.signed" "$work/broken.signed" "$work/unsigned.sqfs" \
        "$work/other-key.signed" "$work/tampered.signed" "$work/truncated.signed"
    wait_for 'MARK boot-good slot=a' "$BOOT_TIMEOUT" && wait_shell || { vm_kill; return 1; }
    local before
    guest_run "$SLOT_B_STATE" && before=$GUEST_OUT
    refuse_update /dev/vdd 'refused, nothing was written: is not signed: no --signature' &&
        refuse_update /dev/vde 'refused, nothing was written: the signature embedded after the root is made with another key \(key ID [0-9A-F]{16}\), not with the vendor update key' &&
        refuse_update /dev/vdf 'refused, nothing was written: the signature embedded after the root does not match the image' &&
        refuse_update /dev/vdg '/dev/vdg: is truncated: its root squashfs needs [0-9]+ bytes' &&
        guest_run "$SLOT_B_STATE" || { vm_kill; return 1; }
    if [ "$GUEST_OUT" != "$before" ]; then
        log "  slot b or the ESP changed after the refused updates:"
        diff <(echo "$before") <(echo "$GUEST_OUT") | sed 's/^/      /'
        vm_kill; return 1
    fi
    log "  slot b's first 4 MiB, /boot/efi/b and the boot entries unchanged ($(echo "$before" | head -n 1 | cut -c1-12)...)"
    # State on /data that must survive: an enrolled device (gateway state_dir) and the boot counter.
    expect_guest 'rampart system status' '^b +/dev/vda3 +empty' &&
        expect_guest 'rampart device add -c /data/config/gateway.toml --tenant default --name phone --user bob --endpoint 127.0.0.1:51820' \
        'PrivateKey' &&
        expect_guest 'rampart system update /dev/vdb' 'signature ok: image test payload update\.sqfs' \
            "slot b: Rampart $base_version\\+update .*armed" &&
        expect_guest 'rampart system status' '^b +/dev/vda3 +trial \(3 left, 0 done\)' '^next boot: slot b' ||
        { vm_kill; return 1; }
    log "  -> rebooting into slot b"
    vm_mark
    guest_send reboot
    wait_for "MARK rootfs-init slot=b version=$base_version\\+update" "$BOOT_TIMEOUT" &&
        wait_for 'MARK data-mounted .*boots=2' 60 &&
        wait_for "MARK boot-good slot=b version=$base_version\\+update" 180 &&
        wait_shell &&
        wg_check &&
        expect_guest 'rampart system status' '^a +/dev/vda2 +good ' '^b +/dev/vda3 +good \*booted' \
            "$base_version\\+update" &&
        expect_guest 'rampart device list -c /data/config/gateway.toml' 'phone' &&
        expect_guest 'rampart audit flows -c /data/config/gateway.toml --device laptop' 'laptop .*ping-gateway' &&
        expect_guest 'rampart system update --tries 2 /dev/vdc' "slot a: Rampart $base_version\\+broken .*gateway-a\\+2\\.conf" ||
        { vm_kill; return 1; }
    # 2 tries instead of the default 3 to save a ~30 s boot: the counting is systemd-boot's either way.
    log "  -> rebooting into the broken slot a (2 tries, then fallback to b)"
    vm_mark
    guest_send reboot
    local try
    for try in 1 2; do
        wait_for "MARK rootfs-init slot=a version=$base_version\\+broken" "$BOOT_TIMEOUT" &&
            wait_for 'MARK boot-failed stage=health slot=a action=reboot' 180 || { vm_kill; return 1; }
        vm_mark
    done
    wait_for "MARK rootfs-init slot=b version=$base_version\\+update" "$BOOT_TIMEOUT" &&
        wait_for 'MARK data-mounted .*boots=5' 60 &&
        wait_for "MARK boot-good slot=b" 180 &&
        wait_shell &&
        expect_guest 'rampart system status' '^a +/dev/vda2 +bad \(no tries left\)' '^b +/dev/vda3 +good \*booted' \
            '^next boot: slot b' &&
        expect_guest 'rampart device list -c /data/config/gateway.toml' 'phone' &&
        expect_guest 'rampart audit flows -c /data/config/gateway.toml --device laptop' 'laptop .*ping-gateway' &&
        wg_check &&
        health_check &&
        vm_powerdown || { vm_kill; return 1; }
}

# ---------------------------------------------------------------- runner

pass=0 fail=0
run_test() {
    local name=$1 t0=$SECONDS
    # IMAGE_TEST_ONLY=substring runs only the matching tests (debugging aid).
    case "$name" in *"${IMAGE_TEST_ONLY:-}"*) ;; *) return 0 ;; esac
    log "--- $name"
    if "test_$name"; then
        pass=$((pass + 1))
        log "--- PASS $name ($((SECONDS - t0)) s)"
    else
        fail=$((fail + 1))
        log "--- FAIL $name ($((SECONDS - t0)) s); serial log: ${VM_LOG#$repo/}; last lines:"
        [ -n "$VM_LOG" ] && tail -n 25 "$VM_LOG" | tr -d '\r' | sed 's/^/      | /'
    fi
}

t_all=$SECONDS
if setup; then
    run_test first_boot_creates_config_and_prints_enrollment_hint
    run_test gateway_serves_wireguard_and_health
    run_test signed_update_boots_slot_b_and_broken_slot_falls_back
else
    log "setup failed"
    fail=3
fi
log "total $((SECONDS - t_all)) s"
echo "image-test: $pass passed, $fail failed"
[ "$fail" = 0 ]
