#!/usr/bin/env bash
# llama.cpp's CUDA build of llama-bench, made on the cpu machine (no GPU needed) and packed for
# the GPU machine, so that nothing is built or installed in its short lease:
# scripts/gpu_llamacpp.sh unpacks and runs it there (BENCHMARKS.md §30).
#
#   scripts/build_llamacpp_cuda.sh OUT.tar.xz [ARCH]
#
# Needs llama.cpp's source as scripts/make_gguf_fixtures.sh fetches it (the llama-cpp-python
# sdist, ${TMPDIR:-/tmp}/moescope-llamacpp/src; nothing of it is committed), the pip CUDA toolkit
# of scripts/setup_cuda_build.sh (CUDA_HOME, nvcc; its lib/ is also linked as lib64, where nvcc
# looks), and cmake (the reference venv's pip cmake will do). ARCH: the card's compute
# capability (default 90, the H200). Takes about an hour on 2 cores (≈190 CUDA files).
set -euo pipefail
OUT=${1:?usage: scripts/build_llamacpp_cuda.sh OUT.tar.xz [ARCH]}
ARCH=${2:-90}
WORK=${TMPDIR:-/tmp}/moescope-llamacpp
[ -d "$WORK/src" ] || { echo "run scripts/make_gguf_fixtures.sh first (it fetches llama.cpp)"; exit 1; }
: "${CUDA_HOME:?source the env.sh of scripts/setup_cuda_build.sh first}"
command -v cmake > /dev/null || PATH="$PWD/target/reference-venv/bin:$PATH"
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
B="$WORK/build-cuda"
# AMX off: on a VM that reports AMX without granting the tile state, ggml's AMX code segfaults.
cmake -S "$WORK/src" -B "$B" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_NATIVE=OFF \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF -DGGML_CCACHE=OFF -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DCUDAToolkit_ROOT="$CUDA_HOME" > "$B.cmake.log"
# The linker looks for libggml-cuda's own CUDA libraries on LD_LIBRARY_PATH.
LD_LIBRARY_PATH="$CUDA_HOME/lib:${LD_LIBRARY_PATH:-}" \
  cmake --build "$B" -j"$(nproc)" --target llama-bench > "$B.build.log"
# llama-bench and the shared libraries it loads from the build (not the CUDA runtime's: the GPU
# machine has its own, matching its driver), stripped.
P=$(mktemp -d)
cp "$B/bin/llama-bench" "$P/"
cp -P "$B"/bin/*.so* "$P/"
# OpenMP's runtime too: a machine with only Python's wheels may not have the system's.
cp -L "$(ldd "$B/bin/libggml-cpu.so" | awk '/libgomp/ {print $3}')" "$P/" || true
# shellcheck disable=SC2046
strip $(find "$P" -type f) 2> /dev/null || true
tar -C "$P" -cJf "$OUT" .
echo "$OUT: $(du -h "$OUT" | cut -f1); llama.cpp $(cd "$WORK/src" && git describe --always 2> /dev/null || basename "$(readlink -f "$WORK/src/../..")")"
