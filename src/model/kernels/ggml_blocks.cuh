// GGML block formats (the GGUF expert types) decoded on the GPU: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// Q4_K, Q5_K, Q6_K, as llama.cpp lays them out (ggml-common.h) and candle dequantises them
// (candle-core's k_quants.rs `to_float`): each weight computed with the same f32 operations in
// the same order — products and sums rounded one at a time (`__fmul_rn`, no fused multiply-add)
// — so a dequantised weight here is the bits of candle's CPU dequantisation. And the
// table-coded types candle does not read — MXFP4, IQ4_NL and IQ4_XS: each weight as llama.cpp's
// `dequantize_row_*` (and moescope's CPU `lut4.rs`) computes it, exact in f32.
//
// A block is cut into units of UW = 8·G weights: G groups of 8 consecutive weights each, a
// group's start within the block given by `start(u, g)`. Why units: a warp reads a row's units
// with consecutive lanes on consecutive units, so its loads coalesce, and a row of few blocks
// (Qwen3-30B-A3B's down rows: three 256-weight blocks) still keeps most lanes busy. Each group of
// 8 weights pairs with one 16-byte load of the bf16 activations.
//
// Decode products (`ggml_dot_q8`) take the activations rounded to 8-bit blocks (`Q8Act`, one f32
// scale per 32 values, as llama.cpp's and candle's GPU kernels round theirs to Q8_1) and multiply
// integers four at a time (`dp4a`): a group's 8 weight codes (offsets such as Q4_0's −8 taken
// in the integers) against its 8 activation codes, exactly, then the block scales in f32. Why:
// decoding each weight to f32 and multiplying it by a bf16 activation made these kernels
// compute-bound — slower per token than the bf16 kernels on half the bytes, and ~1.9× slower
// than llama.cpp's CUDA build on the same files (BENCHMARKS.md §30).
#pragma once
#include "common.cuh"

// GGML's type ids (ggml.h `enum ggml_type`), what the host passes.
#define GGML_Q4_0 2
#define GGML_Q4_1 3
#define GGML_Q5_0 6
#define GGML_Q5_1 7
#define GGML_Q8_0 8
#define GGML_Q4_K 12
#define GGML_Q5_K 13
#define GGML_Q6_K 14
#define GGML_IQ4_NL 20
#define GGML_IQ4_XS 23
#define GGML_MXFP4 39

// A 16-value table of int8 codes as four little-endian words W0..W3 (values 0-3, 4-7, 8-11,
// 12-15), for `lut16` and for the dequantising units.
// llama.cpp's `kvalues_iq4nl` (the IQ4 types' code values).
struct Iq4nlTable {
    static constexpr uint32_t W0 = 0xBFAD9881u, W1 = 0xF6EADDCFu, W2 = 0x26190D01u,
                              W3 = 0x71594535u;
};
// llama.cpp's `kvalues_mxfp4`: E2M1's values doubled, {0, 1, 2, 3, 4, 6, 8, 12} and their
// negatives (code 8 is −0, an integer 0).
struct Mxfp4Table {
    static constexpr uint32_t W0 = 0x03020100u, W1 = 0x0C080604u, W2 = 0xFDFEFF00u,
                              W3 = 0xF4F8FAFCu;
};
template <typename T>
__device__ __forceinline__ int table_value(uint32_t code) {
    const uint32_t w = code < 8 ? (code < 4 ? T::W0 : T::W1) : (code < 12 ? T::W2 : T::W3);
    return (int)(int8_t)((w >> (8 * (code & 3))) & 0xFFu);
}
__device__ __forceinline__ int iq4nl_value(uint32_t code) { return table_value<Iq4nlTable>(code); }
// Eight codes — the eight nibbles of `q`, as a word of a block's code bytes holds them: byte
// j's low nibble weight j, its high nibble weight j + 16 — looked up in table T: x the values
// of the four low nibbles, y those of the four high ones, in byte order (llama.cpp's
// `get_int_from_table_16`). `__byte_perm` reads only the low three bits of each of its four
// selector nibbles (nvcc masks the selector with 0x7777), so a nibble picks its byte within a
// half of the table as it stands; its bit 3 then picks the half, and two fixed permutes split
// the low nibbles' values from the high ones'. Why not a lookup per four codes spread over
// bytes: each call then built its selectors from the bytes with a dozen shifts and masks, and
// the lookups were the IQ4 kernels' cost (BENCHMARKS.md §86, §87).
template <typename T>
__device__ __forceinline__ uint2 lut16x8(uint32_t q) {
    const uint32_t half = 0x32103210u | ((q & 0x88888888u) >> 1);
    const uint32_t a = __byte_perm(__byte_perm(T::W0, T::W1, q), __byte_perm(T::W2, T::W3, q),
                                   half);
    const uint32_t b = __byte_perm(__byte_perm(T::W0, T::W1, q >> 16),
                                   __byte_perm(T::W2, T::W3, q >> 16), half >> 16);
    return make_uint2(__byte_perm(a, b, 0x6420), __byte_perm(a, b, 0x7531));
}
// Half an E8M0 scale byte, 2^(e − 128), as llama.cpp's `ggml_e8m0_to_fp32_half` builds it
// (subnormal for e < 2) — except 0xFF, which the OCP format defines as NaN and llama.cpp's
// half reads as 2^127: NaN here, so a corrupt block shows as NaN logits (which the greedy pick
// refuses) rather than as plausible garbage. The CPU refuses such a block when it loads it.
__device__ __forceinline__ float e8m0_half(uint32_t e) {
    if (e == 0xFFu) return __uint_as_float(0x7FC00000u);
    return __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
}

// Where block bytes are read from: global memory through the read-only cache (`Gmem`), or a
// warp's staging buffer in shared memory (`Smem`, see `stage_async`), where `__ldg` cannot read.
struct Gmem {
    __device__ static uint32_t word(const unsigned int* p) { return __ldg(p); }
    __device__ static uint16_t half(const unsigned short* p) { return __ldg(p); }
    __device__ static uint32_t byte(const uint8_t* p) { return __ldg(p); }
};
struct Smem {
    __device__ static uint32_t word(const unsigned int* p) { return *p; }
    __device__ static uint16_t half(const unsigned short* p) { return *p; }
    __device__ static uint32_t byte(const uint8_t* p) { return *p; }
};

// Loads at whatever alignment the block gives (GGUF blocks are 18, 20, 22, 24, 34, 144, 176 or
// 210 bytes, so a block's fields are often only 2-byte aligned): aligned 4-byte words shifted
// into place (`__funnelshift_r`), the word past the value read only where the value is not
// aligned. Why not a branch on the alignment: the lanes of a warp read neighbouring blocks of
// different alignments (a Q8_0 row alternates), so the two paths of a branch both ran.
template <typename L = Gmem>
__device__ __forceinline__ float ld_half(const uint8_t* p) {
    const uint16_t b = L::half(reinterpret_cast<const unsigned short*>(p));
    return __half2float(__ushort_as_half(b));
}
template <typename L = Gmem>
__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) {
    const uint32_t sh = ((uintptr_t)p & 3u) * 8u;
    const unsigned int* w = reinterpret_cast<const unsigned int*>((uintptr_t)p & ~(uintptr_t)3);
    const uint32_t a = L::word(w);
    const uint32_t b = sh ? L::word(w + 1) : 0u;
    return __funnelshift_r(a, b, sh);
}
template <typename L = Gmem>
__device__ __forceinline__ uint2 ld_u64(const uint8_t* p) {
    const uint32_t sh = ((uintptr_t)p & 3u) * 8u;
    const unsigned int* w = reinterpret_cast<const unsigned int*>((uintptr_t)p & ~(uintptr_t)3);
    const uint32_t a = L::word(w), b = L::word(w + 1);
    const uint32_t c = sh ? L::word(w + 2) : 0u;
    return make_uint2(__funnelshift_r(a, b, sh), __funnelshift_r(b, c, sh));
}
__device__ __forceinline__ uint32_t byte_of(uint2 v, int i) {
    return ((i < 4 ? v.x : v.y) >> (8 * (i & 3))) & 0xFFu;
}

// d·q - m and d·q + m as candle's CPU code rounds them (a product, then a sum).
__device__ __forceinline__ float mul_sub(float d, float q, float m) {
    return __fsub_rn(__fmul_rn(d, q), m);
}
__device__ __forceinline__ float mul_add(float d, float q, float m) {
    return __fadd_rn(__fmul_rn(d, q), m);
}

// Q4_K / Q5_K sub-block j's 6-bit scale and min (llama.cpp's get_scale_min_k4).
template <typename L = Gmem>
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(L::byte(q + j) & 63);
        m = (float)(L::byte(q + j + 4) & 63);
    } else {
        const uint32_t a = L::byte(q + j + 4), lo = L::byte(q + j - 4), hi = L::byte(q + j);
        sc = (float)((a & 0xF) | ((lo >> 6) << 4));
        m = (float)((a >> 4) | ((hi >> 6) << 4));
    }
}

// Each type: BYTES and WEIGHTS a block, UNITS a block, G groups a unit; `start(u, g)` the
// first weight of group g of unit u; `unit(b, u, w)` the unit's UW weights in group order.

struct Q8_0B {
    static constexpr int BYTES = 34, WEIGHTS = 32, UNITS = 4, G = 1;
    __device__ static int start(int u, int) { return 8 * u; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b);
        const uint2 q = ld_u64(b + 2 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = __fmul_rn((float)(int8_t)byte_of(q, i), d);
    }
};

// The 32-weight types with 4-bit (+1 high bit) codes: byte l of qs holds weight l (low nibble)
// and l + 16 (high nibble); a unit is 8 bytes of qs, groups at 8p and 16 + 8p.
struct Q4_0B {
    static constexpr int BYTES = 18, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b);
        const uint2 q = ld_u64(b + 2 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = __fmul_rn((float)((int)(v & 0xF) - 8), d);
            w[8 + i] = __fmul_rn((float)((int)(v >> 4) - 8), d);
        }
    }
};

struct Q4_1B {
    static constexpr int BYTES = 20, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b), m = ld_half(b + 2);
        const uint2 q = ld_u64(b + 4 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = mul_add((float)(v & 0xF), d, m);
            w[8 + i] = mul_add((float)(v >> 4), d, m);
        }
    }
};

struct Q5_0B {
    static constexpr int BYTES = 22, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b);
        const uint32_t qh = ld_u32(b + 2);
        const uint2 q = ld_u64(b + 6 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int j = 8 * u + i;
            const uint32_t v = byte_of(q, i);
            const uint32_t h0 = ((qh >> j) << 4) & 0x10u, h1 = (qh >> (j + 12)) & 0x10u;
            w[i] = __fmul_rn((float)((int)((v & 0xF) | h0) - 16), d);
            w[8 + i] = __fmul_rn((float)((int)((v >> 4) | h1) - 16), d);
        }
    }
};

struct Q5_1B {
    static constexpr int BYTES = 24, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b), m = ld_half(b + 2);
        const uint32_t qh = ld_u32(b + 4);
        const uint2 q = ld_u64(b + 8 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int j = 8 * u + i;
            const uint32_t v = byte_of(q, i);
            const uint32_t h0 = ((qh >> j) << 4) & 0x10u, h1 = (qh >> (j + 12)) & 0x10u;
            w[i] = mul_add((float)((v & 0xF) | h0), d, m);
            w[8 + i] = mul_add((float)((v >> 4) | h1), d, m);
        }
    }
};

// Q4_K: 256 weights in four 64-weight parts j; qs byte 32j + l holds weight 64j + l (low nibble,
// sub-block 2j) and 64j + 32 + l (high nibble, sub-block 2j + 1). Unit u = (j, p): bytes
// 32j + 8p .. + 8, groups at 64j + 8p and 64j + 32 + 8p.
struct Q4_KB {
    static constexpr int BYTES = 144, WEIGHTS = 256, UNITS = 16, G = 2;
    __device__ static int start(int u, int g) { return 64 * (u >> 2) + 8 * (u & 3) + 32 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const int j = u >> 2, p = u & 3;
        const float d = ld_half(b), dmin = ld_half(b + 2);
        float s1, m1, s2, m2;
        scale_min_k4(2 * j, b + 4, s1, m1);
        scale_min_k4(2 * j + 1, b + 4, s2, m2);
        const float d1 = __fmul_rn(d, s1), n1 = __fmul_rn(dmin, m1);
        const float d2 = __fmul_rn(d, s2), n2 = __fmul_rn(dmin, m2);
        const uint2 q = ld_u64(b + 16 + 32 * j + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = mul_sub(d1, (float)(v & 0xF), n1);
            w[8 + i] = mul_sub(d2, (float)(v >> 4), n2);
        }
    }
};

// Q5_K: Q4_K's layout plus a high bit per weight: qh byte l, bit 2j for weight 64j + l and bit
// 2j + 1 for 64j + 32 + l.
struct Q5_KB {
    static constexpr int BYTES = 176, WEIGHTS = 256, UNITS = 16, G = 2;
    __device__ static int start(int u, int g) { return 64 * (u >> 2) + 8 * (u & 3) + 32 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const int j = u >> 2, p = u & 3;
        const float d = ld_half(b), dmin = ld_half(b + 2);
        float s1, m1, s2, m2;
        scale_min_k4(2 * j, b + 4, s1, m1);
        scale_min_k4(2 * j + 1, b + 4, s2, m2);
        const float d1 = __fmul_rn(d, s1), n1 = __fmul_rn(dmin, m1);
        const float d2 = __fmul_rn(d, s2), n2 = __fmul_rn(dmin, m2);
        const uint2 h = ld_u64(b + 16 + 8 * p);
        const uint2 q = ld_u64(b + 48 + 32 * j + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i), hb = byte_of(h, i);
            const float a1 = (hb >> (2 * j)) & 1u ? 16.f : 0.f;
            const float a2 = (hb >> (2 * j + 1)) & 1u ? 16.f : 0.f;
            w[i] = mul_sub(d1, __fadd_rn((float)(v & 0xF), a1), n1);
            w[8 + i] = mul_sub(d2, __fadd_rn((float)(v >> 4), a2), n2);
        }
    }
};

// Q6_K: two 128-weight halves n; for l < 32, ql byte 64n + l and 64n + 32 + l and qh byte 32n + l
// give weights 128n + l, + 32, + 64, + 96 (scales 8n + l/16 + 0, 2, 4, 6). Unit u = (n, p): l in
// 8p .. 8p + 8, four groups.
struct Q6_KB {
    static constexpr int BYTES = 210, WEIGHTS = 256, UNITS = 8, G = 4;
    __device__ static int start(int u, int g) { return 128 * (u >> 2) + 8 * (u & 3) + 32 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const int n = u >> 2, p = u & 3;
        const float d = ld_half(b + 208);
        const uint8_t* sc = b + 192 + 8 * n + (p >> 1);
        float ds[4];
#pragma unroll
        for (int g = 0; g < 4; g++) ds[g] = __fmul_rn(d, (float)(int8_t)__ldg(sc + 2 * g));
        const uint2 lo = ld_u64(b + 64 * n + 8 * p);
        const uint2 hi = ld_u64(b + 64 * n + 32 + 8 * p);
        const uint2 h = ld_u64(b + 128 + 32 * n + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t a = byte_of(lo, i), c = byte_of(hi, i), hb = byte_of(h, i);
            const int q1 = (int)((a & 0xF) | ((hb & 3) << 4)) - 32;
            const int q2 = (int)((c & 0xF) | (((hb >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((a >> 4) | (((hb >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((c >> 4) | (((hb >> 6) & 3) << 4)) - 32;
            w[i] = __fmul_rn(ds[0], (float)q1);
            w[8 + i] = __fmul_rn(ds[1], (float)q2);
            w[16 + i] = __fmul_rn(ds[2], (float)q3);
            w[24 + i] = __fmul_rn(ds[3], (float)q4);
        }
    }
};

// IQ4_NL: Q4_0's layout (f16 d, then 16 bytes of two codes each), each code through the table.
struct IQ4_NLB {
    static constexpr int BYTES = 18, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = ld_half(b);
        const uint2 q = ld_u64(b + 2 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = __fmul_rn(d, (float)iq4nl_value(v & 0xF));
            w[8 + i] = __fmul_rn(d, (float)iq4nl_value(v >> 4));
        }
    }
};

// IQ4_XS: 256 weights as eight 32-weight sub-blocks ib, each IQ4_NL's code layout (qs bytes
// 16ib .. 16ib + 16 at byte 8) scaled by d · (ls − 32), ls six bits: the low four from scales_l
// (byte 4 + ib/2, nibble ib % 2), the high two from scales_h (bits 2ib, 2ib + 1). Unit u = (ib,
// p): bytes 8 + 16ib + 8p .. + 8, groups at 32ib + 8p and 32ib + 16 + 8p.
template <typename L = Gmem>
__device__ __forceinline__ float iq4xs_scale(const uint8_t* b, int ib) {
    const float d = ld_half<L>(b);
    const uint32_t h = L::half(reinterpret_cast<const unsigned short*>(b + 2));
    const uint32_t lo = (L::byte(b + 4 + (ib >> 1)) >> (4 * (ib & 1))) & 0xFu;
    const int ls = (int)(lo | (((h >> (2 * ib)) & 3u) << 4));
    return __fmul_rn(d, (float)(ls - 32));
}
struct IQ4_XSB {
    static constexpr int BYTES = 136, WEIGHTS = 256, UNITS = 16, G = 2;
    __device__ static int start(int u, int g) { return 32 * (u >> 1) + 8 * (u & 1) + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const int ib = u >> 1, p = u & 1;
        const float dl = iq4xs_scale(b, ib);
        const uint2 q = ld_u64(b + 8 + 16 * ib + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = __fmul_rn(dl, (float)iq4nl_value(v & 0xF));
            w[8 + i] = __fmul_rn(dl, (float)iq4nl_value(v >> 4));
        }
    }
};

// MXFP4: an E8M0 scale byte, then IQ4_NL's code layout (16 bytes of two codes each) through
// `kvalues_mxfp4`. A block is 17 bytes, so its fields sit at any byte alignment (`ld_u64`).
struct MXFP4B {
    static constexpr int BYTES = 17, WEIGHTS = 32, UNITS = 2, G = 2;
    __device__ static int start(int u, int g) { return 8 * u + 16 * g; }
    __device__ static void unit(const uint8_t* b, int u, float* w) {
        const float d = e8m0_half(Gmem::byte(b));
        const uint2 q = ld_u64(b + 1 + 8 * u);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t v = byte_of(q, i);
            w[i] = __fmul_rn((float)table_value<Mxfp4Table>(v & 0xF), d);
            w[8 + i] = __fmul_rn((float)table_value<Mxfp4Table>(v >> 4), d);
        }
    }
};

// Activations rounded to 8-bit blocks: value i is q[i] · d[i / 32]. Rows start 8-byte aligned
// (their lengths are multiples of 32), so a group's 8 codes are one 8-byte load.
// In global or shared memory (`moe_decode_gate_up_ggml` stages x): plain loads read either.
struct Q8Act {
    const int8_t* q;
    const float* d;
    // The block of weights from `w` on (w a multiple of 32).
    __device__ __forceinline__ Q8Act at(int w) const { return Q8Act{q + w, d + (w >> 5)}; }
    // The 8 codes from weight i (a multiple of 8) as two words of four.
    __device__ __forceinline__ int2 codes(int i) const {
        return *reinterpret_cast<const int2*>(q + i);
    }
    __device__ __forceinline__ float scale(int i) const { return d[i >> 5]; }
};

// Σ w·a over a group of 8: two dp4a. And Σ a (for the types with a minimum), the same way.
__device__ __forceinline__ int dot8(uint32_t w0, uint32_t w1, int2 a) {
    return __dp4a((int)w1, a.y, __dp4a((int)w0, a.x, 0));
}
__device__ __forceinline__ int sum8(int2 a) {
    return __dp4a(0x01010101, a.y, __dp4a(0x01010101, a.x, 0));
}
// Four bits (weights i..i+3's high bits) moved to bit 4 of each byte.
__device__ __forceinline__ uint32_t spread4(uint32_t b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// Each type's `dot_q8(b, u, a)`: unit u of block b against the block's activations a (a.at(the
// block's first weight)), in f32.
struct Q8_0D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b);
        const uint2 q = ld_u64<L>(b + 2 + 8 * u);
        return d * a.scale(0) * (float)dot8(q.x, q.y, a.codes(8 * u));
    }
};

struct Q4_0D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b);
        const uint2 q = ld_u64<L>(b + 2 + 8 * u);
        const uint32_t m = 0x0F0F0F0Fu, off = 0x08080808u;
        const int s = dot8(__vsubss4(q.x & m, off), __vsubss4(q.y & m, off), a.codes(8 * u)) +
                      dot8(__vsubss4((q.x >> 4) & m, off), __vsubss4((q.y >> 4) & m, off),
                           a.codes(16 + 8 * u));
        return d * a.scale(0) * (float)s;
    }
};

struct Q4_1D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b), mn = ld_half<L>(b + 2);
        const uint2 q = ld_u64<L>(b + 4 + 8 * u);
        const uint32_t m = 0x0F0F0F0Fu;
        const int2 a0 = a.codes(8 * u), a1 = a.codes(16 + 8 * u);
        const int s = dot8(q.x & m, q.y & m, a0) + dot8((q.x >> 4) & m, (q.y >> 4) & m, a1);
        return a.scale(0) * (d * (float)s + mn * (float)(sum8(a0) + sum8(a1)));
    }
};

// Q5_0 / Q5_1: weight j's fifth bit is bit j of qh (j < 32); the unit's low group is weights
// 8u.., its high group 16 + 8u...
__device__ __forceinline__ void q5_words(uint2 q, uint32_t qh, int u, uint32_t* w) {
    const uint32_t m = 0x0F0F0F0Fu;
    const uint32_t lo = qh >> (8 * u), hi = qh >> (8 * u + 16);
    w[0] = (q.x & m) | spread4(lo & 0xF);
    w[1] = (q.y & m) | spread4((lo >> 4) & 0xF);
    w[2] = ((q.x >> 4) & m) | spread4(hi & 0xF);
    w[3] = ((q.y >> 4) & m) | spread4((hi >> 4) & 0xF);
}

struct Q5_0D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b);
        uint32_t w[4];
        q5_words(ld_u64<L>(b + 6 + 8 * u), ld_u32<L>(b + 2), u, w);
        const uint32_t off = 0x10101010u;
        const int s = dot8(__vsubss4(w[0], off), __vsubss4(w[1], off), a.codes(8 * u)) +
                      dot8(__vsubss4(w[2], off), __vsubss4(w[3], off), a.codes(16 + 8 * u));
        return d * a.scale(0) * (float)s;
    }
};

struct Q5_1D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b), mn = ld_half<L>(b + 2);
        uint32_t w[4];
        q5_words(ld_u64<L>(b + 8 + 8 * u), ld_u32<L>(b + 4), u, w);
        const int2 a0 = a.codes(8 * u), a1 = a.codes(16 + 8 * u);
        const int s = dot8(w[0], w[1], a0) + dot8(w[2], w[3], a1);
        return a.scale(0) * (d * (float)s + mn * (float)(sum8(a0) + sum8(a1)));
    }
};

// Q4_K / Q5_K unit u = (j, p): sub-block 2j's weights 64j + 8p.. (low nibbles) and sub-block
// 2j + 1's 64j + 32 + 8p.. (high nibbles), each d·scale·q − dmin·min.
template <typename L>
__device__ __forceinline__ float kquant_pair(const uint8_t* b, int j, const uint32_t* w,
                                             const Q8Act& a, int p) {
    const float d = ld_half<L>(b), dmin = ld_half<L>(b + 2);
    float s1, m1, s2, m2;
    scale_min_k4<L>(2 * j, b + 4, s1, m1);
    scale_min_k4<L>(2 * j + 1, b + 4, s2, m2);
    const int2 a0 = a.codes(64 * j + 8 * p), a1 = a.codes(64 * j + 32 + 8 * p);
    const float g0 = d * s1 * (float)dot8(w[0], w[1], a0) - dmin * m1 * (float)sum8(a0);
    const float g1 = d * s2 * (float)dot8(w[2], w[3], a1) - dmin * m2 * (float)sum8(a1);
    return a.scale(64 * j) * g0 + a.scale(64 * j + 32) * g1;
}

struct Q4_KD {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const int j = u >> 2, p = u & 3;
        const uint2 q = ld_u64<L>(b + 16 + 32 * j + 8 * p);
        const uint32_t m = 0x0F0F0F0Fu;
        const uint32_t w[4] = {q.x & m, q.y & m, (q.x >> 4) & m, (q.y >> 4) & m};
        return kquant_pair<L>(b, j, w, a, p);
    }
};

struct Q5_KD {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const int j = u >> 2, p = u & 3;
        const uint2 h = ld_u64<L>(b + 16 + 8 * p);
        const uint2 q = ld_u64<L>(b + 48 + 32 * j + 8 * p);
        const uint32_t m = 0x0F0F0F0Fu, one = 0x01010101u;
        const uint32_t w[4] = {(q.x & m) | (((h.x >> (2 * j)) & one) << 4),
                               (q.y & m) | (((h.y >> (2 * j)) & one) << 4),
                               ((q.x >> 4) & m) | (((h.x >> (2 * j + 1)) & one) << 4),
                               ((q.y >> 4) & m) | (((h.y >> (2 * j + 1)) & one) << 4)};
        return kquant_pair<L>(b, j, w, a, p);
    }
};

// Q6_K unit u = (n, p): four groups of 8 (weights 128n + 8p + 32g), each within one 16-weight
// sub-block (scale 8n + p/2 + 2g), codes − 32 taken in the integers.
struct Q6_KD {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const int n = u >> 2, p = u & 3;
        const float d = ld_half<L>(b + 208);
        const uint8_t* sc = b + 192 + 8 * n + (p >> 1);
        const uint2 lo = ld_u64<L>(b + 64 * n + 8 * p);
        const uint2 hi = ld_u64<L>(b + 64 * n + 32 + 8 * p);
        const uint2 h = ld_u64<L>(b + 128 + 32 * n + 8 * p);
        const uint32_t m = 0x0F0F0F0Fu, t = 0x03030303u, off = 0x20202020u;
        const uint32_t l[2] = {lo.x, lo.y}, c[2] = {hi.x, hi.y}, hh[2] = {h.x, h.y};
        float acc = 0.f;
#pragma unroll
        for (int g = 0; g < 4; g++) {
            uint32_t w[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const uint32_t src = (g & 1) ? c[i] : l[i];
                const uint32_t nib = (g < 2) ? (src & m) : ((src >> 4) & m);
                w[i] = __vsubss4(nib | (((hh[i] >> (2 * g)) & t) << 4), off);
            }
            const int w0 = 128 * n + 8 * p + 32 * g;
            const float ds = d * (float)(int8_t)L::byte(sc + 2 * g);
            acc += a.scale(w0) * ds * (float)dot8(w[0], w[1], a.codes(w0));
        }
        return acc;
    }
};

// IQ4_NL / IQ4_XS / MXFP4: a unit's 16 codes (8 bytes) through table T into int8 words, then
// dp4a as Q4_0 (no offset: the table values are signed).
template <typename T = Iq4nlTable>
__device__ __forceinline__ int iq4_dot16(uint2 q, const Q8Act& a, int w0) {
    const uint2 x = lut16x8<T>(q.x), y = lut16x8<T>(q.y);
    return dot8(x.x, y.x, a.codes(w0)) + dot8(x.y, y.y, a.codes(w0 + 16));
}

struct IQ4_NLD {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = ld_half<L>(b);
        return d * a.scale(0) * (float)iq4_dot16(ld_u64<L>(b + 2 + 8 * u), a, 8 * u);
    }
};

struct IQ4_XSD {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const int ib = u >> 1, p = u & 1;
        const float dl = iq4xs_scale<L>(b, ib);
        const int s = iq4_dot16(ld_u64<L>(b + 8 + 16 * ib + 8 * p), a, 32 * ib + 8 * p);
        return dl * a.scale(32 * ib) * (float)s;
    }
};

// MXFP4's product: the codes as twice their E2M1 values, so the scale is the half one.
struct MXFP4D {
    template <typename L = Gmem>
    __device__ static float dot_q8(const uint8_t* b, int u, const Q8Act& a) {
        const float d = e8m0_half(L::byte(b));
        return d * a.scale(0) * (float)iq4_dot16<Mxfp4Table>(ld_u64<L>(b + 1 + 8 * u), a, 8 * u);
    }
};

// This lane's share of dot(row, x) over n columns (n a multiple of the block's weights) for one
// row of blocks of type B against activations rounded to 8-bit blocks: units in lane order.
template <typename B, typename D>
__device__ __forceinline__ float block_dot_q8(const uint8_t* __restrict__ row, const Q8Act& x,
                                              int n, int lane) {
    const int units = (n / B::WEIGHTS) * B::UNITS;
    float acc = 0.f;
    for (int t = lane; t < units; t += 32) {
        const int blk = t / B::UNITS, u = t - blk * B::UNITS;
        acc += D::template dot_q8<Gmem>(row + (size_t)blk * B::BYTES, u, x.at(blk * B::WEIGHTS));
    }
    return acc;
}

// Why the dispatchers below take the table-coded types (LUT4) as a template flag: with the IQ4
// types' products beside the other eight in one switch — inlined, or called out of line — the
// kernels that dispatch on the type got slower for every type (a Q4_K_M or Q8_0 decode step
// +0.8–1.5 % on an H200, registers unchanged; BENCHMARKS.md §86). So each GGUF kernel comes
// twice: the plain one decodes the eight types it always did, with the code it always had, and a
// `_lut4` twin decodes those and IQ4_NL / IQ4_XS / MXFP4; the host launches the twin only for a
// matrix set holding a table-coded type.

// block_dot_q8 for the GGML type id `type` (0 for any other, which the host never passes).
template <bool LUT4 = false>
__device__ __forceinline__ float ggml_dot_q8(int type, const uint8_t* __restrict__ row,
                                             const Q8Act& x, int n, int lane) {
    switch (type) {
        case GGML_Q4_0: return block_dot_q8<Q4_0B, Q4_0D>(row, x, n, lane);
        case GGML_Q4_1: return block_dot_q8<Q4_1B, Q4_1D>(row, x, n, lane);
        case GGML_Q5_0: return block_dot_q8<Q5_0B, Q5_0D>(row, x, n, lane);
        case GGML_Q5_1: return block_dot_q8<Q5_1B, Q5_1D>(row, x, n, lane);
        case GGML_Q8_0: return block_dot_q8<Q8_0B, Q8_0D>(row, x, n, lane);
        case GGML_Q4_K: return block_dot_q8<Q4_KB, Q4_KD>(row, x, n, lane);
        case GGML_Q5_K: return block_dot_q8<Q5_KB, Q5_KD>(row, x, n, lane);
        case GGML_Q6_K: return block_dot_q8<Q6_KB, Q6_KD>(row, x, n, lane);
        default:
            if constexpr (LUT4) {
                if (type == GGML_IQ4_NL) return block_dot_q8<IQ4_NLB, IQ4_NLD>(row, x, n, lane);
                if (type == GGML_IQ4_XS) return block_dot_q8<IQ4_XSB, IQ4_XSD>(row, x, n, lane);
                if (type == GGML_MXFP4) return block_dot_q8<MXFP4B, MXFP4D>(row, x, n, lane);
            }
            return 0.f;
    }
}

// Weights a block of the GGML type id `type` holds (1 for any other, which the host never passes).
template <bool LUT4 = false>
__device__ __forceinline__ int ggml_block_weights(int type) {
    switch (type) {
        case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0: return 32;
        case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return 256;
        default:
            if constexpr (LUT4) {
                if (type == GGML_IQ4_NL || type == GGML_MXFP4) return 32;
                if (type == GGML_IQ4_XS) return 256;
            }
            return 1;
    }
}

// Staged decode products. Why: reading a row's blocks where its units are (2- and 4-byte loads
// at the blocks' alignments, one unit a lane at a time) kept too few bytes in flight — the expert
// kernels read at 15–27 % of the copy bandwidth where the bf16 ones, loading 16 bytes a lane,
// reach 61–77 % (BENCHMARKS.md §31). So a warp first copies its rows' bytes into its own
// shared-memory buffer as aligned 16-byte words, all at once (`cp.async`: no registers held,
// every copy in flight together), then takes the same units in the same lane order from there:
// the same products summed in the same order, so the same bits as `ggml_dot_q8`.

// Bytes a block of the GGML type id `type` takes (1 for any other, which the host never passes).
template <bool LUT4 = false>
__device__ __forceinline__ int ggml_block_bytes(int type) {
    switch (type) {
        case GGML_Q4_0: return 18;
        case GGML_Q4_1: return 20;
        case GGML_Q5_0: return 22;
        case GGML_Q5_1: return 24;
        case GGML_Q8_0: return 34;
        case GGML_Q4_K: return 144;
        case GGML_Q5_K: return 176;
        case GGML_Q6_K: return 210;
        default:
            if constexpr (LUT4) {
                if (type == GGML_IQ4_NL) return 18;
                if (type == GGML_IQ4_XS) return 136;
                if (type == GGML_MXFP4) return 17;
            }
            return 1;
    }
}

__device__ __forceinline__ void cp_async16(uint8_t* smem, const uint8_t* gmem) {
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
// The same for one aligned 4-byte word (through L1: `cg` takes only 16 bytes).
__device__ __forceinline__ void cp_async4(uint8_t* smem, const uint8_t* gmem) {
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Starts copying bytes [p, p + n) into `buf` (16-byte aligned, at least n + 30 bytes) as the
// aligned 16-byte words that cover them, the warp's lanes taking consecutive words; returns
// where p's byte lands in buf. The covering words lie in the 16-byte granules that hold the
// range's own bytes, so nothing past a device allocation (256-byte aligned and sized) is read.
__device__ __forceinline__ const uint8_t* stage_async(const uint8_t* p, int n, uint8_t* buf,
                                                      int lane) {
    const uintptr_t a0 = (uintptr_t)p & ~(uintptr_t)15;
    const int words = (int)(((((uintptr_t)p + n + 15) & ~(uintptr_t)15) - a0) >> 4);
    for (int i = lane; i < words; i += 32)
        cp_async16(buf + 16 * i, reinterpret_cast<const uint8_t*>(a0) + 16 * i);
    return buf + ((uintptr_t)p & 15);
}

// block_dot_q8's units of blocks b0 .. b0 + nb (their bytes at `chunk`, staged), added to acc:
// lane `lane` takes the units t ≡ lane (mod 32), in increasing order, as block_dot_q8 does.
template <typename B, typename D>
__device__ __forceinline__ void block_dot_q8_staged(const uint8_t* chunk, const Q8Act& x, int b0,
                                                    int nb, int lane, float& acc) {
    const int u0 = b0 * B::UNITS, u1 = (b0 + nb) * B::UNITS;
    for (int t = u0 + ((lane - u0) & 31); t < u1; t += 32) {
        const int blk = t / B::UNITS, u = t - blk * B::UNITS;
        acc += D::template dot_q8<Smem>(chunk + (size_t)(blk - b0) * B::BYTES, u,
                                        x.at(blk * B::WEIGHTS));
    }
}

template <bool LUT4 = false>
__device__ __forceinline__ void ggml_dot_q8_chunk(int type, const uint8_t* chunk, const Q8Act& x,
                                                  int b0, int nb, int lane, float& acc) {
    switch (type) {
        case GGML_Q4_0: block_dot_q8_staged<Q4_0B, Q4_0D>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q4_1: block_dot_q8_staged<Q4_1B, Q4_1D>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q5_0: block_dot_q8_staged<Q5_0B, Q5_0D>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q5_1: block_dot_q8_staged<Q5_1B, Q5_1D>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q8_0: block_dot_q8_staged<Q8_0B, Q8_0D>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q4_K: block_dot_q8_staged<Q4_KB, Q4_KD>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q5_K: block_dot_q8_staged<Q5_KB, Q5_KD>(chunk, x, b0, nb, lane, acc); break;
        case GGML_Q6_K: block_dot_q8_staged<Q6_KB, Q6_KD>(chunk, x, b0, nb, lane, acc); break;
        default:
            if constexpr (LUT4) {
                if (type == GGML_IQ4_NL)
                    block_dot_q8_staged<IQ4_NLB, IQ4_NLD>(chunk, x, b0, nb, lane, acc);
                else if (type == GGML_IQ4_XS)
                    block_dot_q8_staged<IQ4_XSB, IQ4_XSD>(chunk, x, b0, nb, lane, acc);
                else if (type == GGML_MXFP4)
                    block_dot_q8_staged<MXFP4B, MXFP4D>(chunk, x, b0, nb, lane, acc);
            }
            break;
    }
}

// ggml_dot_q8 over R rows at once (row r of type type[r], n columns, all against x), each
// lane's shares into acc: the rows' bytes staged through `buf` (the warp's own, per_row bytes a
// row, per_row ≥ 256 and a multiple of 16), in chunks of whole blocks where a row does not fit.
template <int R, bool LUT4 = false>
__device__ __forceinline__ void ggml_dot_q8_staged(const int* type, const uint8_t* const* row,
                                                   const Q8Act& x, int n, int lane, uint8_t* buf,
                                                   int per_row, float* acc) {
    int bytes[R], per_chunk[R], blocks[R];
    int chunks = 0;
#pragma unroll
    for (int r = 0; r < R; r++) {
        bytes[r] = ggml_block_bytes<LUT4>(type[r]);
        blocks[r] = n / ggml_block_weights<LUT4>(type[r]);
        per_chunk[r] = (per_row - 32) / bytes[r];
        chunks = max(chunks, (blocks[r] + per_chunk[r] - 1) / per_chunk[r]);
        acc[r] = 0.f;
    }
    for (int c = 0; c < chunks; c++) {
        const uint8_t* at[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int b0 = c * per_chunk[r], nb = min(per_chunk[r], blocks[r] - b0);
            at[r] = nb > 0 ? stage_async(row[r] + (size_t)b0 * bytes[r], nb * bytes[r],
                                         buf + r * per_row, lane)
                           : nullptr;
        }
        cp_async_wait_all();
        __syncwarp();
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int b0 = c * per_chunk[r], nb = min(per_chunk[r], blocks[r] - b0);
            if (nb > 0) ggml_dot_q8_chunk<LUT4>(type[r], at[r], x, b0, nb, lane, acc[r]);
        }
        // Every lane done with this chunk before the next one overwrites the buffer.
        __syncwarp();
    }
}

// One unit of a row (unit index t along the row) dequantised into out (the row's bf16 values),
// each weight rounded to bf16 once.
template <typename B>
__device__ __forceinline__ void block_unit_to_bf16(const uint8_t* __restrict__ row, int t,
                                                   __nv_bfloat16* __restrict__ out) {
    const int blk = t / B::UNITS, u = t - blk * B::UNITS;
    float w[8 * B::G];
    B::unit(row + (size_t)blk * B::BYTES, u, w);
    __nv_bfloat16* ob = out + (size_t)blk * B::WEIGHTS;
#pragma unroll
    for (int g = 0; g < B::G; g++) {
#pragma unroll
        for (int i = 0; i < 8; i++) ob[B::start(u, g) + i] = __float2bfloat16(w[8 * g + i]);
    }
}

// Units of a row of n columns of type `type` (0 for types not listed).
__device__ __forceinline__ int ggml_units(int type, int n) {
    switch (type) {
        case GGML_Q4_0: return n / Q4_0B::WEIGHTS * Q4_0B::UNITS;
        case GGML_Q4_1: return n / Q4_1B::WEIGHTS * Q4_1B::UNITS;
        case GGML_Q5_0: return n / Q5_0B::WEIGHTS * Q5_0B::UNITS;
        case GGML_Q5_1: return n / Q5_1B::WEIGHTS * Q5_1B::UNITS;
        case GGML_Q8_0: return n / Q8_0B::WEIGHTS * Q8_0B::UNITS;
        case GGML_Q4_K: return n / Q4_KB::WEIGHTS * Q4_KB::UNITS;
        case GGML_Q5_K: return n / Q5_KB::WEIGHTS * Q5_KB::UNITS;
        case GGML_Q6_K: return n / Q6_KB::WEIGHTS * Q6_KB::UNITS;
        case GGML_IQ4_NL: return n / IQ4_NLB::WEIGHTS * IQ4_NLB::UNITS;
        case GGML_IQ4_XS: return n / IQ4_XSB::WEIGHTS * IQ4_XSB::UNITS;
        case GGML_MXFP4: return n / MXFP4B::WEIGHTS * MXFP4B::UNITS;
        default: return 0;
    }
}

__device__ __forceinline__ void ggml_unit_to_bf16(int type, const uint8_t* __restrict__ row, int t,
                                                  __nv_bfloat16* __restrict__ out) {
    switch (type) {
        case GGML_Q4_0: block_unit_to_bf16<Q4_0B>(row, t, out); break;
        case GGML_Q4_1: block_unit_to_bf16<Q4_1B>(row, t, out); break;
        case GGML_Q5_0: block_unit_to_bf16<Q5_0B>(row, t, out); break;
        case GGML_Q5_1: block_unit_to_bf16<Q5_1B>(row, t, out); break;
        case GGML_Q8_0: block_unit_to_bf16<Q8_0B>(row, t, out); break;
        case GGML_Q4_K: block_unit_to_bf16<Q4_KB>(row, t, out); break;
        case GGML_Q5_K: block_unit_to_bf16<Q5_KB>(row, t, out); break;
        case GGML_Q6_K: block_unit_to_bf16<Q6_KB>(row, t, out); break;
        case GGML_IQ4_NL: block_unit_to_bf16<IQ4_NLB>(row, t, out); break;
        case GGML_IQ4_XS: block_unit_to_bf16<IQ4_XSB>(row, t, out); break;
        case GGML_MXFP4: block_unit_to_bf16<MXFP4B>(row, t, out); break;
        default: break;
    }
}
