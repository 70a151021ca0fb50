// Helpers shared by moescope's decode kernels (moe_decode.cu, attn_decode.cu): warp sums and
// the warp dot product both families' GEMVs are built on, so their rounding is the same.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float bf16_round(float v) {
    return __bfloat162float(__float2bfloat16(v));
}

// This lane's share of dot(row, x) over n elements; the caller reduces across the warp.
__device__ __forceinline__ float dot_part(const __nv_bfloat16* __restrict__ row,
                                          const __nv_bfloat16* __restrict__ x, int n, int lane) {
    float acc = 0.f;
    int done = 0;
    if ((((uintptr_t)row | (uintptr_t)x) & 15) == 0) {
        const int nv = n / 8;
        const uint4* r4 = reinterpret_cast<const uint4*>(row);
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        // A lane's loads issued four at a time; the multiply-adds keep their order. (Measured
        // the same as the plain loop on an H200, `bench steps`: kept as the form measured.)
#pragma unroll 4
        for (int i = lane; i < nv; i += 32) {
            uint4 a = __ldg(r4 + i);
            uint4 b = __ldg(x4 + i);
            const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
            const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 fa = __bfloat1622float2(a2[j]);
                float2 fb = __bfloat1622float2(b2[j]);
                acc = fmaf(fa.x, fb.x, acc);
                acc = fmaf(fa.y, fb.y, acc);
            }
        }
        done = nv * 8;
    }
    for (int i = done + lane; i < n; i += 32) {
        acc = fmaf(__bfloat162float(row[i]), __bfloat162float(x[i]), acc);
    }
    return acc;
}
