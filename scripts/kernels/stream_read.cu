// The floor for one launch that reads a given number of bytes: every thread streams 16-byte
// loads over a contiguous range (grid-stride, four in flight) and keeps only an xor of them.
// scripts/gpu_kernel_bench.py times it beside moescope's expert kernels on the same byte counts,
// to tell "the kernel leaves bandwidth unused" from "a launch this short cannot reach the copy
// bandwidth". Its loads are the expert kernels' (`ld_stream`: no place in L1, the faster form
// for a read-once stream, BENCHMARKS.md §71). Compile from the repo root:
//   nvcc --ptx -arch=compute_80 -O3 -Isrc/model/kernels -o stream_read.ptx scripts/kernels/stream_read.cu
#include <stdint.h>

#include "common.cuh"

extern "C" __global__ void stream_read(const uint4* __restrict__ p, unsigned long long n16,
                                       unsigned* __restrict__ out) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned acc = 0;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll 4
    for (; i < n16; i += stride) {
        const uint4 v = ld_stream(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    // Written only on a value the random data will not give, so the loads are kept and the
    // stores cost nothing.
    if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;
}
