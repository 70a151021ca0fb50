#!/usr/bin/env bash
# Stacked experts on a GPU: both fixtures restacked (scripts/restack_experts.py), then greedy
# text (native and selective at 3 experts, bf16 and f32) and f32 logits from the restacked copy
# must equal the per-expert original's. README "On a real checkpoint"; tests/stacked_experts.rs
# checks the same on the CPU.
#
#   scripts/gpu_stacked.sh BIN        # BIN: a --features cuda build (.xz is fine); python3 with torch
#
# Tested on the cpu machine with DEVICE=cpu and a CPU build.
set -u
BIN=${1:?usage: scripts/gpu_stacked.sh BIN}
DEVICE=${DEVICE:-cuda:0}
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" stacked) || exit 1
status=0
for fx in qwen3-moe-tiny qwen3-omni-tiny; do
  st=$(mktemp -d)
  python3 scripts/restack_experts.py "tests/fixtures/$fx" "$st" || exit 1
  for dt in bf16 f32; do
    for backend in native selective; do
      extra=(); [ "$backend" = selective ] && extra=(--cache-experts 3)
      gen() { "$BIN" generate --device "$DEVICE" --dtype "$dt" --model "$1" --backend "$backend" "${extra[@]}" \
                --prompt "The cat sat on" --max-new-tokens 12 --temperature 0 2>/dev/null | head -1; }
      a=$(gen "tests/fixtures/$fx"); b=$(gen "$st")
      if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "$fx $dt $backend: same"; else echo "$fx $dt $backend: DIFFERENT"; status=1; fi
    done
  done
  if cmp -s <("$BIN" logits --device "$DEVICE" --dtype f32 --model "tests/fixtures/$fx" --tokens 1,2,3,4,5) \
            <("$BIN" logits --device "$DEVICE" --dtype f32 --model "$st" --tokens 1,2,3,4,5); then
    echo "$fx f32 logits: identical"
  else
    echo "$fx f32 logits: DIFFERENT"; status=1
  fi
  rm -rf "$st"
done
exit $status
