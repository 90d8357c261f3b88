#!/usr/bin/env bash
# One command per stage part on the GPU machine (see docs/DEVICE.md): copy the part sent along
# out of the repository copy, to a folder that stays while the machine is kept up, and check
# its sha256 against the manifest (part-00, which holds the manifest, goes first).
set -euo pipefail
part=${1:?usage: scripts/device/receive.sh .stage/part-NN}
dest=${ADVFACE_STAGE_DIR:-/root/advface-stage}
name=$(basename "$part")
mkdir -p "$dest"
rm -rf "$dest/.$name.tmp"
cp -r "$part" "$dest/.$name.tmp"
rm -rf "${dest:?}/$name"
mv "$dest/.$name.tmp" "$dest/$name"
PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} "${PYTHON:-python3}" \
  scripts/device/device_main.py verify "$dest" "$name"
echo "received $name: $(ls "$dest" | grep -c '^part-') part(s) in $dest; $(df -h "$dest" | tail -1)"
