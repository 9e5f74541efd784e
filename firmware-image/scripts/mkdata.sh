#!/bin/sh
# mkdata.sh SEED_DIR OUT.img SIZE_MB: an ext4 data partition image populated from SEED_DIR, without mount.
set -eu
[ $# -eq 3 ] || { echo "usage: mkdata.sh SEED_DIR OUT.img SIZE_MB" >&2; exit 2; }
rm -f "$2"
mkfs.ext4 -q -F -L data -U 52414d50-4152-5400-0000-0000000000da \
    -E root_owner=0:0,hash_seed=52414d50-4152-5400-0000-0000000000db -d "$1" "$2" "${3}M" >/dev/null
