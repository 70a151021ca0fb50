#!/usr/bin/env bash
# The fuzzing campaign on a many-core machine without a Rust toolchain: runs prebuilt cargo-fuzz
# binaries (ASan, libFuzzer) of every target at once, each with several jobs, until each target
# has made RUNS executions or SECONDS_LIMIT passes. Prints one line per target (executions this
# round, findings) and writes the jobs' logs, the grown corpora and any crash under OUT.
#
#   scripts/fuzz_campaign.sh BIN_DIR CORPUS_TAR OUT [RUNS] [SECONDS_LIMIT]
#
# BIN_DIR holds TARGET.gz (stripped `cargo +nightly fuzz build --fuzz-dir fuzz -O` binaries);
# CORPUS_TAR the seed corpora (tar of fuzz/corpus). The corpora are unpacked once into
# /tmp/fuzz-campaign and grow there, so a second round on the same machine goes on from them.
# Same limits as scripts/fuzz.sh: allocation > 1 GiB, RSS > 2 GiB or an input over 10 s fails.
set -uo pipefail
BIN_DIR=${1:?usage: fuzz_campaign.sh BIN_DIR CORPUS_TAR OUT [RUNS] [SECONDS_LIMIT]}
CORPUS_TAR=${2:?}
OUT=${3:?}
RUNS=${4:-10000000}
LIMIT=${5:-540}
WORK=/tmp/fuzz-campaign
mkdir -p "$WORK/bin" "$OUT"
[ -d "$WORK/corpus" ] || tar xzf "$CORPUS_TAR" -C "$WORK"
# Jobs per target, in proportion to its cost (executions per second measured on the cpu machine:
# TOML and the recording/trace studies are the slow ones). TARGETS may name a subset.
declare -A JOBS=([settings_toml]=5 [extraction_manifest]=3 [recording]=2 [trace]=2
                 [safetensors_header]=1 [chat_template]=1 [worker_protocol]=1 [config_json]=1
                 [shard_index]=1)
declare -A MAXLEN=([safetensors_header]=65536)
TARGETS=${TARGETS:-"${!JOBS[*]}"}
for t in $TARGETS; do
  gunzip -c "$BIN_DIR/$t.gz" > "$WORK/bin/$t" && chmod +x "$WORK/bin/$t"
  j=${JOBS[$t]}
  mkdir -p "$OUT/$t" "$WORK/artifacts/$t"
  (cd "$OUT/$t" && "$WORK/bin/$t" "$WORK/corpus/$t" -jobs="$j" -workers="$j" \
     -runs=$(( (RUNS + j - 1) / j )) -max_total_time="$LIMIT" -max_len="${MAXLEN[$t]:-8192}" \
     -malloc_limit_mb=1024 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
     -artifact_prefix="$WORK/artifacts/$t/" > /dev/null 2>&1) &
done
wait
status=0
for t in $TARGETS; do
  execs=$(cat "$OUT/$t"/fuzz-*.log 2>/dev/null | grep -a 'stat::number_of_executed_units' | awk '{s+=$2} END {print s+0}')
  found=$(ls "$WORK/artifacts/$t" 2>/dev/null | wc -l)
  if [ "$found" -gt 0 ]; then
    status=1
    cp "$WORK/artifacts/$t"/* "$OUT/$t/"
    echo "$t: $execs executions, $found FINDINGS: $(ls "$WORK/artifacts/$t" | tr '\n' ' ')"
  else
    echo "$t: $execs executions, no finding"
  fi
done
exit $status
