// Helpers shared by moescope's kernels (moe_decode.cu, attn_decode.cu, fp8.cu): warp sums,
// the warp dot product both decode families' GEMVs are built on (so their rounding is the
// same), and e4m3 decoding.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// One e4m3fn byte as f32, exactly, without FP8 hardware (PTX for compute_80 runs from Ampere
// on): normal codes move their exponent from bias 7 to bias 127, subnormal ones are m × 2^-9,
// S.1111.111 is NaN — the formula of the CPU table (fp8.rs).
__device__ __forceinline__ float e4m3(uint32_t b) {
    const uint32_t mag = b & 0x7Fu;
    uint32_t bits = (mag < 8u) ? __float_as_uint((float)(mag & 7u) * (1.0f / 512.0f))
                               : ((mag << 20) + (120u << 23));
    if (mag == 0x7Fu) bits = 0x7FC00000u;
    return __uint_as_float(bits | ((b & 0x80u) << 24));
}

// Whether any of the four bytes of q is an e4m3 NaN (low seven bits all set).
__device__ __forceinline__ bool e4m3x4_has_nan(uint32_t q) {
    return (((q & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u) != 0u;
}

// Whether any of the eight bytes of q is an e4m3 NaN.
__device__ __forceinline__ bool e4m3x8_has_nan(uint2 q) {
    return ((((q.x & 0x7F7F7F7Fu) + 0x01010101u) | ((q.y & 0x7F7F7F7Fu) + 0x01010101u)) &
            0x80808080u) != 0u;
}

// The four e4m3 bytes of q (none NaN) as f32 values times 2^-8, exactly: each byte is moved
// into the top byte of an f16 by one byte permute and its exponent and mantissa shifted one
// place down into f16's fields — e4m3's exponent bias is 7 and f16's 15, hence the factor,
// which the caller folds into the block scale (a power of two: the products round the same).
// Subnormal codes land on f16 subnormals of the same scaled value. Why: the decode formula
// above costs ~8 integer operations a byte, enough to make an expert GEMV compute-bound on a
// GPU that reads 4.8 TB/s; this is ~3.
__device__ __forceinline__ void e4m3x4_scaled(uint32_t q, float* v) {
    const uint32_t lo = __byte_perm(q, 0u, 0x1404u);  // bytes 0, 1 in the top of each half
    const uint32_t hi = __byte_perm(q, 0u, 0x3424u);  // bytes 2, 3
    const uint32_t hl = (lo & 0x80008000u) | ((lo & 0x7F007F00u) >> 1);
    const uint32_t hh = (hi & 0x80008000u) | ((hi & 0x7F007F00u) >> 1);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&hl));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hh));
    v[0] = a.x;
    v[1] = a.y;
    v[2] = b.x;
    v[3] = b.y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float bf16_round(float v) {
    return __bfloat162float(__float2bfloat16(v));
}

// A weight's bytes, read once per launch: asked for without a place in L1
// (`L1::no_allocate`), so the streamed rows do not push out what the block reads again — x, the
// mid rows — which then come from L1 instead of L2. Measured on an H200 (BENCHMARKS.md §71,
// `scripts/gpu_kernel_bench.py`): gate_up 78 → 86 % of the copy bandwidth, down 71 → 75 %,
// a plain read of the same bytes 91 → 92 %; the `L2::256B` prefetch size was slower. Same
// values, so the same bits.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ld_stream(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// This lane's share of dot(row, x) over n elements; the caller reduces across the warp. U:
// loads a lane has in flight (the order of the multiply-adds is the same for any U).
template <int U = 4>
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
#pragma unroll U
        for (int i = lane; i < nv; i += 32) {
            uint4 a = ld_stream(r4 + i);
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

// This lane's share of dot(rows[r], x) over n columns for R rows of e4m3 bytes (`srows[r]`: row
// r's block scales, `bc` columns each; the rows and x start at column `col0` of the matrix, a
// multiple of 8): 8 bytes at a time, their 8 products summed in order, then times their block's
// scale into the row's accumulator (the order FP8 GEMMs use); one by one where the bytes or
// blocks do not allow whole 8-byte groups.
template <int R>
__device__ __forceinline__ void fp8_dot_rows(const uint8_t* const* rows, const float* const* srows,
                                             int bc, int col0,
                                             const __nv_bfloat16* __restrict__ x, int n,
                                             int lane, float* acc) {
    bool vec = (bc % 8 == 0) && (col0 % 8 == 0) && (((uintptr_t)x & 15) == 0);
#pragma unroll
    for (int r = 0; r < R; r++) {
        acc[r] = 0.f;
        vec = vec && (((uintptr_t)rows[r] & 7) == 0);
    }
    int done = 0;
    if (vec) {
        const int nv = n / 8;
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (int i = lane; i < nv; i += 32) {
            uint2 q[R];
#pragma unroll
            for (int r = 0; r < R; r++) q[r] = ld_stream(reinterpret_cast<const uint2*>(rows[r]) + i);
            const uint4 c = __ldg(x4 + i);
            const __nv_bfloat162* c2 = reinterpret_cast<const __nv_bfloat162*>(&c);
            float xf[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 f = __bfloat1622float2(c2[j]);
                xf[2 * j] = f.x;
                xf[2 * j + 1] = f.y;
            }
            const int blk = (col0 + 8 * i) / bc;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float s = __ldg(srows[r] + blk);
                float w[8];
                e4m3x4_scaled(q[r].x, w);
                e4m3x4_scaled(q[r].y, w + 4);
                float part = w[0] * xf[0];
#pragma unroll
                for (int j = 1; j < 8; j++) part = fmaf(w[j], xf[j], part);
                // A NaN code makes the group's sum NaN, as its exact decode would (the scaled
                // decode reads it as a finite value). Why not decode such a group byte by byte, as
                // this did: that second path held registers in every FP8 kernel (down 80 against
                // 76, gate_up 56 against 48, the attention projections 56 against 48), and fewer
                // blocks then fit an SM. On an H100 (BENCHMARKS.md §119) attention and, with its
                // cap, gate_up gained; down alone lost (124 → 139 µs a 12-layer step inside the
                // step, 130 with its cap) — not yet explained. Every NaN the GPU computes is the
                // one canonical NaN, so the bits are the same.
                if (e4m3x8_has_nan(q[r])) part = __uint_as_float(0x7FFFFFFFu);
                acc[r] = fmaf(part, s * 256.f, acc[r]);  // 256 undoes e4m3x4_scaled's 2^-8
            }
        }
        done = nv * 8;
    }
    for (int i = done + lane; i < n; i += 32) {
        const float xi = __bfloat162float(x[i]);
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r] = fmaf(e4m3(rows[r][i]) * __ldg(srows[r] + (col0 + i) / bc), xi, acc[r]);
    }
}
