#!/usr/bin/env python3
"""How much foresight a cache policy needs on a recorded run (issue 22's policy goal).

    python3 scripts/policy_bounds.py RECORDING.ndjson [--caps 12.5%,25%,50%]

RECORDING: a session recording (`moescope run --record FILE`, format moescope-recording v1)
with the selective backend's routing events. The request stream is what the simulator
replays: each decode step asks for its routed experts layer by layer; a prompt's prefill is
one step asking once for each distinct expert a layer routes any prompt token to.

For each capacity (a share of all layers' experts, or a count) it prints the hit rate of
Belady (the offline optimum), LRU, LFU with all-time counts (kept across evictions, LRU among
equals — what a frequency policy can know; moescope's `lfu` forgets an evicted expert's count) and of oracles that see the next requests within a window — n layers of the
same token (perfect next-layer guesses, as a router-lookahead predictor gives at best), or
n whole tokens — evicting a resident not requested in the window (the least frequent) and
otherwise the one requested latest. Each as a share of Belady's hits: a policy informed only by
what the window holds cannot do better than its oracle by much, so the window an oracle needs
to reach a goal says what kind of prediction the goal asks for (BENCHMARKS.md §3).
Standard library only.
"""
import argparse
import collections
import heapq
import json
import math
import sys


def requests(path):
    """(key, step) per request, the number of steps, layers and experts."""
    experts, plen, routed = None, {}, []
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("format") == "moescope-recording":
                experts = e.get("moe", {}).get("num_experts")
            elif e.get("backend") != "selective":
                continue
            elif e.get("type") == "prompt_started":
                plen[e["prompt"]] = e["prompt_tokens"]
            elif e.get("type") == "routing":
                routed.append((e["prompt"], e["position"], e["experts"]))
    if experts is None or not routed:
        sys.exit(f"{path}: no recording header or no selective routing events")
    layers = len(routed[0][2])
    steps = []  # [prompt, per-layer expert lists, is prefill]
    for prompt, pos, ex in routed:
        if pos < plen.get(prompt, 0):
            if steps and steps[-1][0] == prompt and steps[-1][2]:
                for layer in range(layers):
                    for x in ex[layer]:
                        if x not in steps[-1][1][layer]:
                            steps[-1][1][layer].append(x)
                continue
            steps.append([prompt, [list(r) for r in ex], True])
        else:
            steps.append([prompt, ex, False])
    reqs = [(layer * experts + x, s) for s, (_, ex, _) in enumerate(steps)
            for layer in range(layers) for x in ex[layer]]
    return reqs, len(steps), layers, experts


def next_uses(keys):
    nxt, last = [0] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = last.get(keys[i], math.inf)
        last[keys[i]] = i
    return nxt


def belady(keys, nxt, cap):
    cache, heap, hits = {}, [], 0
    for i, k in enumerate(keys):
        if k in cache:
            hits += 1
        elif len(cache) >= cap:
            while True:
                nu, victim = heapq.heappop(heap)
                if victim in cache and cache[victim] == -nu:
                    break
            del cache[victim]
        cache[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return hits / len(keys)


def online(keys, nxt, cap, window, frequency):
    """LRU (frequency False, window 0), LFU (window 0), or a window oracle."""
    cache, hits, count, last, nu = set(), 0, collections.Counter(), {}, {}
    for i, k in enumerate(keys):
        count[k] += 1
        if k in cache:
            hits += 1
        else:
            if len(cache) >= cap:
                far = [x for x in cache if nu[x] - i > window]
                if far:
                    rank = (lambda x: (count[x], last[x])) if frequency else (lambda x: last[x])
                    victim = min(far, key=rank)
                else:
                    victim = max(cache, key=lambda x: nu[x])
                cache.remove(victim)
            cache.add(k)
        nu[k], last[k] = nxt[i], i
    return hits / len(keys)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording")
    ap.add_argument("--caps", default="12.5%,25%,50%")
    a = ap.parse_args()
    reqs, steps, layers, experts = requests(a.recording)
    keys = [k for k, _ in reqs]
    nxt = next_uses(keys)
    total = layers * experts
    per_token = len(keys) / steps
    per_layer = per_token / layers
    print(f"{a.recording}: {len(keys)} requests, {steps} steps, {layers} layers x {experts} "
          f"experts ({per_token:.1f} requests a step)")
    windows = [(f"{n} layer{'s' if n > 1 else ''}", n * per_layer) for n in (1, 2, layers // 2)]
    windows += [(f"{n} token{'s' if n > 1 else ''}", n * per_token) for n in (1, 2, 4)]
    print("capacity | Belady | LRU | LFU (all-time) | " + " | ".join(w for w, _ in windows))
    for c in a.caps.split(","):
        cap = round(total * float(c[:-1]) / 100) if c.endswith("%") else int(c)
        b = belady(keys, nxt, cap)
        share = lambda h: f"{100 * h / b:.0f} %"
        cells = [f"{c} ({cap})", f"{100 * b:.1f} %", share(online(keys, nxt, cap, 0, False)),
                 share(online(keys, nxt, cap, 0, True))]
        cells += [share(online(keys, nxt, cap, int(w), True)) for _, w in windows]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
