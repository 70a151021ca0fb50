// Block-scaled FP8 (e4m3) matrices on the GPU, kept as bytes and dequantised inside the product.
//
// Why our own: candle has no FP8 product, and its FP8 cast kernels are not in every build of its
// PTX. A decode token is a GEMV per matrix, so each output row is one warp's dot product over the
// row's bytes (4 at a time), each byte decoded in registers and multiplied by its block's scale;
// nothing dense is ever written. Prefill (many tokens) dequantises the matrix once into the
// compute dtype and leaves the product to cuBLAS.
//
// Decoding is exact and needs no FP8 hardware (PTX for compute_80 runs from Ampere on):
// normal codes move their exponent from bias 7 to bias 127, subnormal ones are m × 2^-9,
// S.1111.111 is NaN — the same formula as the CPU kernel (fp8.rs).
//
// Layout: w [rows, cols] bytes row-major; scale [ceil(rows/br), ceil(cols/bc)] f32; x [n, cols];
// y [n, rows]. Accumulation in f32, one rounding to the output type.

#include "common.cuh"

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// One warp per output row, for every token: y[t, r] = Σ_c e4m3(w[r, c]) · scale[r/br, c/bc] · x[t, c].
// `wide` / `grouped`: cols and bc are multiples of 8 / 4 and rows start so aligned, so each lane
// reads 8 / 4 bytes at once and a group never straddles two blocks.
template <typename T>
__device__ void gemv(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                     const T* __restrict__ x, T* __restrict__ y, int rows, int cols, int br,
                     int bc, int n) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const int r = warp;
    const int scols = (cols + bc - 1) / bc;
    const float* srow = scale + (size_t)(r / br) * scols;
    const uint8_t* row = w + (size_t)r * cols;
    const bool grouped = (cols % 4 == 0) && (bc % 4 == 0);
    // Rows of whole 8-byte groups: 8 bytes a lane at once, decoded by e4m3x4_scaled (its 2^-8
    // folded into the scale) — the decode formula costs more than the load on a fast GPU.
    const bool wide = (cols % 8 == 0) && (bc % 8 == 0) && (((uintptr_t)row & 7) == 0);
    for (int t = 0; t < n; t++) {
        const T* xt = x + (size_t)t * cols;
        float acc = 0.f;
        if (wide) {
            const uint2* row8 = reinterpret_cast<const uint2*>(row);
            for (int g = lane; g < cols / 8; g += 32) {
                const uint2 q = __ldg(row8 + g);
                const int c = 8 * g;
                float w[8];
                float scale = srow[c / bc] * 256.f;
                if (!e4m3x4_has_nan(q.x) && !e4m3x4_has_nan(q.y)) {
                    e4m3x4_scaled(q.x, w);
                    e4m3x4_scaled(q.y, w + 4);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        w[j] = e4m3((q.x >> (8 * j)) & 0xFFu);
                        w[4 + j] = e4m3((q.y >> (8 * j)) & 0xFFu);
                    }
                    scale = srow[c / bc];
                }
                float part = w[0] * load(xt, c);
#pragma unroll
                for (int j = 1; j < 8; j++) part = fmaf(w[j], load(xt, c + j), part);
                acc = fmaf(part, scale, acc);
            }
        } else if (grouped) {
            const uint32_t* row4 = reinterpret_cast<const uint32_t*>(row);
            for (int g = lane; g < cols / 4; g += 32) {
                const uint32_t q = __ldg(row4 + g);
                const int c = 4 * g;
                float part = e4m3(q & 0xFFu) * load(xt, c);
                part = fmaf(e4m3((q >> 8) & 0xFFu), load(xt, c + 1), part);
                part = fmaf(e4m3((q >> 16) & 0xFFu), load(xt, c + 2), part);
                part = fmaf(e4m3(q >> 24), load(xt, c + 3), part);
                acc = fmaf(part, srow[c / bc], acc);
            }
        } else {
            for (int c = lane; c < cols; c += 32) {
                acc = fmaf(e4m3(row[c]) * srow[c / bc], load(xt, c), acc);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) store(y, (size_t)t * rows + r, acc);
    }
}

// out[r, c] = e4m3(w[r, c]) · scale[r/br, c/bc], grid-stride over every element.
template <typename T>
__device__ void dequant(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                        T* __restrict__ out, int rows, int cols, int br, int bc) {
    const int scols = (cols + bc - 1) / bc;
    const size_t total = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        store(out, i, e4m3(w[i]) * scale[(size_t)(r / br) * scols + c / bc]);
    }
}

extern "C" __global__ void fp8_gemv_bf16(const uint8_t* w, const float* scale,
                                         const __nv_bfloat16* x, __nv_bfloat16* y, int rows,
                                         int cols, int br, int bc, int n) {
    gemv(w, scale, x, y, rows, cols, br, bc, n);
}

extern "C" __global__ void fp8_gemv_f32(const uint8_t* w, const float* scale, const float* x,
                                        float* y, int rows, int cols, int br, int bc, int n) {
    gemv(w, scale, x, y, rows, cols, br, bc, n);
}

extern "C" __global__ void fp8_dequant_bf16(const uint8_t* w, const float* scale,
                                            __nv_bfloat16* out, int rows, int cols, int br,
                                            int bc) {
    dequant(w, scale, out, rows, cols, br, bc);
}

extern "C" __global__ void fp8_dequant_f32(const uint8_t* w, const float* scale, float* out,
                                           int rows, int cols, int br, int bc) {
    dequant(w, scale, out, rows, cols, br, bc);
}
