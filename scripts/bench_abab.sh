#!/bin/bash
# Usage: BASE=path/to/old/moescope HEAD=path/to/new/moescope scripts/bench_abab.sh (an engine
# preset model in /tmp/engine: moescope bench random-checkpoint --preset engine --out /tmp/engine).
# ABAB, 4 rounds: native and selective decode on the engine preset (random weights: no early
# EOS), 256 new tokens, f32 and bf16; the bundled model's bench decode (native, 64 tokens).
out=${OUT:-/tmp/abab2}; rm -rf $out; mkdir -p $out
P="Write a long story about a lighthouse keeper and the sea."
for round in 1 2 3 4; do
  for v in base head; do
    if [ $v = base ]; then b=${BASE:?}; else b=${HEAD:?}; fi
    for dt in f32 bf16; do
      for be in native selective; do
        $b generate --model /tmp/engine --dtype $dt --backend $be --prefetch none --prompt "$P" --max-new-tokens 256 --json > $out/gen-$be-$dt-$v-$round.json 2>/dev/null
      done
    done
    $b bench decode --model models/tiny-moe --dtype f32,bf16 --repeats 3 --json > $out/bench-$v-$round.json 2>/dev/null
  done
done
echo done > $out/DONE
