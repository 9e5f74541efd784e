#!/bin/sh
# A kernel GUE peer for tests/e2e_gue.rs: a QEMU (TCG) guest with Debian's cloud kernel, whose FOU/IPIP
# modules make a real `encap gue` tunnel (this host's kernel has none). Recipe: ../shared/design/onramps.md §2.
#
#   gue_vm.sh build DIR     downloads the kernel and busybox debs into DIR/debs (once; `apt-get download`) and
#                           builds DIR/vmlinuz and DIR/initrd.gz (busybox, iproute2's ip with its libraries,
#                           the modules and their dependencies, /init below)
#   gue_vm.sh run DIR TAP ARGS...
#                           boots the guest on the tap device TAP (run it in the namespace that holds TAP);
#                           ARGS are kernel command line words rampart.*=..., read by /init:
#                           rampart.addr (guest address/prefix on eth0), rampart.hop (next hop to the gateway),
#                           rampart.gw (the gateway's GUE address), rampart.inner (the tunnel's inner address),
#                           rampart.routes (comma-separated networks through the tunnel), rampart.ping (an address
#                           to ping), rampart.fetch (a URL to fetch). The guest prints "RESULT <name> <rc>" lines
#                           and "GUEST DONE", then powers off.
set -eu

KERNEL_PKG=${GUE_VM_KERNEL:-linux-image-6.1.0-56-cloud-amd64}
MODULES="virtio_pci failover net_failover virtio_net udp_tunnel ip6_udp_tunnel ip_tunnel tunnel4 ipip fou"

die() { echo "gue_vm.sh: $*" >&2; exit 1; }

build() {
    dir=$1
    mkdir -p "$dir/debs"
    # Rebuilt when this script changes (the debs stay cached).
    stamp=$(sha256sum "$0" | cut -d' ' -f1)
    if [ -f "$dir/initrd.gz" ] && [ -f "$dir/vmlinuz" ] && [ "$(cat "$dir/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "gue_vm.sh: cached $dir/vmlinuz and $dir/initrd.gz"
        return 0
    fi
    (cd "$dir/debs" && { ls "$KERNEL_PKG"_*.deb >/dev/null 2>&1 || apt-get download "$KERNEL_PKG" \
        || { apt-get download "${KERNEL_PKG}-unsigned"; }; } \
        && { ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download busybox-static; }) \
        || die "cannot download $KERNEL_PKG / busybox-static with apt-get download (run apt-get update)"
    x="$dir/extract"
    rm -rf "$x" "$dir/root"
    mkdir -p "$x"
    for d in "$dir"/debs/*.deb; do dpkg-deb -x "$d" "$x"; done
    kver=$(ls "$x/lib/modules" | head -n1)
    [ -n "$kver" ] || die "no modules in the kernel deb"
    cp "$x/boot/vmlinuz-$kver" "$dir/vmlinuz.tmp"
    r="$dir/root"
    mkdir -p "$r/bin" "$r/sbin" "$r/lib/modules" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/lib64" "$r/usr/lib"
    cp "$x/bin/busybox" "$r/bin/busybox"
    for a in sh mount insmod sleep cat echo ping poweroff tr cut sed grep seq; do ln -sf busybox "$r/bin/$a"; done
    # iproute2's ip (busybox's applet has no `fou`) and curl (static busybox's wget crashes resolving even an
    # address literal through glibc's NSS), with their libraries; called by full path in /init.
    cp /usr/sbin/ip "$r/sbin/ip"
    cp "$(command -v curl)" "$r/sbin/curl" || die "curl is missing (make deps)"
    for lib in $( (ldd /usr/sbin/ip; ldd "$r/sbin/curl") | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$r$(dirname "$lib")"
        cp -L "$lib" "$r$lib"
    done
    # Modules in load order; the deb has no modules.dep, so dependencies come from each module's depends=.
    order=""
    add() {
        # Recursive: keep this call's values (dash and busybox sh have `local`).
        local f deps d
        case " $order " in *" $1 "*) return 0 ;; esac
        f=$(find "$x/lib/modules/$kver" -name "$1.ko" -o -name "$1.ko.xz" | head -n1)
        if [ -z "$f" ]; then
            # Built into the kernel: nothing to load.
            return 0
        fi
        deps=$(strings "$f" 2>/dev/null | sed -n 's/^depends=//p' | tr ',' ' ')
        case "$f" in *.xz) deps=$(xz -dc "$f" | strings | sed -n 's/^depends=//p' | tr ',' ' ') ;; esac
        for d in $deps; do add "$d"; done
        case "$f" in
            *.xz) xz -dc "$f" > "$r/lib/modules/$1.ko" ;;
            *) cp "$f" "$r/lib/modules/$1.ko" ;;
        esac
        order="$order $1"
    }
    for m in $MODULES; do add "$m"; done
    echo "$order" > "$r/lib/modules/order"
    cat > "$r/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "GUEST insmod $m failed"; done
# The NIC appears once virtio_net has probed the PCI device.
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
echo "GUEST NICS $(ls /sys/class/net | tr '\n' ' ')"
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^rampart.$1=//p"; }
IP=/sbin/ip
$IP link set lo up
$IP link set eth0 up
$IP addr add "$(arg addr)" dev eth0
$IP route add "$(arg gw)/32" via "$(arg hop)"
local=$(arg addr | cut -d/ -f1)
$IP fou add port 6080 gue
$IP link add gue1 type ipip remote "$(arg gw)" local "$local" ttl 64 encap gue encap-sport auto encap-dport 6080
$IP addr add "$(arg inner)/32" dev gue1
$IP link set gue1 up
for n in $(arg routes | tr ',' ' '); do $IP route add "$n" dev gue1 src "$(arg inner)"; done
echo "GUEST UP $($IP -o link show gue1)"
if [ -n "$(arg ping)" ]; then
    ping -c 3 -W 5 "$(arg ping)"
    echo "RESULT ping $?"
fi
if [ -n "$(arg fetch)" ]; then
    /sbin/curl -sS -m 20 -o /tmp/page "$(arg fetch)"
    rc=$?
    echo "PAGE $(cat /tmp/page 2>/dev/null)"
    echo "RESULT fetch $rc"
fi
echo "GUEST DONE"
poweroff -f
EOF
    chmod 755 "$r/init"
    mkdir -p "$r/etc"
    echo "127.0.0.1 localhost" > "$r/etc/hosts"
    # busybox's own cpio: the host needs no cpio package.
    (cd "$r" && find . | "$x/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$dir/initrd.gz.tmp"
    mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
    mv "$dir/initrd.gz.tmp" "$dir/initrd.gz"
    echo "$stamp" > "$dir/stamp"
    rm -rf "$x"
    echo "gue_vm.sh: built $dir/vmlinuz ($kver) and $dir/initrd.gz with modules:$order"
}

run() {
    dir=$1 tap=$2
    shift 2
    command -v qemu-system-x86_64 >/dev/null 2>&1 \
        || die "qemu-system-x86_64 is missing: install qemu-system-x86 (make deps)"
    exec qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults -display none -no-reboot \
        -serial stdio -kernel "$dir/vmlinuz" -initrd "$dir/initrd.gz" \
        -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device virtio-net-pci,netdev=n0 \
        -append "console=ttyS0 quiet panic=-1 $*"
}

case "${1:-}" in
    build) build "$2" ;;
    run) shift; run "$@" ;;
    *) die "usage: gue_vm.sh build DIR | run DIR TAP ARGS..." ;;
esac
