#!/usr/bin/env bash
# Fuzzes every parser of files moescope reads (fuzz/fuzz_targets/*.rs) with cargo-fuzz (libFuzzer,
# AddressSanitizer) on the nightly toolchain installed beside stable. Seed corpora come from the
# repository's own files (fixtures, recordings, prompts, profiles, themes); crashes land in
# fuzz/artifacts/TARGET/ (turn each into a regression test under tests/).
#
#   scripts/fuzz.sh [RUNS_PER_TARGET] [TARGET…]     default: 1000000 runs, every target
#   SMOKE=1 scripts/fuzz.sh                         a few seconds per target
#
# Limits (the campaign's rules): an allocation over 1 GiB, RSS over 2 GiB or an input taking over
# 10 s is a failure. Prints executions and outcome per target; exits non-zero on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1000000}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(safetensors_header shard_index config_json chat_template extraction_manifest recording trace worker_protocol settings_toml gguf tokenizer_files)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi

# Seeds: the files each parser reads in the repository.
seed() {
  local t=$1 dir=fuzz/corpus/$1
  mkdir -p "$dir"
  [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return
  case $t in
    safetensors_header) for f in tests/fixtures/*/*.safetensors models/tiny-moe/*.safetensors; do head -c 65536 "$f" > "$dir/$(echo "$f" | tr / _)"; done ;;
    shard_index) cp tests/fixtures/*/model.safetensors.index.json "$dir/" ;;
    config_json) for f in tests/fixtures/*/config.json models/tiny-moe/config.json; do cp "$f" "$dir/$(echo "$f" | tr / _)"; done ;;
    chat_template) for f in tests/fixtures/*/tokenizer_config.json models/tiny-moe/tokenizer_config.json; do cp "$f" "$dir/$(echo "$f" | tr / _)"; done ;;
    extraction_manifest) target/debug/moescope extract --model tests/fixtures/qwen3-moe-tiny --out /tmp/fuzz-extract --quiet >/dev/null 2>&1
                         cp /tmp/fuzz-extract/manifest.json "$dir/" 2>/dev/null ;;
    recording) for f in recordings/demo-tiny-moe.ndjson tests/fixtures/events/*.ndjson; do head -c 200000 "$f" > "$dir/$(basename "$f")"; done ;;
    trace) for f in recordings/demo-tiny-moe.ndjson tests/fixtures/events/viable.ndjson; do
             target/debug/moescope export "$f" --format trace 2>/dev/null | head -c 100000 > "$dir/$(basename "$f").trace"; done ;;
    worker_protocol) printf '%s\n' '{"cmd":"hello","version":2}' '{"cmd":"step"}' \
                       '{"ev":"session","type":"token","backend":"native","prompt":0,"index":1,"id":2,"text":"x","dt":0.5,"prefill":false}' > "$dir/lines" ;;
    settings_toml) cp prompts/*.toml src/session/profiles/*.toml themes/*.toml "$dir/" ;;
    # The fixture repo's five files cut at 0xFF (the target's format), and its vocabulary and
    # merges alone (no added-token files).
    tokenizer_files) python3 - "$dir" <<'PYEOF'
import sys
d, src = sys.argv[1], "tests/fixtures/tokenizer-vocab"
names = ["vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]
def part(n):
    try:
        return open(f"{src}/{n}", "rb").read()
    except FileNotFoundError:
        return b""
open(f"{d}/repo", "wb").write(b"\xff".join(part(n) for n in names))
open(f"{d}/plain", "wb").write(b"\xff".join(part(n) for n in names[:2]))
PYEOF
      ;;
    # A whole ~250 KB file (metadata, the bundled tokenizer, tensors) from moescope's writer.
    gguf) target/debug/moescope bench random-checkpoint --preset fuzz --gguf Q8_0 --out "$dir/fuzz-Q8_0.gguf" >/dev/null
          # The same file with one expert stack retyped to types candle cannot read — IQ2_XXS,
          # which moescope refuses; IQ4_XS and MXFP4, which it decodes itself — so the header's
          # second walk (`model::gguf_types`) is reached from the start.
          python3 - "$dir" <<'PYEOF'
import sys
d = sys.argv[1]
b = bytearray(open(f"{d}/fuzz-Q8_0.gguf", "rb").read())
name = b"blk.0.ffn_down_exps.weight"
at = b.find(name) + len(name) + 4 + 3 * 8  # the name, its dimension count, three dimensions
for ty, tag in ((16, "iq2xxs"), (23, "iq4xs"), (39, "mxfp4")):
    c = bytearray(b)
    c[at:at + 4] = ty.to_bytes(4, "little")
    open(f"{d}/seed-{tag}.gguf", "wb").write(c)
PYEOF
          ;;
  esac
}

[ -x target/debug/moescope ] || cargo build --quiet
status=0
for t in "${TARGETS[@]}"; do
  seed "$t"
  if [ -n "${SMOKE:-}" ]; then limit=(-max_total_time=5); else limit=(-runs="$RUNS"); fi
  log=fuzz/$t.log
  maxlen=262144; [ "$t" = gguf ] && maxlen=524288  # a whole seed file is ~450 KB
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
    "${limit[@]}" -malloc_limit_mb=1024 -rss_limit_mb=2048 -timeout=10 -max_len=$maxlen \
    -print_final_stats=1 > "$log" 2>&1
  rc=$?
  execs=$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  if [ $rc -eq 0 ]; then
    echo "$t: ${execs:-?} executions, no finding"
  else
    echo "$t: FINDING after ${execs:-?} executions (exit $rc) — see $log and fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
