#!/usr/bin/env python3
"""Judges scripts/gpu_reference.py's fidelity output: one line saying what passed, and exit 1 if
anything failed. Used by scripts/gpu_check.sh.

Pass means, for every case:
  - bf16 fidelity (the CPU suite's rule): moescope's bf16 error against the f32 goldens at most
    twice transformers' own plus 2 % of the largest logit (where transformers ran), and top-1
    equal to f32's unless the two best f32 logits are a tie for bf16: within bf16's spacing, or
    within twice transformers' own bf16 error (where transformers ran) — a gap the reference
    implementation's error could close as well, so its order is the order of the sums, not of
    the model (BENCHMARKS.md, "Fidelity on the GPU");
  - selective == native on the GPU, bit for bit, in every prefill case;
  - every decode variant (graphs off, each miss path, GPU fills, speculation rules, scopes):
    logits, tokens and routing identical to native's graphed steps;
  - decode (the steps after the prefill, which run moescope's attention kernels), against
    transformers' f32 logits over the same tokens: the largest per-step error at most twice
    transformers' own bf16 error on those steps plus 2 % of the largest logit — the prefill rule.

Usage: gpu_verdict.py FIDELITY_JSON
"""
import json
import sys


def main(path):
    try:
        res = json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"gpu check: FAILED — {path}: {e}")
        return 1
    failures, ties = [], []
    cases = res.get("cases", [])
    for c in cases:
        name = f"{c['model']} seq {c['seq']}"
        ours, scale = c["ours_bf16_vs_f32"], c["scale"]
        hf = c.get("hf_bf16_vs_f32")
        if hf is not None and ours > 2 * hf + 0.02 * scale:
            failures.append(f"{name}: bf16 error {ours:.3f} > 2 × transformers' {hf:.3f} + 2 %")
        tie = max(c["bf16_spacing"], 2 * hf if hf is not None else 0.0)
        if not c["top1_same_as_f32"]:
            if c["f32_top2_gap"] > tie:
                failures.append(f"{name}: top-1 differs from f32 (gap {c['f32_top2_gap']:.4f} > tie {tie:.4f})")
            else:
                ties.append(f"{name} (f32 gap {c['f32_top2_gap']:.4f} ≤ {tie:.4f})")
    sel = res.get("selective", [])
    for s in sel:
        if not s["identical"]:
            failures.append(f"{s['model']} selective {s['capacity']} {s['scope']}: prefill differs by {s['max_abs_diff']}")
    dec = res.get("decode", [])
    for d in dec:
        if not d["identical"]:
            failures.append(f"{d['model']} decode vs {d['vs']}: differs ({d['max_abs_diff']}, tokens/routing equal: {d['tokens_and_routing_equal']})")
    dhf = res.get("decode_vs_hf", [])
    for c in dhf:
        ours, hf = c["kernels_vs_f32"]["max"], c["hf_bf16_vs_f32"]["max"]
        if ours > 2 * hf + 0.02 * c["scale"]:
            failures.append(f"{c['model']} decode: error {ours:.3f} > 2 × transformers' {hf:.3f} + 2 %")
    if not cases or not sel or not dec or not dhf:
        failures.append("the fidelity run produced no results for some part")
    summary = (f"fidelity {len(cases)} cases, selective prefill {sum(s['identical'] for s in sel)}/{len(sel)} identical, "
               f"decode {sum(d['identical'] for d in dec)}/{len(dec)} identical, decode error vs f32 "
               + ", ".join(f"{c['kernels_vs_f32']['max']:.3f} (transformers bf16 {c['hf_bf16_vs_f32']['max']:.3f})" for c in dhf))
    if failures:
        print(f"gpu check: FAILED — {summary}; " + "; ".join(failures))
        return 1
    flipped = f"; top-1 ties ordered unlike f32: {', '.join(ties)}" if ties else ""
    print(f"gpu check: passed — {summary}{flipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
