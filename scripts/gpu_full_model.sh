#!/usr/bin/env bash
# Issue 19, "the full model, measured": a random checkpoint of Qwen3-30B-A3B's full geometry
# (48 layers, 128 experts, the real per-expert layout, ~61 GB bf16) on one GPU, every command a
# user runs on it, timed. Run from the repo root on the GPU machine (/dev/shm must hold 61 GB):
#
#   scripts/gpu_full_model.sh BIN OUT_DIR
#
# BIN: `cargo build --release --features cuda` (gzipped is fine). PARTS (default "A B") picks
# what runs, so the work fits the device's 10-minute calls; the checkpoint is written once and
# reused while the machine stays up:
#   A. write the checkpoint; `verify`; `generate` with each backend (load time, decode, peak RSS);
#      `run --no-tui` with the default (alternate) and the sequential schedule to a verdict
#   B. `sweep` at 12.5 / 25 / 50 / 100 % (one pass); `run --schedule sequential --cold`
# Every command's stdout/stderr lands in OUT_DIR/NAME.{out,err}; one line per command on stdout
# gives its exit code, wall time and peak RSS (the process and its workers).
# Environment: BACKENDS and SCHEDULES (part A's generate and run subsets), LAYERS (48), PRESET, CKPT, DEVICE (cuda:0), CACHE_MEM (12GiB), TOKENS (24),
# MOESCOPE_H2D (left to the settings' auto rule unless set).
# Tested on the cpu machine at a small size: LAYERS=2 PRESET=engine DEVICE=cpu DTYPE=f32
# CACHE_MEM=4MiB scripts/gpu_full_model.sh target/release/moescope /tmp/full
set -uo pipefail
BIN=${1:?usage: scripts/gpu_full_model.sh BIN OUT_DIR}
OUT=${2:?usage: scripts/gpu_full_model.sh BIN OUT_DIR}
PARTS=${PARTS:-"A B"}
LAYERS=${LAYERS:-48}
PRESET=${PRESET:-qwen3-30b-a3b-12l}
CKPT=${CKPT:-/dev/shm/moescope-q30-${LAYERS}l}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bf16}
CACHE_MEM=${CACHE_MEM:-12GiB}
TOKENS=${TOKENS:-24}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" full) || exit 1
status=0
part() { [[ " $PARTS " == *" $1 "* ]]; }

# NAME CMD...: runs CMD with stdout/stderr to OUT/NAME.*, prints exit code, wall seconds and the
# peak RSS of the command and every child it waited for (the workers of `run` and `sweep`).
timed() {
  local name=$1; shift
  python3 - "$OUT/$name" "$@" <<'EOF'
import resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.monotonic()
with open(out + ".out", "wb") as o, open(out + ".err", "wb") as e:
    rc = subprocess.run(cmd, stdout=o, stderr=e).returncode
wall = time.monotonic() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
print(f"{out.rsplit('/', 1)[-1]}: rc {rc}, wall {wall:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
sys.exit(rc)
EOF
  local rc=$?
  [ "$rc" -eq 0 ] || { status=1; tail -5 "$OUT/$name.err"; }
  return $rc
}

common=(--model "$CKPT" --device "$DEVICE" --dtype "$DTYPE")
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if part A; then
  if [ ! -f "$CKPT/config.json" ]; then
    timed random_checkpoint "$BIN" bench random-checkpoint --preset "$PRESET" --layers "$LAYERS" --out "$CKPT" --shard-size 4GiB
    cp models/tiny-moe/tokenizer.json models/tiny-moe/tokenizer_config.json "$CKPT/"
  fi
  du -sh "$CKPT" | tee "$OUT/size.txt"
  timed verify "$BIN" verify "$CKPT"
  for b in ${BACKENDS:-native selective}; do
    timed "generate_$b" "$BIN" generate "${common[@]}" --backend "$b" --cache-mem "$CACHE_MEM" \
      --prompt "Explain what a mixture-of-experts layer does." --max-new-tokens 64 --json
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); t=d["timing"]; c=d.get("cache") or {}
print("  load %.2f s, decode %.1f tok/s, hit rate %s" % (t["load_s"], t["decode_tok_s"], c.get("hit_rate", "-")))' "$OUT/generate_$b.out"
  done
  for s in ${SCHEDULES:-alternate sequential}; do
    timed "run_$s" "$BIN" run "${common[@]}" --cache-mem "$CACHE_MEM" --no-tui --schedule "$s" \
      --max-new-tokens "$TOKENS" --record "$OUT/run_$s.jsonl"
    grep -E "load time|decode tok/s|memory peak|GPU \(peak\)|expected weights|cache hit rate|^memory reduction|^verdict" "$OUT/run_$s.out" | sed 's/^/  /'
  done
fi

if part B; then
  [ -f "$CKPT/config.json" ] || { echo "no checkpoint at $CKPT: run part A first"; exit 1; }
  timed sweep "$BIN" sweep "${common[@]}" --capacities 12.5%,25%,50%,100% --passes 1 \
    --max-new-tokens "$TOKENS" -o "$OUT/sweep.json"
  cat "$OUT/sweep.out"
  timed run_cold "$BIN" run "${common[@]}" --cache-mem "$CACHE_MEM" --no-tui --schedule sequential --cold \
    --max-new-tokens "$TOKENS" --record "$OUT/run_cold.jsonl"
  grep -E "load time|decode tok/s|memory peak|GPU \(peak\)|expected weights|cache hit rate|^memory reduction|^verdict" "$OUT/run_cold.out" | sed 's/^/  /'
fi
exit $status
