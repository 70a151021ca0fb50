#!/usr/bin/env bash
# Stretched RoPE on the GPU: the moe fixture with each RoPE setting of tests/fixtures/rope/golden.json
# (scripts/make_rope_goldens.py: transformers' f32 logits on the CPU), its final logits from
# `moescope logits --device cuda:0` in f32 and bf16 against those goldens, beside plain RoPE's
# distance from them (what ignoring the setting would cost). Run on an NVIDIA machine from the
# repo root:
#
#   scripts/gpu_rope.sh BIN [OUT_DIR]        BIN: a `--features cuda` build (.xz or .gz is fine)
#   DEVICE=cpu scripts/gpu_rope.sh BIN       the same on the CPU (a dry run of the script)
#
# Prints one line per case, dtype and sequence; exits non-zero when an f32 run is further than
# 1e-4 from transformers' or a run fails.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_rope.sh BIN [OUT_DIR]}
OUT=${2:-gpu-results/rope}
mkdir -p "$OUT"
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" rope) || exit 1
python3 - "$BIN" "$OUT" <<'PY'
import json, pathlib, shutil, subprocess, sys, tempfile
binary, out = sys.argv[1], pathlib.Path(sys.argv[2])
import os
DEVICE = os.environ.get("DEVICE", "cuda:0")
g = json.load(open("tests/fixtures/rope/golden.json"))
fix = pathlib.Path("tests/fixtures/qwen3-moe-tiny")
status, rows = 0, []
def logits(model, seq, dtype):
    r = subprocess.run([binary, "logits", "--model", str(model), "--device", DEVICE, "--dtype", dtype,
                        "--tokens", ",".join(map(str, seq))], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    v = json.loads(r.stdout)
    return v["logits"] if isinstance(v, dict) else v
for name, case in g["cases"].items():
    d = pathlib.Path(tempfile.mkdtemp())
    for f in fix.iterdir():
        shutil.copy(f, d / f.name)
    cfg = json.load(open(d / "config.json"))
    cfg["rope_parameters"] = case["rope_parameters"]
    json.dump(cfg, open(d / "config.json", "w"))
    for seq, want, plain in zip(g["sequences"], case["logits"], g["plain"]):
        for dtype in ("f32", "bf16"):
            try:
                got = logits(d, seq, dtype)
            except Exception as e:
                print(f"{name} {dtype} {len(seq)} tokens: FAILED {e}"); status = 1; continue
            diff = max(abs(a - b) for a, b in zip(got, want))
            ignored = max(abs(a - b) for a, b in zip(plain, want))
            rows.append({"case": name, "dtype": dtype, "tokens": len(seq), "max_abs_diff": diff, "plain_rope_diff": ignored})
            print(f"{name:14} {dtype:5} {len(seq):4} tokens: max |diff| {diff:.3g} against transformers f32 "
                  f"(plain RoPE is {ignored:.3g} away)")
            if dtype == "f32" and not diff <= 1e-4:
                status = 1
json.dump(rows, open(out / "rope.json", "w"), indent=1)
print("gpu rope: " + ("passed" if status == 0 else "FAILED"))
sys.exit(status)
PY
