#!/bin/sh
# Install (idempotently, quietly) the Debian packages that `make image` and `make image-test` need.
# apt-get update runs only when something is missing. Packages are Debian bookworm names.
set -eu

# Build: squashfs-tools (mksquashfs/unsquashfs), dosfstools + mtools (ESP without mount), fdisk (sfdisk),
# e2fsprogs (mkfs.ext4 -d), busybox-static (appliance userland), systemd-boot-efi (loader), cpio + zstd
# (initramfs, compressed image), binutils (strip), minisign (signs the update payload; the test signs its own),
# nftables (its nft and libraries go into the image for the inbound firewall), openssl (busybox wget's HTTPS helper).
# Test: qemu-system-x86 + ovmf (UEFI VM), qemu-utils (qemu-img), wireguard-go + wireguard-tools (client),
# iproute2 + iputils-ping (test netns), socat (QMP), curl (/health).
PKGS="busybox-static squashfs-tools dosfstools mtools fdisk e2fsprogs systemd-boot-efi cpio zstd binutils minisign nftables openssl
ovmf qemu-system-x86 qemu-utils wireguard-go wireguard-tools iproute2 iputils-ping socat curl ca-certificates"

missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing="$missing $p"
done

# qemu-img must actually run: installing qemu-system-x86 can remove a backported qemu-utils (design note 1).
qemu_img_ok() { qemu-img --version >/dev/null 2>&1; }

if [ -z "$missing" ] && qemu_img_ok; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "image-deps: installing:${missing:- (qemu-utils repair)}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
apt_q() { apt-get -qq -o Dpkg::Use-Pty=0 "$@" >"$log" 2>&1 || { cat "$log" >&2; return 1; }; }
apt_q update
# qemu-system-x86 first, on its own: apt may replace a newer qemu-utils with the matching one below.
case " $missing " in
*" qemu-system-x86 "*) apt_q install -y --no-install-recommends qemu-system-x86 ;;
esac
others=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e qemu-system-x86 -e '' || true)
if [ -n "$others" ]; then
    # shellcheck disable=SC2086
    apt_q install -y --no-install-recommends $others
fi
if ! qemu_img_ok; then
    v=$(dpkg-query -W -f='${Version}' qemu-system-common)
    apt_q install -y --no-install-recommends --allow-downgrades "qemu-utils=$v"
fi
qemu_img_ok || { echo "image-deps: qemu-img still does not run" >&2; exit 1; }
echo "image-deps: done"
