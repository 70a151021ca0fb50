#!/usr/bin/env python3
"""Make moescope's FP8 fixtures: the bf16 fixtures (tests/fixtures/qwen3-moe-tiny and
qwen3-omni-tiny, made by scripts/make_fixtures.py) quantized the way Qwen publishes its FP8
checkpoints, and transformers' outputs on the dequantised weights.

Rerun (CPU is enough; seconds):
    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch transformers accelerate safetensors numpy
    /tmp/fx/bin/python scripts/make_fp8_fixtures.py        # writes tests/fixtures/fp8/
Deterministic: quantization has no randomness, so a rerun rewrites identical files.

Any other checkpoint in the per-expert safetensors layout (one file or shards + index), e.g. the
bundled model for the benchmarks:
    python scripts/make_fp8_fixtures.py --model models/tiny-moe --out models/tiny-moe-fp8 [--block 128 128]

The scheme (Qwen3-*-FP8, after DeepSeek-V3): `quantization_config = {quant_method: "fp8",
fmt: "e4m3", activation_scheme: "dynamic", weight_block_size: [R, C]}`; every linear layer's
`X.weight` becomes float8_e4m3fn and gains `X.weight_scale_inv` (f32, one per R×C block, the
last block of a row or column partial): for each block, scale = max|W| / 448 and
q = round_to_e4m3(W / scale), so that W ≈ q × scale. The router (`mlp.gate`), norms and the
embedding stay bf16, as in Qwen's files.

What it writes (tests/fixtures/fp8/):
  qwen3-moe-tiny-fp8/   blocks [32, 32] (matrices span up to 4×2 blocks; every dimension a whole
                        number of blocks, which transformers' own FP8 reader requires); lm_head
                        quantized too (a variant some writers produce); golden.json in the format
                        of make_fixtures.py's, made by transformers reading *this FP8 file
                        itself* (its FineGrainedFP8 loader, which without a GPU dequantises every
                        matrix into the model's dtype): logits_f32 with the dequantised matrices
                        in f32, logits_bf16 with them in bf16 ("dequantise, then bf16")
  qwen3-omni-tiny-fp8/  blocks [128, 128] (Qwen's own size: every matrix here is one partial
                        block); 3 shards + index, with the scales of layer 1's experts 0..3 in a
                        different shard from their weights; lm_head tied (not quantized)

Every quantized matrix is checked by dequantising it in numpy with a decoder written from the
e4m3 definition (not torch's), against torch's own float8 → float32 conversion.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (SEQUENCES, PROMPTS, golden(), routing_hooks())

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "fixtures"
OUT = SRC / "fp8"
E4M3_MAX = 448.0


def is_quantized_linear(name: str, quantize_lm_head: bool) -> bool:
    if name.endswith("lm_head.weight"):
        return quantize_lm_head
    return name.endswith("_proj.weight") and ".model.layers." in f".{name}"


def quantize(w: torch.Tensor, block):
    """Block-scaled e4m3 of a [rows, cols] matrix: (q float8_e4m3fn, scale_inv f32), on the CPU.
    Computed on a GPU when there is one (division and the e4m3 cast round the same way there)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = w.to(dev).float()
    rows, cols = w.shape
    br, bc = block
    sr, sc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(sr * br, sc * bc, dtype=torch.float32, device=dev)
    padded[:rows, :cols] = w
    blocks = padded.view(sr, br, sc, bc)
    # Zero padding never raises a block's max |w|.
    scale = (blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX).float()
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    q = q.view(sr * br, sc * bc)[:rows, :cols].contiguous()
    return q.cpu(), scale.cpu()


def e4m3_decode_numpy(bits: np.ndarray) -> np.ndarray:
    """e4m3fn from its definition: sign, 4 exponent bits (bias 7), 3 mantissa bits, exponent 0
    subnormal, S.1111.111 NaN, no infinities."""
    b = bits.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7))
    val = np.where((exp == 0xF) & ((b & 0x7) == 0x7), np.nan, val)
    return sign * val


def dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """W = q × scale per block, in f32 (rounded once), checked two independent ways."""
    rows, cols = q.shape
    br, bc = block
    expanded = s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    by_torch = q.to(torch.float32) * expanded
    bits = q.view(torch.uint8).numpy()
    by_numpy = (e4m3_decode_numpy(bits) * expanded.double().numpy()).astype(np.float32)
    assert not np.isnan(by_numpy).any()
    assert np.array_equal(by_torch.numpy(), by_numpy), "torch and numpy dequantisation differ"
    return by_torch


def convert(state: dict, block, quantize_lm_head: bool, check_first=None):
    """(fp8 state for the file, dequantised f32 state for the reference). Every matrix is checked
    against the numpy decoder, or only the first `check_first` (large checkpoints)."""
    fp8, deq = {}, {}
    checked = 0
    for name, t in state.items():
        if t.dim() == 2 and is_quantized_linear(name, quantize_lm_head):
            q, s = quantize(t, block)
            fp8[name] = q.contiguous()
            fp8[name[: -len("weight")] + "weight_scale_inv"] = s.contiguous()
            if check_first is None or checked < check_first:
                deq[name] = dequantize(q, s, block)
                checked += 1
        else:
            fp8[name] = t
            if check_first is None:
                deq[name] = t.float()
    return fp8, deq


def write_config(src: Path, dst: Path, block):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


def fresh(d: Path):
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def make_moe_tiny():
    from transformers import Qwen3MoeForCausalLM

    src = SRC / "qwen3-moe-tiny"
    block = (32, 32)
    d = OUT / "qwen3-moe-tiny-fp8"
    fresh(d)
    state = load_file(str(src / "model.safetensors"))
    fp8, deq = convert(state, block, quantize_lm_head=True)
    save_file(fp8, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_config(src, d, block)

    # The reference: transformers reading this FP8 file itself. Without a GPU its FineGrainedFP8
    # loader dequantises every matrix into the model's dtype: f32 (the exact dequantised matrix)
    # or bf16 (that rounded to bf16: "dequantise, then bf16").
    def load(dtype):
        m = Qwen3MoeForCausalLM.from_pretrained(
            d, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
        )
        m.eval()
        for name in ("model.layers.2.self_attn.q_proj.weight", "lm_head.weight"):
            got = m.get_parameter(name)
            assert torch.equal(got, deq[name].to(dtype)), f"transformers reads {name} differently"
        e = m.model.layers[0].mlp.experts
        for x in range(8):
            want = torch.cat([deq[f"model.layers.0.mlp.experts.{x}.{p}_proj.weight"] for p in ("gate", "up")])
            assert torch.equal(e.gate_up_proj[x], want.to(dtype)), f"expert {x} differs"
            want = deq[f"model.layers.0.mlp.experts.{x}.down_proj.weight"]
            assert torch.equal(e.down_proj[x], want.to(dtype)), f"expert {x} down differs"
        return m

    def forward(m, ids):
        return m(input_ids=torch.tensor([ids])).logits[0]

    def capture(m, ids):
        routers = [(l, m.model.layers[l].mlp.gate) for l in (0, 2, 3)]
        seen, hs = mf.routing_hooks(m, routers)
        forward(m, ids)
        for h in hs:
            h.remove()
        return {str(k): v for k, v in seen.items()}

    m32, m16 = load(torch.float32), load(torch.bfloat16)
    g = mf.golden(forward, m32, m16, capture)
    g["fp8_block"] = list(block)
    (d / "golden.json").write_text(json.dumps(g) + "\n")
    n = sum(v.numel() for k, v in fp8.items() if v.dtype == torch.float8_e4m3fn)
    print(f"qwen3-moe-tiny-fp8: {n} FP8 weights, blocks {block}")


def make_omni_tiny():
    src = SRC / "qwen3-omni-tiny"
    block = (128, 128)
    d = OUT / "qwen3-omni-tiny-fp8"
    fresh(d)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(src / shard)))
    # Only the thinker's text layers are quantized (audio/visual/talker tensors stay as they are).
    text = {k: v for k, v in state.items() if k.startswith("thinker.model.")}
    fp8_text, _ = convert({k[len("thinker."):]: v for k, v in text.items()}, block, False)
    fp8 = {k: v for k, v in state.items() if not k.startswith("thinker.model.")}
    fp8.update({"thinker." + k: v for k, v in fp8_text.items()})

    def shard_of(name):
        base = name.replace(".weight_scale_inv", ".weight")
        shard = index["weight_map"][base]
        # Scales of layer 1's experts 0..3 live in the next shard: the index, not adjacency,
        # says where a scale is.
        if name.endswith("weight_scale_inv") and ".layers.1.mlp.experts." in name:
            if int(name.split(".")[6]) < 4:
                return "model-00002-of-00003.safetensors"
        return shard

    shards = {}
    for k, v in fp8.items():
        shards.setdefault(shard_of(k), {})[k] = v
    weight_map, total = {}, 0
    for fname, tensors in sorted(shards.items()):
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    out_index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(out_index, indent=2) + "\n")
    write_config(src, d, block)
    print(f"qwen3-omni-tiny-fp8: {len(fp8)} tensors in {len(shards)} shards, blocks {block}")


def quantize_checkpoint(src: Path, dst: Path, block):
    """Any per-expert safetensors checkpoint → FP8 in the same sharding (lm_head kept, as Qwen)."""
    fresh(dst)
    index_path = src / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        if index_path.exists()
        else ["model.safetensors"]
    )
    weight_map, total = {}, 0
    for shard in shards:
        fp8, _ = convert(load_file(str(src / shard)), block, False, check_first=8)
        save_file(fp8, str(dst / shard), metadata={"format": "pt"})
        for k, v in fp8.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    if index_path.exists():
        out_index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index_path.name).write_text(json.dumps(out_index, indent=2) + "\n")
    write_config(src, dst, block)
    print(f"{dst}: {total / 2**20:.1f} MiB in {len(shards)} file(s), blocks {tuple(block)}")


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="quantize this checkpoint instead of the fixtures")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128])
    args = ap.parse_args()
    if args.model:
        if not args.out:
            ap.error("--model needs --out")
        quantize_checkpoint(args.model, args.out, tuple(args.block))
        return 0
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    make_moe_tiny()
    make_omni_tiny()
    print("FP8 fixtures written to", OUT)


if __name__ == "__main__":
    sys.exit(main())
