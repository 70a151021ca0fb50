#!/usr/bin/env bash
# Issue 20's GPU measurements in one sitting, on one card, from the repo root of an NVIDIA
# machine:
#
#   scripts/gpu_issue20.sh BIN OUT_DIR
#
# BIN: `cargo build --release --features cuda` (.gz or .xz is fine). Needs python3 with torch
# and safetensors (the FP8 file). One random model with Qwen3-30B-A3B's geometry at LAYERS
# layers (default 12) as bf16 safetensors, FP8 (Qwen's 128×128 blocks), GGUF Q8_0 and Q4_K_M
# (scripts/gpu_formats.sh writes them to /dev/shm, the same weights up to each format's
# rounding), then:
#   1. the question per format: `run --no-tui` at the default 25 % (scripts/gpu_formats.sh)
#   2. native decode against candle-transformers on the same file (`bench decode`: its
#      quantized_qwen3_moe for GGUF, qwen3_moe for bf16) for REF_FILES (default "Q4_K_M.gguf
#      Q8_0.gguf bf16"); FP8 alone (candle-transformers has no FP8 model: `bench decode`
#      refuses it as a reference)
#   3. the sweep at 12.5 / 25 / 50 / 100 % of the experts: selective against its bound and the
#      prediction, for DECODE_FILES (default "Q4_K_M.gguf fp8")
# Everything printed lands in OUT_DIR. BENCHMARKS.md says what the runs gave.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_issue20.sh BIN OUT_DIR}
OUT=${2:?usage: scripts/gpu_issue20.sh BIN OUT_DIR}
LAYERS=${LAYERS:-12}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" i20) || exit 1
status=0
D=/dev/shm/formats-${LAYERS}l
echo "== 1. the question per format"
LAYERS=$LAYERS scripts/gpu_formats.sh "$BIN" "$OUT/formats" || status=1
for f in ${REF_FILES:-Q4_K_M.gguf Q8_0.gguf bf16} fp8; do
  echo "== 2. $f: native decode against candle-transformers"
  ref=(); [ "$f" = fp8 ] && ref=(--no-reference)
  "$BIN" bench decode --model "$D/$f" --device cuda:0 --dtype bf16 --prompt-tokens 16 \
    --new-tokens 64 --repeats 3 "${ref[@]}" 2>&1 | tee "$OUT/decode-${f%.gguf}.txt" || status=1
done
for f in ${DECODE_FILES:-Q4_K_M.gguf fp8}; do
  echo "== 3. $f: the sweep against the bound"
  "$BIN" sweep --model "$D/$f" --device cuda:0 --dtype bf16 --capacities 12.5%,25%,50%,100% \
    --policy lru --prompts prompts/standard.toml --max-new-tokens 24 --passes 1 \
    > "$OUT/sweep-${f%.gguf}.txt" 2>&1 || status=1
  tail -25 "$OUT/sweep-${f%.gguf}.txt"
done
exit $status
