#!/usr/bin/env python3
"""The bf16 expert kernels alone, against the copy bandwidth and against a plain read of the same
bytes (issue 22's "expert GEMVs at >= 80 % of the copy bandwidth").

Run on an NVIDIA machine with torch (CUDA), from the repo root:

  python3 scripts/gpu_kernel_bench.py --ptx head=src/model/kernels/moe_decode.ptx \
      [--ptx NAME=OTHER.ptx ...] --stream dist/ptx/stream_read.ptx [--layers 8] [--json OUT]

Each --ptx is a build of src/model/kernels/moe_decode.cu (nvcc --ptx -arch=compute_80 -O3, as
scripts/build_kernels.sh makes it); --stream is scripts/kernels/stream_read.cu the same way (with
-Isrc/model/kernels; repeatable as NAME=PATH to compare builds of it).
The driver JIT-compiles each for the card, as moescope's own launches do.

Geometry: Qwen3-30B-A3B's experts (128 experts, hidden 2048, intermediate 768, top-8), LAYERS
layers of random bf16 stacks so that no launch finds the previous launch's rows in L2 (50 MB on
an H200; one layer's routed rows are 25 + 50 MB). For each build it runs
  gate_up   moe_decode_gate_up_bf16 as moescope launches it (a warp per routed row pair, 8 warps
            a block), over the layers in turn, captured as one CUDA graph;
  down      moe_decode_down_bf16 (a block per 4 output rows, a warp per routed expert), with the
            residual folded in, the same way;
  layer     gate_up then down for each layer (a step's expert part);
and checks that every build's outputs are the first build's bits. `stream` times stream_read over
the same byte counts with several grid sizes and keeps the best: what one launch reading that
many bytes reaches. The copy bandwidth is moescope's (`bench steps`): the best of five 1 GiB
device-to-device copies, counted as 2 x bytes / s.
"""
import argparse
import ctypes
import json

import torch

E, H, I, K = 128, 2048, 768, 8
DOWN_ROWS = 4
WARPS_PER_BLOCK = 8

cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
cuda.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
cuda.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_void_p,
]


def check(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: CUresult {r}")


def load(path, names):
    """The named kernels of a PTX file, JIT-compiled by the driver."""
    mod = ctypes.c_void_p()
    with open(path, "rb") as f:
        check(cuda.cuModuleLoadData(ctypes.byref(mod), f.read() + b"\0"), f"load {path}")
    out = {}
    for n in names:
        fn = ctypes.c_void_p()
        check(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, n.encode()), f"{n} in {path}")
        out[n] = fn
    return out


def launch(fn, grid, block, args):
    vals = []
    for a in args:
        if isinstance(a, torch.Tensor):
            vals.append(ctypes.c_uint64(a.data_ptr()))
        elif a is None:
            vals.append(ctypes.c_uint64(0))
        elif isinstance(a, ctypes._SimpleCData):
            vals.append(a)
        else:
            vals.append(ctypes.c_int(a))
    ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    stream = torch.cuda.current_stream().cuda_stream
    check(cuda.cuLaunchKernel(fn, *grid, *block, 0, stream, ptrs, None), "launch")


def timed(body, launches, replays=7):
    """Best per-launch time (µs) of a CUDA graph of `body`'s launches."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # once outside the capture: JIT and first-touch
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(replays):
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b))
    return best * 1000 / launches


def copy_bandwidth():
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b))
    return 2 * n / (best * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptx", action="append", required=True, help="NAME=PATH[,dw=W][,gu=G][,rows=R] of a moe_decode build, launched as moescope "
                    "does unless told: W warps a routed expert in the down kernel's blocks, R output rows "
                    "a down block, G times the gate_up blocks (for builds that change the kernels' split); co=C: "
                    "the kernels' preferred shared-memory carveout in % (CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT)")
    ap.add_argument("--stream", action="append", default=[], help="NAME=PATH (or PATH) of a stream_read.ptx build; repeatable")
    ap.add_argument("--between", type=float, default=0.0, help="MB read by the first --stream build before each "
                    "layer's pair in an extra `step` timing (0: none): the pair between other reads, as in a step")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=12, help="passes over the layers in one graph")
    ap.add_argument("--same-inputs", action="store_true", help="every launch reads the same x (and down the same "
                    "mid rows), as this bench did before 2026-12-03: flatters builds that keep them in L1 across launches")
    ap.add_argument("--json")
    a = ap.parse_args()

    torch.manual_seed(0)
    dev = "cuda"
    L, R = a.layers, a.repeats
    gate_up = [torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=dev).normal_(0, 0.02) for _ in range(L)]
    down = [torch.empty(E, H, I, dtype=torch.bfloat16, device=dev).normal_(0, 0.02) for _ in range(L)]
    ids = [torch.randperm(E)[:K].to(torch.int32).to(dev) for _ in range(L)]
    x = torch.randn(H, dtype=torch.bfloat16, device=dev)
    w = torch.softmax(torch.randn(K), 0).to(torch.bfloat16).float().to(dev)
    res = torch.randn(H, dtype=torch.bfloat16, device=dev)
    mid = [torch.empty(K, I, dtype=torch.bfloat16, device=dev) for _ in range(L)]
    y = [torch.empty(H, dtype=torch.bfloat16, device=dev) for _ in range(L)]
    # Each launch of a timed graph reads its own copy of x (and down its own mid rows), as a
    # decode step's kernels read what the kernel before them has just written: one x shared by
    # all launches stays in each SM's L1 from launch to launch, which no step gives.
    n_launch = L * R
    fresh = not a.same_inputs
    xs = [x.clone() for _ in range(n_launch)] if fresh else None
    mids = [torch.empty(K, I, dtype=torch.bfloat16, device=dev) for _ in range(n_launch)] if fresh else None
    gu_grid = ((K * I + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK, 1, 1)
    gu_block = (32 * WARPS_PER_BLOCK, 1, 1)
    dn_block = (32 * K, 1, 1)
    gu_bytes = K * 2 * I * H * 2
    dn_bytes = K * H * I * 2

    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:,.0f} GB/s (2 x 1 GiB / best of 5)")
    print(f"{L} layers of random stacks; routed bytes a launch: gate_up {gu_bytes / 1e6:.1f} MB, "
          f"down {dn_bytes / 1e6:.1f} MB; {L * R} launches a graph, best of 7 replays")

    # j: the launch's place in a timed graph (its own inputs when fresh); None for the bit check.
    def gu(fns, l, mult=1, j=None):
        xi, mo = (xs[j], mids[j]) if fresh and j is not None else (x, mid[l])
        launch(fns["moe_decode_gate_up_bf16"], (gu_grid[0] * mult, 1, 1), gu_block, [gate_up[l], ids[l], None, xi, mo, K, I, H])

    def dn(fns, l, per_expert=1, rows=DOWN_ROWS, j=None):
        mi = mids[j] if fresh and j is not None else mid[l]
        launch(fns["moe_decode_down_bf16"], ((H + rows - 1) // rows, 1, 1), (dn_block[0] * per_expert, 1, 1),
               [down[l], ids[l], None, w, mi, y[l], res, K, I, H])

    between = None
    if a.between > 0 and a.stream:
        spec0 = a.stream[0]
        sfn = load(spec0.split("=", 1)[1] if "=" in spec0 else spec0, ["stream_read"])["stream_read"]
        nb = int(a.between * 1e6) // 16 * 16
        bbuf = torch.empty(L * nb, dtype=torch.uint8, device=dev).random_()
        bout = torch.zeros(4224, dtype=torch.int32, device=dev)

        def between(l):
            launch(sfn, (4224, 1, 1), (256, 1, 1), [bbuf[l * nb:], ctypes.c_uint64(nb // 16), bout])

    rows = []
    first = None
    for spec in a.ptx:
        name, path = spec.split("=", 1)
        path, *opts = path.split(",")
        opts = dict(o.split("=") for o in opts)
        per, gu_mult, drows = int(opts.get("dw", 1)), int(opts.get("gu", 1)), int(opts.get("rows", DOWN_ROWS))
        fns = load(path, ["moe_decode_gate_up_bf16", "moe_decode_down_bf16"])
        if "co" in opts:  # the kernels' preferred shared-memory carveout, % (0: the most L1)
            for fn in fns.values():
                check(cuda.cuFuncSetAttribute(fn, 9, int(opts["co"])), "carveout")
        for l in range(L):
            gu(fns, l, gu_mult)
            dn(fns, l, per, drows)
        torch.cuda.synchronize()
        outs = [t.clone() for t in mid + y]
        if first is None:
            first = outs
            # A sanity check of the arithmetic (not of the bits): layer 0 in f32 on torch.
            g = gate_up[0][ids[0].long()].float() @ x.float()
            gb, ub = g[:, :I].bfloat16().float(), g[:, I:].bfloat16().float()
            m = ((gb * torch.sigmoid(gb)).bfloat16().float() * ub).bfloat16()
            d = torch.einsum("khi,ki->kh", down[0][ids[0].long()].float(), m.float()).bfloat16().float()
            yr = (d * w[:, None]).bfloat16().float().sum(0).bfloat16().float() + res.float()
            print(f"layer 0 against torch f32: mid max |diff| {(m.float() - mid[0].float()).abs().max():.3g}, "
                  f"y max |diff| {(yr - y[0].float()).abs().max():.3g}")
            same = True
        else:
            same = all(torch.equal(p.view(torch.int16), q.view(torch.int16)) for p, q in zip(first, outs))
        if fresh:
            for j in range(n_launch):
                mids[j].copy_(mid[j % L])
        t_gu = timed(lambda: [gu(fns, l, gu_mult, j=q * L + l) for q in range(R) for l in range(L)], L * R)
        t_dn = timed(lambda: [dn(fns, l, per, drows, j=q * L + l) for q in range(R) for l in range(L)], L * R)
        t_ly = timed(lambda: [(gu(fns, l, gu_mult, j=q * L + l), dn(fns, l, per, drows, j=q * L + l))
                              for q in range(R) for l in range(L)], L * R)
        t_st = None
        if between:
            t_st = timed(lambda: [(between(l), gu(fns, l, gu_mult, j=q * L + l), dn(fns, l, per, drows, j=q * L + l))
                                  for q in range(R) for l in range(L)], L * R)
            print(f"{name:>12}: step-like (a {a.between:g} MB read, gate_up, down) {t_st:6.2f} µs a layer")
        row = {
            "build": name,
            "step_like_us": t_st,
            "bits_equal_first": same,
            "gate_up_us": t_gu,
            "gate_up_of_copy": gu_bytes / (t_gu * 1e-6) / 1e9 / copy,
            "down_us": t_dn,
            "down_of_copy": dn_bytes / (t_dn * 1e-6) / 1e9 / copy,
            "layer_us": t_ly,
        }
        rows.append(row)
        print(f"{name:>12}: gate_up {t_gu:6.2f} µs ({100 * row['gate_up_of_copy']:.1f} % of copy), "
              f"down {t_dn:6.2f} µs ({100 * row['down_of_copy']:.1f} %), gate_up+down {t_ly:6.2f} µs, "
              f"bits {'= first' if same else 'DIFFER from first'}")

    stream = {}
    for spec in a.stream:
        sname, spath = spec.split("=", 1) if "=" in spec else ("stream_read", spec)
        fn = load(spath, ["stream_read"])["stream_read"]
        buf = torch.empty(L * gu_bytes, dtype=torch.uint8, device=dev).random_()
        out = torch.zeros(132 * 64, dtype=torch.int32, device=dev)
        stream[sname] = {}
        for what, n in (("down", dn_bytes), ("gate_up", gu_bytes)):
            best = None
            for blocks in (132, 264, 528, 1056, 2112, 4224):
                for threads in (256, 512):
                    t = timed(lambda: [launch(fn, (blocks, 1, 1), (threads, 1, 1),
                                              [buf[l * gu_bytes:], ctypes.c_uint64(n // 16), out]) for _ in range(R) for l in range(L)],
                              L * R)
                    if best is None or t < best[0]:
                        best = (t, blocks, threads)
            t, blocks, threads = best
            stream[sname][what] = {"us": t, "of_copy": n / (t * 1e-6) / 1e9 / copy, "blocks": blocks, "threads": threads}
            print(f"  {sname} {n / 1e6:.1f} MB ({what}'s bytes): {t:6.2f} µs "
                  f"({100 * stream[sname][what]['of_copy']:.1f} % of copy; best grid {blocks} x {threads})")
        del buf
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy, "layers": L,
                       "builds": rows, "stream_read": stream}, f, indent=1)


if __name__ == "__main__":
    main()
