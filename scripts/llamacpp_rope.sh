#!/usr/bin/env bash
# Stretched RoPE in GGUF files against llama.cpp's own logits: the bundled model with
# `rope_parameters` set to YaRN (and to linear scaling) in its config.json, converted by
# llama.cpp's convert_hf_to_gguf.py to F32 (which writes `qwen3moe.rope.scaling.*`), then
# `llama-perplexity --kl-divergence-base` on prompts/reference.txt (-c 64) and `moescope bench
# kld` on the same file; beside it, moescope on the same file with the scaling keys left out
# (a plain-RoPE file of the same weights) — what reading the file as plain RoPE would cost.
#
#   scripts/llamacpp_rope.sh BIN [PYTHON] [WORKDIR]
#
# BIN: a moescope release build. PYTHON and WORKDIR as scripts/make_gguf_fixtures.sh (which
# fetches llama.cpp's source); llama-perplexity is built as scripts/llamacpp_compare.sh builds
# it. Prints one line a comparison.
set -euo pipefail
BIN=${1:?usage: scripts/llamacpp_rope.sh BIN [PYTHON] [WORKDIR]}
PY=${2:-target/reference-venv/bin/python3}
WORK=${3:-${TMPDIR:-/tmp}/moescope-llamacpp}
B="$WORK/build-noamx"
[ -x "$B/bin/llama-perplexity" ] || { echo "build llama-perplexity first (scripts/llamacpp_compare.sh)" >&2; exit 2; }
OUT=$(mktemp -d)
convert() { # MODEL_DIR OUTFILE
  PYTHONPATH="$WORK/src/gguf-py:$WORK/src" "$PY" scripts/llamacpp_convert.py "$WORK/src" f32 "$2" "$1" \
    > "$2.log" 2>&1
}
for case in yarn linear; do
  m="$OUT/tiny-moe-$case"
  cp -r models/tiny-moe "$m"
  "$PY" - "$m/config.json" "$case" <<'PYEOF'
import json, sys
path, case = sys.argv[1:]
c = json.load(open(path))
c["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64}
                        if case == "yarn" else
                        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
json.dump(c, open(path, "w"), indent=1)
PYEOF
  f="$OUT/tiny-moe-$case-F32.gguf"
  convert "$m" "$f"
  # The same file without its scaling keys: what a reader that ignores them runs.
  "$PY" - "$f" "$OUT/tiny-moe-$case-plain.gguf" "$WORK/src/gguf-py" <<'PYEOF'
import sys
src, dst, gguf_py = sys.argv[1:]
sys.path.insert(0, gguf_py)
import gguf
r = gguf.GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(dst, arch)
for name, field in r.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture" or ".rope.scaling." in name \
            or name.endswith(".rope.scale_linear"):
        continue
    vt = field.types[0]
    val = field.contents()
    if vt == gguf.GGUFValueType.ARRAY:
        w.add_key_value(name, val, vt, sub_type=field.types[-1])
    else:
        w.add_key_value(name, val, vt)
for t in r.tensors:
    w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PYEOF
  grep -a "rope scaling" "$f.log" | tail -1 || true
  base="$OUT/$case.bin"
  "$B/bin/llama-perplexity" -m "$f" -f prompts/reference.txt -c 64 -b 64 -t 2 \
    --kl-divergence-base "$base" > "$base.log" 2>&1
  echo "$case: moescope f32 on the scaled file against llama.cpp:"
  "$BIN" bench kld --model "$f" --base "$base" --dtype f32 | tail -2
  echo "$case: moescope f32 on the same weights read as plain RoPE against llama.cpp:"
  "$BIN" bench kld --model "$OUT/tiny-moe-$case-plain.gguf" --base "$base" --dtype f32 | tail -2
done
echo "files in $OUT"
