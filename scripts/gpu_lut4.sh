#!/usr/bin/env bash
# The table-coded GGUF types (IQ4_XS, IQ4_NL, MXFP4) on a GPU, through moescope's block decode
# kernels (src/model/kernels/ggml_blocks.cuh): for each fixture (tests/fixtures/gguf/kquant-*.gguf,
# from llama-quantize; MXFP4_ATTN also holds attention and the embeddings in MXFP4), greedy text
# of native and selective (3 experts, so misses) in bf16 must be the same, and the GPU's bf16 final logits are set against the CPU's f32 ones (how far the
# 8-bit-activation kernels are from the exact product; Q4_K_M, which the kernels took before,
# as the yardstick). README "GGUF files"; tests/gguf.rs checks the CPU side.
#
#   scripts/gpu_lut4.sh BIN CPUBIN   # BIN: a --features cuda build, CPUBIN any build (.xz is fine)
set -u
BIN=${1:?usage: scripts/gpu_lut4.sh BIN CPUBIN}
CPU=${2:-$BIN}
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" lut4) || exit 1
CPU=$(unpack_bin "$CPU" lut4-cpu) || exit 1
DEVICE=${DEVICE:-cuda:0}
status=0
for kind in IQ4_XS IQ4_NL MXFP4_MOE MXFP4_ATTN Q4_K_M; do
  f=tests/fixtures/gguf/kquant-$kind.gguf
  gen() { "$BIN" generate --device "$DEVICE" --dtype bf16 --model "$f" --backend "$1" "${@:2}" \
            --prompt "The cat sat on the" --max-new-tokens 16 --temperature 0 2>/tmp/gen.err | head -1
        cat /tmp/gen.err >&2; }
  a=$(gen native 2>/dev/null); b=$(gen selective --cache-experts 3 2>/tmp/sel.err)
  if [ -n "$a" ] && [ "$a" = "$b" ]; then
    echo "$kind bf16 selective == native: same ($a)"
  else
    echo "$kind bf16 selective == native: DIFFERENT"; echo " native: $a"; echo " selective: $b"
    tail -2 /tmp/sel.err; status=1
  fi
  toks=1,17,300,4000,25,9,777,12,3000,41
  "$BIN" logits --device "$DEVICE" --dtype bf16 --model "$f" --tokens $toks > /tmp/gpu.json 2>/tmp/gpu.err || { cat /tmp/gpu.err; status=1; continue; }
  "$CPU" logits --device cpu --dtype f32 --model "$f" --tokens $toks > /tmp/cpu.json 2>/tmp/cpu.err || { cat /tmp/cpu.err; status=1; continue; }
  python3 - "$kind" <<'PYEOF'
import json, math, sys
g = json.load(open("/tmp/gpu.json")); c = json.load(open("/tmp/cpu.json"))
find = lambda v: v["logits"] if isinstance(v, dict) and "logits" in v else v
g, c = find(g), find(c)
scale = max(abs(x) for x in c)
worst = max(abs(a - b) for a, b in zip(g, c))
def softmax(v):
    m = max(v); e = [math.exp(x - m) for x in v]; s = sum(e); return [x / s for x in e]
pg, pc = softmax(g), softmax(c)
kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pc, pg) if p > 0)
top = lambda v: max(range(len(v)), key=v.__getitem__)
print(f"{sys.argv[1]} GPU bf16 vs CPU f32 final logits: max |d| {worst:.4f} of {scale:.3f} "
      f"({worst / scale:.2%}), KL(cpu||gpu) {kl:.2e}, top-1 {'same' if top(g) == top(c) else 'DIFFERENT'}")
PYEOF
done
exit $status
