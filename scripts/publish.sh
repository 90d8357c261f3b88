#!/usr/bin/env bash
# Copy a finished reproduction's results (results.json, report, tables, figures, the bench's
# under robustness/) from its run folder into the folder committed beside them, leaving out
# what is recomputed or machine-local: stage caches, logs and files being written. What DEST
# already holds (its README, the ledger) stays.
#
#   bash scripts/publish.sh runs/cpu-full docs/results/cpu-full
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 RUN_DIR DEST" >&2
  exit 2
fi
src=${1%/} dst=${2%/}
if [ ! -f "$src/results.json" ]; then
  echo "$0: $src/results.json is missing: not a reproduction's output folder" >&2
  exit 1
fi
if ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["complete"] else 1)' \
  "$src/results.json"; then
  echo "$0: $src/results.json is not complete (parts_pending): the run has not finished" >&2
  exit 1
fi
n=0
while IFS= read -r -d '' f; do
  rel=${f#"$src"/}
  mkdir -p "$dst/$(dirname "$rel")"
  # Through a temporary name, so an interrupted copy leaves whole files only.
  cp "$f" "$dst/$rel.tmp.$$"
  mv "$dst/$rel.tmp.$$" "$dst/$rel"
  n=$((n + 1))
done < <(find "$src" \( -name cache -o -name '*.work' \) -prune -o -type f \
  ! -name '*.log' ! -name log.txt ! -name '*.tmp' ! -name '*.tmp.*' -print0)
echo "published $n files from $src to $dst"
