#!/bin/bash
# Build the Rampart appliance disk image without mount, loop devices, Docker or root-only tricks.
#
#   build.sh --rampart PATH --out DIR --work DIR
#
# Outputs in --out: rampart.img (raw GPT, sparse), rampart.img.zst, rampart.qcow2, rampart-rootfs.sqfs (the
# update payload for `rampart system update`) and its signature rampart-rootfs.sqfs.minisig, rampart-update.pub
# (the public key every root embeds at /usr/share/rampart/update.pub), SHA256SUMS, manifest.txt.
# Signing key: RAMPART_UPDATE_KEY (see "update signing key" below and firmware-image/README.md).
# Layout and pitfalls: firmware-image/README.md and shared design note appliance-image.md.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)   # firmware-image/
repo=$(cd "$here/.." && pwd)
rampart_bin= out= work=
while [ $# -gt 0 ]; do
    case "$1" in
    --rampart) rampart_bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$rampart_bin" ] && [ -n "$out" ] && [ -n "$work" ] || { echo "usage: build.sh --rampart PATH --out DIR --work DIR" >&2; exit 2; }
out=$(realpath -m "$out") work=$(realpath -m "$work") rampart_bin=$(realpath "$rampart_bin")
[ -x "$rampart_bin" ] || { echo "build.sh: $rampart_bin is not an executable (run cargo build --release)" >&2; exit 1; }

export MTOOLS_SKIP_CHECK=1 LC_ALL=C
step() { echo "image: $*"; }
t_start=$(date +%s)

# Reproducibility: timestamps from the last commit, fixed UUIDs.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}
[ -n "$SOURCE_DATE_EPOCH" ] || SOURCE_DATE_EPOCH=0
export SOURCE_DATE_EPOCH
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
version=${IMAGE_VERSION:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)}
build_id=${IMAGE_BUILD_ID:-$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)}

# ---------------------------------------------------------------- update signing key
# `rampart system update` installs only roots signed with this key (minisign). RAMPART_UPDATE_KEY names the vendor's
# minisign secret key (an encrypted one asks for its password twice: public key, then signature);
# RAMPART_UPDATE_PUBKEY its .pub (default: recreated from the secret key with `minisign -R`). Without them a
# development key is generated once under target/update-key/ (never committed) and reused.
command -v minisign >/dev/null || { echo "build.sh: minisign missing (run make image-deps)" >&2; exit 1; }
if [ -n "${RAMPART_UPDATE_KEY:-}" ]; then
    sign_key=$(realpath "$RAMPART_UPDATE_KEY")
    [ -f "$sign_key" ] || { echo "build.sh: RAMPART_UPDATE_KEY=$RAMPART_UPDATE_KEY is not a file" >&2; exit 1; }
    key_origin="RAMPART_UPDATE_KEY"
else
    sign_key=$repo/target/update-key/rampart-dev.key
    key_origin="development key (set RAMPART_UPDATE_KEY for release builds)"
    if [ ! -f "$sign_key" ]; then
        step "generating the development update key $sign_key"
        (umask 077 && mkdir -p "$(dirname "$sign_key")" &&
            minisign -G -W -s "$sign_key" -p "${sign_key%.key}.pub" >/dev/null)
    fi
fi
mkdir -p "$out"
if [ -n "${RAMPART_UPDATE_PUBKEY:-}" ]; then
    cp "$RAMPART_UPDATE_PUBKEY" "$out/rampart-update.pub"
else
    rm -f "$out/rampart-update.pub"
    minisign -R -s "$sign_key" -p "$out/rampart-update.pub" >/dev/null
    echo >>"$out/rampart-update.pub"
fi
update_key_id=$(sed -n '1s/.*minisign public key //p' "$out/rampart-update.pub")
step "update key: $(sed -n 2p "$out/rampart-update.pub") (key ID $update_key_id, $key_origin)"

# ---------------------------------------------------------------- kernel (pinned in kernel.lock)
kpkg=$(sed -n 's/^package=//p' "$here/kernel.lock")
kver=$(sed -n 's/^version=//p' "$here/kernel.lock")
ksha=$(sed -n 's/^sha256=//p' "$here/kernel.lock")
kv=${kpkg#linux-image-}
kdir=$work/kernel/$kpkg-$kver
deb=$work/kernel/${kpkg}_${kver}_amd64.deb
mkdir -p "$work/kernel" "$out"
if ! echo "$ksha  $deb" | sha256sum -c --status 2>/dev/null; then
    step "fetching $kpkg=$kver"
    rm -f "$deb"
    # apt drops privileges to _apt for downloads; a root-only build directory makes it warn, not fail.
    (cd "$work/kernel" && apt-get download -qq "$kpkg=$kver" 2>&1 | grep -v 'unsandboxed as root' || true)
    [ -f "$deb" ] || { echo "build.sh: apt-get download $kpkg=$kver failed; is it still in the archive? (README: Bumping the kernel)" >&2; exit 1; }
    echo "$ksha  $deb" | sha256sum -c --status || { echo "build.sh: $deb does not match sha256 in kernel.lock" >&2; exit 1; }
    rm -rf "$kdir"
fi
if [ ! -f "$kdir/.done" ]; then
    step "extracting kernel $kv"
    rm -rf "$kdir"
    mkdir -p "$kdir"
    dpkg-deb -x "$deb" "$kdir"
    busybox depmod -b "$kdir" "$kv"
    touch "$kdir/.done"
fi
vmlinuz=$kdir/boot/vmlinuz-$kv
kmod=$kdir/lib/modules/$kv

# ---------------------------------------------------------------- busybox tree helper
busybox_bin=$(command -v busybox)
if ldd "$busybox_bin" >/dev/null 2>&1; then echo "build.sh: $busybox_bin is not static (install busybox-static)" >&2; exit 1; fi
install_busybox() { # $1 = root dir
    mkdir -p "$1/bin" "$1/sbin" "$1/usr/bin" "$1/usr/sbin"
    cp "$busybox_bin" "$1/bin/busybox"
    local a
    for a in $("$busybox_bin" --list); do
        [ "$a" = busybox ] && continue
        ln -sf busybox "$1/bin/$a"
    done
    ln -sf ../bin/busybox "$1/sbin/init"
    for a in modprobe depmod insmod rmmod lsmod switch_root poweroff reboot halt getty acpid udhcpc ip nologin; do
        ln -sf ../bin/busybox "$1/sbin/$a"
    done
}

# ---------------------------------------------------------------- initramfs
step "initramfs (busybox + modules from firmware-image/modules.list)"
ird=$work/initramfs
rm -rf "$ird"
mkdir -p "$ird"/{proc,sys,dev,newroot,etc,lib/modules/$kv}
install_busybox "$ird"
install -m 0755 "$here/initramfs/init" "$ird/init"
: >"$ird/etc/modules"
declare -A want_files=()
# modules.dep: "kernel/x/y.ko: kernel/a.ko kernel/b.ko"; names compare with - and _ folded.
declare -A mod_path=() mod_deps=()
while IFS= read -r line; do
    p=${line%%:*}
    n=${p##*/}; n=${n%.ko}; n=${n//-/_}
    mod_path[$n]=$p
    mod_deps[$n]=${line#*:}
done <"$kmod/modules.dep"
declare -A builtin=()
while IFS= read -r p; do n=${p##*/}; n=${n%.ko}; builtin[${n//-/_}]=1; done <"$kmod/modules.builtin"
add_with_deps() {
    local p=$1 d
    [ -n "${want_files[$p]:-}" ] && return
    want_files[$p]=1
    local n=${p##*/}; n=${n%.ko}; n=${n//-/_}
    for d in ${mod_deps[$n]}; do add_with_deps "$d"; done
}
while IFS= read -r m; do
    case "$m" in '' | '#'*) continue ;; esac
    n=${m//-/_}
    if [ -n "${mod_path[$n]:-}" ]; then
        add_with_deps "${mod_path[$n]}"
        echo "$n" >>"$ird/etc/modules"
    elif [ -n "${builtin[$n]:-}" ]; then
        :
    else
        echo "build.sh: module $m (modules.list) is neither a module nor builtin in $kv" >&2
        exit 1
    fi
done <"$here/modules.list"
for p in "${!want_files[@]}"; do
    mkdir -p "$ird/lib/modules/$kv/$(dirname "$p")"
    cp "$kmod/$p" "$ird/lib/modules/$kv/$p"
done
cp "$kmod"/modules.{builtin,order,builtin.modinfo} "$ird/lib/modules/$kv/"
busybox depmod -b "$ird" "$kv"
find "$ird" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
initrd=$work/initrd.zst
(cd "$ird" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet | zstd -q -19 -T0 -f -o "$initrd")
step "  ${#want_files[@]} modules, initrd $(du -k "$initrd" | cut -f1) KiB"

# ---------------------------------------------------------------- root filesystem (one slot)
step "rootfs (busybox + rampart + its shared libraries)"
rfs=$work/rootfs
rm -rf "$rfs"
mkdir -p "$rfs"/{proc,sys,dev,run,tmp,data,root,boot/efi,etc/rampart,lib64,var,usr/lib/rampart}
install_busybox "$rfs"
cp -a "$here/rootfs/." "$rfs/"
ln -s /data/log "$rfs/var/log"
ln -s /run "$rfs/var/run"
ln -s /tmp "$rfs/var/tmp"
ln -s /run/resolv.conf "$rfs/etc/resolv.conf"
# Password hashes live on the data partition (root is locked until a console password is seeded; console-auth).
ln -s /data/system/shadow "$rfs/etc/shadow"
# Release builds carry debug info (profile.release debug = 1); the appliance gets a stripped copy.
strip -o "$rfs/usr/bin/rampart" "$rampart_bin" 2>/dev/null || cp "$rampart_bin" "$rfs/usr/bin/rampart"
chmod 0755 "$rfs/usr/bin/rampart"
# glibc binaries: copy every library ldd names, dereferenced, to the same path (design note 8).
copy_libs() {
    { ldd "$1" 2>/dev/null || true; } | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | sort -u | while read -r lib; do
        mkdir -p "$rfs$(dirname "$lib")"
        cp -L "$lib" "$rfs$lib"
    done
}
copy_libs "$rampart_bin"
# nft from Debian's nftables for the inbound policy (usr/lib/rampart/firewall-up).
nft_bin=$(command -v nft || echo /usr/sbin/nft)
[ -x "$nft_bin" ] || { echo "build.sh: nft missing (run make image-deps)" >&2; exit 1; }
cp "$nft_bin" "$rfs/usr/sbin/nft"
copy_libs "$nft_bin"
# openssl from Debian: busybox wget runs `openssl s_client` for HTTPS (boot-check's GET /health on an admin
# listener that requires TLS and a token, lib.sh admin_get); busybox's built-in TLS does not complete a handshake
# with the gateway's rustls listener.
openssl_bin=$(command -v openssl || echo /usr/bin/openssl)
[ -x "$openssl_bin" ] || { echo "build.sh: openssl missing (run make image-deps)" >&2; exit 1; }
cp "$openssl_bin" "$rfs/usr/bin/openssl"
copy_libs "$openssl_bin"
# Each slot carries its own kernel and initramfs; `rampart system update` copies them to the ESP.
cp "$vmlinuz" "$rfs/boot/vmlinuz"
cp "$initrd" "$rfs/boot/initrd"
cmdline_tmpl="root=PARTLABEL=root_@SLOT@ rampart.slot=@SLOT@ ro console=tty0 console=ttyS0,115200 quiet loglevel=3 panic=5"
echo "$cmdline_tmpl" >"$rfs/etc/rampart/kernel-cmdline"
mkdir -p "$rfs/usr/share/rampart"
cp "$out/rampart-update.pub" "$rfs/usr/share/rampart/update.pub"
cat >"$rfs/etc/rampart-release" <<EOF
NAME=Rampart
VERSION=$version
BUILD_ID=$build_id
KERNEL=$kv
EOF
find "$rfs" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
sqfs=$out/rampart-rootfs.sqfs
rm -f "$sqfs"
mksquashfs "$rfs" "$sqfs" -comp zstd -all-root -noappend -quiet -no-progress >/dev/null
step "  squashfs $(du -k "$sqfs" | cut -f1) KiB"
# The signature covers exactly the squashfs file; `rampart system update` checks the same bytes in a slot (the
# squashfs padded to 4 KiB, which is the whole file as mksquashfs writes it).
[ $(($(stat -c %s "$sqfs") % 4096)) = 0 ] || { echo "build.sh: $sqfs is not padded to 4 KiB" >&2; exit 1; }
step "signing the root with key ID $update_key_id"
rm -f "$sqfs.minisig"
minisign -S -s "$sign_key" -m "$sqfs" -x "$sqfs.minisig" -c "rampart update signature" \
    -t "rampart $version ($build_id) root filesystem" >/dev/null
minisign -V -q -p "$out/rampart-update.pub" -m "$sqfs" -x "$sqfs.minisig"
# The same signature as a block right after the root in root_a, so rampart.img (or a stick written from it) is
# an update payload on its own; format: src/system/signature.rs SIG_BLOCK_MAGIC.
{ printf 'rampart-update-signature v1\n'; cat "$sqfs.minisig"; } >"$work/sig-block"
[ "$(stat -c %s "$work/sig-block")" -le 4096 ] || { echo "build.sh: signature block over 4 KiB" >&2; exit 1; }
truncate -s 4096 "$work/sig-block"

# ---------------------------------------------------------------- partition table (MiB)
ESP_MB=128 SLOT_MB=192 DATA_MB=256
esp_start=1 a_start=$((1 + ESP_MB)) b_start=$((1 + ESP_MB + SLOT_MB)) d_start=$((1 + ESP_MB + 2 * SLOT_MB))
disk_mb=$((d_start + DATA_MB + 1))
sqfs_bytes=$(stat -c %s "$sqfs")
[ $((sqfs_bytes + 4096)) -le $((SLOT_MB * 1048576)) ] || { echo "build.sh: rootfs ($sqfs_bytes bytes) exceeds the ${SLOT_MB} MiB slot" >&2; exit 1; }

# ---------------------------------------------------------------- ESP (FAT32, mtools, no mount)
step "ESP (systemd-boot, slot a armed with 3 tries)"
esp=$work/esp.img
rm -f "$esp"
mkfs.vfat -C -F 32 -n ESP -i 52414d50 --invariant "$esp" $((ESP_MB * 1024)) >/dev/null
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/a ::/b
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/systemd/systemd-bootx64.efi
# No "default" line: a default glob would boot a slot whose tries are used up (design note 7).
printf 'timeout 0\nconsole-mode keep\neditor no\n' >"$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$vmlinuz" ::/a/vmlinuz
mcopy -i "$esp" "$initrd" ::/a/initrd
# "version" is the install generation: a newer install always sorts first among slots with tries left.
cat >"$work/entry-a.conf" <<EOF
# rampart-version $version
# rampart-build $build_id
title Rampart $version (slot a)
sort-key rampart
version 1
linux /a/vmlinuz
initrd /a/initrd
options ${cmdline_tmpl//@SLOT@/a}
EOF
mcopy -i "$esp" "$work/entry-a.conf" "::/loader/entries/gateway-a+3.conf"

# ---------------------------------------------------------------- data partition (ext4 -d, no mount)
step "data partition (ext4, empty config: first boot runs rampart init)"
data=$work/data.img
seed=$work/data-seed
rm -rf "$seed"
mkdir -p "$seed/config" "$seed/log" "$seed/system"
cp "$here/data/README.txt" "$seed/"
find "$seed" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
"$here/scripts/mkdata.sh" "$seed" "$data" "$DATA_MB"

# ---------------------------------------------------------------- disk
step "disk image ($disk_mb MiB, GPT)"
img=$out/rampart.img
rm -f "$img"
truncate -s "${disk_mb}M" "$img"
sfdisk -q "$img" <<EOF
label: gpt
label-id: 52414D50-4152-5400-0000-000000000000
unit: sectors
first-lba: 2048
start=$((esp_start * 2048)), size=$((ESP_MB * 2048)), type=U, name="esp", uuid=52414D50-4152-5400-0000-000000000001
start=$((a_start * 2048)), size=$((SLOT_MB * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root_a", uuid=52414D50-4152-5400-0000-000000000002
start=$((b_start * 2048)), size=$((SLOT_MB * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root_b", uuid=52414D50-4152-5400-0000-000000000003
start=$((d_start * 2048)), size=$((DATA_MB * 2048)), type=L, name="data", uuid=52414D50-4152-5400-0000-000000000004
EOF
place() { dd if="$1" of="$img" bs=1M seek="$2" conv=notrunc,sparse status=none; }
place "$esp" "$esp_start"
place "$sqfs" "$a_start"
dd if="$work/sig-block" of="$img" bs=4096 seek=$(((a_start * 1048576 + sqfs_bytes) / 4096)) conv=notrunc status=none
place "$data" "$d_start"

step "qcow2 + zstd"
rm -f "$out/rampart.qcow2" "$out/rampart.img.zst"
qemu-img convert -c -O qcow2 "$img" "$out/rampart.qcow2"
zstd -q -19 -T0 -f "$img" -o "$out/rampart.img.zst"
cat >"$out/manifest.txt" <<EOF
rampart $version ($build_id)
kernel $kpkg $kver
busybox $(dpkg-query -W -f='${Version}' busybox-static)
systemd-boot-efi $(dpkg-query -W -f='${Version}' systemd-boot-efi)
nftables $(dpkg-query -W -f='${Version}' nftables)
partitions esp=${ESP_MB}MiB root_a=${SLOT_MB}MiB root_b=${SLOT_MB}MiB data=${DATA_MB}MiB
EOF
(cd "$out" && sha256sum rampart.img rampart.img.zst rampart.qcow2 rampart-rootfs.sqfs rampart-rootfs.sqfs.minisig \
    rampart-update.pub >SHA256SUMS)
step "update public key ($out/rampart-update.pub, key ID $update_key_id):"
sed -n 2p "$out/rampart-update.pub"
step "done in $(($(date +%s) - t_start)) s: $(cd "$out" && ls -s --block-size=K rampart.img rampart.img.zst rampart.qcow2 rampart-rootfs.sqfs | tr '\n' ' ')"
