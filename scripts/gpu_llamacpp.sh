#!/usr/bin/env bash
# llama.cpp's CUDA build against moescope native on the same GPU, the same model and the same
# files (issues 20 and 22): Qwen3-30B-A3B's geometry at LAYERS layers (default 12) written by
# moescope's writer as bf16 safetensors and as GGUF BF16 / Q8_0 / Q4_K_M (one seed: the same
# weights, `bench::random` unit test), then batch-1 decode — `llama-bench -p 16 -n 64 -ngl 99`
# (its defaults otherwise: flash attention auto, f16 KV cache) beside moescope `bench decode
# --no-reference --prompt-tokens 16 --new-tokens 64 --dtype bf16` (bf16 activations).
#
#   scripts/gpu_llamacpp.sh BIN LLAMA.tar.xz OUT_DIR
#
# BIN: `cargo build --release --features cuda` (.xz is fine). LLAMA.tar.xz: llama-bench and its
# shared libraries from llama.cpp built with -DGGML_CUDA=ON for the card's architecture
# (scripts/build_llamacpp_cuda.sh, on the cpu machine with the pip CUDA toolkit; BENCHMARKS.md §30),
# carried to the GPU machine rather than built in its lease.
# SAFETENSORS=0 leaves out the bf16 safetensors directory (its writing and its moescope row).
# Tried on the cpu machine at a small size with llama.cpp's CPU build:
#   PRESET=engine LAYERS=2 DEVICE=cpu REPS=1 WORKDIR=/tmp scripts/gpu_llamacpp.sh \
#     target/release/moescope llama-cpu.tar.xz /tmp/llcmp
set -uo pipefail
BIN=${1:?usage: scripts/gpu_llamacpp.sh BIN LLAMA.tar.xz OUT_DIR}
LLAMA=${2:?usage: scripts/gpu_llamacpp.sh BIN LLAMA.tar.xz OUT_DIR}
OUT=${3:?usage: scripts/gpu_llamacpp.sh BIN LLAMA.tar.xz OUT_DIR}
LAYERS=${LAYERS:-12}
QUANTS=${QUANTS:-"BF16 Q8_0 Q4_K_M"}
REPS=${REPS:-3}
ROUNDS=${ROUNDS:-2}
PRESET=${PRESET:-qwen3-30b-a3b-12l}
DEVICE=${DEVICE:-cuda:0}
SAFETENSORS=${SAFETENSORS:-1}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" llamacpp-cmp) || exit 1
L=/tmp/llamacpp-cuda
mkdir -p "$L" && tar -xJf "$LLAMA" -C "$L" || { echo "cannot unpack $LLAMA"; exit 1; }
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"
status=0
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
D=${WORKDIR:-/dev/shm}/llamacpp-$PRESET-${LAYERS}l
mkdir -p "$D"
[ "$SAFETENSORS" = 0 ] || [ -e "$D/bf16" ] || "$BIN" bench random-checkpoint --preset "$PRESET" --layers "$LAYERS" --out "$D/bf16" > /dev/null 2>&1 || { echo "writing bf16 failed"; exit 1; }
for q in $QUANTS; do
  t=$SECONDS
  [ -e "$D/$q.gguf" ] || "$BIN" bench random-checkpoint --preset "$PRESET" --layers "$LAYERS" --gguf "$q" --out "$D/$q.gguf" > /dev/null 2>&1 || { echo "writing $q failed"; status=1; continue; }
  echo "$q written in $((SECONDS - t)) s"
done
ours() { "$BIN" bench decode --model "$1" --device "$DEVICE" --dtype bf16 --no-reference --prompt-tokens 16 --new-tokens 64 --repeats "$REPS" 2>&1 | grep -E "tok/s decode|on the device"; }
theirs() { "$L/llama-bench" -m "$1" -p 16 -n 64 -ngl 99 -r "$REPS" 2>&1 | grep -E "pp16|tg64|error|failed"; }
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  [ "$SAFETENSORS" = 0 ] || echo "moescope bf16 safetensors: $(ours "$D/bf16")"
  for q in $QUANTS; do
    [ -e "$D/$q.gguf" ] || continue
    [ "$q" = BF16 ] || echo "moescope $q: $(ours "$D/$q.gguf")"
    echo "llama.cpp $q:"; theirs "$D/$q.gguf" || status=1
  done
done
exit $status
