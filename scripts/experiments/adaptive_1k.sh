#!/bin/bash
# Inputs: runs/resrec-lfw-cpu (the README's 30-minute ResRec attacker) and the cpu reproduction
# in runs/reproduce-cpu-v2 (its CelebA ResRec shadow plays the server's).
# A larger adaptive attacker: its own shadow is the 30-min ResRec attacker; 1,000 LFW non-pair
# images protected once (projected AdvFace, T=40, eps 0.2), 6 epochs; then attacked LFW/CFP-FP
# features protected with the server's shadow (the cpu reproduction's CelebA ResRec).
cd "$(dirname "$0")/../.." && . .venv/bin/activate && export ADVFACE_DATA_ROOT=${ADVFACE_DATA_ROOT:-../shared/data}
S=$(ls -d runs/reproduce-cpu-v2/cache/model-shadow-resrec-*)
set -x
/usr/bin/time -f "wall %e s" advface train-recon --arch resrec --train-set lfw-nonpairs \
  --out runs/adaptive-1k --overwrite --epochs 6 --lr 1e-3 --limit 1000 --features advface:runs/resrec-lfw-cpu \
  --no-flip --threads 2 --max-minutes 40 --no-progress
for d in lfw cfp-fp; do
  /usr/bin/time -f "wall %e s" advface attack --attacker runs/adaptive-1k --dataset $d --limit 200 \
    --seed 0 --json --threads 2 --protection "advface:$S" --grid runs/adaptive-1k/grid-$d.png --overwrite \
    > runs/adaptive-1k-$d.json
  /usr/bin/time -f "wall %e s" advface attack --attacker runs/resrec-lfw-cpu --dataset $d --limit 200 \
    --seed 0 --json --threads 2 --protection "advface:$S" > runs/resrec30-advface-$d.json
done
