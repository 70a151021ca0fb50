#!/usr/bin/env python3
"""The staged GPU path's speed model (BENCHMARKS.md §27) against a sweep's own figures.

    python3 scripts/staged_prediction.py SWEEP.json [SWEEP.json ...]

SWEEP.json: `moescope sweep ... -o SWEEP.json` on a GPU whose misses took the staged path (as
`scripts/gpu_staged.sh` runs it). Per capacity, a decode step is predicted as the piecewise step
(selective reading routing back, all resident) plus, per layer that misses, min(read, copy), and
per miss max(read, copy) — read: the smallest capacity's mean miss host time; copy: its staged
copies' device time per miss. Nothing is fitted. The layers that miss per step come from the
simulator (`decode_miss_layers`) when the sweep has them, else they are estimated from the misses
per step as if spread at random over the layers (Poisson). Prints each row beside the sweep's own
prediction (one cost per miss) and the measured speed.
"""
import json
import math
import sys


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in sys.argv[1:]:
        d = json.load(open(path))
        rows = [r for r in d["rows"] if r.get("measured_decode_tok_s")]
        if not rows or not d.get("selective_uncaptured_decode_tok_s"):
            raise SystemExit(f"{path}: no measured rows or no piecewise step time")
        layers = int(d.get("num_layers") or 48)  # older sweeps do not say: the full geometry
        piecewise = 1.0 / d["selective_uncaptured_decode_tok_s"]
        first = rows[0]
        read = first["miss_cost_us"] * 1e-6
        copy = first["h2d_time_us"] * 1e-6 / first["simulated"]["misses"]
        print(f"{path}: piecewise step {piecewise * 1e3:.2f} ms, read {read * 1e3:.3f} ms, "
              f"copy {copy * 1e3:.3f} ms a miss")
        old, new = [], []
        for r in rows:
            sim = r["simulated"]
            steps = sum(p["steps"] for p in r["decode_paths"])
            m = sim["decode_misses"] / steps
            if "decode_miss_layers" in sim:
                lay, how = sim["decode_miss_layers"] / steps, "simulated"
            else:
                lay, how = layers * (1 - math.exp(-m / layers)), "estimated"
            p = 1.0 / (piecewise + lay * min(read, copy) + m * max(read, copy))
            x = r["measured_decode_tok_s"]
            new.append(abs(p - x) / x)
            if r.get("prediction_error_pct") is not None:
                old.append(r["prediction_error_pct"])
            print(f"  {r['capacity_pct']:5.1f} %: measured {x:6.1f} tok/s, sweep's prediction "
                  f"{r['predicted_decode_tok_s']:6.1f}, this model {p:6.1f} ({100 * abs(p - x) / x:4.1f} %); "
                  f"{m:.1f} misses and {lay:.1f} layers that miss a step ({how})")
        print(f"  mean error: sweep's {sum(old) / max(len(old), 1):.1f} %, "
              f"this model's {100 * sum(new) / len(new):.1f} %")


if __name__ == "__main__":
    main()
