#!/usr/bin/env bash
# GGUF files of the bundled model written by llama.cpp's own converter — test data from an
# independent writer for issue 20 (quantized experts). Downloads the llama-cpp-python sdist from
# PyPI (llama.cpp's source is vendored in it; nothing of it is committed), then runs
# convert_hf_to_gguf.py on models/tiny-moe with --outtype bf16 and q8_0 (the converter writes
# Q8_0 itself; the k-quants come from llama-quantize, built from the same source with cmake).
#
#   scripts/make_gguf_fixtures.sh [PYTHON] [WORKDIR]
#
# PYTHON: one with torch, transformers, numpy and safetensors (default
# target/reference-venv/bin/python3, see scripts/setup_reference_python.sh). Writes
#   models/tiny-moe-gguf/tiny-moe-{BF16,Q8_0,Q4_K_M,IQ4_XS,IQ4_NL,MXFP4_MOE}.gguf (ignored by git:
#                                                           19 / 12 / 9 / 9 / 9 / 10 MB)
#   tests/fixtures/gguf/kquant-{Q8_0,Q4_K_M,MXFP4_MOE,MXFP4_ATTN,IQ4_XS,IQ4_NL}.gguf (committed;
#                                                           CI's GGUF tests)
#   tests/fixtures/gguf/kquant-{MXFP4_MOE,IQ4_XS,IQ4_NL}.rows.json (gguf-py's decoding of six
#                                                           expert rows of each)
#   tests/fixtures/gguf/split/kquant-Q4_K_M-0000{1,2,3}-of-00003.gguf   (llama-gguf-split's parts)
# The second pair is a random Qwen3-MoE (2 layers, 4 experts of 256 × 256, top 2, the bundled
# model's tokenizer) whose every row is a whole number of 256-element k-quant blocks — the
# bundled model's 48-wide expert rows are not, so llama-quantize leaves its ffn_down in F16.
# Our tokenizers split text as Qwen2's do, but their vocabularies are our own, so the converter
# does not know their pre-tokenizer hash: scripts/llamacpp_convert.py tells it "qwen2".
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
convert() { # MODEL_DIR OUTTYPE OUTFILE
  PYTHONPATH="$WORK/src/gguf-py:$WORK/src" "$PY" scripts/llamacpp_convert.py "$WORK/src" "$2" "$3" "$1"
}
QUANTIZE="$WORK/build/bin/llama-quantize"
SPLIT="$WORK/build/bin/llama-gguf-split"
if [ ! -x "$QUANTIZE" ] || [ ! -x "$SPLIT" ]; then
  cmake -S "$WORK/src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$WORK/cmake.log"
  cmake --build "$WORK/build" -j"$(nproc)" --target llama-quantize llama-gguf-split > "$WORK/build.log"
fi
for t in bf16 q8_0; do
  convert models/tiny-moe "$t" "$OUT/tiny-moe-$(echo "$t" | tr a-z A-Z).gguf"
done
for q in Q4_K_M IQ4_XS IQ4_NL MXFP4_MOE; do
  "$QUANTIZE" "$OUT/tiny-moe-BF16.gguf" "$OUT/tiny-moe-$q.gguf" "$q" > "$WORK/q.log" 2>&1
done

# The k-quant fixture: a random model whose rows are whole 256-element blocks.
KQ="$WORK/kquant-src"
"$PY" - "$KQ" <<'PYEOF'
import json, shutil, sys, torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
dest = sys.argv[1]
torch.manual_seed(20)
cfg = Qwen3MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
    moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
    norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=1024,
    eos_token_id=[2, 0], pad_token_id=0, bos_token_id=None)
cfg.architectures = ["Qwen3MoeForCausalLM"]
m = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
with torch.no_grad():  # larger than the init's 0.02 so the output is not one token forever
    for p in m.parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.08)
m.save_pretrained(dest)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"models/tiny-moe/{f}", dest)
PYEOF
mkdir -p tests/fixtures/gguf
convert "$KQ" bf16 "$WORK/kquant-BF16.gguf"
# IQ4_XS and IQ4_NL (i-quants that need no importance matrix) put the experts and attention in
# the type, the tied token embedding in Q6_K, as the IQ4_XS files shared for Qwen3-30B-A3B do.
for q in Q8_0 Q4_K_M MXFP4_MOE IQ4_XS IQ4_NL; do
  "$QUANTIZE" "$WORK/kquant-BF16.gguf" "tests/fixtures/gguf/kquant-$q.gguf" "$q" > "$WORK/q.log" 2>&1
done
# A variant other writers make with --tensor-type: MXFP4 outside the experts too (the tied token
# embedding and the query projections), which moescope widens at load.
"$QUANTIZE" --tensor-type token_embd=mxfp4 --tensor-type attn_q=mxfp4 "$WORK/kquant-BF16.gguf" \
  tests/fixtures/gguf/kquant-MXFP4_ATTN.gguf MXFP4_MOE > "$WORK/q.log" 2>&1
# MXFP4_MOE keeps the expert stacks in MXFP4 (candle does not read it; moescope decodes it
# itself): gguf-py's own decoding of row 5 of expert 3 of each stack, for tests/gguf.rs to hold
# moescope's decoding to, bit for bit.
PYTHONPATH="$WORK/src/gguf-py" "$PY" - <<'PYEOF'
import json, numpy as np, gguf
from gguf.quants import dequantize
T = gguf.GGMLQuantizationType
for kind, ty in [("MXFP4_MOE", T.MXFP4), ("IQ4_XS", T.IQ4_XS), ("IQ4_NL", T.IQ4_NL)]:
    r = gguf.GGUFReader(f"tests/fixtures/gguf/kquant-{kind}.gguf")
    rows = {}
    for t in r.tensors:
        if t.tensor_type == ty and "_exps" in t.name:
            d = dequantize(t.data, t.tensor_type).astype(np.float32)
            rows[t.name] = [int(v) for v in d[3, 5].view(np.uint32)]
    assert len(rows) == 6, (kind, sorted(rows))
    with open(f"tests/fixtures/gguf/kquant-{kind}.rows.json", "w") as f:
        json.dump({"expert": 3, "row": 5, "f32_bits": rows}, f, sort_keys=True)
PYEOF
rm -rf tests/fixtures/gguf/split && mkdir -p tests/fixtures/gguf/split
"$SPLIT" --split --split-max-tensors 12 tests/fixtures/gguf/kquant-Q4_K_M.gguf \
  tests/fixtures/gguf/split/kquant-Q4_K_M > "$WORK/split.log"
ls -la "$OUT" tests/fixtures/gguf tests/fixtures/gguf/split
