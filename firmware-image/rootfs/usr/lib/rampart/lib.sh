# Shared helpers for the appliance scripts (sourced, busybox ash).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
RAMPART_CONFIG_DIR=/data/config
RAMPART_CONFIG=$RAMPART_CONFIG_DIR/gateway.toml
ESP=/boot/efi

# Progress markers on the console; the boot test waits for these lines.
mark() { echo "MARK $* uptime=$(cut -d' ' -f1 /proc/uptime)" >/dev/console; }
say() { echo "rampart: $*" >/dev/console; }

# The slot systemd-boot started us from: "a" or "b" (rampart.slot= on the kernel command line).
booted_slot() { sed -n 's/.*rampart\.slot=\([ab]\).*/\1/p' /proc/cmdline; }

# "vda2" -> "vda", "nvme0n1p2" -> "nvme0n1".
parent_disk() { basename "$(readlink -f "/sys/class/block/$1/..")"; }

# Partition of disk $1 whose GPT name is $2, e.g. find_part_on vda data -> vda4.
find_part_on() {
    for u in /sys/class/block/"$1"/*/uevent; do
        [ -f "$u" ] || continue
        if grep -qx "PARTNAME=$2" "$u"; then
            sed -n 's/^DEVNAME=//p' "$u"
            return 0
        fi
    done
    return 1
}

# host:port of the admin listener from the config (default 127.0.0.1:8080); wildcard -> loopback.
admin_addr() {
    a=$(sed -n 's/^[[:space:]]*admin_listen[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$RAMPART_CONFIG" 2>/dev/null | head -n 1)
    a=${a:-127.0.0.1:8080}
    case "$a" in
    0.0.0.0:*) a=127.0.0.1:${a#0.0.0.0:} ;;
    "[::]:"*) a="[::1]:${a#\[::\]:}" ;;
    esac
    echo "$a"
}

# GET http(s)://<admin_listen>$1 (body on stdout). With gateway.admin_token_file (required off loopback) the
# listener speaks HTTPS and wants the token (its certificate is the gateway's own self-signed one).
admin_get() {
    f=$(sed -n 's/^[[:space:]]*admin_token_file[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$RAMPART_CONFIG" 2>/dev/null | head -n 1)
    # (busybox 1.35 static wget segfaults with -T: bound it with timeout instead)
    if [ -z "$f" ]; then
        timeout 5 wget -q -O - "http://$(admin_addr)$1" 2>/dev/null
        return
    fi
    case "$f" in /*) ;; *) f=$RAMPART_CONFIG_DIR/$f ;; esac
    timeout 5 wget -q -O - --no-check-certificate --header "Authorization: Bearer $(cat "$f" 2>/dev/null)" \
        "https://$(admin_addr)$1" 2>/dev/null
}
