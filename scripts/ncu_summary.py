#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV: the last decode step, or (--all) everything.

On the GPU machine (ncu ships with CUDA there; nsys there cannot import its own traces):

    MOESCOPE_CUDA_GRAPHS=0 ncu --csv --metrics gpu__time_duration.sum -c 20000 \
        --log-file ncu.csv moescope logits --model M --tokens 1,2,3,4 --greedy 3 \
        --device cuda:0 --dtype bf16 > /dev/null
    python3 scripts/ncu_summary.py ncu.csv

Graphs off so that each kernel is profiled on its own. Loading the weights launches a copy
kernel per tensor (~3,000 at 12 layers, ~12,000 at 48) before the first decode kernel, so `-c`
must cover those too; the script says so when the profile ends before a decode step. The default window is the last 8 MoE
layers' kernels (it starts after the 9th-from-last experts kernel), so it includes the previous
step's final norm and lm_head. `--all` sums every kernel in the file instead (a prefill: profile
a run with one forward pass of the prompt). ncu locks clocks and flushes caches unless told not
to: compare kernels with each other, not with tok/s.
"""
import csv, collections, sys
args = [a for a in sys.argv[1:] if not a.startswith('--')]
whole = '--all' in sys.argv
if len(args) != 1:
    sys.exit('usage: ncu_summary.py NCU.csv [--all]')
try:
    rows = list(csv.reader(open(args[0])))
except OSError as e:
    sys.exit(f'{args[0]}: {e}')
# From the header on: without --log-file the program's own output comes first, and its lines
# may have commas too.
head = next((i for i, r in enumerate(rows) if 'Kernel Name' in r and 'Metric Value' in r), None)
rows = [] if head is None else [r for r in rows[head:] if len(r) == len(rows[head])]
if not rows:
    sys.exit(f"{args[0]}: not an ncu --csv profile (no 'Kernel Name' / 'Metric Value' header)")
hdr=rows[0]; rows=rows[1:]
ni=hdr.index('Kernel Name'); vi=hdr.index('Metric Value')
if 'Metric Name' in hdr:  # a profile of several metrics: the durations only
    mi = hdr.index('Metric Name')
    rows = [r for r in rows if r[mi] == 'gpu__time_duration.sum']
ks=[(r[ni], float(r[vi].replace(',',''))) for r in rows]
if whole:
    step = ks
    print('kernels', len(step), 'total us', sum(d for _, d in step)/1000)
else:
    moe=[i for i,(n,_) in enumerate(ks) if 'moe_decode_down' in n or 'moe_gemm' in n]
    if len(moe) < 9:
        sys.exit(f"{args[0]}: {len(ks)} kernels, {len(moe)} of them experts kernels; the window "
                 "needs 9 (the profile ended before a decode step's last layers: raise ncu's -c, "
                 "or pass --all)")
    start = moe[-9]+1
    step=ks[start:]
    print('last step kernels',len(step),'total us',sum(d for _,d in step)/1000)
agg=collections.defaultdict(lambda:[0,0.0])
for n,d in step:
    agg[n[:60]][0]+=1; agg[n[:60]][1]+=d
for k,(c,d) in sorted(agg.items(), key=lambda x:-x[1][1])[:25]:
    print(f"{d/1000:8.1f} us {c:4d}x {d/c/1000:6.1f} each {k}")
