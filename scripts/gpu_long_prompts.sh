#!/usr/bin/env bash
# Long prompts on the GPU: prefill and decode speed, and the card's memory peak, against the
# prompt's length, for one or more CUDA builds alternated in one sitting (BENCHMARKS.md §51, §54).
# Run on an NVIDIA machine from the repo root:
#
#   scripts/gpu_long_prompts.sh OUT_DIR NAME=BIN [NAME=BIN ...]
#
# BIN: a moescope built with `--features cuda` (.xz or .gz is fine). ENV_NAME, when set, holds
# variables a build runs with (e.g. ENV_candle=MOESCOPE_MOE_KERNEL=candle with candle=BIN: the
# same binary on candle's MoE GEMM); one BIN may appear under several names. The model is Qwen3-30B-A3B's
# geometry at LAYERS layers (default 12), random bf16 weights, written once to /dev/shm. For each
# prompt length in TOKENS (default "16 512 1024 2048 4000 8000") and each round (ROUNDS, default 2)
# every build runs `bench decode --no-reference --prompt-tokens T --new-tokens 32 --repeats 3`
# while `nvidia-smi` samples the memory in use every 20 ms; the largest sample, less the memory
# in use before the run, is the run's peak (weights, KV cache and the prefill's temporaries).
# Writes OUT_DIR/long-prompts.tsv: build, tokens, round, prefill tok/s, decode tok/s, peak MiB.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_long_prompts.sh OUT_DIR NAME=BIN [NAME=BIN ...]}; shift
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
declare -A BINS; NAMES=()
for nb in "$@"; do
  name=${nb%%=*}; bin=${nb#*=}
  BINS[$name]=$(unpack_bin "$bin" "$name") || exit 1; NAMES+=("$name")
done
L=${LAYERS:-12}
M=/dev/shm/q30-${L}l-bf16
first=${BINS[${NAMES[0]}]}
[ -f "$M/config.json" ] || "$first" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$L" --out "$M" > /dev/null || exit 1
TSV="$OUT/long-prompts.tsv"
printf 'build\ttokens\tround\tprefill_tok_s\tdecode_tok_s\tpeak_mib\n' > "$TSV"
status=0
for T in ${TOKENS:-16 512 1024 2048 4000 8000}; do
  for r in $(seq 1 "${ROUNDS:-2}"); do
    for name in "${NAMES[@]}"; do
      base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$OUT/mem.txt" &
      smi=$!
      envs="ENV_$name"
      env ${!envs:-} "${BINS[$name]}" bench decode --model "$M" --device cuda:0 --dtype bf16 --no-reference \
        --prompt-tokens "$T" --new-tokens 32 --repeats 3 --json > "$OUT/run.json" 2> "$OUT/run.err"
      rc=$?
      kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
      peak=$(sort -n "$OUT/mem.txt" | tail -1)
      if [ $rc -ne 0 ]; then
        echo "$name T=$T round $r failed: $(tail -2 "$OUT/run.err")"; status=1
        printf '%s\t%s\t%s\tfail\tfail\t%s\n' "$name" "$T" "$r" "$((peak - base))" >> "$TSV"
        continue
      fi
      python3 - "$OUT/run.json" "$name" "$T" "$r" "$((peak - base))" >> "$TSV" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rows = j if isinstance(j, list) else [j]
o = rows[0]
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{o['ours_prefill_tok_s']:.0f}\t{o['ours_tok_s']:.1f}\t{sys.argv[5]}")
PY
      tail -1 "$TSV"
    done
  done
done
exit $status
