#!/usr/bin/env python3
"""Why both backends decode slower "side by side" on one GPU (issue 22's first open effect).

Run on an NVIDIA machine with torch (CUDA):   python3 scripts/gpu_two_contexts.py [--steps N]

The sweep's side-by-side comparison runs native and selective as two worker processes on one GPU
under the alternate schedule: each decode step of one waits for the other's, over a pipe, and is
timed from the moment it starts to its token. Three things could make those steps slower than
the same steps run alone: the wait itself (a process blocked on a pipe wakes up late), the GPU
switching between two processes' contexts, and whatever the other process left in the caches.
This measures each with the same stand-in for a decode step — a CUDA graph of GEMVs that streams
STEP_BYTES of bf16 weights (about a 30B-A3B 8-layer step), replayed and synchronised:

  alone      one process, steps back to back (what `generate` and a lone sweep row time)
  echo       one GPU process, each step started by a token from a CPU-only process (a pipe
             round trip per step, no second GPU context)
  two        two GPU processes (one context each), steps in turn over pipes — the alternate
             schedule
  two-idle   as alone, but a second GPU process holds a context and does nothing
  two-claim  as two, but each turn first runs a one-byte memset and waits, untimed (what a
             moescope worker does before a stepped token: `Engine::take_turn_on_device`)

Each mode prints the median and mean time of the timed part (replay + synchronise) per step.
"""
import argparse
import json
import multiprocessing as mp
import statistics
import time

STEP_BYTES = 1_600 * 2**20  # bytes of weights a stand-in step reads
ROWS, COLS = 4096, 2048  # one GEMV's matrix (16 MiB of bf16)


def make_step(torch):
    """A captured graph that reads STEP_BYTES of weights in GEMVs, and a function replaying it."""
    n = STEP_BYTES // (ROWS * COLS * 2)
    ws = [torch.randn(ROWS, COLS, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    x = torch.randn(COLS, 1, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(ROWS, 1, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for w in ws[:3]:
            torch.matmul(w, x, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            torch.matmul(w, x, out=out)
    torch.cuda.synchronize()

    def step():
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def gpu_worker(conn, steps, role):
    """role 'alone': free-running; 'echo'/'two'/'claim': a step per token received, then a token
    back ('claim': after an untimed one-byte memset and a wait); 'idle': a context that waits
    until told to stop."""
    import torch

    step = make_step(torch)
    flag = torch.zeros(1, device="cuda", dtype=torch.uint8)
    for _ in range(20):
        step()
    conn.send("ready")
    times = []
    if role == "idle":
        conn.recv()
        conn.send([])
        return
    if role == "alone":
        conn.recv()
        times = [step() for _ in range(steps)]
        conn.send(times)
        return
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        if role == "claim":
            flag.zero_()
            torch.cuda.synchronize()
        times.append(step())
        conn.send("done")
    conn.send(times)


def summary(times):
    ms = [t * 1e3 for t in times]
    return {"median_ms": round(statistics.median(ms), 4), "mean_ms": round(statistics.fmean(ms), 4),
            "p90_ms": round(sorted(ms)[int(0.9 * len(ms))], 4), "steps": len(ms)}


def run(mode, steps):
    ctx = mp.get_context("spawn")
    pairs = []
    roles = {"alone": ["alone"], "echo": ["echo"], "two": ["two", "two"], "two-idle": ["alone", "idle"],
             "two-claim": ["claim", "claim"]}[mode]
    for role in roles:
        a, b = ctx.Pipe()
        p = ctx.Process(target=gpu_worker, args=(b, steps, role))
        p.start()
        pairs.append((p, a, role))
    for _, a, _ in pairs:
        assert a.recv() == "ready"
    out = {}
    if mode in ("alone", "two-idle"):
        pairs[0][1].send("go")
        out["a"] = summary(pairs[0][1].recv())
        for _, a, role in pairs[1:]:
            a.send("stop")
            a.recv()
    elif mode == "echo":
        a = pairs[0][1]
        for _ in range(steps):
            a.send("step")  # this process is the CPU-only side: it only passes tokens
            a.recv()
        a.send("stop")
        out["a"] = summary(a.recv())
    else:
        (_, a, _), (_, b, _) = pairs
        for _ in range(steps):
            a.send("step")
            a.recv()
            b.send("step")
            b.recv()
        a.send("stop")
        b.send("stop")
        out["a"], out["b"] = summary(a.recv()), summary(b.recv())
    for p, _, _ in pairs:
        p.join()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    res = {}
    for r in range(args.rounds):
        for mode in ["alone", "echo", "two", "two-idle", "two-claim"]:
            res[f"{mode} {r + 1}"] = run(mode, args.steps)
            print(mode, r + 1, json.dumps(res[f"{mode} {r + 1}"]), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
