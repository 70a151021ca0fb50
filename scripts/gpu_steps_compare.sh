#!/usr/bin/env bash
# Several CUDA builds' decode steps side by side in one sitting (issue 22's native goal, BENCHMARKS.md
# §57): `moescope bench steps` on Qwen3-30B-A3B's geometry, the builds alternated round by round so
# that each is compared with the others on the same card at the same time. Run on an NVIDIA machine
# from the repo root:
#
#   scripts/gpu_steps_compare.sh OUT_DIR NAME=BIN [NAME=BIN ...]
#
# BIN: a moescope built with `--features cuda` (.xz or .gz is fine). LAYERS (default "12 48"; 48
# layers need ~61 GB in /dev/shm, written once and removed at the end), FORMATS (default "bf16";
# also fp8 — Qwen's 128×128 block scheme from the bf16 files, scripts/make_fp8_fixtures.py, which
# needs python3 with torch and safetensors — and GGUF types such as Q4_K_M or Q8_0, moescope's
# writer; the checkpoint's layers and seed, so the same weights up to each format's rounding;
# BENCHMARKS.md §58), ROUNDS (default 2), TOKENS
# (the prompt before the profiled step, default 16) and STAGE_ROUNDS (`bench steps --rounds`,
# default 10 at 12 layers, 5 above). The first build writes the random checkpoints. Writes each
# run's table to OUT_DIR/steps-LAYERS[-FORMAT]-NAME-ROUND.txt and one line a run to
# OUT_DIR/steps.tsv: layers, format, build, round, whole-step µs, % of the bound, the
# attention, router, gate_up and down stages' µs a step, and gate_up's and down's inside the step.
# Exits non-zero when a run fails.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_steps_compare.sh OUT_DIR NAME=BIN [NAME=BIN ...]}; shift
[ $# -ge 1 ] || { echo "usage: scripts/gpu_steps_compare.sh OUT_DIR NAME=BIN [NAME=BIN ...]" >&2; exit 2; }
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
declare -A BINS; NAMES=()
for nb in "$@"; do
  name=${nb%%=*}; bin=${nb#*=}
  case "$name" in ''|*[!A-Za-z0-9_-]*) echo "a build's name must be letters, digits, - or _: '$name'" >&2; exit 2 ;; esac
  [ -f "$bin" ] || { echo "no such build: $bin" >&2; exit 2; }
  BINS[$name]=$(unpack_bin "$bin" "$name") || exit 1; NAMES+=("$name")
done
first=${BINS[${NAMES[0]}]}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
TSV="$OUT/steps.tsv"
printf 'layers\tformat\tbuild\tround\twhole_us\tpct_of_bound\tattention_us\trouter_us\tgate_up_us\tdown_us\tgate_up_in_step_us\tdown_in_step_us\n' > "$TSV"
# The µs a step of a stage row of `bench steps`' table ("| attention | 12 | 291.7 | …"); with a
# third argument, of its second table (the stage inside the chained step, BENCHMARKS.md §118;
# empty for builds before it).
stage() { awk -F'|' -v s="$2" -v second="${3:-}" '/^inside the step/ {inside=1} {n=$2; gsub(/^ +| +$/, "", n)} n == s && (second == "" || inside) {gsub(/ /, "", $4); print $4; exit}' "$1"; }
status=0
for L in ${LAYERS:-12 48}; do
  B=/dev/shm/q30-${L}l-bf16
  made=()
  if [ ! -f "$B/config.json" ]; then
    "$first" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$L" --out "$B" > /dev/null || { echo "writing $B failed" >&2; exit 1; }
    made+=("$B")
  fi
  sr=${STAGE_ROUNDS:-$([ "$L" -le 12 ] && echo 10 || echo 5)}
  for fmt in ${FORMATS:-bf16}; do
    case "$fmt" in
      bf16) M=$B; tag=$L ;;
      fp8) M=/dev/shm/q30-${L}l-fp8; tag=$L-fp8
        if [ ! -f "$M/config.json" ]; then
          python3 scripts/make_fp8_fixtures.py --model "$B" --out "$M" > "$OUT/write-$tag.out" 2>&1 || { echo "writing $M failed: $(tail -2 "$OUT/write-$tag.out")"; status=1; continue; }
          made+=("$M")
        fi ;;
      *) M=/dev/shm/q30-${L}l-$fmt.gguf; tag=$L-$fmt
        if [ ! -f "$M" ]; then
          "$first" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$L" --gguf "$fmt" --out "$M" > "$OUT/write-$tag.out" 2>&1 || { echo "writing $M failed: $(tail -2 "$OUT/write-$tag.out")"; status=1; continue; }
          made+=("$M")
        fi ;;
    esac
    for r in $(seq 1 "${ROUNDS:-2}"); do
      for name in "${NAMES[@]}"; do
        f="$OUT/steps-$tag-$name-$r.txt"
        if ! "${BINS[$name]}" bench steps --model "$M" --prompt-tokens "${TOKENS:-16}" --rounds "$sr" > "$f" 2>&1; then
          echo "$name, $L layers $fmt, round $r failed: $(tail -2 "$f")"; status=1; continue
        fi
        whole=$(sed -n 's/^whole-step graph: \([0-9.]*\) µs.* = \([0-9.]*\) % of the bound.*/\1\t\2/p' "$f")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$L" "$fmt" "$name" "$r" "$whole" \
          "$(stage "$f" attention)" "$(stage "$f" 'router (top-k)')" "$(stage "$f" 'experts gate_up')" \
          "$(stage "$f" 'experts down + residual')" "$(stage "$f" 'experts gate_up' in)" \
          "$(stage "$f" 'experts down + residual' in)" >> "$TSV"
        tail -1 "$TSV"
      done
    done
  done
  # What this run wrote past 12 layers goes (61 GB at 48 in bf16); 12-layer files stay for reruns.
  if [ "$L" -gt 12 ] && [ ${#made[@]} -gt 0 ]; then rm -rf "${made[@]}"; fi
done
exit $status
