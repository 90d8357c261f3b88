#!/usr/bin/env bash
# Last command on the GPU machine (see docs/DEVICE.md): unstage the received parts, run `advface reproduce`
# (JOB=reproduce) or the robustness bench (JOB=bench) on the GPU for at most BUDGET_S seconds,
# and send back what exists in $OUT, also after a timeout: every stage is cached under $WORK,
# so the next command, while the machine is kept up, resumes.
#   JOB (reproduce)  PROFILE (paper; gpu for bench)  DATASETS (bench: "lfw cfp-fp")
#   DEVICE (cuda)  BUDGET_S (480)  PYTHON (python3)  MODELS (1: also return the decoders)
#   ADVFACE_STAGE_DIR (/root/advface-stage)  WORK (/root/advface-work)
set -uo pipefail
stage=${ADVFACE_STAGE_DIR:-/root/advface-stage}
work=${WORK:-/root/advface-work}
out=${OUT:-$work/out}
py=${PYTHON:-python3}
mkdir -p "$work" "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ADVFACE_CACHE_DIR=$work/cache ADVFACE_DATA_ROOT=$work/data
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader; "$py" -c "import torch; print('torch', torch.__version__)") \
  >"$out/device.txt" 2>&1
[ -f "$work/data/advface-staged.json" ] ||
  "$py" scripts/device/device_main.py unstage "$stage" --root "$work/data" || exit 2
job=${JOB:-reproduce}
extra=()
if [ "$job" = bench ]; then
  for d in ${DATASETS:-lfw cfp-fp}; do extra+=(--dataset "$d"); done
  profile=${PROFILE:-gpu}
else
  profile=${PROFILE:-paper}
fi
t0=$(date +%s)
timeout "${BUDGET_S:-480}" "$py" scripts/device/device_main.py "$job" \
  --profile "$profile" --device "${DEVICE:-cuda}" --data-root "$work/data" \
  --weights "$work/data/facenet-fp16.safetensors" --out "$work/run" "${extra[@]}" \
  >"$out/log.txt" 2>&1
rc=$?
echo "$job exit $rc after $(($(date +%s) - t0)) s" | tee -a "$out/device.txt"
tail -c 4000 "$out/log.txt"
# Outputs (tables, report, figures) and the trained decoders, which a later run can send
# back into $WORK/run/cache to resume training elsewhere.
tar czf "$out/results.tar.gz" -C "$work/run" --exclude=./cache . 2>/dev/null
[ "${MODELS:-1}" = 1 ] && (cd "$work/run/cache" 2>/dev/null && ls -d model-* >/dev/null 2>&1 &&
  tar czf "$out/models.tar.gz" --exclude='optimizer.safetensors' model-*)
ls -la "$out"
exit $rc
