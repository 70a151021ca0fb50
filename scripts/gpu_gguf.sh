#!/usr/bin/env bash
# GGUF on a GPU (issue 20), run on an NVIDIA machine from the repo root:
#
#   scripts/gpu_gguf.sh BIN [OUT_DIR]
#
# BIN: a moescope built with `--features cuda` (gzipped or xz-compressed is fine). LAYERS (default 12) layers of
# Qwen3-30B-A3B's geometry are written as GGUF files by moescope's own writer (`bench
# random-checkpoint --gguf`, candle's quantizer; llama.cpp's converter does not run there), then:
#   1. selective == native on the GPU, greedy tokens, Q8_0 and Q4_K_M, at 25 % of the experts
#   2. native decode: moescope against candle-transformers' quantized_qwen3_moe (same file)
#   3. selective decode at 100 / 50 / 25 / 12.5 % of the experts (token ids, 64 new tokens); at
#      100 % the GPU fills its own slots, then once more with MOESCOPE_FILL=0 (the host fills)
#   4. `run --no-tui` at the default 25 %: memory saved and speed ratio for this format
#   5. the sweep at 12.5 / 25 / 50 / 100 %: selective against its bound, and the prediction
# STEPS="1 4" runs only those steps (the file is written whenever it is missing).
# Writes what it printed to OUT_DIR (default gpu-gguf/). A benchmark: BENCHMARKS.md §12.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_gguf.sh BIN [OUT_DIR]}
OUT=${2:-gpu-gguf}
LAYERS=${LAYERS:-12}
QUANTS=${QUANTS:-"Q4_K_M Q8_0"}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" cuda) || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$BIN" bench kernels > /dev/null 2>&1 || true
want() { [[ " ${STEPS:-1 2 3 4 5} " == *" $1 "* ]]; }
IDS=$(seq 11 26 | tr '\n' ' ')
for q in $QUANTS; do
  F=/dev/shm/q30-${LAYERS}l-$q.gguf
  [ -f "$F" ] || /usr/bin/time -f "written in %e s" "$BIN" bench random-checkpoint \
    --preset qwen3-30b-a3b-12l --layers "$LAYERS" --gguf "$q" --out "$F" 2>&1 | tee -a "$OUT/$q.txt"
  ls -la "$F" | tee -a "$OUT/$q.txt"
  if want 1; then
  echo "== $q 1. identity" | tee -a "$OUT/$q.txt"
  "$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --token-ids $IDS --max-new-tokens 32 --json > "$OUT/$q-native.json" 2>> "$OUT/$q.txt"
  "$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --backend selective --cache-experts $((LAYERS * 128 / 4)) --token-ids $IDS --max-new-tokens 32 --json > "$OUT/$q-selective.json" 2>> "$OUT/$q.txt"
  python3 - "$OUT/$q-native.json" "$OUT/$q-selective.json" <<'PY' | tee -a "$OUT/$q.txt"
import json, sys
a, b = (json.load(open(p))["generated_token_ids"] for p in sys.argv[1:3])
print(f"selective tokens == native tokens: {a == b} ({len(a)} tokens)")
PY
  fi
  want 2 && echo "== $q 2. native decode vs candle-transformers quantized_qwen3_moe" | tee -a "$OUT/$q.txt"
  want 2 && "$BIN" bench decode --model "$F" --device cuda:0 --dtype bf16 --prompt-tokens 16 --new-tokens 64 --repeats 3 2>&1 | tee -a "$OUT/$q.txt"
  if want 3; then
  echo "== $q 3. selective decode" | tee -a "$OUT/$q.txt"
  for pct in 100 50 25 12.5; do
    n=$(python3 -c "print(int($LAYERS*128*$pct/100))")
    echo "-- $pct % ($n experts)" | tee -a "$OUT/$q.txt"
    "$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --backend selective --cache-experts "$n" --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$OUT/$q.txt"
  done
  # 100 % again with the host filling the slots (MOESCOPE_FILL=0): what GPU self-fill is worth.
  echo "-- 100 % with host fills (MOESCOPE_FILL=0)" | tee -a "$OUT/$q.txt"
  MOESCOPE_FILL=0 "$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --backend selective --cache-experts $((LAYERS * 128)) --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$OUT/$q.txt"
  "$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$OUT/$q.txt"
  fi
  want 4 && echo "== $q 4. the question for this format (run --no-tui, 25 %)" | tee -a "$OUT/$q.txt"
  want 4 && "$BIN" run --no-tui --model "$F" --device cuda:0 --dtype bf16 --max-new-tokens 32 2>&1 \
    | grep -E "peak|expected weights|memory reduction|verdict \(|hit rate|decode" | tee -a "$OUT/$q.txt"
  want 5 && echo "== $q 5. sweep against the bound" | tee -a "$OUT/$q.txt"
  want 5 && "$BIN" sweep --model "$F" --device cuda:0 --dtype bf16 --capacities 12.5%,25%,50%,100% \
    --policy lru --prompts prompts/standard.toml --max-new-tokens 24 --passes 1 2>&1 | tail -25 | tee -a "$OUT/$q.txt"
done
