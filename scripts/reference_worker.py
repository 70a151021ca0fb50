#!/usr/bin/env python3
"""moescope's reference worker: Hugging Face transformers on the user's own weights.

`moescope run --reference-impl transformers` starts this script (embedded in the binary, written
to a temporary file) with the Python of `--python` (default python3), after both moescope
backends have run every prompt. It speaks JSON lines — one command per line on stdin, one event
per line on stdout, logs on stderr — and runs on token ids moescope gives it, so the comparison
is of the models' arithmetic, not of two tokenizers:

  {"cmd": "load", "model": DIR, "dtype": "f32|bf16|f16", "device": "cpu|cuda:N"}
      -> {"ev": "loaded", "implementation": "transformers X (torch Y)", "load_s": S, "vocab_size": V}
  {"cmd": "generate", "prompt_ids": [...], "max_new_tokens": N, "stop_ids": [...]}
      -> {"ev": "generated", "ids": [...], "ttft_s": S, "decode_s": S}    (greedy, KV cache)
  {"cmd": "score", "prompt_ids": [...], "continuation": [...], "support": [[ids], ...] | K}
      -> {"ev": "scored", "rows": [{"ids": [...], "logp": [...], "top1": T}, ...]}
  {"cmd": "shutdown"} -> {"ev": "bye"}
Any failure: {"ev": "error", "message": "..."} (a failed load ends the worker).

Qwen3 MoE checkpoints load with transformers' own `from_pretrained`; a Qwen3-Omni checkpoint's
thinker is loaded from its `thinker.*` tensors (audio, vision and talker are never read), the
per-expert weights fused as transformers' fused experts expect. Experts run with transformers'
eager implementation, the reference the fidelity tests use.
"""
import json
import sys
import time
from pathlib import Path


def send(ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def dtype_of(name, torch):
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def load_omni_thinker(model_dir, dtype, torch):
    from safetensors.torch import load_file
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    cfg = Qwen3OmniMoeConfig.from_pretrained(model_dir)
    thinker_cfg = cfg.thinker_config
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    sd = {}
    for s in shards:
        for k, v in load_file(str(Path(model_dir) / s)).items():
            if k.startswith("thinker."):
                sd[k[len("thinker."):]] = v
    text = thinker_cfg.text_config
    fused = {}
    for layer in range(text.num_hidden_layers):
        base = f"model.layers.{layer}.mlp.experts"
        if f"{base}.0.gate_proj.weight" not in sd:
            continue
        n = text.num_experts
        gu = [torch.cat([sd.pop(f"{base}.{e}.gate_proj.weight"), sd.pop(f"{base}.{e}.up_proj.weight")])
              for e in range(n)]
        fused[f"{base}.gate_up_proj"] = torch.stack(gu)
        fused[f"{base}.down_proj"] = torch.stack([sd.pop(f"{base}.{e}.down_proj.weight") for e in range(n)])
    sd.update(fused)
    m = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_cfg)
    # The checkpoint says `model.layers…`; newer transformers nest the text model as
    # `model.language_model.layers…`: take whichever name the module has.
    expected = set(m.state_dict().keys())
    renamed = {}
    for k, v in sd.items():
        alt = "model.language_model." + k[len("model."):] if k.startswith("model.") else k
        renamed[k if k in expected or alt not in expected else alt] = v
    missing, unexpected = m.load_state_dict(renamed, strict=False)
    # Audio and vision towers are not in a text comparison; the tied head is filled by tie_weights.
    tied = getattr(thinker_cfg, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text, "tie_word_embeddings", False)
    towers = ("audio_tower", "visual")
    missing = [k for k in missing
               if not any(t in k for t in towers) and (k != "lm_head.weight" or not tied)]
    if missing:
        raise ValueError(f"{model_dir}: the thinker lacks {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = [k for k in unexpected if not any(t in k for t in towers)]
    if unexpected:
        raise ValueError(f"{model_dir}: {len(unexpected)} thinker tensors have no place in "
                         f"transformers' model, e.g. {unexpected[:3]}")
    m.tie_weights()
    return m.to(dtype)


def load(cmd):
    t0 = time.monotonic()
    import torch
    import transformers

    model_dir, dtype = cmd["model"], dtype_of(cmd["dtype"], torch)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") == "qwen3_omni_moe":
        m = load_omni_thinker(model_dir, dtype, torch)
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    m.config._experts_implementation = "eager"
    m = m.to(cmd["device"]).eval()
    vocab = m.get_output_embeddings().weight.shape[0]
    return m, {
        "ev": "loaded",
        "implementation": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "load_s": time.monotonic() - t0,
        "vocab_size": int(vocab),
    }


def sync(torch, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def generate(m, cmd, device):
    import torch

    ids = torch.tensor([cmd["prompt_ids"]], device=device)
    stops = set(cmd.get("stop_ids", []))
    out, past = [], None
    t0 = time.monotonic()
    ttft, decode_start = None, None
    with torch.no_grad():
        for _ in range(cmd["max_new_tokens"]):
            r = m(input_ids=ids, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            sync(torch, device)
            if ttft is None:
                ttft = time.monotonic() - t0
                decode_start = time.monotonic()
            out.append(nxt)
            if nxt in stops:
                break
            ids = torch.tensor([[nxt]], device=device)
    return {"ev": "generated", "ids": out, "ttft_s": ttft or 0.0,
            "decode_s": (time.monotonic() - decode_start) if decode_start else 0.0}


def score(m, cmd, device):
    import torch

    prompt, cont = cmd["prompt_ids"], cmd["continuation"]
    ids = torch.tensor([prompt + cont], device=device)
    top_k = cmd.get("routing_top_k")
    routing = None
    with torch.no_grad():
        out = None
        if top_k:
            try:
                out = m(input_ids=ids, output_router_logits=True)
            except TypeError:  # a model class without the option: no routing, still scored
                out = None
        if out is None:
            out = m(input_ids=ids)
        # One tensor per MoE layer, [positions, experts]: the k experts each position picked,
        # per position and layer (None where the model does not report them).
        layers = getattr(out, "router_logits", None) if top_k else None
        if layers:
            layers = [r[0] if r.dim() == 3 else r for r in layers]
            picked = [torch.topk(r.float(), top_k, dim=-1).indices.tolist() for r in layers]
            routing = [[layer[pos] for layer in picked] for pos in range(len(picked[0]))]
        logits = out.logits[0].float()
    # The row that predicted continuation token j is the logits at position len(prompt)-1+j.
    logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(cont)], dim=-1)
    support = cmd["support"]
    rows = []
    for j in range(len(cont)):
        row = logp[j]
        if isinstance(support, int):
            vals, idx = torch.topk(row, min(support, row.shape[0]))
            sel = idx.tolist()
            lp = vals.tolist()
        else:
            sel = support[j]
            lp = row[torch.tensor(sel, device=row.device)].tolist() if sel else []
        rows.append({"ids": sel, "logp": lp, "top1": int(row.argmax())})
    return {"ev": "scored", "rows": rows, "routing": routing}


def main():
    model, device = None, "cpu"
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            kind = cmd.get("cmd")
            if kind == "load":
                device = cmd["device"]
                model, ev = load(cmd)
                send(ev)
            elif kind == "shutdown":
                send({"ev": "bye"})
                return
            elif model is None:
                send({"ev": "error", "message": "load first"})
            elif kind == "generate":
                send(generate(model, cmd, device))
            elif kind == "score":
                send(score(model, cmd, device))
            else:
                send({"ev": "error", "message": f"unknown command {kind!r}"})
        except ModuleNotFoundError as e:
            send({"ev": "error", "message": f"{e.name} is not installed for {sys.executable} "
                  f"(pip install torch transformers safetensors)"})
            return
        except Exception as e:  # the parent reports it and goes on without the reference
            send({"ev": "error", "message": f"{type(e).__name__}: {e}"})
            if model is None:
                return


if __name__ == "__main__":
    main()
