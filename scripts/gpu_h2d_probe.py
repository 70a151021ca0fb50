#!/usr/bin/env python3
"""Where the staged miss path's copy bandwidth goes (issue 22, BENCHMARKS.md §27 / §73).

The staged path reads a missed expert from the page cache into a page-locked ring buffer with
CPU threads, then copies it to the device. On an H200 host those copies ran at 23-26 GB/s of
device time, against 46-52 GB/s for the direct path's copies from registered file pages. This
probe separates the parts, with torch on the device machine (no moescope needed):

  * host->device copies of one expert's bytes (9 MiB) from page-locked memory, alone;
  * the same while CPU threads copy memory (what the next miss's read does meanwhile);
  * the CPU read alone (page cache -> page-locked buffer), 1 and N threads;
  * each of the above with the process bound to each NUMA node in turn, when numactl exists.

Run from the repo root on an NVIDIA machine:  python3 scripts/gpu_h2d_probe.py [--json OUT]
Prints one line per measurement; --json writes them all.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

EXPERT = 9 * 1024 * 1024  # one Qwen3-30B-A3B bf16 expert (gate, up, down)


def topology():
    out = {}
    for cmd in (["nvidia-smi", "topo", "-m"], ["numactl", "-H"], ["lscpu"]):
        if shutil.which(cmd[0]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            out[" ".join(cmd)] = r.stdout
    try:
        import torch

        bus = torch.cuda.get_device_properties(0).pci_bus_id if hasattr(
            torch.cuda.get_device_properties(0), "pci_bus_id") else None
        out["pci_bus_id"] = bus
    except Exception as e:  # noqa: BLE001 - only a label
        out["pci_bus_id"] = repr(e)
    nodes = {}
    for dev in os.listdir("/sys/bus/pci/devices"):
        p = f"/sys/bus/pci/devices/{dev}"
        try:
            if open(f"{p}/vendor").read().strip() == "0x10de" and open(f"{p}/class").read().startswith("0x03"):
                nodes[dev] = open(f"{p}/numa_node").read().strip()
        except OSError:
            pass
    out["gpu_numa_node"] = nodes
    return out


def measure(threads, rounds):
    import numpy as np
    import torch

    dev = torch.device("cuda:0")
    stream = torch.cuda.Stream()
    dst = torch.empty(2 * EXPERT, dtype=torch.uint8, device=dev)
    pinned = [torch.empty(EXPERT, dtype=torch.uint8).pin_memory() for _ in range(2)]
    for p in pinned:
        p.numpy()[:] = 7
    # a "page cache": plain memory, larger than the last-level cache, read like the files
    src = np.ones(64 * EXPERT, dtype=np.uint8)
    res = {}

    def h2d(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for i in range(n):
                dst[(i % 2) * EXPERT:(i % 2 + 1) * EXPERT].copy_(pinned[i % 2], non_blocking=True)
            end.record(stream)
        end.synchronize()
        return n * EXPERT / (start.elapsed_time(end) / 1e3) / 1e9

    def cpu_read(nthreads, seconds, out=None):
        """Copies `src` into a page-locked buffer in nthreads slices until `seconds` pass."""
        buf = pinned[0].numpy()
        stop = time.perf_counter() + seconds
        moved = [0] * nthreads

        def work(t):
            part = EXPERT // nthreads
            i = 0
            while time.perf_counter() < stop:
                s = ((i * nthreads + t) % 64) * EXPERT + t * part
                np.copyto(buf[t * part:(t + 1) * part], src[s:s + part])
                moved[t] += part
                i += 1

        ts = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        gbs = sum(moved) / (time.perf_counter() - t0) / 1e9
        if out is not None:
            out.append(gbs)
        return gbs

    h2d(20)
    res["h2d_alone_gbs"] = max(h2d(rounds) for _ in range(3))
    # one big copy, to see the link itself
    big = torch.empty(256 * 1024 * 1024, dtype=torch.uint8).pin_memory()
    bigd = torch.empty_like(big, device=dev)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    bigd.copy_(big, non_blocking=True)
    e1.record()
    e1.synchronize()
    res["h2d_256mib_gbs"] = big.numel() / (e0.elapsed_time(e1) / 1e3) / 1e9
    # the read alone, then copies while it runs, for each thread count up to `threads`
    for n in sorted({1, 2, 4, 8, threads} & set(range(1, threads + 1))):
        res[f"cpu_read_{n}t_gbs"] = cpu_read(n, 1.0)
        got = []
        t = threading.Thread(target=cpu_read, args=(n, 3.0, got))
        t.start()
        time.sleep(0.2)
        res[f"h2d_during_{n}t_read_gbs"] = min(h2d(rounds) for _ in range(3))
        t.join()
        res[f"cpu_{n}t_read_during_h2d_gbs"] = got[0] if got else None
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.threads, a.rounds)))
        return
    report = {"topology": topology(), "runs": {}}
    for k, v in report["topology"].items():
        if k in ("gpu_numa_node", "pci_bus_id"):
            print(f"{k}: {v}")
    variants = [("unbound", [])]
    if shutil.which("numactl"):
        r = subprocess.run(["numactl", "-H"], capture_output=True, text=True).stdout
        line = next((ln for ln in r.splitlines() if ln.startswith("available:")), "")
        count = int(line.split()[1]) if line else 1
        if count > 1:
            variants += [(f"node{n}", ["numactl", f"--cpunodebind={n}", f"--membind={n}"])
                         for n in range(count)]
    for name, prefix in variants:
        cmd = prefix + [sys.executable, __file__, "--child", "--threads", str(a.threads),
                        "--rounds", str(a.rounds)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed: {r.stderr.strip()[-400:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        report["runs"][name] = res
        print(name + ": " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in res.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
