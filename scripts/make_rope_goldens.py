#!/usr/bin/env python3
"""transformers' logits for the moe fixture under stretched RoPE (YaRN and linear scaling), for
tests/rope_scaling.rs: the same files as tests/fixtures/qwen3-moe-tiny with only the config's
`rope_parameters` changed, in f32 on the CPU.

  target/reference-venv/bin/python3 scripts/make_rope_goldens.py   # scripts/setup_reference_python.sh

Writes tests/fixtures/rope/golden.json: per case the rope_parameters given to transformers and
the last position's logits for each sequence (random token ids, fixed seed), plus the same
sequences' logits with plain RoPE (so a test can tell that scaling changed something).
"""
import json
import pathlib
import random

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/qwen3-moe-tiny"
OUT = ROOT / "tests/fixtures/rope/golden.json"

CASES = {
    # Correction range 0..5 of the 16 frequencies at this geometry: both ends of the ramp.
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
             "original_max_position_embeddings": 64},
    # Every optional setting given, an untruncated range.
    "yarn_explicit": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                      "original_max_position_embeddings": 128, "attention_factor": 1.25,
                      "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    # attention_factor from mscale / mscale_all_dim (DeepSeek's spelling).
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                    "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1].float().tolist()


def main():
    rng = random.Random(7)
    base_cfg = AutoConfig.from_pretrained(FIXTURE)
    seqs = [[rng.randrange(3, base_cfg.vocab_size) for _ in range(n)] for n in (5, 40, 150)]
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "sequences": seqs, "cases": {}}
    plain = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    out["plain"] = [logits(plain, s) for s in seqs]
    for name, params in CASES.items():
        cfg = AutoConfig.from_pretrained(FIXTURE)
        cfg.rope_parameters = dict(params)
        model = AutoModelForCausalLM.from_pretrained(FIXTURE, config=cfg, dtype=torch.float32).eval()
        out["cases"][name] = {"rope_parameters": params, "logits": [logits(model, s) for s in seqs]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
