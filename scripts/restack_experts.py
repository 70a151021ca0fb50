#!/usr/bin/env python3
"""Restacks a per-expert Qwen3-MoE checkpoint's experts into transformers 5's in-memory layout
(`mlp.experts.gate_up_proj` [E, 2I, H], each expert's gate rows then its up rows, and
`mlp.experts.down_proj` [E, H, I]) in one model.safetensors; sets of experts that are not whole
(the Omni fixture's talker decoy) stay as they are. Used by scripts/gpu_stacked.sh.

    python3 scripts/restack_experts.py SRC_DIR DST_DIR     # torch + safetensors
"""
import json, os, re, shutil, sys
import torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
sd = {}
for f in os.listdir(src):
    if f.endswith(".safetensors"):
        sd.update(load_file(os.path.join(src, f)))
    elif f != "model.safetensors.index.json":
        shutil.copy(os.path.join(src, f), dst)
pat = re.compile(r"(.*\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
groups = {}
for k in list(sd):
    m = pat.fullmatch(k)
    if m:
        groups.setdefault(m.group(1), {})[(int(m.group(3)), m.group(4))] = sd.pop(k)
for base, parts in list(groups.items()):
    n = 1 + max(e for e, _ in parts)
    if len(parts) != 3 * n:  # not a whole set of experts (the Omni fixture's talker decoy): as it was
        for (e, kind), t in parts.items():
            sd[f"{base}.{e}.{kind}_proj.weight"] = t
        del groups[base]
        continue
    sd[base + ".gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)]).contiguous()
    sd[base + ".down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)]).contiguous()
save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
print("restacked", len(groups), "layers into", dst)
