#!/usr/bin/env bash
# moescope against llama.cpp on the same GGUF files (issue 20; BENCHMARKS.md §12): decode speed
# (moescope `bench decode --no-reference` vs `llama-bench`, 2 threads, prompt 16, 64 new
# tokens) and fidelity (`llama-perplexity --kl-divergence-base` on prompts/reference.txt, then
# `moescope bench kld` in f32 and bf16; then llama.cpp against its own logits with one setting
# changed, the spread any second implementation has to be read against). A benchmark, not a test.
#
#   scripts/llamacpp_compare.sh [BIN] [FILE.gguf …]      (SPEED=0: fidelity only)
#
# BIN defaults to target/release/moescope; the files to the bundled model's GGUF conversions
# (scripts/make_gguf_fixtures.sh). llama.cpp's source comes from the llama-cpp-python sdist that
# make_gguf_fixtures.sh unpacks into ${TMPDIR:-/tmp}/moescope-llamacpp; it is built here with
# AMX off — on a VM that reports AMX but does not grant the tile state, ggml's AMX matmul
# segfaults (seen on the 2-core CI machine).
set -euo pipefail
BIN=${1:-target/release/moescope}
shift || true
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(models/tiny-moe-gguf/tiny-moe-{BF16,Q8_0,Q4_K_M}.gguf)
WORK=${TMPDIR:-/tmp}/moescope-llamacpp
[ -d "$WORK/src" ] || { echo "run scripts/make_gguf_fixtures.sh first (it fetches llama.cpp)"; exit 1; }
B="$WORK/build-noamx"
if [ ! -x "$B/bin/llama-perplexity" ] || [ ! -x "$B/bin/llama-bench" ]; then
  cmake -S "$WORK/src" -B "$B" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
    -DGGML_AMX_BF16=OFF > "$WORK/cmake-noamx.log"
  cmake --build "$B" -j"$(nproc)" --target llama-bench llama-perplexity > "$WORK/build-noamx.log"
fi
OUT=$(mktemp -d)
for round in $([ "${SPEED:-1}" = 1 ] && echo 1 2); do
  for f in "${FILES[@]}"; do
    "$BIN" bench decode --model "$f" --dtype f32 --no-reference --prompt-tokens 16 \
      --new-tokens 64 --repeats 3 | tail -1
    "$B/bin/llama-bench" -m "$f" -p 16 -n 64 -t 2 2>/dev/null | grep -E "pp16|tg64"
  done
done
for f in "${FILES[@]}"; do
  base="$OUT/$(basename "$f" .gguf).bin"
  "$B/bin/llama-perplexity" -m "$f" -f prompts/reference.txt -c 64 -b 64 -t 2 \
    --kl-divergence-base "$base" > "$base.log" 2>&1
  for d in f32 bf16; do "$BIN" bench kld --model "$f" --base "$base" --dtype "$d"; done
  # llama.cpp against itself: the same file, one setting changed (micro-batch of 16, flash
  # attention off, an f32 KV cache) — how far two sound runs of one engine already are.
  for alt in "-ub 16" "-fa off" "-fa off -ctk f32 -ctv f32"; do
    # shellcheck disable=SC2086  # $alt is several arguments
    "$B/bin/llama-perplexity" -m "$f" -f prompts/reference.txt -c 64 -b 64 -t 2 $alt \
      --kl-divergence-base "$base" --kl-divergence > "$base.self.log" 2>&1
    echo "$(basename "$f") llama.cpp ($alt) against llama.cpp (defaults):" \
      "$(grep -aE '^(Mean +KLD|Maximum KLD|Same top p)' "$base.self.log" | tr -s ' ' | paste -sd ';')"
  done
done
echo "logits files in $OUT"
