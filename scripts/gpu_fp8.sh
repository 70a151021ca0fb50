#!/usr/bin/env bash
# FP8 checkpoints on a GPU (issue 20), run on an NVIDIA machine from the repo root:
#
#   scripts/gpu_fp8.sh BIN [OUT_DIR]
#
# BIN: a moescope built with `--features cuda` (gzipped is fine). Needs python3 with torch and
# safetensors (scripts/make_fp8_fixtures.py quantizes on the GPU).
#   1. the FP8 fixtures (and one with bf16 scales) on the GPU: logits against the same binary on
#      the CPU (f32), and selective == native (tokens) in f32 and bf16
#   2. LAYERS (default 12) layers of Qwen3-30B-A3B's geometry written in bf16 (`bench
#      random-checkpoint`) and quantized to FP8 with Qwen's scheme (128×128 blocks)
#   3. selective == native on the FP8 file at 25 %; native decode, FP8 against the bf16 file
#   4. selective decode at 100 / 50 / 25 / 12.5 % of the experts (token ids, 64 new tokens); at
#      100 % the GPU fills its own slots, then once more with MOESCOPE_FILL=0 (the host fills)
#   5. `run --no-tui` at the default 25 % on both files: memory saved and speed ratio per format
# STEPS="1 2 3" runs only those steps (2 must have run on the machine before 3–5).
# Writes what it printed to OUT_DIR (default gpu-fp8/). A benchmark: BENCHMARKS.md §12.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_fp8.sh BIN [OUT_DIR]}
OUT=${2:-gpu-fp8}
LAYERS=${LAYERS:-12}
mkdir -p "$OUT"
LOG="$OUT/fp8.txt"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" cuda) || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$BIN" bench kernels > /dev/null 2>&1 || true
want() { [[ " ${STEPS:-1 2 3 4 5} " == *" $1 "* ]]; }

want 1 && echo "== 1. fixtures" | tee -a "$LOG"
# Another writer's variant: the same model with its scales stored in bf16 (GPU misses then take
# the converting path, not the as-stored copy).
BS=/tmp/moescope-fp8-bf16-scales
want 1 && rm -rf "$BS" && cp -r tests/fixtures/fp8/qwen3-moe-tiny-fp8 "$BS" && python3 - "$BS" <<'PY'
import glob, sys, torch
from safetensors.torch import load_file, save_file
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    t = load_file(f)
    save_file({k: (v.to(torch.bfloat16) if k.endswith("weight_scale_inv") else v) for k, v in t.items()}, f, metadata={"format": "pt"})
PY
want 1 && for M in tests/fixtures/fp8/qwen3-moe-tiny-fp8 tests/fixtures/fp8/qwen3-omni-tiny-fp8 "$BS"; do
  fx=$(basename "$M")
  for dev in cpu cuda:0; do
    "$BIN" logits --model "$M" --device "$dev" --tokens 1,72,101,108,10,20,30 > "$OUT/$fx-${dev%%:*}.json" 2>> "$LOG"
    "$BIN" logits --model "$M" --device "$dev" --dtype bf16 --tokens 1,72,101,108,10,20,30 > "$OUT/$fx-${dev%%:*}-bf16.json" 2>> "$LOG"
  done
  python3 - "$OUT/$fx-cpu.json" "$OUT/$fx-cuda.json" "$fx" "$OUT/$fx-cuda-bf16.json" "$OUT/$fx-cpu-bf16.json" <<'PY' | tee -a "$LOG"
import json, sys
a, b, gb, cb = (json.load(open(p))["logits"] for p in sys.argv[1:3] + sys.argv[4:6])
d = lambda u, v: max(abs(x - y) for x, y in zip(u, v))
print(f"{sys.argv[3]}: f32 logits GPU vs CPU max abs diff {d(a, b):.3e} (largest |logit| {max(map(abs, a)):.2f}); "
      f"bf16 (a 7-token prompt: the dequantised-stack path on the GPU) vs the CPU's f32: GPU {d(gb, a):.3e}, CPU bf16 {d(cb, a):.3e}")
PY
  for dt in f32 bf16; do
    "$BIN" generate --model "$M" --device cuda:0 --dtype $dt --token-ids 1 72 101 108 --max-new-tokens 24 --json > "$OUT/n.json" 2>> "$LOG"
    "$BIN" generate --model "$M" --device cuda:0 --dtype $dt --backend selective --cache-experts 3 --token-ids 1 72 101 108 --max-new-tokens 24 --json > "$OUT/s.json" 2>> "$LOG"
    python3 - "$OUT/n.json" "$OUT/s.json" "$fx $dt" <<'PY' | tee -a "$LOG"
import json, sys
a, b = (json.load(open(p))["generated_token_ids"] for p in sys.argv[1:3])
print(f"{sys.argv[3]}: selective tokens == native tokens on the GPU: {a == b} ({len(a)} tokens)")
PY
  done
done

B=/dev/shm/q30-${LAYERS}l-bf16
F=/dev/shm/q30-${LAYERS}l-fp8
want 2 && echo "== 2. write and quantize" | tee -a "$LOG"
want 2 && [ ! -d "$B" ] && /usr/bin/time -f "bf16 written in %e s" "$BIN" bench random-checkpoint \
  --preset qwen3-30b-a3b-12l --layers "$LAYERS" --out "$B" 2>&1 | tail -2 | tee -a "$LOG"
want 2 && [ ! -d "$F" ] && /usr/bin/time -f "quantized in %e s" python3 scripts/make_fp8_fixtures.py \
  --model "$B" --out "$F" 2>&1 | tail -2 | tee -a "$LOG"
want 2 && du -sh "$B" "$F" | tee -a "$LOG"

IDS=$(seq 11 26 | tr '\n' ' ')
if want 3; then
echo "== 3. identity at 25 % and native decode" | tee -a "$LOG"
"$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --token-ids $IDS --max-new-tokens 32 --json > "$OUT/fp8-native.json" 2>> "$LOG"
"$BIN" generate --model "$F" --device cuda:0 --dtype bf16 --backend selective --cache-experts $((LAYERS * 128 / 4)) --token-ids $IDS --max-new-tokens 32 --json > "$OUT/fp8-selective.json" 2>> "$LOG"
python3 - "$OUT/fp8-native.json" "$OUT/fp8-selective.json" <<'PY' | tee -a "$LOG"
import json, sys
a, b = (json.load(open(p))["generated_token_ids"] for p in sys.argv[1:3])
print(f"FP8 30B geometry: selective tokens == native tokens: {a == b} ({len(a)} tokens)")
PY
fi
want 3 && for M in "$F" "$B"; do
  "$BIN" bench decode --model "$M" --device cuda:0 --dtype bf16 --no-reference --prompt-tokens 16 --new-tokens 64 --repeats 3 2>&1 | tail -1 | tee -a "$LOG"
done

want 4 && echo "== 4. selective decode" | tee -a "$LOG"
want 4 && for M in "$F" "$B"; do
  for pct in 100 50 25 12.5; do
    n=$(python3 -c "print(int($LAYERS*128*$pct/100))")
    echo "-- $(basename $M) $pct % ($n experts)" | tee -a "$LOG"
    "$BIN" generate --model "$M" --device cuda:0 --dtype bf16 --backend selective --cache-experts "$n" --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$LOG"
  done
  # 100 % again with the host filling the slots (MOESCOPE_FILL=0): what GPU self-fill is worth.
  echo "-- $(basename $M) 100 % with host fills (MOESCOPE_FILL=0)" | tee -a "$LOG"
  MOESCOPE_FILL=0 "$BIN" generate --model "$M" --device cuda:0 --dtype bf16 --backend selective --cache-experts $((LAYERS * 128)) --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$LOG"
  "$BIN" generate --model "$M" --device cuda:0 --dtype bf16 --token-ids $IDS --max-new-tokens 64 2>&1 | tail -1 | tee -a "$LOG"
done

want 5 && echo "== 5. the question per format (run --no-tui, 25 %)" | tee -a "$LOG"
want 5 && for M in "$B" "$F"; do
  "$BIN" run --no-tui --model "$M" --device cuda:0 --dtype bf16 --max-new-tokens 32 2>&1 \
    | grep -E "peak|expected weights|memory reduction|verdict \(|hit rate|decode" | tee -a "$LOG"
done
