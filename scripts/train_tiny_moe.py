#!/usr/bin/env python3
"""Train the bundled tiny Qwen3-MoE from scratch and write it in the real HF on-disk layout.

Steps (the corpus and tokenizer are built here first, the training runs on the GPU machine):
    python3 scripts/build_corpus.py                     # → models/tiny-moe/tokenizer*.json,
                                                        #   .device/tiny-moe-data/*.bin
    # on the GPU machine (torch + transformers 5.x), from the repo root:
    python3 scripts/train_tiny_moe.py --data .device/tiny-moe-data --out models/tiny-moe \
        --budget-s 420
Fixed seeds. The step count is set from the measured step time so the run fits --budget-s;
the number used is written to the model card with everything else measured.

Writes into --out: config.json, generation_config.json, model.safetensors (bf16, one tensor per
expert and projection, as the published Qwen3 checkpoints), README.md (model card) and
training_report.json.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

try:
    import tomllib
except ImportError:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent


def model_config(vocab, eos, pad, aux_coef):
    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )


def batches(data, seq, batch, rng):
    n = len(data) - seq - 1
    while True:
        idx = rng.integers(0, n, size=batch)
        x = np.stack([data[i:i + seq + 1] for i in idx]).astype(np.int64)
        yield torch.from_numpy(x)


def split_experts(state, moe_layers):
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for l in moe_layers:
        base = f"model.layers.{l}.mlp.experts"
        gu, down = state[f"{base}.gate_up_proj"], state[f"{base}.down_proj"]
        inter = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            out[f"{base}.{e}.gate_proj.weight"] = gu[e, :inter].contiguous()
            out[f"{base}.{e}.up_proj.weight"] = gu[e, inter:].contiguous()
            out[f"{base}.{e}.down_proj.weight"] = down[e].contiguous()
    return out


@torch.no_grad()
def evaluate(model, data, seq, device, max_tokens=150_000):
    model.eval()
    n = min(len(data) - 1, max_tokens)
    nll, count = 0.0, 0
    for s in range(0, n - seq, seq):
        x = torch.from_numpy(data[s:s + seq + 1].astype(np.int64)).to(device)[None]
        out = model(input_ids=x[:, :-1])
        logp = torch.log_softmax(out.logits.float(), -1)
        nll += -logp.gather(-1, x[:, 1:, None]).sum().item()
        count += seq
    model.train()
    return math.exp(nll / count), count


@torch.no_grad()
def expert_usage(model, data, seq, device, cfg, max_tokens=150_000):
    """Per layer: how often each expert is in a token's top-k on held-out text."""
    model.eval()
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    hooks = []
    for l, layer in enumerate(model.model.layers):
        def fn(_m, _i, out, l=l):
            idx = out[2].reshape(-1).cpu().numpy()
            np.add.at(counts[l], idx, 1)
        hooks.append(layer.mlp.gate.register_forward_hook(fn))
    for s in range(0, min(len(data) - 1, max_tokens) - seq, seq):
        x = torch.from_numpy(data[s:s + seq].astype(np.int64)).to(device)[None]
        model(input_ids=x)
    for h in hooks:
        h.remove()
    model.train()
    layers = []
    for l in range(cfg.num_hidden_layers):
        c = counts[l]
        p = c / c.sum()
        ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        top = np.sort(p)[::-1]
        layers.append({
            "layer": l,
            "entropy_bits": round(ent, 3),
            "max_entropy_bits": round(math.log2(cfg.num_experts), 3),
            "top4_share": round(float(top[:4].sum()), 3),
            "top8_share": round(float(top[:8].sum()), 3),
            "min_share": round(float(top[-1]), 4),
            "dead_experts": int((c == 0).sum()),
            "counts": c.tolist(),
        })
    return layers


def load_prompts():
    out = []
    for f in ["standard.toml", "long.toml"]:
        p = ROOT / "prompts" / f
        if tomllib and p.exists():
            out += [x["text"] for x in tomllib.loads(p.read_text())["prompt"]]
    return out


@torch.no_grad()
def samples(model, tok, prompts, device, max_new=50):
    model.eval()
    out = []
    for p in prompts:
        text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        ids = tok.encode(text, add_special_tokens=False).ids
        x = torch.tensor([ids], device=device)
        g = model.generate(input_ids=x, max_new_tokens=max_new, do_sample=False)
        gen = g[0, len(ids):].tolist()
        out.append({"prompt": p, "output": tok.decode(gen, skip_special_tokens=True)})
    model.train()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / ".device/tiny-moe-data"))
    ap.add_argument("--out", default=str(ROOT / "models/tiny-moe"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="cap (0 = from budget)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    # 0.01 left one expert dead in two layers (never selected on held-out or training text):
    # the balancing gradient of an unused expert's own term is zero, so it only revives
    # indirectly. 0.05 keeps every expert alive while routing stays clearly non-uniform.
    ap.add_argument("--aux-coef", type=float, default=0.01)
    # HF's balancing loss (above) gives an expert that no token picks no gradient of its own,
    # and with it alone one expert stayed dead (0.01 and 0.05 both). This term, KL(uniform ‖
    # mean router probability) per layer, pulls every expert's *average* probability up
    # directly, so none dies, while each token's routing stays its own.
    ap.add_argument("--usage-coef", type=float, default=0.01)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    pad = tok.token_to_id("<|endoftext|>")
    data = Path(args.data)
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    valid = np.fromfile(data / "valid.bin", dtype=np.uint16)
    corpus = json.loads((data / "corpus.json").read_text())

    cfg = model_config(tok.get_vocab_size(), eos, pad, args.aux_coef)
    model = Qwen3MoeForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    gen = batches(train, args.seq, args.batch, rng)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    warmup = 100
    total = args.max_steps or 10**9
    t0 = time.time()
    log = []
    step = 0
    model.train()
    while step < total:
        if step == 30 and not args.max_steps:
            per = (time.time() - t0) / 30
            total = max(200, int(args.budget_s / per))
            print(f"step time {per*1000:.1f} ms -> {total} steps in {args.budget_s:.0f} s", flush=True)
        lr = args.lr * min(1.0, (step + 1) / warmup)
        if step >= warmup and total < 10**9:
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(gen).to(device)
        with autocast:
            o = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), shift_labels=x[:, 1:].contiguous())
        loss = o.loss
        if args.usage_coef > 0 and getattr(o, "router_logits", None) is not None:
            kl = 0.0
            for rl in o.router_logits:
                mean_p = torch.softmax(rl.float(), dim=-1).mean(0)
                kl = kl - torch.log(mean_p * cfg.num_experts + 1e-9).mean()
            loss = loss + args.usage_coef * kl / len(o.router_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            aux = float(o.aux_loss.detach()) if getattr(o, "aux_loss", None) is not None else 0.0
            print(f"step {step} loss {loss.item():.3f} aux {aux:.3f} lr {lr:.2e} t {time.time()-t0:.0f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "t": round(time.time() - t0, 1)})
        step += 1
    train_s = time.time() - t0
    model.config.output_router_logits = False

    ppl, ppl_tokens = evaluate(model, valid, args.seq, device)
    usage = expert_usage(model, valid, args.seq, device, cfg)
    train_usage = expert_usage(model, train, args.seq, device, cfg, max_tokens=300_000)
    for u, t in zip(usage, train_usage):
        u["dead_on_training_sample"] = t["dead_experts"]
    prompts = load_prompts()
    outs = samples(model, tok, prompts, device)

    # Write the real layout: bf16, per-expert tensors, tied embeddings (no lm_head in the file).
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)
    state = split_experts(state, range(cfg.num_hidden_layers))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.output_router_logits = False
    # What `model.save_pretrained` would record (tools such as llama.cpp's converter dispatch on
    # `architectures`); the config alone does not know its model class.
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": pad,
                                                            "do_sample": False}, indent=2) + "\n")
    # Held-out perplexity again from the saved bf16 weights, in f32 (what moescope runs).
    reloaded = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).float()
    ppl_saved, _ = evaluate(reloaded, valid, args.seq, device)

    report = {
        "params": n_params,
        "bytes_on_disk": (out / "model.safetensors").stat().st_size,
        "steps": step,
        "tokens_seen": step * args.batch * args.seq,
        "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seq": args.seq, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "final_loss": log[-1]["loss"] if log else None,
        "heldout_perplexity_train_precision": round(ppl, 3),
        "heldout_perplexity_saved_bf16_weights_f32": round(ppl_saved, 3),
        "heldout_tokens": ppl_tokens,
        "corpus": corpus,
        "expert_usage": usage,
        "samples": outs,
        "loss_log": log,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(out, cfg, report, args)
    print(json.dumps({k: v for k, v in report.items() if k not in ("loss_log", "expert_usage", "corpus")}, indent=1))


def write_card(out, cfg, r, args):
    usage = "\n".join(
        f"| {u['layer']} | {u['entropy_bits']:.2f} / {u['max_entropy_bits']:.2f} | {u['top4_share']:.2f} | "
        f"{u['top8_share']:.2f} | {u['min_share']:.4f} | {u['dead_experts']} / {u['dead_on_training_sample']} |"
        for u in r["expert_usage"]
    )
    samples = "\n".join(f"- **{s['prompt']}** → {s['output'].strip()}" for s in r["samples"])
    docs = "\n".join(f"| {k} | {v} |" for k, v in r["corpus"]["documents"].items())
    lic = "\n".join(f"- {k}: {v}" for k, v in r["corpus"]["sources"].items())
    card = f"""# tiny-moe — the model bundled with moescope

A Qwen3-MoE (`Qwen3MoeForCausalLM`) trained from scratch so that `moescope` works out of the box
and its expert cache behaves like a trained MoE's (non-uniform, input-dependent routing), not like
random weights (near-uniform routing).

## Architecture
| | |
|---|---|
| layers | {cfg.num_hidden_layers}, all MoE |
| hidden size | {cfg.hidden_size} |
| attention | {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim}, q/k RMSNorm, RoPE θ = 10000 |
| experts | {cfg.num_experts} per layer, top-{cfg.num_experts_per_tok}, SwiGLU, intermediate {cfg.moe_intermediate_size}, renormalised top-k |
| vocabulary | {cfg.vocab_size} (byte-level BPE, Qwen pre-tokenizer split, `<|endoftext|>` `<|im_start|>` `<|im_end|>`) |
| embeddings | tied |
| parameters | {r['params']:,} ({r['params']*2/1e6:.1f} MB in bf16; file {r['bytes_on_disk']/1e6:.1f} MB) |
| on disk | `model.safetensors`, bf16, one tensor per expert and projection (the published Qwen3 layout) |

## Corpus (built by `scripts/build_corpus.py` from Debian 12 packages)
| part | documents |
|---|---|
{docs}

{r['corpus']['train_tokens']:,} training tokens, {r['corpus']['valid_tokens']:,} held out.
Licences:
{lic}

## Training
`python3 scripts/train_tiny_moe.py --max-steps {args.max_steps} --aux-coef {args.aux_coef} --usage-coef {args.usage_coef}` on {r['device']} (torch {r['torch']},
transformers {r['transformers']}): {r['steps']} steps of {args.batch}×{args.seq} tokens
({r['tokens_seen']/1e6:.1f} M tokens seen) in {r['train_seconds']:.0f} s, AdamW lr {args.lr} with warm-up
and cosine decay, bf16 autocast, router load-balancing loss on (coefficient {cfg.router_aux_loss_coef}) plus a mean-usage term
KL(uniform ‖ mean router probability) (coefficient {args.usage_coef}) that keeps every expert alive, seed {args.seed}.
Final training loss {r['final_loss']}.

## Held-out perplexity
{r['heldout_perplexity_saved_bf16_weights_f32']:.2f} on {r['heldout_tokens']:,} held-out tokens (the saved bf16 weights, computed in f32;
{r['heldout_perplexity_train_precision']:.2f} with the training-precision weights).

## Expert usage on held-out text (share of top-{cfg.num_experts_per_tok} selections)
| layer | entropy (bits) / uniform | top-4 share | top-8 share | least-used share | dead experts (held-out / 300k training tokens) |
|---|---|---|---|---|---|
{usage}

## Sample outputs (greedy, 50 tokens, chat template)
{samples}

## Limits
A ~{r['params']/1e6:.0f} M-parameter model trained for minutes: it writes readable English fragments,
definitions and short answers, and it is often wrong. It exists to exercise moescope, not to be used.
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
