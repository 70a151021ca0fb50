#!/usr/bin/env bash
# Issue 22, "the staged path": selective decode on Qwen3-30B-A3B's full geometry (48 layers, the
# real per-expert layout, ~61 GB bf16 in /dev/shm) where the expert files exceed half the host's
# available memory: by default the files that fit in that half are registered and the rest's
# misses staged (BENCHMARKS.md §90); `MOESCOPE_H2D=staged` stages every miss, as the Jetson Thor
# does. The sweep at CAPS against its bound (native's step plus the missed bytes at each path's
# own measured rate; staged: read and copied), then `run --no-tui` at CACHE_MEM: selective's
# tokens and logits must equal native's. BENCHMARKS.md §27, §84, §90.
#
#   scripts/gpu_staged.sh BIN OUT_DIR
#
# BIN: `cargo build --release --features cuda` (.gz or .xz is fine). Environment: CAPS
# (12.5%,25%,50%,100%), PASSES (1), TOKENS (24), LAYERS (48), CKPT, CACHE_MEM (12GiB), RUN (1: the
# identity run); MOESCOPE_* settings pass through (`MOESCOPE_H2D=staged` forces the path where
# the files would fit). Every command's output lands in OUT_DIR/NAME.{out,err}.
# Tested on the cpu machine at a small size (the staged path only exists on a GPU):
#   LAYERS=2 PRESET=engine DEVICE=cpu DTYPE=f32 CACHE_MEM=4MiB scripts/gpu_staged.sh target/release/moescope /tmp/staged
set -uo pipefail
BIN=${1:?usage: scripts/gpu_staged.sh BIN OUT_DIR}
OUT=${2:?usage: scripts/gpu_staged.sh BIN OUT_DIR}
LAYERS=${LAYERS:-48}
PRESET=${PRESET:-qwen3-30b-a3b-12l}
CKPT=${CKPT:-/dev/shm/moescope-q30-${LAYERS}l}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bf16}
CAPS=${CAPS:-12.5%,25%,50%,100%}
TOKENS=${TOKENS:-24}
CACHE_MEM=${CACHE_MEM:-12GiB}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" staged) || exit 1
status=0
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ ! -f "$CKPT/config.json" ]; then
  t=$SECONDS
  "$BIN" bench random-checkpoint --preset "$PRESET" --layers "$LAYERS" --out "$CKPT" --shard-size 4GiB > "$OUT/checkpoint.out" 2>&1 || { echo "checkpoint failed"; tail -5 "$OUT/checkpoint.out"; exit 1; }
  cp models/tiny-moe/tokenizer.json models/tiny-moe/tokenizer_config.json "$CKPT/"
  echo "checkpoint: $((SECONDS - t)) s"
fi
free -g | head -2
common=(--model "$CKPT" --device "$DEVICE" --dtype "$DTYPE")
t=$SECONDS
"$BIN" sweep "${common[@]}" --capacities "$CAPS" --passes "${PASSES:-1}" \
  --max-new-tokens "$TOKENS" -o "$OUT/sweep.json" > "$OUT/sweep.out" 2> "$OUT/sweep.err"
rc=$?
echo "== sweep: rc $rc, $((SECONDS - t)) s"
cat "$OUT/sweep.out"
[ "$rc" -eq 0 ] || { status=1; tail -5 "$OUT/sweep.err"; }
if [ "${RUN:-1}" = 1 ]; then
  t=$SECONDS
  "$BIN" run "${common[@]}" --cache-mem "$CACHE_MEM" --no-tui --max-new-tokens "$TOKENS" \
    --record "$OUT/run.jsonl" > "$OUT/run.out" 2> "$OUT/run.err"
  rc=$?
  echo "== run: rc $rc, $((SECONDS - t)) s"
  grep -E "^\| (decode tok/s|memory peak|cache hit rate)|^memory reduction|^verdict" "$OUT/run.out"
  [ "$rc" -eq 0 ] || { status=1; tail -5 "$OUT/run.err"; }
fi
exit $status
