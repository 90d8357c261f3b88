#!/usr/bin/env bash
# Run or resume `advface reproduce --profile cpu-full` on a 2-core machine (after
# scripts/setup.sh, with ADVFACE_DATA_ROOT set); rerun to resume.
#
# The decoders and offline heads train in one two-thread process (their time budgets count CPU
# time per thread). Once results.json says both are done, the rest runs in two one-thread
# processes, which give about a fifth more throughput on two cores: the main run (LFW, then
# CFP-FP, then the robustness bench, writing the results) and a helper that runs the
# robustness bench first and then computes CFP-FP's stages for the main run to reuse.
#
# It starts by importing LEDGER (the trained networks and finished settings that an earlier
# machine exported, committed beside the results; the bench's networks under
# LEDGER/robustness) into OUT's caches, so a fresh machine resumes where the ledger stands
# rather than from nothing. `export` writes the ledger from OUT's caches (scripts/ledger.sh).
#
#   OUT=runs/cpu-full bash scripts/cpu-full.sh     # logs: OUT/log.txt and OUT/helper.log
#   bash scripts/cpu-full.sh export                # OUT's finished work -> LEDGER
# (PROFILE and BENCH name other reproduce and bench profiles, e.g. smoke to try it.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/cpu-full}"
PROFILE="${PROFILE:-cpu-full}"
BENCH="${BENCH:-cpu}"
LEDGER="${LEDGER:-docs/results/$PROFILE/ledger}"
if [ "${1:-}" = export ]; then
  bash scripts/ledger.sh export "$OUT/cache" "$LEDGER"
  if [ -d "$OUT/robustness/cache" ]; then
    bash scripts/ledger.sh export "$OUT/robustness/cache" "$LEDGER/robustness"
  fi
  exit 0
fi
mkdir -p "$OUT/cache" "$OUT/robustness/cache"
if [ -d "$LEDGER" ]; then
  bash scripts/ledger.sh import "$LEDGER" "$OUT/cache" >> "$OUT/log.txt"
fi
if [ -d "$LEDGER/robustness" ]; then
  bash scripts/ledger.sh import "$LEDGER/robustness" "$OUT/robustness/cache" >> "$OUT/log.txt"
fi
# shellcheck source=/dev/null
. .venv/bin/activate
# Every face set it reads, aligned whole and side by side first (a fresh machine's LFW and CFP
# take about 15 minutes; a complete set is checked in seconds): the run would otherwise align
# the subsets it needs one after another.
nice -n 19 advface prepare lfw --no-progress >> "$OUT/log.txt" 2>&1 &
aligning=$!
nice -n 19 advface prepare cfp --no-progress >> "$OUT/log.txt" 2>&1
wait "$aligning"
nice -n 19 advface prepare celeba --no-progress >> "$OUT/log.txt" 2>&1
# A simple command, so that `&` gives advface's own pid (for kill) rather than a subshell's.
RUN=(nice -n 19 advface reproduce --profile "$PROFILE" --out "$OUT" --quiet)

networks_done() {
  python - "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path

p = Path(sys.argv[1])
done = json.loads(p.read_text()).get("parts_done", []) if p.is_file() else []
sys.exit(0 if "offline heads" in done else 1)
EOF
}

if ! networks_done; then
  echo "$(date -u +%FT%TZ) decoders and offline heads (one process)" >> "$OUT/log.txt"
  # Stops after the heads are written (results.json marked partial), then goes on below.
  "${RUN[@]}" --threads 2 >> "$OUT/log.txt" 2>&1 &
  main=$!
  until networks_done || ! kill -0 "$main" 2>/dev/null; do sleep 60; done
  if ! kill -0 "$main" 2>/dev/null; then
    wait "$main"  # it ended: done, or failed (its status is this script's)
    exit $?
  fi
  kill "$main" && wait "$main" 2>/dev/null || true
fi

echo "$(date -u +%FT%TZ) stages in two processes" >> "$OUT/log.txt"
(
  # A failed bench must not keep CFP-FP's stages from running: the main run reruns the bench
  # at its end (from whatever the helper cached) and reports a failure there.
  OMP_NUM_THREADS=1 nice -n 19 advface bench --profile "$BENCH" --out "$OUT/robustness" --quiet ||
    { rc=$?; echo "$(date -u +%FT%TZ) bench failed (exit $rc); going on with CFP-FP's stages"; }
  "${RUN[@]}" --datasets cfp-fp --threads 1 --stages-only
) >> "$OUT/helper.log" 2>&1 &
helper=$!
# The helper must not outlive the main run (a rerun would start a second one on its chunks).
trap 'pkill -TERM -P "$helper" 2>/dev/null; kill "$helper" 2>/dev/null || true' EXIT
"${RUN[@]}" --threads 1 >> "$OUT/log.txt" 2>&1
wait "$helper"
