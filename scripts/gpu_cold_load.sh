#!/usr/bin/env bash
# Selective and native load with the checkpoint's pages out of memory (a checkpoint on local
# storage, read for the first time), where registering the expert files for direct copies must
# read them all. Two builds in one sitting, so the comparison is a ratio from one run. On the
# GPU machine, from the repo root:
#
#   scripts/gpu_cold_load.sh BEFORE_BIN AFTER_BIN [ROUNDS]
#
# Writes an 8-layer random checkpoint of Qwen3-30B-A3B's geometry to CKPT (/root/ckpt8: disk,
# not /dev/shm), then per round drops its pages (posix_fadvise DONTNEED) before every command:
# selective with each build, selective staged (MOESCOPE_H2D=staged), native. One line each.
set -uo pipefail
BEFORE=${1:?usage: scripts/gpu_cold_load.sh BEFORE_BIN AFTER_BIN [ROUNDS]}
AFTER=${2:?usage}
ROUNDS=${3:-2}
C=${CKPT:-/root/ckpt8}
source "$(dirname "$0")/unpack_bin.sh"
BEFORE=$(unpack_bin "$BEFORE" before) || exit 1
AFTER=$(unpack_bin "$AFTER" after) || exit 1
if [ ! -f "$C/config.json" ]; then
  "$AFTER" bench random-checkpoint --preset qwen3-30b-a3b-12l --layers 8 --out "$C" --shard-size 4GiB > /dev/null || exit 1
  cp models/tiny-moe/tokenizer.json models/tiny-moe/tokenizer_config.json "$C/"
  sync
fi
drop() { python3 -c "
import glob, os
for f in glob.glob('$C/*.safetensors'):
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)"; }
one() { # LABEL BIN BACKEND [ENV=VAL]
  local label=$1 bin=$2 backend=$3; shift 3
  drop
  env "$@" "$bin" generate --model "$C" --device cuda:0 --dtype bf16 --cache-mem 2GiB --backend "$backend" \
    --prompt "Explain what a mixture-of-experts layer does." --max-new-tokens 64 --json > /tmp/cold.json 2> /tmp/cold.err \
    || { echo "$label failed"; tail -3 /tmp/cold.err; return; }
  python3 - "$label" <<'PY'
import hashlib, json, sys
d = json.load(open("/tmp/cold.json")); t = d["timing"]; c = d.get("cache") or {}
ids = hashlib.sha1(str(d["generated_token_ids"]).encode()).hexdigest()[:8]
print("%-22s load %5.2f s  TTFT %6.3f s  decode %6.1f tok/s  ids %s  %s" % (sys.argv[1], t["load_s"], t["ttft_s"], t["decode_tok_s"], ids, c.get("h2d_path", "")))
PY
}
for r in $(seq "$ROUNDS"); do
  one "before selective" "$BEFORE" selective
  one "after selective" "$AFTER" selective
  one "after staged" "$AFTER" selective MOESCOPE_H2D=staged
  one "after native" "$AFTER" native
done
