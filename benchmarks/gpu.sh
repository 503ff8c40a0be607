#!/usr/bin/env bash
# Every GPU claim of the project in one run, under 8 minutes on one H100/H200 (see benchmarks/gpu.py):
# device agreement, per-image cost against batch size, occlusion against Captum at a large batch,
# batched I-GOS against one image at a time, IBA, leaderboard images per second, LRP's cost.
# Writes benchmarks/results/gpu.md and gpu.json (OUT_DIR to write elsewhere). DEVICE=cpu with --tiny
# checks the script itself in seconds (the tests do this).
set -euo pipefail
cd "$(dirname "$0")/.."
export SALIENCYLAB_PROGRESS=0 PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu.py --device "${DEVICE:-cuda}" --out "${OUT_DIR:-benchmarks/results}" "$@"
