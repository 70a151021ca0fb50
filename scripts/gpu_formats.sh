#!/usr/bin/env bash
# Issue 20's question per format, in one sitting on one GPU: the same random model with
# Qwen3-30B-A3B's geometry (LAYERS layers, default 12) as bf16 safetensors, FP8 (Qwen's 128×128
# block scheme, scripts/make_fp8_fixtures.py), and GGUF Q8_0 and Q4_K_M (moescope's writer: the
# same seed, so the same weights up to each format's rounding), each through `run --no-tui` at
# the default 25 % capacity: memory saved and selective's speed against native's. FORMATS picks
# (default "bf16 fp8 Q8_0 Q4_K_M"; any `bench random-checkpoint --gguf` type too, such as
# MXFP4_MOE or IQ4_XS_MOE: BENCHMARKS.md §87).
#
#   scripts/gpu_formats.sh BIN OUT_DIR
#
# BIN: `cargo build --release --features cuda` (.gz or .xz is fine). Needs python3 with torch and
# safetensors (the FP8 quantization). Files go to /dev/shm (about 31 GB at 12 layers). Each run's
# output lands in OUT_DIR/FORMAT.out; the summary lines are printed. BENCHMARKS.md §12.
# RUN=0 writes the files and stops (scripts/gpu_issue20.sh writes them beside other work).
set -uo pipefail
BIN=${1:?usage: scripts/gpu_formats.sh BIN OUT_DIR}
OUT=${2:?usage: scripts/gpu_formats.sh BIN OUT_DIR}
LAYERS=${LAYERS:-12}
TOKENS=${TOKENS:-32}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" formats) || exit 1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
D=/dev/shm/formats-${LAYERS}l
mkdir -p "$D"
write() { # WHAT PATH COMMAND...
  local what=$1 path=$2; shift 2
  [ -e "$path" ] && return 0
  local t=$SECONDS
  "$@" > "$OUT/write-$what.out" 2>&1 || { echo "writing $what failed"; tail -3 "$OUT/write-$what.out"; status=1; return 1; }
  echo "$what written in $((SECONDS - t)) s: $(du -sh "$path" | cut -f1)"
}
FORMATS=${FORMATS:-bf16 fp8 Q8_0 Q4_K_M}
files=()
for fmt in $FORMATS; do
  case "$fmt" in
    bf16) write bf16 "$D/bf16" "$BIN" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$LAYERS" --out "$D/bf16"
      files+=(bf16) ;;
    fp8) write bf16 "$D/bf16" "$BIN" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$LAYERS" --out "$D/bf16"
      write fp8 "$D/fp8" python3 scripts/make_fp8_fixtures.py --model "$D/bf16" --out "$D/fp8"
      files+=(fp8) ;;
    *) write "$fmt" "$D/$fmt.gguf" "$BIN" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$LAYERS" --gguf "$fmt" --out "$D/$fmt.gguf"
      files+=("$fmt.gguf") ;;
  esac
done
[ "${RUN:-1}" = 1 ] || exit $status
for f in "${files[@]}"; do
  [ -e "$D/$f" ] || continue
  t=$SECONDS
  "$BIN" run --no-tui --model "$D/$f" --device cuda:0 --dtype bf16 --max-new-tokens "$TOKENS" \
    > "$OUT/${f%.gguf}.out" 2> "$OUT/${f%.gguf}.err"
  rc=$?
  echo "== $f: rc $rc, $((SECONDS - t)) s"
  grep -E "^\| +(decode tok/s|memory peak|of which GPU|expected weights|cache hit rate)|^memory reduction|^verdict" "$OUT/${f%.gguf}.out"
  [ "$rc" -eq 0 ] || { status=1; tail -5 "$OUT/${f%.gguf}.err"; }
done
exit $status
