#!/bin/sh
# mkdata.sh SEED_DIR OUT.img SIZE_MB: an ext4 data partition image populated from SEED_DIR, without mount.
# With SOURCE_DATE_EPOCH set the result is reproducible (fixed UUID, hash seed, times).
set -eu
[ $# -eq 3 ] || { echo "usage: mkdata.sh SEED_DIR OUT.img SIZE_MB" >&2; exit 2; }
rm -f "$2"
mkfs.ext4 -q -F -L data -U 52414d50-4152-5400-0000-0000000000da \
    -E root_owner=0:0,hash_seed=52414d50-4152-5400-0000-0000000000db -d "$1" "$2" "${3}M" >/dev/null
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    # mkfs.ext4 -d copies each file's ctime, which touch cannot set: pin it afterwards.
    (cd "$1" && find . -mindepth 1) | sed "s|^\.\(.*\)|sif \"\1\" ctime @$SOURCE_DATE_EPOCH|" >"$2.debugfs"
    debugfs -w -f "$2.debugfs" "$2" >/dev/null 2>&1
    rm -f "$2.debugfs"
fi
