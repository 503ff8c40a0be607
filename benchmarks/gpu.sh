#!/usr/bin/env bash
# Every GPU claim of the project in one run, under 8 minutes on one H100/H200 (see benchmarks/gpu.py):
# device agreement, per-image cost against batch size, occlusion against Captum at a large batch,
# batched I-GOS against one image at a time, IBA, leaderboard images per second, LRP's cost; then a
# guided training step against a plain one (benchmarks/training.py at batch 64 of 224x224 images).
# Writes benchmarks/results/gpu.{md,json} and training-gpu.{md,json} (OUT_DIR to write elsewhere).
# DEVICE=cpu with --tiny checks the script itself in seconds (the tests run gpu.py that way).
set -euo pipefail
cd "$(dirname "$0")/.."
export SALIENCYLAB_PROGRESS=0 PYTHONUNBUFFERED=1
"${PYTHON:-python3}" benchmarks/gpu.py --device "${DEVICE:-cuda}" --out "${OUT_DIR:-benchmarks/results}" "$@"
case " $* " in *" --tiny "*) exit 0 ;; esac
"${PYTHON:-python3}" benchmarks/training.py --device "${DEVICE:-cuda}" --threads 0 --batch 64 --size 224 \
    --width 64 --name training-gpu --out "${OUT_DIR:-benchmarks/results}"
