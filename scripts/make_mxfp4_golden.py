#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/mxfp4-quantize.json: rows of f32 values and the MXFP4 blocks that
gguf-py (llama.cpp's own Python package, `gguf.quants.MXFP4.quantize_blocks`, the same rule as
its C `quantize_row_mxfp4_ref`) encodes them to — the golden for `lut4::quantize_row`, which
`bench random-checkpoint --gguf MXFP4_MOE` writes expert stacks with.

Rerun (numpy needed; gguf-py comes with the llama-cpp-python sdist, see make_gguf_fixtures.sh):
    target/reference-venv/bin/python scripts/make_mxfp4_golden.py /tmp/moescope-llamacpp/src/gguf-py
"""
import json
import sys

import numpy as np

sys.path.insert(0, sys.argv[1])
from gguf.quants import MXFP4  # noqa: E402

rng = np.random.default_rng(20261203)
rows = [
    rng.normal(0, 0.02, 64),  # weights at a checkpoint's scale
    rng.normal(0, 3.0, 64) * (rng.random(64) < 0.5),  # half zeros, large values
    np.concatenate([np.zeros(32), rng.normal(0, 1e-3, 32)]),  # a block of zeros
    # exact codes and midpoints between them at one scale (ties go to the first code)
    np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7] * 2
             + [-v for v in [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7]] * 2),
]
out = []
for r in rows:
    x = np.asarray(r, dtype=np.float32)
    blocks = MXFP4.quantize_blocks(x.reshape(-1, 32))
    out.append({"values": [float(v) for v in x], "blocks": blocks.reshape(-1).tolist()})
json.dump({"made_by": "scripts/make_mxfp4_golden.py (gguf-py MXFP4.quantize_blocks)", "rows": out},
          open("tests/fixtures/gguf/mxfp4-quantize.json", "w"))
print("wrote", len(out), "rows")
