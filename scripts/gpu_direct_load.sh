#!/usr/bin/env bash
# Issue 19's load goal on the direct path (expert files small enough to be registered with the
# driver): selective load against native load, for two builds in the same sitting, so the
# effect of registering in the background is a ratio from one run. Run from the repo root on
# the GPU machine:
#
#   scripts/gpu_direct_load.sh BEFORE_BIN AFTER_BIN OUT_DIR
#
# Either BIN may be gzipped. Writes an 8-layer random checkpoint of Qwen3-30B-A3B's geometry to
# /dev/shm (~10 GB, so the direct path is taken), then for ROUNDS (2) rounds and each build:
# `generate` native and selective (CACHE_MEM, 2GiB) with --json, and one `run --no-tui` per build.
# One line per command on stdout: load s, decode tok/s, and the cache's miss path.
set -uo pipefail
BEFORE=${1:?usage: scripts/gpu_direct_load.sh BEFORE_BIN AFTER_BIN OUT_DIR}
AFTER=${2:?usage}
OUT=${3:?usage}
LAYERS=${LAYERS:-8}
CKPT=${CKPT:-/dev/shm/moescope-q30-${LAYERS}l}
CACHE_MEM=${CACHE_MEM:-2GiB}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BEFORE=$(unpack_bin "$BEFORE" before) || exit 1
AFTER=$(unpack_bin "$AFTER" after) || exit 1
if [ ! -f "$CKPT/config.json" ]; then
  "$AFTER" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers "$LAYERS" --out "$CKPT" --shard-size 4GiB > "$OUT/ckpt.out" 2>&1 || { tail "$OUT/ckpt.out"; exit 1; }
  cp models/tiny-moe/tokenizer.json models/tiny-moe/tokenizer_config.json "$CKPT/"
fi
du -sh "$CKPT"
common=(--model "$CKPT" --device cuda:0 --dtype bf16 --cache-mem "$CACHE_MEM")
# The first read of fresh files is slower for whichever command comes first: read them once.
"$AFTER" generate "${common[@]}" --backend native --prompt hi --max-new-tokens 2 --json > /dev/null 2>&1
for r in $(seq "$ROUNDS"); do
  for build in before after; do
    bin=$BEFORE; [ "$build" = after ] && bin=$AFTER
    for b in native selective; do
      f="$OUT/generate_${build}_${b}_$r"
      "$bin" generate "${common[@]}" --backend "$b" --prompt "Explain what a mixture-of-experts layer does." \
        --max-new-tokens 64 --json > "$f.json" 2> "$f.err" || { echo "$f failed"; tail -3 "$f.err"; continue; }
      python3 - "$f.json" "$build $b round $r" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); t = d["timing"]; c = d.get("cache") or {}
import hashlib
ids = hashlib.sha1(str(d["generated_token_ids"]).encode()).hexdigest()[:10]
print("%-28s load %6.2f s  decode %6.1f tok/s  tokens %s  hit %s  path %s" % (sys.argv[2], t["load_s"], t["decode_tok_s"], ids, c.get("hit_rate", "-"), c.get("h2d_path", "-")))
PY
    done
  done
done
for build in before after; do
  bin=$BEFORE; [ "$build" = after ] && bin=$AFTER
  "$bin" run "${common[@]}" --no-tui --max-new-tokens 24 --record "$OUT/run_$build.jsonl" > "$OUT/run_$build.out" 2> "$OUT/run_$build.err"
  echo "run $build: rc $?"
  grep -E "load time|decode tok/s|identical|cache hit rate|^verdict" "$OUT/run_$build.out" | sed 's/^/  /'
done
