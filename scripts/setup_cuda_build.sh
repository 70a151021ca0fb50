#!/usr/bin/env bash
# Builds a CUDA 13.0 toolchain for candle (cuda feature) on a GPU-less x86-64 box, from PyPI only.
# Usage: bash scripts/setup_cuda_build.sh [DEST]   then:  source DEST/env.sh && cargo build --release
# Needs cudarc's source in the cargo registry first (`cargo fetch --locked`). Idempotent: a DEST
# that already holds the toolchain is reused (CI caches it). Kept in the repo so a clean clone
# (CI) has it; the workspace's shared/tools holds the same script.
set -euo pipefail
DEST=${1:-$HOME/.cache/moescope-cuda}
if [ -f "$DEST/env.sh" ] && [ -x "$DEST/nvidia/cu13/bin/nvcc" ]; then
  echo "ok (cached): source $DEST/env.sh"; exit 0
fi
python3 -m pip install -q --no-deps --target "$DEST" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
R="$DEST/nvidia/cu13"
# unversioned names for -l<lib> at link time
( cd "$R/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf lib$l.so.13 lib$l.so; done && ln -sf libcurand.so.10 libcurand.so )
# link-time stub for the driver library (the real libcuda.so.1 comes from the GPU machine's driver)
mkdir -p "$R/lib/stubs"
CUDARC_SRC=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.10 | head -1)
grep -ohE 'load::<_F>\("cu[A-Za-z0-9_]+"\)' "$CUDARC_SRC/src/driver/sys/mod.rs" | sed 's/load::<_F>("//; s/")//' | sort -u \
  | awk '{print "void " $1 "(void){}"}' > "$R/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib/stubs/libcuda.so" "$R/lib/stubs/libcuda_stub.c"
cat > "$DEST/env.sh" <<EOT
export CUDA_HOME=$R
export PATH=$R/bin:\$PATH
export CUDA_COMPUTE_CAP=90
EOT
echo "ok: source $DEST/env.sh"
