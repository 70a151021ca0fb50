#!/usr/bin/env bash
# tests/fixtures/events/inspect.ndjson: a real run of the bundled model (12 new tokens, a
# 40-expert cache so selective loads experts) recorded with the per-token detail the token
# inspector shows (alternatives, loads, routing). The dashboard snapshots of the inspector read
# it. Rerun after changing what a run records (timings will differ; the snapshots then too):
#   cargo build && scripts/make_inspect_fixture.sh [BIN]
set -euo pipefail
BIN=${1:-target/debug/moescope}
OUT=tests/fixtures/events/inspect.ndjson
rm -f "$OUT"
"$BIN" run --no-tui --max-new-tokens 12 --cache-experts 40 --reference none --record "$OUT" > /dev/null
rm -f "${OUT%.ndjson}.summary.json" "$OUT.summary.json"
echo "wrote $OUT ($(wc -c < "$OUT") bytes)"
