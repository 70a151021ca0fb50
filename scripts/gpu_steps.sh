#!/usr/bin/env bash
# Issue 22, "know where a step's time goes": `moescope bench steps` on Qwen3-30B-A3B's geometry,
# run on an NVIDIA machine from the repo root:
#
#   scripts/gpu_steps.sh BIN [OUT_DIR]
#
# BIN: a moescope built with `--features cuda` (gzipped is fine). For each layer count in LAYERS
# (default "12 48"; 48 needs ~61 GB in /dev/shm) it writes the random checkpoint once
# (`bench random-checkpoint`), then profiles one decode step (`bench steps`, text and JSON) and
# times native decode the way `generate` runs it (`bench decode --no-reference`, CUDA graphs), so
# the profile's whole-step graph can be checked against real decode steps.
# Writes what it printed to OUT_DIR (default gpu-steps/). A benchmark: BENCHMARKS.md §14.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_steps.sh BIN [OUT_DIR]}
OUT=${2:-gpu-steps}
mkdir -p "$OUT"
LOG="$OUT/steps.txt"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" cuda) || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
"$BIN" bench kernels > /dev/null 2>&1 || true
for L in ${LAYERS:-12 48}; do
  M=/dev/shm/q30-${L}l-bf16
  [ -d "$M" ] || /usr/bin/time -f "$L layers written in %e s" "$BIN" bench random-checkpoint \
    --preset qwen3-30b-a3b-12l --layers "$L" --out "$M" 2>&1 | tail -1 | tee -a "$LOG"
  echo "== $L layers: bench steps" | tee -a "$LOG"
  "$BIN" bench steps --model "$M" --rounds "${ROUNDS:-20}" --save "$OUT/steps-${L}l.json" 2>&1 | tee -a "$LOG"
  echo "== $L layers: bench decode (graphs, 64 new tokens)" | tee -a "$LOG"
  "$BIN" bench decode --model "$M" --device cuda:0 --dtype bf16 --no-reference --new-tokens 64 2>&1 | tee -a "$LOG"
done
