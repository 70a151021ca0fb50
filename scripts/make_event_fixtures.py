#!/usr/bin/env python3
"""Write the hand-built session recordings in tests/fixtures/events/ (one per verdict outcome).

Each file is a valid moescope recording (header line + one event per line) describing a session
whose numbers are chosen to land on one outcome of the decision framework, so the reducer, the
verdict, the export and the dashboard snapshots can be tested without running a model.
Rerun after changing the event format:  python3 scripts/make_event_fixtures.py
"""
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "events"
MIB = 1 << 20

SHORT = [
    ("capital", "factual", "What is the capital of France?", None),
    ("volcano", "factual", "What is a volcano?", None),
    ("sea", "creative", "Write a sentence about the sea.", None),
]
LONG = [
    ("rivers", "factual", "Tell me about rivers.", 160),
    ("python", "technical", "Explain what Python is.", 160),
]
TEXT = ("The capital of France is Paris . It is a large city on the river Seine , known for "
        "its museums and its old streets . Many people visit it every year and walk along the "
        "river in the evening . The city has parks , bridges and cafes , and its metro carries "
        "millions of people every day . ").split(" ")


def header(name, prompts, profile="relative", experts=32, layers=6, top_k=4):
    return {
        "format": "moescope-recording", "version": 1, "tool_version": "0.1.0",
        "created_utc": "2026-11-25T12:00:00Z", "model": f"fixtures/{name}", "model_type": "qwen3_moe",
        "config_fingerprint": "0123456789abcdef",
        "moe": {"num_layers": layers, "moe_layers": list(range(layers)), "num_experts": experts, "top_k": top_k},
        "device": "cpu", "dtype": "f32",
        "cache": {"cache_experts": 48, "cache_mem": None, "cache_scope": "global", "policy": "lru",
                  "expert_source": {"kind": "shards"}, "allow_missing_experts": False, "cold": False,
                  "prefetch": "none", "mask_experts": []},
        "cache_describe": "48 experts, global scope, lru; source shards; warm page cache",
        "schedule": "alternate", "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 42},
        "prompts": {"version": 1, "name": name, "max_new_tokens": 50,
                    "prompt": [dict({"id": i, "category": c, "text": t}, **({"max_new_tokens": m} if m else {}))
                               for i, c, t, m in prompts]},
        "profile": profile, "host": "fixture",
    }


class Session:
    def __init__(self, name, prompts, **kw):
        self.name = name
        self.prompts = prompts
        self.lines = [header(name, prompts, **kw)]
        self.t = 0.0
        self.experts = kw.get("experts", 32)
        self.layers = kw.get("layers", 6)

    def ev(self, e, dt=0.001):
        self.t += dt
        self.lines.append(dict({"t": round(self.t, 6)}, **e))

    def memory(self, b, total_mib, gpu=None):
        anon = int(total_mib * 0.8 * MIB)
        file = int(total_mib * MIB) - anon
        self.ev({"type": "memory", "backend": b, "sample": {
            "rss_anon": anon, "rss_file": file, "rss_shmem": 0, "peak_rss": anon + file,
            "gpu": gpu, "gpu_source": "nvml_process" if gpu is not None else None,
            "system_available": 8 << 30, "source": "fixture"}})

    def start(self, mem_before, mem_loaded, degraded=(False, False), load_s=(2.0, 0.5)):
        for i, b in enumerate(["native", "selective"]):
            self.ev({"type": "worker_started", "backend": b, "pid": 1000 + i})
            self.memory(b, mem_before[i])
        for i, b in enumerate(["native", "selective"]):
            res = {"non_expert": 100 * MIB, "experts": (400 if b == "native" else 50) * MIB,
                   "cache_capacity": 0 if b == "native" else 60 * MIB, "expert_bytes": 1 * MIB}
            self.ev({"type": "loaded", "backend": b, "load_s": load_s[i], "resident": res,
                     "degraded": degraded[i], "describe": f"{b} f32 cpu"})
            self.memory(b, mem_loaded[i])

    def prompt(self, i, tok_s, tokens, diverge_at=None, mem=(500, 200), kl=0.0, top1=1.0, fail=None,
               words=TEXT, opens_thinking=False):
        """tok_s: (native, selective); tokens per backend; a backend failing mid-way: fail=backend.
        words: the output's words, cycled; opens_thinking: the prompt opened a <think> block."""
        n = tokens
        ids = {b: [100 + (k % 50) for k in range(n)] for b in ("native", "selective")}
        if diverge_at is not None:
            for k in range(diverge_at, n):
                ids["selective"][k] = 7 + (k % 5)
        maxn = self.prompts[i][3] or 50
        for b in ("native", "selective"):
            if fail == "done-" + b:
                continue
            started = {"type": "prompt_started", "backend": b, "prompt": i, "prompt_tokens": 12, "max_new_tokens": maxn}
            if opens_thinking:
                started["opens_thinking"] = True
            self.ev(started)
        for k in range(n):
            for bi, b in enumerate(("native", "selective")):
                if fail == b and k == n // 2:
                    self.ev({"type": "failed", "backend": b, "reason": "worker killed by signal 9 (SIGKILL: killed, e.g. by kill -9 or the out-of-memory killer)"})
                    fail = "done-" + b
                if fail == "done-" + b:
                    continue
                dt = 1.0 / tok_s[bi]
                word = words[k % len(words)]
                if b == "selective" and diverge_at is not None and k >= diverge_at:
                    word = ["stone", "cloud", "iron", "grass", "wind"][k % 5]
                self.ev({"type": "token", "backend": b, "prompt": i, "index": k, "id": ids[b][k],
                         "text": (" " if k else "") + word, "dt": round(dt * (3 if k == 0 else 1), 6),
                         "prefill": k == 0}, dt=dt)
                if b == "native":
                    experts = [[(k + l + j * 7) % self.experts for j in range(4)] for l in range(self.layers)]
                    self.ev({"type": "routing", "backend": b, "prompt": i, "position": 12 + k, "experts": experts}, dt=0)
            if k % 10 == 0:
                self.memory("native", mem[0])
                self.memory("selective", mem[1])
        for bi, b in enumerate(("native", "selective")):
            if fail == "done-" + b:
                continue
            text = "".join((" " if k else "") + (words[k % len(words)] if not (b == "selective" and diverge_at is not None and k >= diverge_at) else ["stone", "cloud", "iron", "grass", "wind"][k % 5]) for k in range(n))
            self.ev({"type": "prompt_done", "backend": b, "prompt": i, "finish": "max_new_tokens",
                     "token_ids": ids[b], "text": text, "ttft_s": 3.0 / tok_s[bi],
                     "prefill_tok_s": 4.0 * tok_s[bi], "decode_tok_s": tok_s[bi]})
        if fail is None:
            self.ev({"type": "agreement", "prompt": i, "stats": {"positions": n, "mean_kl": kl,
                     "max_kl": kl * 4, "top1_agreement": top1, "exact": True}})

    def cache(self, hits, misses):
        layers = [{"layer": l, "hits": [hits // (self.layers * self.experts)] * self.experts,
                   "misses": [misses // (self.layers * self.experts)] * self.experts,
                   "evictions": [1] * self.experts,
                   "resident": [e < 8 for e in range(self.experts)]} for l in range(self.layers)]
        self.ev({"type": "cache", "backend": "selective", "snapshot": {
            "layers": layers, "hits": hits, "misses": misses, "evictions": misses - 48,
            "bytes_read": misses * MIB, "resident_experts": 48, "resident_bytes": 48 * MIB,
            "capacity_experts": 48, "capacity_bytes": 48 * MIB,
            "load_latency": {"count": misses, "mean_us": 40.0, "p50_us": 35.0, "p95_us": 80.0, "max_us": 200.0},
            "load_time_us": misses * 40, "prefetch": None}})

    def finish(self, ppl=(10.0, 10.0), reason="completed"):
        if ppl:
            for b, p in zip(("native", "selective"), ppl):
                self.ev({"type": "perplexity", "backend": b, "perplexity": p, "tokens": 300})
        self.ev({"type": "finished", "reason": reason})

    def write(self):
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / f"{self.name}.ndjson", "w") as f:
            for l in self.lines:
                f.write(json.dumps(l, separators=(",", ":")) + "\n")


THINKING = ("The user asks for the capital of France . That is Paris , on the Seine . </think> "
            "\n\nThe capital of France is Paris .").split(" ")


def main():
    # Step mode: the run waits after each prompt (30 s of reading after the first) until the
    # user goes on; selective's cache totals before and after prompt 2 give its own hit rate.
    s = Session("step_mode", SHORT)
    s.ev({"type": "step_mode", "on": True})
    s.start((10, 10), (500, 150))
    s.prompt(0, (100.0, 80.0), 30)
    s.cache(200, 60)
    s.ev({"type": "waiting", "prompt": 0})
    s.ev({"type": "continued", "prompt": 0}, dt=30.0)
    s.prompt(1, (100.0, 60.0), 30, diverge_at=20)
    s.cache(500, 100)
    s.ev({"type": "waiting", "prompt": 1})
    s.ev({"type": "continued", "prompt": 1}, dt=12.0)
    s.prompt(2, (100.0, 80.0), 30)
    s.finish()
    s.write()

    # Selective's speed swings from prompt to prompt around half of native's: the speed
    # criteria are within their noise of their thresholds, so the verdict may not rest on them.
    s = Session("unclear_speed", SHORT)
    s.start((10, 10), (500, 150))
    for i, sel in enumerate([30.0, 80.0, 45.0]):
        s.prompt(i, (100.0, sel), 30)
    s.finish()
    s.write()

    # A Thinking checkpoint: the template opened <think>, the output reasons, closes the block and
    # answers; prompt 1 diverges in the answer, prompt 2 in the reasoning.
    s = Session("thinking", SHORT)
    s.start((10, 10), (500, 150))
    s.prompt(0, (100.0, 80.0), len(THINKING), words=THINKING, opens_thinking=True)
    s.prompt(1, (100.0, 80.0), len(THINKING), words=THINKING, opens_thinking=True, diverge_at=19)
    s.prompt(2, (100.0, 80.0), len(THINKING), words=THINKING, opens_thinking=True, diverge_at=4)
    s.finish()
    s.write()

    s = Session("viable", SHORT)
    s.start((10, 10), (500, 150))
    for i in range(3):
        s.prompt(i, (100.0, 80.0), 30)
    s.cache(600, 120)
    s.finish()
    s.write()

    s = Session("degraded", SHORT)
    s.start((10, 10), (500, 150), degraded=(False, True))
    for i in range(3):
        s.prompt(i, (100.0, 80.0), 30)
    s.finish()
    s.write()

    s = Session("native_preferred", SHORT)
    s.start((10, 10), (500, 150))
    for i in range(3):
        s.prompt(i, (100.0, 8.0), 30)
    s.cache(50, 700)
    s.finish()
    s.write()

    s = Session("perturbed", SHORT)
    s.start((10, 10), (500, 150))
    for i in range(3):
        s.prompt(i, (100.0, 80.0), 30, diverge_at=6, kl=0.2, top1=0.7)
    s.finish(ppl=(10.0, 13.0))
    s.write()

    s = Session("hybrid", SHORT + LONG)
    s.start((10, 10), (500, 150))
    for i in range(3):
        s.prompt(i, (100.0, 80.0), 30)
    for i in range(3, 5):
        s.prompt(i, (100.0, 30.0), 60)
    s.finish()
    s.write()

    s = Session("failed", SHORT)
    s.start((10, 10), (500, 150))
    s.prompt(0, (100.0, 80.0), 30)
    s.prompt(1, (100.0, 80.0), 30, fail="selective")
    s.prompt(2, (100.0, 80.0), 30, fail="done-selective")
    s.finish(ppl=None)
    s.write()

    s = Session("too_few_tokens", SHORT[:1])
    s.start((10, 10), (500, 150))
    s.prompt(0, (100.0, 80.0), 5)
    s.finish()
    s.write()

    # The seed project's own numbers (Qwen3-Omni on a Thor): native ~64 GB at 1.32 tok/s,
    # selective ~9.5 GB at 0.06 tok/s -> NATIVE PREFERRED under the seed profile.
    s = Session("seed_numbers", SHORT, profile="seed", experts=128, layers=48)
    s.start((1000, 1000), (64000, 9500), load_s=(167.0, 7.4))
    for i in range(3):
        s.prompt(i, (1.32, 0.06), 25, mem=(64000, 9500))
    s.finish(ppl=None)
    s.write()
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
