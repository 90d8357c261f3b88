#!/usr/bin/env bash
# Carry a long reproduction's finished work from one machine's stage cache to another's.
#
# What is carried stands for hours of computing and is small: the trained networks (the
# decoders' `model-*` and the offline heads' `offline-*` checkpoint folders, epoch checkpoints
# of unfinished decoders included, so their training resumes) and each finished setting's
# record (`record-*.json`: its tables' values and grids, which stand for its chunks). Chunk
# files and aligned faces are not carried: they are recomputed. (scripts/cpu-full.sh exports
# the bench's cache as a second ledger, its networks and nothing else, the same way.)
# Every entry is named by its cache key, so an entry is only ever used where the same code,
# weights and settings ask for it.
#
#   bash scripts/ledger.sh export runs/cpu-full/cache docs/results/cpu-full/ledger
#   bash scripts/ledger.sh import docs/results/cpu-full/ledger runs/cpu-full/cache
#
# import adds the entries that the cache lacks and never touches one it has (its own copy is
# as new or newer); export replaces each entry in the ledger with the cache's, one entry at a
# time through a temporary name, so an interrupted export leaves whole entries only.
#
# export leaves out an entry larger than LEDGER_MAX_KB (default 8192): a ledger is committed,
# and the repository's size is what every clone and every transfer to a GPU machine carries.
# That keeps the offline heads out (FaceNet's layers from repeat_3 on, about 42 MB each in
# float32): another machine distils them again, and recomputes the settings whose stored side
# runs through them.
set -euo pipefail
max_kb=${LEDGER_MAX_KB:-8192}

usage() {
  echo "usage: $0 export CACHE LEDGER | import LEDGER CACHE" >&2
  exit 2
}
[ $# -eq 3 ] || usage
cmd=$1 src=${2%/} dst=${3%/}
case "$cmd" in export | import) ;; *) usage ;; esac
if [ ! -d "$src" ]; then
  echo "$0: no folder $src" >&2
  exit 1
fi
mkdir -p "$dst"

n=0
shopt -s nullglob
for entry in "$src"/model-* "$src"/offline-* "$src"/record-*.json; do
  name=$(basename "$entry")
  # A stage being written; a distillation's work folder (its feature chunks are large and
  # recomputed: an unfinished head starts again).
  case "$name" in *.tmp | *.tmp.* | *.work) continue ;; esac
  if [ "$cmd" = import ] && [ -e "$dst/$name" ]; then
    continue
  fi
  if [ "$cmd" = export ]; then
    kb=$(du -sk "$entry" | cut -f1)
    if [ "$kb" -gt "$max_kb" ]; then
      echo "$0: not carried: $name ($kb KB > LEDGER_MAX_KB=$max_kb)" >&2
      continue
    fi
  fi
  tmp="$dst/.$name.tmp.$$"
  rm -rf "$tmp"
  cp -r "$entry" "$tmp"
  rm -rf "${dst:?}/$name"
  mv "$tmp" "$dst/$name"
  n=$((n + 1))
done
echo "$cmd: $n entries from $src to $dst"
