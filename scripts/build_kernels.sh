#!/usr/bin/env bash
# Regenerates the PTX of moescope's own CUDA kernels (src/model/kernels/*.cu → *.ptx), which the
# `cuda` build embeds and the driver JIT-compiles for the card at first use. PTX for compute_80
# runs on every card from Ampere on (A100, H100, Jetson Thor); committed so that building with
# `--features cuda` needs no extra step. Needs nvcc ≥ 13.0 (`source /opt/cuda13/env.sh`, see
# ../shared/reference/cuda-build.md); run from the repo root after editing a .cu file.
set -euo pipefail
for cu in src/model/kernels/*.cu; do
  nvcc --ptx -arch=compute_80 -O3 -std=c++17 -o "${cu%.cu}.ptx" "$cu"
  echo "wrote ${cu%.cu}.ptx"
done
