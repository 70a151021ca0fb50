#!/usr/bin/env python3
"""How predictable a recording's routing is, per layer: what bounds an online cache policy.

    python3 scripts/trace_stats.py RECORDING [--backend native] [--capacity-per-layer 8]

Prints, over native's decode and prefill steps:
- reuse at lag N: P(an expert picked for token t is picked again for token t+N in that layer),
  against the chance level top_k / experts (recency is worth something only above it);
- the hindsight static share: the requests that the `capacity-per-layer` most used experts of
  each layer would serve — the hit rate of the best fixed cache chosen knowing the whole trace
  (frequency is worth at most this);
- the same per prompt: each prompt served by its own best fixed cache, chosen knowing that
  prompt's routing (what a policy that learns a prompt's favourites at once could reach at most,
  loading them for free);
- the entropy of each layer's expert use (log2(experts) bits = uniform).
"""
import argparse
import collections
import json
import math


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recording")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--capacity-per-layer", type=int, default=8)
    a = ap.parse_args()
    experts = None
    by_prompt = collections.defaultdict(list)
    for line in open(a.recording):
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if e.get("format") == "moescope-recording":  # the header
            experts = e.get("moe", {}).get("num_experts")
        elif e.get("type") == "routing" and e.get("backend") == a.backend:
            by_prompt[e["prompt"]].append(e["experts"])
    steps = [s for seq in by_prompt.values() for s in seq]
    if not steps:
        raise SystemExit(f"{a.recording}: no {a.backend} routing events")
    layers, k = len(steps[0]), len(steps[0][0])
    if experts is None:
        experts = 1 + max(x for s in steps for row in s for x in row)
    print(f"{len(steps)} tokens, {layers} MoE layers, top-{k} of {experts} experts")
    print(f"chance of reuse: {k / experts:.3f}")
    for lag in (1, 2, 4, 8, 16):
        hit = tot = 0
        for seq in by_prompt.values():
            for t in range(len(seq) - lag):
                for l in range(layers):
                    hit += len(set(seq[t][l]) & set(seq[t + lag][l]))
                    tot += k
        if tot:
            print(f"reuse at lag {lag:>2}: {hit / tot:.3f}")
    share = []
    for l in range(layers):
        c = collections.Counter(x for s in steps for x in s[l])
        n = sum(c.values())
        top = sum(v for _, v in c.most_common(a.capacity_per_layer)) / n
        h = -sum(v / n * math.log2(v / n) for v in c.values())
        share.append(top)
        print(f"layer {l}: hindsight top-{a.capacity_per_layer} share {top:.3f}, entropy {h:.2f} bits "
              f"(uniform {math.log2(experts):.2f})")
    print(f"hindsight static cache of {a.capacity_per_layer} per layer: {sum(share) / len(share):.3f} hit rate")
    hit = tot = 0
    for seq in by_prompt.values():
        for l in range(layers):
            c = collections.Counter(x for s in seq for x in s[l])
            tot += sum(c.values())
            hit += sum(v for _, v in c.most_common(a.capacity_per_layer))
    print(f"per-prompt hindsight static cache of {a.capacity_per_layer} per layer: {hit / tot:.3f} hit rate")


if __name__ == "__main__":
    main()
