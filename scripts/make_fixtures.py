#!/usr/bin/env python3
"""Make moescope's fidelity fixtures: tiny random checkpoints of both families in the real on-disk
layout, a tiny tokenizer, and golden outputs computed by HF transformers.

Rerun (CPU is enough; ~1 minute):
    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch==2.11.0 transformers==5.17.0 tokenizers
    /tmp/fx/bin/python scripts/make_fixtures.py            # writes tests/fixtures/
Deterministic: fixed seeds, so a rerun with the same versions rewrites identical files.

What it writes (tests/fixtures/):
  tokenizer/                     byte-level BPE (vocab 384) with Qwen's special tokens + chat template
  qwen3-moe-tiny/                Qwen3MoeForCausalLM: 4 layers (layer 1 dense via mlp_only_layers),
                                 8 experts top-2, head_dim 32 != hidden/heads, untied lm_head,
                                 norm_topk_prob false, one model.safetensors (bf16, per-expert tensors)
  qwen3-omni-tiny/               Qwen3-Omni thinker: 3 layers, 8 experts top-2, norm_topk_prob true,
                                 M-RoPE config, tied embeddings; `thinker.` names; audio_tower, visual,
                                 talker and code2wav tensors present; 3 shards + index, with layer 1's
                                 experts split across two shards
  */golden.json                  transformers' outputs on those files:
    logits_f32[i]   final-position logits of sequences[i], f32 compute from the bf16 weights
    all_logits_f32  every position's logits for sequences[2] (teacher-forced scoring)
    logits_bf16[i]  the same in bf16 compute (to size the bf16 tolerance)
    greedy[j]       20 greedy tokens after prompts[j] (f32), with each step's top-1/top-2 margin
    routing         experts selected per (layer, position) for sequences[2]
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file, load_file

import transformers
from transformers import (
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeThinkerConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = """The capital of France is Paris. Two plus two is four, and 2 + 2 = 4.
A mixture of experts routes each token to a few experts chosen by a small router.
The cache keeps the experts that were used recently, and loads the others from disk.
Rivers run to the sea; the sea gives rain back to the hills, and the hills feed the rivers.
Once upon a time a small robot learned to read the stars and count the waves.
Memory is measured in bytes: a gibibyte is 1024 mebibytes, and a mebibyte is 1024 kibibytes.
"""

SEQUENCES = [
    [5],
    [11, 42, 7, 300, 128],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 200, 250, 17, 33, 64, 383],
]
PROMPTS = [[1, 72, 101, 108], [10, 20, 30, 40, 50, 60, 70]]


def make_tokenizer(dest: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tok.get_vocab_size()


def split_experts(state: dict, prefix: str, num_layers: int, moe_layers: list) -> dict:
    """transformers 5 holds experts fused ([E, 2I, H] gate_up, [E, H, I] down); the real files
    keep one tensor per expert and projection. Write them that way."""
    out = {}
    for name, t in state.items():
        if ".mlp.experts.gate_up_proj" in name or ".mlp.experts.down_proj" in name:
            continue
        out[name] = t
    for l in moe_layers:
        base = f"{prefix}model.layers.{l}.mlp.experts"
        gu = state[f"{base}.gate_up_proj"]
        down = state[f"{base}.down_proj"]
        inter = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            out[f"{base}.{e}.gate_proj.weight"] = gu[e, :inter].contiguous()
            out[f"{base}.{e}.up_proj.weight"] = gu[e, inter:].contiguous()
            out[f"{base}.{e}.down_proj.weight"] = down[e].contiguous()
    return out


def bf16_state(model) -> dict:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def golden(forward, model_f32, model_bf16, capture_routing) -> dict:
    g = {"transformers": transformers.__version__, "torch": torch.__version__}
    g["sequences"] = SEQUENCES
    g["prompts"] = PROMPTS
    with torch.no_grad():
        g["logits_f32"] = [forward(model_f32, s)[-1].tolist() for s in SEQUENCES]
        g["all_logits_f32"] = forward(model_f32, SEQUENCES[2]).tolist()
        g["logits_bf16"] = [forward(model_bf16, s)[-1].float().tolist() for s in SEQUENCES]
        greedy = []
        for p in PROMPTS:
            ids = list(p)
            margins = []
            for _ in range(20):
                logits = forward(model_f32, ids)[-1]
                top = torch.topk(logits, 2)
                margins.append(float(top.values[0] - top.values[1]))
                ids.append(int(top.indices[0]))
            greedy.append({"prompt": p, "tokens": ids[len(p):], "margins": margins})
        g["greedy"] = greedy
        g["routing"] = capture_routing(model_f32, SEQUENCES[2])
    return g


def routing_hooks(model, routers):
    """Records the top-k experts each router picks: {layer: [[e, ...] per position]}."""
    seen = {}

    def hook(layer):
        def fn(_mod, _inp, out):
            # router returns (logits, scores, indices)
            seen[layer] = out[2].tolist()

        return fn

    handles = [r.register_forward_hook(hook(l)) for l, r in routers]
    return seen, handles


def make_qwen3_moe(vocab: int):
    torch.manual_seed(1234)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        bos_token_id=None,
    )
    model = Qwen3MoeForCausalLM(cfg)
    # Random init gives near-uniform routing and tiny norms; widen so tokens and experts differ.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "gate.weight" not in n else 0.5)
    d = OUT / "qwen3-moe-tiny"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cfg.save_pretrained(d)
    state = split_experts(bf16_state(model), "", 4, [0, 2, 3])
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "do_sample": False}) + "\n")
    copy_tokenizer(d)

    def load(dtype):
        m = Qwen3MoeForCausalLM.from_pretrained(
            d, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
        )
        m.eval()
        return m

    def forward(m, ids):
        return m(input_ids=torch.tensor([ids])).logits[0]

    def capture(m, ids):
        routers = [(l, m.model.layers[l].mlp.gate) for l in (0, 2, 3)]
        seen, hs = routing_hooks(m, routers)
        forward(m, ids)
        for h in hs:
            h.remove()
        return {str(k): v for k, v in seen.items()}

    m32 = load(torch.bfloat16).float()
    m16 = load(torch.bfloat16)
    check_roundtrip(m16, d / "model.safetensors", "")
    g = golden(forward, m32, m16, capture)
    (d / "golden.json").write_text(json.dumps(g) + "\n")
    print("qwen3-moe-tiny:", sum(p.numel() for p in m32.parameters()), "params")


def check_roundtrip(model, path, prefix):
    """The per-expert file must load into transformers with exactly the weights we wrote."""
    disk = load_file(str(path))
    sd = model.state_dict()
    for name, t in sd.items():
        full = prefix + name
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
            continue
        assert full in disk, f"{full} missing on disk"
        assert torch.equal(disk[full].to(t.dtype), t), f"{full} differs after loading"


def make_omni(vocab: int):
    torch.manual_seed(4321)
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
            "interleaved": True,
            "mrope_interleaved": True,
        },
    )
    audio = dict(
        num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        d_model=16, output_dim=64, n_window=4, n_window_infer=8, conv_chunksize=4,
        downsample_hidden_size=8, max_source_positions=32,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
        patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    thinker_cfg = Qwen3OmniMoeThinkerConfig(
        text_config=text, audio_config=audio, vision_config=vision, tie_word_embeddings=True
    )
    thinker_cfg._attn_implementation = "eager"
    model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "mlp.gate.weight" not in n else 0.5)
    d = OUT / "qwen3-omni-tiny"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    full = Qwen3OmniMoeConfig(
        thinker_config=thinker_cfg.to_dict(),
        talker_config={"thinker_hidden_size": 64},
        code2wav_config={},
        enable_audio_output=True,
    )
    full.save_pretrained(d)
    state = {"thinker." + k: v for k, v in bf16_state(model).items()}
    state = split_experts(state, "thinker.", 3, [0, 1, 2])
    # Tensors of parts we never run, so tests prove they are skipped unread.
    state["talker.model.embed_tokens.weight"] = torch.randn(16, 8).to(torch.bfloat16)
    state["talker.model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(4, 8).to(torch.bfloat16)
    state["code2wav.decoder.0.conv.weight"] = torch.randn(4, 4).to(torch.bfloat16)
    # Tied embeddings: the real tied files carry no lm_head; drop it if present.
    state.pop("thinker.lm_head.weight", None)

    # Shards: 1 = embeddings, layer 0, layer 1's experts 0..3 ; 2 = layer 1 rest, layer 2, norm ;
    # 3 = audio/visual/talker/code2wav (never opened by moescope).
    def shard_of(name):
        if not name.startswith("thinker.model.") and not name.startswith("thinker.lm_head"):
            return 3
        if name.startswith("thinker.model.layers.1.mlp.experts."):
            e = int(name.split(".")[6])
            return 1 if e < 4 else 2
        if name.startswith("thinker.model.layers.0.") or name.startswith("thinker.model.embed"):
            return 1
        return 2

    shards = {1: {}, 2: {}, 3: {}}
    for k, v in state.items():
        shards[shard_of(k)][k] = v
    weight_map = {}
    total = 0
    for i, tensors in shards.items():
        fname = f"model-0000{i}-of-00003.safetensors"
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}) + "\n")
    copy_tokenizer(d)

    # Reload the thinker from the per-expert shards (strip the prefix) to prove the layout loads.
    disk = {}
    for i in (1, 2, 3):
        disk.update(load_file(str(d / f"model-0000{i}-of-00003.safetensors")))
    thinker_sd = {k[len("thinker."):]: v for k, v in disk.items() if k.startswith("thinker.")}

    def load(dtype):
        m = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_cfg)
        fused = {}
        for l in range(3):
            base = f"model.layers.{l}.mlp.experts"
            gates = [thinker_sd[f"{base}.{e}.gate_proj.weight"] for e in range(8)]
            ups = [thinker_sd[f"{base}.{e}.up_proj.weight"] for e in range(8)]
            downs = [thinker_sd[f"{base}.{e}.down_proj.weight"] for e in range(8)]
            fused[f"{base}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)])
            fused[f"{base}.down_proj"] = torch.stack(downs)
        sd = {k: v for k, v in thinker_sd.items() if ".mlp.experts." not in k}
        sd.update(fused)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        assert not missing and not unexpected, (missing, unexpected)
        m.tie_weights()
        assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
        m.config._experts_implementation = "eager"
        m.eval()
        return m.to(dtype)

    def forward(m, ids):
        ids_t = torch.tensor([ids])
        return m(input_ids=ids_t).logits[0]

    def capture(m, ids):
        routers = [(l, m.model.layers[l].mlp.gate) for l in range(3)]
        seen, hs = routing_hooks(m, routers)
        forward(m, ids)
        for h in hs:
            h.remove()
        return {str(k): v for k, v in seen.items()}

    m32 = load(torch.float32)
    m16 = load(torch.bfloat16)
    g = golden(forward, m32, m16, capture)
    (d / "golden.json").write_text(json.dumps(g) + "\n")
    print("qwen3-omni-tiny: thinker", sum(p.numel() for p in m32.parameters()), "params")


def copy_tokenizer(d: Path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(OUT / "tokenizer" / f, d / f)


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(OUT / "tokenizer")
    assert vocab == 384, vocab
    make_qwen3_moe(vocab)
    make_omni(vocab)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    sys.exit(main())
