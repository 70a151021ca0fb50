#!/usr/bin/env bash
# Issue 18: does the default run give the same verdict every time? Runs `moescope run --no-tui`
# (the bundled model, the standard prompts, every default) N times in a row and prints one line
# per run — verdict, memory saved, speed ratio with its noise — then how many of each verdict.
#
#   scripts/verdict_stability.sh [BIN] [N] [EXTRA_ARGS…]
#
# BIN defaults to target/release/moescope; N to 10. Recordings and outputs go to a temp dir.
# A benchmark, not a test: BENCHMARKS.md §9 records what it said.
set -uo pipefail
BIN=${1:-target/release/moescope}
N=${2:-10}
shift 2 2>/dev/null || shift $#
DIR=$(mktemp -d)
for i in $(seq 1 "$N"); do
  "$BIN" run --no-tui --record "$DIR/r$i.ndjson" "$@" > "$DIR/o$i.txt" 2>&1 || echo "run $i exited $?"
  "$BIN" export "$DIR/r$i.ndjson" > "$DIR/s$i.json"
  python3 - "$DIR/s$i.json" "$i" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
crit = {c["metric"] + c["group"]: c for c in s["verdict"]["criteria"]}
sp = crit.get("speed_ratioviable", {})
mem = s["comparison"]["memory_reduction_pct"]
noise = sp.get("noise")
print(f"run {sys.argv[2]:>2}: {s['verdict']['outcome']:<17} memory saved {mem:5.1f} %  "
      f"speed ratio {sp.get('measured', float('nan')):.3f}"
      + (f" ± {noise:.3f}" if noise is not None else "")
      + ("  (unclear)" if sp.get("unclear") else ""))
PY
done | tee "$DIR/lines.txt"
echo "verdicts:"; awk '{print $3}' "$DIR/lines.txt" | sort | uniq -c
echo "outputs in $DIR"
