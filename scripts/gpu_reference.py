#!/usr/bin/env python3
"""GPU references for moescope (run on the GPU machine by scripts/gpu_check.sh; needs torch with
CUDA and transformers 5.x).

  fidelity   moescope on cuda (bf16) vs transformers on cuda (bf16) vs the f32 goldens, on the test
             fixtures and the bundled model; and selective == native on the GPU, bit for bit, at
             several cache capacities.                      -> JSON on stdout
  hf-decode  transformers' greedy decode tok/s on a checkpoint, default and eager experts.
  h2d        host->device copy bandwidth (pageable and pinned), for the selective bound.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_logits(binary, model, tokens, extra=()):
    out = subprocess.run(
        [binary, "logits", "--model", str(model), "--tokens", ",".join(map(str, tokens)), *extra],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["logits"]


def run_steps(binary, model, tokens, n, extra=(), env=None):
    """`n` greedy decode steps after `tokens`: each step's token, logits and routing."""
    out = subprocess.run(
        [binary, "logits", "--model", str(model), "--tokens", ",".join(map(str, tokens)),
         "--greedy", str(n), *extra],
        check=True, capture_output=True, text=True, env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(out)["steps"]


def steps_diff(a, b):
    """Largest |logit difference| over all steps, and whether tokens and routing are equal."""
    d = max(max_abs(x["logits"], y["logits"]) for x, y in zip(a, b))
    same = len(a) == len(b) and all(x["token"] == y["token"] and x["routing"] == y["routing"]
                                    for x, y in zip(a, b))
    return d, same


def max_abs(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def hf_model(model_dir, dtype):
    from transformers import Qwen3MoeForCausalLM
    m = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return m.to("cuda").eval()


def decode_vs_hf(binary, model, prompt, steps, hf, extra):
    """Decode logits against transformers run over the prompt and the generated tokens at once
    (eager attention; bf16, and f32 as the truth): moescope's attention kernels, and candle's ops
    (MOESCOPE_ATTN_KERNEL=candle) beside them. Steps after the prefill only (the prefill does
    not use the decode kernels); candle's steps are compared while their tokens are the
    kernels' (a tie may order two tokens differently). Per-step max |difference|: the largest
    and the mean over the steps."""
    candle = run_steps(binary, model, prompt, len(steps), extra, {"MOESCOPE_ATTN_KERNEL": "candle"})
    full = torch.tensor([prompt + [st["token"] for st in steps[:-1]]], device="cuda")
    hf32 = hf_model(model, torch.float32)
    with torch.no_grad():
        bf = hf(input_ids=full).logits[0].float()
        f32 = hf32(input_ids=full).logits[0].float()
    del hf32
    at = lambda rows, j: rows[len(prompt) - 1 + j].tolist()
    same = 1
    while same < len(steps) and candle[same - 1]["token"] == steps[same - 1]["token"]:
        same += 1

    def errs(run, ref, n):
        e = [max_abs(run[j]["logits"], at(ref, j)) for j in range(1, n)]
        return {"max": max(e), "mean": sum(e) / len(e)} if e else None

    return {"model": str(model.relative_to(ROOT)), "steps": len(steps) - 1,
            "kernels_vs_f32": errs(steps, f32, len(steps)),
            "hf_bf16_vs_f32": {"max": max(max_abs(at(bf, j), at(f32, j)) for j in range(1, len(steps))),
                               "mean": sum(max_abs(at(bf, j), at(f32, j)) for j in range(1, len(steps))) / (len(steps) - 1)},
            "candle_ops_vs_f32": errs(candle, f32, same),
            "kernels_vs_hf_bf16": errs(steps, bf, len(steps)),
            "candle_steps_compared": same - 1,
            "tokens_equal": [st["token"] for st in steps] == [st["token"] for st in candle],
            "scale": max(max(abs(x) for x in at(f32, j)) for j in range(1, len(steps)))}


def fidelity(a):
    res = {"device": torch.cuda.get_device_name(), "cases": [], "selective": [], "decode": [],
           "decode_vs_hf": []}
    cases = [("tests/fixtures/qwen3-moe-tiny", True), ("tests/fixtures/qwen3-omni-tiny", False),
             ("models/tiny-moe", True)]
    for rel, hf_ok in cases:
        d = ROOT / rel
        golden = json.loads((d / "golden.json").read_text()) if (d / "golden.json").exists() else None
        seqs = golden["sequences"] if golden else [[1, 2, 3, 4, 5, 6, 7, 8], [100, 200, 300, 7, 9]]
        hf = hf_model(d, torch.bfloat16) if hf_ok else None
        hf32 = hf_model(d, torch.bfloat16).float() if (hf_ok and not golden) else None
        for i, s in enumerate(seqs[:3]):
            ours = run_logits(a.bin, d, s, ["--device", "cuda:0", "--dtype", "bf16"])
            case = {"model": rel, "seq": i, "len": len(s)}
            with torch.no_grad():
                ids = torch.tensor([s], device="cuda")
                if golden:
                    ref32 = golden["logits_f32"][i]
                else:
                    ref32 = hf32(input_ids=ids).logits[0, -1].float().tolist()
                case["ours_bf16_vs_f32"] = max_abs(ours, ref32)
                if hf is not None:
                    theirs = hf(input_ids=ids).logits[0, -1].float().tolist()
                    case["hf_bf16_vs_f32"] = max_abs(theirs, ref32)
                    case["ours_vs_hf_bf16"] = max_abs(ours, theirs)
                case["scale"] = max(abs(x) for x in ref32)
                top = lambda xs: int(max(range(len(xs)), key=lambda j: xs[j]))
                case["top1_same_as_f32"] = top(ours) == top(ref32)
                if hf is not None:
                    case["hf_top1_same_as_f32"] = top(theirs) == top(ref32)
                # f32 gap between the two best logits: under bf16's spacing at that magnitude
                # (2^(e-7) for |x| in [2^e, 2^(e+1))) no bf16 computation can be relied on to
                # order them, so a different top-1 there is a tie, not an error.
                best = sorted(ref32, reverse=True)[:2]
                case["f32_top2_gap"] = best[0] - best[1]
                case["bf16_spacing"] = 2.0 ** (math.floor(math.log2(abs(best[0]))) - 7)
            res["cases"].append(case)
            # Selective on the GPU must equal native on the GPU bit for bit (checked on the longest
            # sequence: its prefill overflows the small pools, exercising the temporary stack).
            if i != min(2, len(seqs) - 1):
                continue
            native = ours
            cfg = json.loads((d / "config.json").read_text())
            tc = cfg.get("thinker_config", {}).get("text_config", cfg)
            ne = tc.get("num_experts") or tc.get("num_local_experts")
            k = tc["num_experts_per_tok"]
            moe_layers = tc["num_hidden_layers"] - len(tc.get("mlp_only_layers") or [])
            for cap, scope in [(k, "global"), (k * moe_layers, "layer"), (ne * moe_layers, "global"), (max(1, ne * moe_layers // 8), "global")]:
                sel = run_logits(a.bin, d, s, ["--device", "cuda:0", "--dtype", "bf16", "--backend", "selective",
                                               "--cache-experts", str(cap), "--cache-scope", scope])
                res["selective"].append({"model": rel, "seq": i, "capacity": cap, "scope": scope,
                                         "identical": sel == native, "max_abs_diff": max_abs(sel, native)})
            # Decode steps (KV cache, routing read back per step): native through a CUDA graph
            # must equal native launched kernel by kernel and selective, bit for bit.
            gpu = ["--device", "cuda:0", "--dtype", "bf16"]
            graphed = run_steps(a.bin, d, s, 12, gpu)
            variants = [("native, graphs off", gpu, {"MOESCOPE_CUDA_GRAPHS": "0"}),
                        (f"selective {k} global", gpu + ["--backend", "selective", "--cache-experts", str(k)], {}),
                        # Both miss paths explicitly (the default depends on the host).
                        (f"selective {k} global, staged copies", gpu + ["--backend", "selective", "--cache-experts", str(k)], {"MOESCOPE_H2D": "staged"}),
                        (f"selective {k} global, direct copies", gpu + ["--backend", "selective", "--cache-experts", str(k)], {"MOESCOPE_H2D": "direct"}),
                        (f"selective {k} global, direct copies on a second stream", gpu + ["--backend", "selective", "--cache-experts", str(k)], {"MOESCOPE_H2D": "direct", "MOESCOPE_COPY_STREAM": "1"}),
                        # A slot for every expert: the GPU fills missing slots itself inside the
                        # step's graph (every decode step a graph), in both scopes.
                        (f"selective {ne * moe_layers} global, GPU fills", gpu + ["--backend", "selective", "--cache-experts", str(ne * moe_layers)], {}),
                        (f"selective {ne * moe_layers} layer, GPU fills", gpu + ["--backend", "selective", "--cache-experts", str(ne * moe_layers), "--cache-scope", "layer"], {}),
                        (f"selective {ne * moe_layers} global, host loads", gpu + ["--backend", "selective", "--cache-experts", str(ne * moe_layers)], {"MOESCOPE_FILL": "0"}),
                        # Guessing after every clean step (the earlier rule): 12 steps are too few
                        # for the default gate to open, this one tries graphs and redoes failures.
                        (f"selective {ne * moe_layers} global, host loads, guess after any clean step", gpu + ["--backend", "selective", "--cache-experts", str(ne * moe_layers)], {"MOESCOPE_SPECULATE": "last", "MOESCOPE_FILL": "0"}),
                        (f"selective {k * moe_layers} layer", gpu + ["--backend", "selective", "--cache-experts", str(k * moe_layers), "--cache-scope", "layer"], {})]
            if hf is not None:
                res["decode_vs_hf"].append(decode_vs_hf(a.bin, d, s, graphed, hf, gpu))
            for name, extra, env in variants:
                other = run_steps(a.bin, d, s, 12, extra, env)
                dd, same = steps_diff(graphed, other)
                paths = {}
                for st in other:
                    paths[st.get("path")] = paths.get(st.get("path"), 0) + 1
                res["decode"].append({"model": rel, "vs": name, "steps": len(other), "identical": dd == 0.0 and same,
                                      "max_abs_diff": dd, "tokens_and_routing_equal": same, "paths": paths})
        del hf
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))


def hf_decode(a):
    from transformers import Qwen3MoeForCausalLM
    out = {"device": torch.cuda.get_device_name(), "model": a.model, "prompt_tokens": a.prompt_tokens,
           "new_tokens": a.new_tokens}
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    prompt = torch.tensor([[(i * 7919 + 13) % vocab for i in range(a.prompt_tokens)]], device="cuda")
    for impl in ["default", "eager"]:
        kw = {} if impl == "default" else {"experts_implementation": "eager"}
        m = Qwen3MoeForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, **kw).to("cuda").eval()

        def gen(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                m.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        gen(4)
        best = 0.0
        for _ in range(3):
            t1 = gen(1)
            tn = gen(a.new_tokens)
            best = max(best, (a.new_tokens - 1) / max(tn - t1, 1e-9))
        out[impl] = {"decode_tok_s": best}
        del m
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


def h2d(a):
    n = 256 << 20
    res = {"device": torch.cuda.get_device_name(), "bytes": n}
    for pinned in [False, True]:
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        dev.copy_(host)
        torch.cuda.synchronize()
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            dev.copy_(host, non_blocking=False)
            torch.cuda.synchronize()
            best = max(best, n / (time.perf_counter() - t0))
        res["pinned" if pinned else "pageable"] = {"bytes_per_s": best}
    print(json.dumps(res, indent=1))


def miss_paths(a):
    """Where an expert miss's time goes: host->device copy paths measured on one file in the page
    cache, with expert-sized transfers (`--expert-mib`), so the selective bound can be checked
    against what each path can reach on this host."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n_exp = a.experts
    ebytes = int(a.expert_mib * (1 << 20))
    path = a.file
    size = n_exp * ebytes
    if not os.path.exists(path) or os.path.getsize(path) != size:
        with open(path, "wb") as f:
            block = np.arange(64 << 20, dtype=np.uint8).tobytes()
            left = size
            while left:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
    fd = os.open(path, os.O_RDONLY)
    # Touch it all so the page cache is warm (as in the sweep).
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    res = {"device": torch.cuda.get_device_name(), "expert_bytes": ebytes, "experts": n_exp}
    slots = torch.empty((a.slots, ebytes), dtype=torch.uint8, device="cuda")
    pool = ThreadPoolExecutor(a.threads)
    chunk = 1 << 20

    def read_into(buf_np, e):
        views = [(memoryview(buf_np[o : o + chunk]), e * ebytes + o) for o in range(0, ebytes, chunk)]
        list(pool.map(lambda v: os.preadv(fd, [v[0]], v[1]), views))

    order = np.random.default_rng(0).permutation(n_exp)[: a.count]

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"s": dt, "bytes_per_s": len(order) * ebytes / dt, "us_per_expert": dt / len(order) * 1e6}

    bufs = [torch.empty(ebytes, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
    nps = [b.numpy() for b in bufs]
    events = [None] * 4

    def lone_dma():
        for i, _ in enumerate(order):
            slots[i % a.slots].copy_(bufs[i % 2], non_blocking=True)

    def read_only():
        for i, e in enumerate(order):
            read_into(nps[i % 2], e)

    def bounce(ring):
        def go():
            for i, e in enumerate(order):
                b = i % ring
                if events[b] is not None:
                    events[b].synchronize()
                read_into(nps[b], e)
                slots[i % a.slots].copy_(bufs[b], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                events[b] = ev
        return go

    timed(lone_dma)  # warm-up: CUDA context, allocator
    res["lone_pinned_dma"] = timed(lone_dma)
    res["read_to_pinned"] = timed(read_only)
    res["bounce_ring2"] = timed(bounce(2))
    res["bounce_ring4"] = timed(bounce(4))
    # Register the file's mapping with the driver (read-only) and copy straight from it.
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    arr = np.frombuffer(mm, dtype=np.uint8)
    t0 = time.perf_counter()
    err = int(torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, size, 8))
    res["register"] = {"error": err, "s": time.perf_counter() - t0,
                       "bytes": size}
    if res["register"]["error"] == 0:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            host = torch.frombuffer(mm, dtype=torch.uint8)

        def direct():
            for i, e in enumerate(order):
                slots[i % a.slots].copy_(host[e * ebytes : (e + 1) * ebytes], non_blocking=True)

        res["direct_from_registered_mmap"] = timed(direct)
        res["direct_from_registered_mmap_2"] = timed(direct)
        torch.cuda.cudart().cudaHostUnregister(arr.ctypes.data)
    print(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity")
    f.add_argument("--bin", required=True)
    h = sub.add_parser("hf-decode")
    h.add_argument("--model", required=True)
    h.add_argument("--prompt-tokens", type=int, default=16)
    h.add_argument("--new-tokens", type=int, default=64)
    sub.add_parser("h2d")
    m = sub.add_parser("miss-paths")
    m.add_argument("--file", default="/tmp/moescope-miss-paths.bin")
    m.add_argument("--experts", type=int, default=512)
    m.add_argument("--expert-mib", type=float, default=9.0)
    m.add_argument("--count", type=int, default=256)
    m.add_argument("--slots", type=int, default=64)
    m.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()
    {"fidelity": fidelity, "hf-decode": hf_decode, "h2d": h2d, "miss-paths": miss_paths}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
