#!/usr/bin/env bash
# GPU fidelity checks and benchmarks for moescope, run on an NVIDIA machine from the repo root.
#
#   scripts/gpu_check.sh BIN [OUT_DIR]
#
# BIN: a moescope built with `cargo build --release --features cuda` (gzipped or xz'd is fine).
# Needs python3 with torch (CUDA) and transformers 5.x. Writes JSON results to OUT_DIR
# (default gpu-results/); BENCHMARKS.md records what they said. About 6 minutes on an H100.
#   1. fidelity: moescope bf16 on the GPU vs transformers bf16 on the GPU vs the f32 goldens;
#      selective == native on the GPU, bit for bit, at several capacities and both scopes; decode
#      steps (moescope's attention kernels) vs transformers' f32 over the same tokens, beside
#      transformers' bf16 and candle's ops (MOESCOPE_ATTN_KERNEL=candle)
#   2. a random checkpoint with Qwen3-30B-A3B's geometry, LAYERS layers (default 12), written
#      in the real per-expert layout
#   3. native decode: moescope vs candle-transformers' qwen3_moe (same files, same process)
#   4. transformers 5.x generate, default and eager experts implementations
#   5. host->device bandwidth (the selective bound)
#   6. selective decode at 100 / 50 / 25 / 12.5 % slot capacity (worker processes, NVML memory)
# The decode kernels' own unit tests are scripts/gpu_unit_tests.sh (a test binary, not BIN).
# Exits non-zero when any identity or fidelity check fails (or a step could not run), and ends
# with one line saying what passed (scripts/gpu_verdict.py judges step 1).
set -uo pipefail
status=0
fail() { echo "gpu check: step $1 failed"; status=1; }
STEPS=${STEPS:-"1 2 3 4 5 6"}
step() { [[ " $STEPS " == *" $1 "* ]]; }
BIN=${1:?usage: scripts/gpu_check.sh BIN [OUT_DIR]}
OUT=${2:-gpu-results}
LAYERS=${LAYERS:-8}
CKPT=${CKPT:-/tmp/moescope-q30-${LAYERS}l}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" cuda) || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

if step 1; then echo "== 1. fidelity"
python3 scripts/gpu_reference.py fidelity --bin "$BIN" > "$OUT/fidelity.json" || fail 1
head -c 3000 "$OUT/fidelity.json"; echo
python3 scripts/gpu_verdict.py "$OUT/fidelity.json" | tee "$OUT/verdict.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; fi

if step 2; then echo "== 2. random checkpoint ($LAYERS layers, Qwen3-30B-A3B geometry)"
[ -f "$CKPT/config.json" ] || "$BIN" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$LAYERS" --out "$CKPT" --shard-size 4GiB || fail 2
cp models/tiny-moe/tokenizer.json models/tiny-moe/tokenizer_config.json "$CKPT/"; fi

if step 3; then echo "== 3. native vs candle-transformers"
"$BIN" bench decode --model "$CKPT" --dtype bf16 --device cuda:0 --repeats 3 --json > "$OUT/decode.json" || fail 3
cat "$OUT/decode.json"; fi

if step 4; then echo "== 4. transformers"
python3 scripts/gpu_reference.py hf-decode --model "$CKPT" > "$OUT/hf.json" || echo '{"error": "transformers run failed"}' > "$OUT/hf.json"
cat "$OUT/hf.json"; fi

if step 5; then echo "== 5. host->device bandwidth"
python3 scripts/gpu_reference.py h2d > "$OUT/h2d.json"; cat "$OUT/h2d.json"; fi

if step 6; then echo "== 6. selective sweep"
# Two passes over the prompts: the second shows selective with a warm slot pool (steady state).
"$BIN" sweep --model "$CKPT" --device cuda:0 --dtype bf16 --capacities "${CAPS:-12.5%,25%,50%,100%}" \
  --prompts prompts/standard.toml --max-new-tokens "${SWEEP_TOKENS:-48}" --passes "${PASSES:-2}" --policy "${POLICY:-lru}" --cache-scope "${SCOPE:-global}" \
  -o "$OUT/sweep.json" | tee "$OUT/sweep.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || fail 6; fi
echo "done: $OUT"
[ -f "$OUT/verdict.txt" ] && cat "$OUT/verdict.txt"
exit $status
