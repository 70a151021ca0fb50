#!/usr/bin/env bash
# GGUF files of the bundled model written by llama.cpp's own converter — test data from an
# independent writer for issue 20 (quantized experts). Downloads the llama-cpp-python sdist from
# PyPI (llama.cpp's source is vendored in it; nothing of it is committed), then runs
# convert_hf_to_gguf.py on models/tiny-moe with --outtype bf16 and q8_0 (the converter writes
# Q8_0 itself; the k-quants need llama-quantize, built from the same source — not done here).
#
#   scripts/make_gguf_fixtures.sh [PYTHON] [WORKDIR]
#
# PYTHON: one with torch, numpy and safetensors (default target/reference-venv/bin/python3, see
# scripts/setup_reference_python.sh). Writes models/tiny-moe-gguf/tiny-moe-{BF16,Q8_0}.gguf.
# Our tokenizers split text as Qwen2's do, but their vocabularies are our own, so the converter
# does not know their pre-tokenizer hash: the wrapper below tells it "qwen2".
set -euo pipefail
PY=${1:-target/reference-venv/bin/python3}
WORK=${2:-${TMPDIR:-/tmp}/moescope-llamacpp}
OUT=models/tiny-moe-gguf
mkdir -p "$WORK" "$OUT"
if [ ! -d "$WORK/src" ]; then
  "$PY" - "$WORK" <<'PYEOF'
import json, sys, tarfile, urllib.parse, urllib.request
work = sys.argv[1]
base = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(base, timeout=60))
sdist = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
path = f"{work}/{sdist['filename']}"
urllib.request.urlretrieve(urllib.parse.urljoin(base, sdist["url"]), path)
with tarfile.open(path) as t:
    t.extractall(f"{work}/unpacked", filter="data")
import glob, os
src = glob.glob(f"{work}/unpacked/*/vendor/llama.cpp")[0]
os.symlink(src, f"{work}/src")
print("llama.cpp from llama-cpp-python", meta["info"]["version"])
PYEOF
fi
for t in bf16 q8_0; do
  T=$(echo "$t" | tr a-z A-Z)
  PYTHONPATH="$WORK/src/gguf-py:$WORK/src" "$PY" - "$WORK/src" "$t" "$OUT/tiny-moe-$T.gguf" <<'PYEOF'
import runpy, sys
src, outtype, out = sys.argv[1:]
sys.path.insert(0, src)
import conversion.base as base
# Our tokenizers pre-tokenize as Qwen2's (see models/tiny-moe/README.md).
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", "models/tiny-moe", "--outtype", outtype, "--outfile", out]
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
PYEOF
done
ls -la "$OUT"
