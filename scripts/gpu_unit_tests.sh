#!/usr/bin/env bash
# The unit tests that need a GPU — the decode kernels' tests in src/model/attn_decode.rs and
# src/model/moe_decode.rs (each skips itself where there is no CUDA device) — run on an NVIDIA
# machine from the repo root:
#
#   scripts/gpu_unit_tests.sh TESTBIN [FILTER]
#
# TESTBIN: the library's unit-test binary of a cuda build, made on the build machine with
#   source ~/.cache/moescope-cuda/env.sh   # ../shared/reference/cuda-build.md
#   cargo test --release --features cuda --lib --no-run   # prints target/release/deps/moescope-HASH
# then stripped and compressed (.xz or .gz) to carry. FILTER defaults to "pick attn_decode
# moe_decode moe_block moe_grouped layers:: gpu_reuse gpu_gated gpu_quantized_self_fill
# gpu_long_prompts gpu_table_coded gpu_small_runs gpu_residency" (the greedy pick on the device, the
# attention and MoE decode kernels, a long prompt's MoE GEMM in chunks, the prompt's grouped
# expert products, the prompt attention, decode-state reuse with its graphs, gated selective
# steps on every format, GPU self-fill over GGUF and FP8 slots, 300-token prompts on every
# format, table-coded experts loaded on a GPU, an FP8 miss's scale tables read by one kernel
# from a registered file, and the residency tables kept by one kernel). gpu_reuse, gpu_gated,
# gpu_quantized_self_fill, gpu_long_prompts and gpu_table_coded load the bundled model and the
# fixtures, so models/tiny-moe and tests/fixtures must be in the tree carried to the GPU machine;
# pass "attn_decode moe_decode moe_grouped" to leave them out when the carry has no room for them.
# Exits non-zero when a test fails, or when the tests were skipped for want of a GPU.
set -uo pipefail
BIN=${1:?usage: scripts/gpu_unit_tests.sh TESTBIN [FILTER]}
source "$(dirname "$0")/unpack_bin.sh"
BIN=$(unpack_bin "$BIN" unit) || exit 1
out=$("$BIN" ${2:-pick attn_decode moe_decode moe_block moe_grouped layers:: gpu_reuse gpu_gated gpu_quantized_self_fill gpu_long_prompts gpu_table_coded gpu_small_runs gpu_residency} --test-threads 1 --nocapture 2>&1)
rc=$?
echo "$out" | tail -25
# A test that skips itself on this machine (a file not mapped into the device's address space,
# say) still counts as passed: say which did.
echo "$out" | grep -i "skipped" | sed 's/^/skipped here: /'
if echo "$out" | grep -q "no CUDA device"; then
  echo "gpu unit tests: skipped — no CUDA device"; exit 1
fi
exit $rc
