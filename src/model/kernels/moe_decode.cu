// MoE expert MLP for one decode token (batch 1), bf16 weights, f32 accumulation.
//
// The FP8 and GGUF kernels come twice: `moe_decode_*` for one token and `moe_tokens_*` for a
// short prompt, a token along gridDim.y with its k slots' rows read for it alone (the other
// road for a prompt dequantises every routed expert first). The same body, so each token gets
// the bits a launch of that token alone gives; apart because the token's offsets cost the
// decode kernels registers (and a block an SM) where a parameter read from the constant bank
// costs none.
//
// Why: candle's fused MoE kernel is a tiled WMMA GEMM built for many tokens; with one token it
// launches a block per (expert, column tile) for all experts and runs ~10x under the memory
// bandwidth the weights need (measured with ncu on an H100: 160 + 67 us per layer against
// ~17 + 8 us of bytes). A decode token is two batched GEMVs, so each output row is one warp's
// dot product, read with 16-byte loads.
//
// Rounding follows transformers' bf16 experts: each linear's output rounded to bf16, SiLU and the
// gate*up product rounded to bf16, the expert output times its (bf16) routing weight rounded to
// bf16. Only the final sum over the top-k experts is kept in f32 and rounded once.
//
// Weights are the stacked layouts moescope uses for candle's kernel: gate_up [E, 2I, H] (gate rows
// first), down [E, H, I]; `ids` are rows of those stacks (expert ids for native, slot ids for the
// selective slot pool), so both backends run the same arithmetic.

#include "common.cuh"
#include "ggml_blocks.cuh"

#define MAX_TOPK 16
// Routing: one warp holds every logit, 32 per lane at most (MAX_EXPERTS = 1024 in moe_decode.rs).
#define MAX_EXPERTS_PER_LANE 32

// The lane's shares of gate_r · x and up_r · x summed over the warp, then (lane 0) the rounded
// activation times the rounded up into `out`.
__device__ __forceinline__ void store_mid(float g, float u, int lane, __nv_bfloat16* out) {
    g = warp_sum(g);
    u = warp_sum(u);
    if (lane == 0) {
        const float gb = bf16_round(g);
        const float ub = bf16_round(u);
        const float act = bf16_round(gb / (1.f + expf(-gb)));
        *out = __float2bfloat16(act * ub);
    }
}

// mid[s, r] = bf16(silu(bf16(gate_r . x)) * bf16(up_r . x)) for slot s (expert ids[s]), row r < I.
// One warp per (s, r). `map` (may be null): ids are expert ids and map[id] their rows (the
// selective slot pool's expert→slot table), saving a separate remapping launch per layer.
extern "C" __global__ void moe_decode_gate_up_bf16(
    const __nv_bfloat16* __restrict__ w_gu,  // [E, 2I, H]
    const uint32_t* __restrict__ ids,        // [k]
    const uint32_t* __restrict__ map,        // [experts] or null
    const __nv_bfloat16* __restrict__ x,     // [H]
    __nv_bfloat16* __restrict__ mid,         // [k, I]
    int k, int inter, int hidden) {
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (warp >= k * inter) return;
    const int s = warp / inter;
    const int r = warp - s * inter;
    const size_t e = map ? map[ids[s]] : ids[s];
    const __nv_bfloat16* base = w_gu + e * (size_t)(2 * inter) * hidden;
    const float g = dot_part(base + (size_t)r * hidden, x, hidden, lane);
    const float u = dot_part(base + (size_t)(inter + r) * hidden, x, hidden, lane);
    store_mid(g, u, lane, mid + (size_t)s * inter + r);
}

// dot_part over `rows` consecutive rows (`stride` elements apart, rows <= DOWN_ROWS) against
// the same x, their loads issued together: each row's accumulator sees its elements in
// dot_part's order, so the bits are dot_part's.
#define DOWN_ROWS 4
__device__ __forceinline__ void dot_rows(const __nv_bfloat16* __restrict__ row0, size_t stride,
                                         int rows, const __nv_bfloat16* __restrict__ x, int n,
                                         int lane, float* acc) {
#pragma unroll
    for (int r = 0; r < DOWN_ROWS; r++) acc[r] = 0.f;
    if (rows != DOWN_ROWS || (((uintptr_t)row0 | (uintptr_t)x | (stride * 2)) & 15) != 0) {
        for (int r = 0; r < rows; r++) acc[r] = dot_part(row0 + r * stride, x, n, lane);
        return;
    }
    const int nv = n / 8;
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    for (int i = lane; i < nv; i += 32) {
        uint4 w[DOWN_ROWS];
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) w[r] = ld_stream(reinterpret_cast<const uint4*>(row0 + r * stride) + i);
        const uint4 c = __ldg(x4 + i);
        const __nv_bfloat162* c2 = reinterpret_cast<const __nv_bfloat162*>(&c);
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) {
            const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&w[r]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 fa = __bfloat1622float2(a2[j]);
                const float2 fc = __bfloat1622float2(c2[j]);
                acc[r] = fmaf(fa.x, fc.x, acc[r]);
                acc[r] = fmaf(fa.y, fc.y, acc[r]);
            }
        }
    }
    for (int i = nv * 8 + lane; i < n; i += 32) {
        const float xi = __bfloat162float(x[i]);
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) acc[r] = fmaf(__bfloat162float(row0[r * stride + i]), xi, acc[r]);
    }
}

// y[h] = sum_s bf16(bf16(down_h(ids[s]) . mid[s]) * bf16(w[s])), the sum in f32 in slot order
// (then res[h] + y[h] in bf16 when `res` is given).
// One block per DOWN_ROWS output rows, one warp per routed expert (blockDim = 32 k), each warp
// reading its expert's DOWN_ROWS rows at once. Why not one warp per row: a row's k short dots
// (I = 768 on Qwen3-30B-A3B) then run one after another and too few bytes are in flight (a third
// of the copy bandwidth, `bench steps`). Each dot and the sum's order are what one warp per row
// did, so the bits are too.

// DOWN_ROWS rows of expert `e`'s down matrix from row h0 (`rows` of them real) dotted with the
// same mid row: the lane's shares, into acc.
struct Bf16Down {
    const __nv_bfloat16* w_dn;
    __device__ __forceinline__ void dot(size_t e, int h0, int rows, int hidden, int inter,
                                        const __nv_bfloat16* __restrict__ m, int lane,
                                        float* acc) const {
        dot_rows(w_dn + (e * hidden + h0) * (size_t)inter, (size_t)inter, rows, m, inter, lane, acc);
    }
};

// Slot s's row of mid (I values a row): bf16, or rounded to 8-bit blocks (GGUF's kernels).
__device__ __forceinline__ const __nv_bfloat16* mid_row(const __nv_bfloat16* m, int s, int n) {
    return m + (size_t)s * n;
}
__device__ __forceinline__ Q8Act mid_row(const Q8Act& m, int s, int n) {
    return m.at(s * n);
}

// The down kernels' body over `dn`'s matrices (see moe_decode_down_bf16).
template <bool TOKENS, typename D, typename M>
__device__ __forceinline__ void moe_down(const D& dn, const uint32_t* __restrict__ ids,
                                         const uint32_t* __restrict__ map,
                                         const float* __restrict__ topk_w,
                                         const M& mid,
                                         __nv_bfloat16* __restrict__ y,
                                         const __nv_bfloat16* __restrict__ res, int k, int inter,
                                         int hidden) {
    __shared__ float d[DOWN_ROWS][MAX_TOPK];
    __shared__ float wb[MAX_TOPK];
    // TOKENS: token blockIdx.y of the launch — its ids, weights, mid rows, output, residual.
    if (TOKENS) {
        ids += (size_t)blockIdx.y * k;
        topk_w += (size_t)blockIdx.y * k;
        y += (size_t)blockIdx.y * hidden;
        if (res) res += (size_t)blockIdx.y * hidden;
    }
    const M m = TOKENS ? mid_row(mid, blockIdx.y * k, inter) : mid;
    const int h0 = blockIdx.x * DOWN_ROWS;
    const int rows = min(DOWN_ROWS, hidden - h0);
    const int s = threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (rows <= 0) return;
    // The routing weights and the residual are asked for before the expert rows, so their
    // loads wait beside the dots' instead of after the barrier (same values, same bits).
    if (threadIdx.x < k) wb[threadIdx.x] = bf16_round(topk_w[threadIdx.x]);
    const __nv_bfloat16 r_in = (res && threadIdx.x < rows) ? res[h0 + threadIdx.x] : __float2bfloat16(0.f);
    if (s < k) {
        const size_t e = map ? map[ids[s]] : ids[s];
        float part[DOWN_ROWS];
        dn.dot(e, h0, rows, hidden, inter, mid_row(m, s, inter), lane, part);
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) {
            const float v = bf16_round(warp_sum(part[r]));
            if (lane == 0 && r < rows) d[r][s] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < rows) {
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += bf16_round(d[threadIdx.x][j] * wb[j]);
        const __nv_bfloat16 o = __float2bfloat16(acc);
        // The residual add as candle's bf16 add computes it, so folding it in keeps the bits.
        y[h0 + threadIdx.x] = res ? __hadd(r_in, o) : o;
    }
}

extern "C" __global__ void moe_decode_down_bf16(
    const __nv_bfloat16* __restrict__ w_dn,  // [E, H, I]
    const uint32_t* __restrict__ ids,        // [k]
    const uint32_t* __restrict__ map,        // [experts] or null, as above
    const float* __restrict__ topk_w,        // [k]
    const __nv_bfloat16* __restrict__ mid,   // [k, I]
    __nv_bfloat16* __restrict__ y,           // [H]
    const __nv_bfloat16* __restrict__ res,   // [H] or null: added to y (the residual)
    int k, int inter, int hidden) {
    moe_down<false>(Bf16Down{w_dn}, ids, map, topk_w, mid, y, res, k, inter, hidden);
}

// FP8 expert stacks (Qwen's block-scaled e4m3, decoded in registers): the bf16 kernels' work
// and rounding, each weight row's dot product taken 8 bytes at a time — the 8 products summed in
// order, then times their block's scale into the row's accumulator (the order FP8 GEMMs use).
// Stacks: gate_up [E, 2I, H] bytes with scales [E, 2 SR, SC] f32 (gate's SR = ceil(I / br)
// block rows, then up's; SC = ceil(H / bc)); down [E, H, I] bytes with scales
// [E, ceil(H / br), ceil(I / bc)]. As for bf16, `ids` are rows of the stacks (native's expert
// ids, or with `map` the selective slot pool's slots), so both backends run the same arithmetic.

// Registers capped (`__maxnreg__`) so that a Qwen3-30B-A3B layer's blocks fit an H100's or H200's
// 132 SMs in one wave: gate_up's 768 blocks of 8 warps need 6 a SM (40 registers; it took 56,
// then 48, so 4–5 fitted and the rest ran as a second, mostly idle wave) and down's 512 need 4
// (64 registers against 76). Measured on an H100 (BENCHMARKS.md §119, `bench steps`, FP8 at 12
// layers): gate_up inside the step 196 → 159 µs, down 125 → 130 µs, the whole step 0.93× main's.
// A few bytes spill (gate_up 24, down 12), before and after the 8-byte loop, none inside it
// (checked in nvdisasm's sm_90 code).

// mid[s, r] as moe_decode_gate_up_bf16 computes it, from FP8 stacks. One warp per (s, r).
#define GATE_UP_FP8_PARAMS                                                       \
    const uint8_t* __restrict__ w_gu,        /* [E, 2I, H] */                    \
    const float* __restrict__ s_gu,          /* [E, 2 SR, SC] */                 \
    const uint32_t* __restrict__ ids,        /* [T, k] */                        \
    const uint32_t* __restrict__ map,        /* [experts] or null */             \
    const __nv_bfloat16* __restrict__ x,     /* [T, H] */                        \
    __nv_bfloat16* __restrict__ mid,         /* [T, k, I] */                     \
    int k, int inter, int hidden, int br, int bc
#define GATE_UP_FP8_ARGS w_gu, s_gu, ids, map, x, mid, k, inter, hidden, br, bc
template <bool TOKENS>
__device__ __forceinline__ void gate_up_fp8(GATE_UP_FP8_PARAMS) {
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (warp >= k * inter) return;
    if (TOKENS) {  // token blockIdx.y of the launch
        ids += (size_t)blockIdx.y * k;
        x += (size_t)blockIdx.y * hidden;
        mid += (size_t)blockIdx.y * k * inter;
    }
    const int s = warp / inter;
    const int r = warp - s * inter;
    const size_t e = map ? map[ids[s]] : ids[s];
    const int sr = (inter + br - 1) / br, sc = (hidden + bc - 1) / bc;
    const uint8_t* base = w_gu + e * (size_t)(2 * inter) * hidden;
    const float* sbase = s_gu + e * (size_t)(2 * sr) * sc;
    const uint8_t* rows[2] = {base + (size_t)r * hidden, base + (size_t)(inter + r) * hidden};
    const float* srows[2] = {sbase + (size_t)(r / br) * sc, sbase + (size_t)(sr + r / br) * sc};
    float acc[2];
    fp8_dot_rows<2>(rows, srows, bc, 0, x, hidden, lane, acc);
    store_mid(acc[0], acc[1], lane, mid + (size_t)s * inter + r);
}
extern "C" __global__ void __maxnreg__(40) moe_decode_gate_up_fp8(GATE_UP_FP8_PARAMS) {
    gate_up_fp8<false>(GATE_UP_FP8_ARGS);
}
extern "C" __global__ void __maxnreg__(40) moe_tokens_gate_up_fp8(GATE_UP_FP8_PARAMS) {
    gate_up_fp8<true>(GATE_UP_FP8_ARGS);
}

// y (plus `res`) as moe_decode_down_bf16 computes it, from FP8 stacks: Bf16Down's rows as e4m3
// bytes with their block scales.
struct Fp8Down {
    const uint8_t* w_dn;
    const float* s_dn;
    int br, bc;
    __device__ __forceinline__ void dot(size_t e, int h0, int rows, int hidden, int inter,
                                        const __nv_bfloat16* __restrict__ m, int lane,
                                        float* acc) const {
        const int sr = (hidden + br - 1) / br, sc = (inter + bc - 1) / bc;
        const uint8_t* rp[DOWN_ROWS];
        const float* sp[DOWN_ROWS];
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) {
            // Past the last row: the last row again, its result not kept.
            const int h = min(h0 + r, hidden - 1);
            rp[r] = w_dn + (e * hidden + h) * (size_t)inter;
            sp[r] = s_dn + (e * sr + h / br) * (size_t)sc;
        }
        fp8_dot_rows<DOWN_ROWS>(rp, sp, bc, 0, m, inter, lane, acc);
    }
};

#define DOWN_FP8_PARAMS                                                          \
    const uint8_t* __restrict__ w_dn,        /* [E, H, I] */                     \
    const float* __restrict__ s_dn,          /* [E, ceil(H / br), ceil(I / bc)] */ \
    const uint32_t* __restrict__ ids,        /* [T, k] */                        \
    const uint32_t* __restrict__ map,        /* [experts] or null */             \
    const float* __restrict__ topk_w,        /* [T, k] */                        \
    const __nv_bfloat16* __restrict__ mid,   /* [T, k, I] */                     \
    __nv_bfloat16* __restrict__ y,           /* [T, H] */                        \
    const __nv_bfloat16* __restrict__ res,   /* [T, H] or null */                \
    int k, int inter, int hidden, int br, int bc
extern "C" __global__ void __maxnreg__(64) moe_decode_down_fp8(DOWN_FP8_PARAMS) {
    moe_down<false>(Fp8Down{w_dn, s_dn, br, bc}, ids, map, topk_w, mid, y, res, k, inter, hidden);
}
extern "C" __global__ void __maxnreg__(64) moe_tokens_down_fp8(DOWN_FP8_PARAMS) {
    moe_down<true>(Fp8Down{w_dn, s_dn, br, bc}, ids, map, topk_w, mid, y, res, k, inter, hidden);
}

// Experts of FP8 stacks dequantised into a bf16 stack, for a prompt's tokens (candle's MoE GEMM
// over them): out[j] = e4m3(w[rows[j]]) × its block's scale, rounded to bf16 once. `w`
// [E, m, cols] bytes, `s` [E, groups · ceil(m / groups / br), ceil(cols / bc)]: the m rows are
// `groups` matrices blocked apart (gate_up: gate then up). Grid-stride over n × m × cols.
extern "C" __global__ void fp8_dequant_stack_bf16(
    const uint8_t* __restrict__ w, const float* __restrict__ s,
    const uint32_t* __restrict__ rows, __nv_bfloat16* __restrict__ out,
    int n, int n_stack, int m, int cols, int groups, int br, int bc) {
    const int gm = m / groups;
    const int sr = (gm + br - 1) / br, sc = (cols + bc - 1) / bc;
    const size_t per = (size_t)m * cols;
    const size_t total = (size_t)n * per;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t j = i / per, within = i - j * per;
        const int r = (int)(within / cols), c = (int)(within - (size_t)r * cols);
        const size_t e = rows[j];
        if (e >= (size_t)n_stack) {  // not a row of the stack: nothing to read
            out[i] = __float2bfloat16(0.f);
            continue;
        }
        const int g = r / gm, rr = r - g * gm;
        const float scale = s[(e * groups * sr + (size_t)g * sr + rr / br) * sc + c / bc];
        out[i] = __float2bfloat16(e4m3(w[e * per + within]) * scale);
    }
}

// GGUF expert stacks (GGML blocks, decoded in registers, `ggml_blocks.cuh`): the bf16 kernels'
// work and rounding, except that each product's input — x for gate_up, mid for down — is first
// rounded to 8-bit blocks (`quantize_q8_bf16`) and multiplied by the weights' codes in integers
// (`ggml_dot_q8`), as llama.cpp's and candle's kernels do. A stack holds each expert's bytes as
// the file stores them, `stride` bytes apart: gate_up's gate rows (type `tg`, `rbg` bytes a row)
// then its up rows (`tu`, `rbu`); down's rows (`td`, `rbd`). A slot pool's stride may exceed an
// expert's bytes (one pool serves layers whose types differ). As for bf16, `ids` are rows of the
// stacks (native's expert ids, or with `map` the slot pool's slots).

// The GGUF kernels' staging buffers (`ggml_dot_q8_staged`): each warp's rows, sized at launch.
extern __shared__ __align__(16) uint8_t ggml_stage[];

// x [rows, 32 · blocks] bf16 rounded to 8-bit blocks: for each 32 values, d = max|x| / 127 and
// q = round(x / d) (0 where the block is all zeros; d NaN where it holds a NaN, so that the NaN
// reaches the products). One warp per block.
extern "C" __global__ void quantize_q8_bf16(const __nv_bfloat16* __restrict__ x,
                                            int8_t* __restrict__ q, float* __restrict__ d,
                                            int blocks) {
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (warp >= blocks) return;
    const float v = __bfloat162float(x[(size_t)warp * 32 + lane]);
    float amax = fabsf(v);
    bool nan = v != v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    nan = __any_sync(0xffffffffu, nan);
    const float dd = nan ? __int_as_float(0x7FC00000) : __fdiv_rn(amax, 127.f);
    const int qi = (amax == 0.f || nan) ? 0 : (int)roundf(__fdiv_rn(v, dd));
    q[(size_t)warp * 32 + lane] = (int8_t)qi;
    if (lane == 0) d[warp] = dd;
}

// mid[s, r] as moe_decode_gate_up_bf16 computes it, from GGUF stacks and x rounded to 8-bit
// blocks. One warp per (s, r). With `stage_x`, the block first copies x's codes and scales
// into shared memory (every warp of the block reads all of them), then each warp's two rows
// follow them (`ggml_dot_q8_staged`).
#define GATE_UP_GGML_PARAMS                                                      \
    const uint8_t* __restrict__ w_gu,        /* [E, stride] */                   \
    unsigned long long stride,                                                   \
    int tg, int rbg, int tu, int rbu,                                            \
    const uint32_t* __restrict__ ids,        /* [T, k] */                        \
    const uint32_t* __restrict__ map,        /* [experts] or null */             \
    const int8_t* __restrict__ xq,           /* [T, H] codes */                  \
    const float* __restrict__ xd,            /* [T, H / 32] scales */            \
    __nv_bfloat16* __restrict__ mid,         /* [T, k, I] */                     \
    int k, int inter, int hidden,                                                \
    int per_row,   /* staging bytes a row: 2 · per_row a warp */                 \
    int stage_x    /* x staged first: round16(H + H / 8) bytes */
#define GATE_UP_GGML_ARGS \
    w_gu, stride, tg, rbg, tu, rbu, ids, map, xq, xd, mid, k, inter, hidden, per_row, stage_x
template <bool TOKENS, bool LUT4>
__device__ __forceinline__ void gate_up_ggml(GATE_UP_GGML_PARAMS) {
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (TOKENS) {  // token blockIdx.y of the launch
        ids += (size_t)blockIdx.y * k;
        xq += (size_t)blockIdx.y * hidden;
        xd += (size_t)blockIdx.y * (hidden / 32);
        mid += (size_t)blockIdx.y * k * inter;
    }
    Q8Act x{xq, xd};
    uint8_t* buf = ggml_stage;
    if (stage_x) {
        // H is a multiple of 32: the codes are whole 16-byte words (a token's start at a
        // multiple of 32 bytes); the scales go as 4-byte words, since a later token's start at
        // H / 8 bytes a token need not be 16-byte aligned.
        const int cw = hidden / 16, sw = hidden / 32;
        for (int i = threadIdx.x; i < cw + sw; i += blockDim.x) {
            if (i < cw)
                cp_async16(ggml_stage + 16 * i, reinterpret_cast<const uint8_t*>(xq) + 16 * i);
            else
                cp_async4(ggml_stage + hidden + 4 * (i - cw),
                          reinterpret_cast<const uint8_t*>(xd + (i - cw)));
        }
        cp_async_wait_all();
        __syncthreads();
        x = Q8Act{reinterpret_cast<const int8_t*>(ggml_stage),
                  reinterpret_cast<const float*>(ggml_stage + hidden)};
        buf += (hidden + hidden / 8 + 15) / 16 * 16;
    }
    if (warp >= k * inter) return;
    const int s = warp / inter;
    const int r = warp - s * inter;
    const size_t e = map ? map[ids[s]] : ids[s];
    const uint8_t* base = w_gu + e * stride;
    const int types[2] = {tg, tu};
    const uint8_t* rows[2] = {base + (size_t)r * rbg, base + (size_t)inter * rbg + (size_t)r * rbu};
    float gu[2];
    ggml_dot_q8_staged<2, LUT4>(types, rows, x, hidden, lane,
                          buf + (size_t)(threadIdx.x / 32) * 2 * per_row, per_row, gu);
    store_mid(gu[0], gu[1], lane, mid + (size_t)s * inter + r);
}
extern "C" __global__ void __launch_bounds__(256) moe_decode_gate_up_ggml(GATE_UP_GGML_PARAMS) {
    gate_up_ggml<false, false>(GATE_UP_GGML_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) moe_tokens_gate_up_ggml(GATE_UP_GGML_PARAMS) {
    gate_up_ggml<true, false>(GATE_UP_GGML_ARGS);
}
// The same, the table-coded types (IQ4_NL, IQ4_XS, MXFP4) decoded too (`ggml_blocks.cuh`
// says why apart).
extern "C" __global__ void __launch_bounds__(256)
    moe_decode_gate_up_ggml_lut4(GATE_UP_GGML_PARAMS) {
    gate_up_ggml<false, true>(GATE_UP_GGML_ARGS);
}
extern "C" __global__ void __launch_bounds__(256)
    moe_tokens_gate_up_ggml_lut4(GATE_UP_GGML_PARAMS) {
    gate_up_ggml<true, true>(GATE_UP_GGML_ARGS);
}

// y (plus `res`) as moe_decode_down_bf16 computes it, from a GGUF down stack and mid rounded to
// 8-bit blocks (each slot's row on its own: I is a multiple of 32). Not staged: staging its
// DOWN_ROWS rows took 80 registers, and a Qwen3-30B-A3B layer's blocks then no longer fitted
// the card at once (BENCHMARKS.md §33).
template <bool LUT4>
struct GgmlDown {
    const uint8_t* w_dn;
    unsigned long long stride;
    int type, rb;
    __device__ __forceinline__ void dot(size_t e, int h0, int rows, int hidden, int inter,
                                        const Q8Act& m, int lane, float* acc) const {
        const uint8_t* base = w_dn + e * stride;
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; r++) {
            // Past the last row: the last row again, its result not kept.
            const int h = min(h0 + r, hidden - 1);
            acc[r] = ggml_dot_q8<LUT4>(type, base + (size_t)h * rb, m, inter, lane);
        }
    }
};

#define DOWN_GGML_PARAMS                                                         \
    const uint8_t* __restrict__ w_dn,        /* [E, stride] */                   \
    unsigned long long stride,                                                   \
    int td, int rbd,                                                             \
    const uint32_t* __restrict__ ids,        /* [T, k] */                        \
    const uint32_t* __restrict__ map,        /* [experts] or null */             \
    const float* __restrict__ topk_w,        /* [T, k] */                        \
    const int8_t* __restrict__ mq,           /* [T, k, I] codes */               \
    const float* __restrict__ md,            /* [T, k, I / 32] scales */         \
    __nv_bfloat16* __restrict__ y,           /* [T, H] */                        \
    const __nv_bfloat16* __restrict__ res,   /* [T, H] or null */                \
    int k, int inter, int hidden
extern "C" __global__ void moe_decode_down_ggml(DOWN_GGML_PARAMS) {
    moe_down<false>(GgmlDown<false>{w_dn, stride, td, rbd}, ids, map, topk_w, Q8Act{mq, md}, y,
                    res, k, inter, hidden);
}
extern "C" __global__ void moe_tokens_down_ggml(DOWN_GGML_PARAMS) {
    moe_down<true>(GgmlDown<false>{w_dn, stride, td, rbd}, ids, map, topk_w, Q8Act{mq, md}, y,
                   res, k, inter, hidden);
}
extern "C" __global__ void moe_decode_down_ggml_lut4(DOWN_GGML_PARAMS) {
    moe_down<false>(GgmlDown<true>{w_dn, stride, td, rbd}, ids, map, topk_w, Q8Act{mq, md}, y,
                    res, k, inter, hidden);
}
extern "C" __global__ void moe_tokens_down_ggml_lut4(DOWN_GGML_PARAMS) {
    moe_down<true>(GgmlDown<true>{w_dn, stride, td, rbd}, ids, map, topk_w, Q8Act{mq, md}, y,
                   res, k, inter, hidden);
}

// `m` rows of type `type` (`rb` bytes each, from byte `off` of each expert) of the experts
// `rows` of a GGUF stack dequantised into rows `row0`.. of a bf16 stack out [n, out_rows, cols],
// each weight rounded to bf16 once. For a prompt's tokens (candle's MoE GEMM over them).
// Grid-stride over n × m × the row's units; a row past the stack gives zeros.
extern "C" __global__ void ggml_dequant_stack_bf16(
    const uint8_t* __restrict__ w, unsigned long long stride, unsigned long long off,
    int type, int rb, const uint32_t* __restrict__ rows, int n, int n_stack, int m, int cols,
    __nv_bfloat16* __restrict__ out, int out_rows, int row0) {
    const int units = ggml_units(type, cols);
    if (units == 0) return;
    const int uw = cols / units;  // weights a unit: the units of a row tile it
    const size_t total = (size_t)n * m * units;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t rr = i / units;
        const int t = (int)(i - rr * units);
        const size_t j = rr / m;
        const int r = (int)(rr - j * m);
        __nv_bfloat16* o = out + (j * out_rows + row0 + r) * (size_t)cols;
        const size_t e = rows[j];
        if (e >= (size_t)n_stack) {
            for (int c = 0; c < uw; c++) o[(size_t)t * uw + c] = __float2bfloat16(0.f);
            continue;
        }
        ggml_unit_to_bf16(type, w + e * stride + off + (size_t)r * rb, t, o);
    }
}

// A logit as f32: bf16 logits (candle's router product), or the f32 copies of bf16-rounded
// logits the fused router writes — read past L1, since other blocks of the launch wrote them.
__device__ __forceinline__ float logit_at(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float logit_at(const float* p) { return __ldcg(p); }

// The lane's best not-yet-taken logit (the first in its elements' order on ties or NaN, as a
// plain scan): `bi` -1 when it has none left.
template <int PER_LANE>
__device__ __forceinline__ void lane_best(const float* v, int nt, int lane, uint32_t taken,
                                          float& best, int& bi) {
    best = -INFINITY;
    bi = -1;
#pragma unroll
    for (int t = 0; t < PER_LANE; t++) {
        if (t >= nt) break;
        if (!((taken >> t) & 1u) && (bi < 0 || v[t] > best)) {
            best = v[t];
            bi = lane + 32 * t;
        }
    }
}

// Up to 32 × PER_LANE experts. The lane's logits (elements lane + 32 t, t < nt) are read once,
// their loads in flight together, and kept in registers; each pass rescans only the lane whose
// best was taken; the k picks are kept by lanes 0..k-1 (no per-pick arrays). Why: the router was
// 12–13 µs a layer on an H200 for 0.5 MB (`bench steps`, ncu: 0.1 instructions issued per cycle)
// — its passes re-read memory, then scanned long unrolled windows; the code is kept small too,
// since each launch runs it once per SM from a cold instruction cache.
template <typename T, int PER_LANE>
__device__ __forceinline__ void route_topk_lanes(const T* __restrict__ row, int n_experts, int k,
                                                 int norm, uint32_t* __restrict__ ids,
                                                 float* __restrict__ weights) {
    const int lane = threadIdx.x & 31;
    const int nt = n_experts > lane ? (n_experts - lane + 31) / 32 : 0;
    float v[PER_LANE];
#pragma unroll
    for (int t = 0; t < PER_LANE; t++) {
        if (t >= nt) break;
        v[t] = logit_at(row + lane + 32 * t);
    }
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < PER_LANE; t++) {
        if (t >= nt) break;
        mx = fmaxf(mx, v[t]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < PER_LANE; t++) {
        if (t >= nt) break;
        sum += expf(v[t] - mx);
    }
    sum = warp_sum(sum);
    uint32_t taken = 0;  // bit t: this lane's element lane + 32 t is selected
    float lb;
    int lbi;
    lane_best<PER_LANE>(v, nt, lane, taken, lb, lbi);
    float my_p = 0.f;  // lane j: the j-th pick's probability and id
    int my_id = 0;
    float sel_sum = 0.f;
#pragma unroll 1
    for (int j = 0; j < k; j++) {
        float best = lb;
        int bi = lbi;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > best || (ov == best && oi < bi))) {
                best = ov;
                bi = oi;
            }
        }
        if (bi < 0) bi = j;  // no candidate compared (NaN logits): any valid index
        if ((bi & 31) == lane) {
            taken |= 1u << (bi >> 5);
            lane_best<PER_LANE>(v, nt, lane, taken, lb, lbi);
        }
        const float p = expf(best - mx) / sum;
        if (lane == j) {
            my_p = p;
            my_id = bi;
        }
        sel_sum += p;
    }
    if (lane < k) {
        const float w = norm ? my_p / sel_sum : my_p;
        ids[lane] = (uint32_t)my_id;
        weights[lane] = bf16_round(w);
    }
}

// Routing of one token's row by the calling warp: softmax over the experts in f32, the top k
// (ties to the lower index), renormalised over the k when `norm` (Qwen3's norm_topk_prob),
// weights rounded to bf16 as transformers casts them. n_experts <= 1024, k <= 32.
template <typename T>
__device__ __forceinline__ void route_topk_warp(const T* __restrict__ row, int n_experts, int k,
                                                int norm, uint32_t* __restrict__ ids,
                                                float* __restrict__ weights) {
    if (n_experts <= 128) route_topk_lanes<T, 4>(row, n_experts, k, norm, ids, weights);
    else if (n_experts <= 256) route_topk_lanes<T, 8>(row, n_experts, k, norm, ids, weights);
    else route_topk_lanes<T, MAX_EXPERTS_PER_LANE>(row, n_experts, k, norm, ids, weights);
}

// Routing of bf16 logits [T, n_experts]: one warp per token (grid = tokens).
extern "C" __global__ void moe_route_topk_bf16(
    const __nv_bfloat16* __restrict__ logits,  // [T, n_experts]
    int n_experts, int k, int norm,
    uint32_t* __restrict__ ids,                // [T, k]
    float* __restrict__ weights) {             // [T, k]
    route_topk_warp(logits + (size_t)blockIdx.x * n_experts, n_experts, k, norm,
                    ids + (size_t)blockIdx.x * k, weights + (size_t)blockIdx.x * k);
}

// The routing of route_topk_lanes by a whole block, for n_experts ≤ RANKED_EXPERTS: each
// expert's place in the order route_topk_lanes picks in — larger logit first, the lower index on
// ties — counted at once by one thread an expert against every other logit, then softmax and
// weights by the first warp, its sums in route_topk_lanes' lane order (so the same bits: the same
// ids in the same order, the same weights). Returns false, having done nothing, where a logit is
// NaN (no such order; the caller routes with route_topk_lanes) — a uniform answer for the block.
// Why: picking k = 8 one after another costs eight rounds of butterfly comparisons on the one
// warp that routes, at the tail of every layer's router.
#define RANKED_EXPERTS 256
__device__ __forceinline__ bool route_topk_ranked(const float* __restrict__ logits, int n_experts,
                                                  int k, int norm, uint32_t* __restrict__ ids,
                                                  float* __restrict__ weights) {
    __shared__ float lv[RANKED_EXPERTS];
    __shared__ int sel[MAX_TOPK];
    const int tid = threadIdx.x, lane = tid & 31;
    bool nan = false;
    for (int c = tid; c < n_experts; c += blockDim.x) {
        const float v = __ldcg(logits + c);
        lv[c] = v;
        nan = nan || v != v;
    }
    if (__syncthreads_or(nan)) return false;
    for (int c = tid; c < n_experts; c += blockDim.x) {
        const float v = lv[c];
        int rank = 0;
#pragma unroll 8
        for (int u = 0; u < n_experts; u++) {
            const float o = lv[u];
            rank += (o > v) || (o == v && u < c);
        }
        if (rank < k) sel[rank] = c;
    }
    __syncthreads();
    if (tid >= 32) return true;
    const int nt = n_experts > lane ? (n_experts - lane + 31) / 32 : 0;
    float mx = -INFINITY;
    for (int t = 0; t < nt; t++) mx = fmaxf(mx, lv[lane + 32 * t]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int t = 0; t < nt; t++) sum += expf(lv[lane + 32 * t] - mx);
    sum = warp_sum(sum);
    const int my_id = lane < k ? sel[lane] : 0;
    const float my_p = lane < k ? expf(lv[my_id] - mx) / sum : 0.f;
    float sel_sum = 0.f;  // in pick order, as route_topk_lanes adds them
    for (int j = 0; j < k; j++) sel_sum += __shfl_sync(0xffffffffu, my_p, j);
    if (lane < k) {
        const float w = norm ? my_p / sel_sum : my_p;
        ids[lane] = (uint32_t)my_id;
        weights[lane] = bf16_round(w);
    }
    return true;
}

// The router of one decode token in one launch: the logits W·x (one warp per expert, rounded to
// bf16 as the router's bf16 product), then — in whichever block finishes last — the routing above
// over them. `arrived` counts finished blocks; it is 0 between launches (the last block resets
// it), so the launch can be replayed in a CUDA graph. Why: the router was two launches plus
// cuBLAS's GEMV, ~12 µs a layer for 0.5 MB of weights (`bench steps`).
extern "C" __global__ void moe_router_topk_bf16(
    const __nv_bfloat16* __restrict__ w,  // [n_experts, hidden]
    const __nv_bfloat16* __restrict__ x,  // [hidden]
    int n_experts, int hidden, int k, int norm,
    float* __restrict__ logits,           // [n_experts] scratch
    unsigned int* __restrict__ arrived,   // [1]
    uint32_t* __restrict__ ids,           // [k]
    float* __restrict__ weights) {        // [k]
    __shared__ unsigned int ticket;
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (warp < n_experts) {
        // All eight of a lane's loads of a 2,048-long row in flight: the router is latency.
        const float acc = warp_sum(dot_part<8>(w + (size_t)warp * hidden, x, hidden, lane));
        if (lane == 0) logits[warp] = bf16_round(acc);
    }
    __threadfence();  // this block's logits visible to the last block before it counts itself
    __syncthreads();
    if (threadIdx.x == 0) ticket = atomicAdd(arrived, 1u);
    __syncthreads();
    if (ticket != gridDim.x - 1) return;
    __threadfence();
    if (threadIdx.x == 0) *arrived = 0u;
    if (n_experts <= RANKED_EXPERTS && k <= n_experts &&
        route_topk_ranked(logits, n_experts, k, norm, ids, weights))
        return;
    if (threadIdx.x < 32) route_topk_warp(logits, n_experts, k, norm, ids, weights);
}

// Selective on a discrete GPU with a slot for every expert (capacity 100 %): the slots of routed
// experts that are not resident yet are filled by the GPU itself, reading the expert's bytes from
// host memory (the registered, device-mapped expert files) over PCIe — inside the step's CUDA
// graph, so a step that misses needs no routing read back and no host round trip per layer.
// `resident` [E] is 1 for experts in their slot; `home` [E] the slot each fills; `src` [3E] the
// device addresses of its gate, up and down parts (each `part` bytes). Grid: (blocks per part,
// routed ids, 3 parts). The copy is bitwise, so the slot holds what a host-queued copy would.
// `mark_filled` (launched after, on the same stream) records the fills in `resident`.

// Copies `n` bytes in words of T (the caller checked the alignment). A warp's loads of
// consecutive words coalesce into whole PCIe read requests whatever the word size; four loads
// are kept in flight per thread because PCIe reads take microseconds.
template <typename T>
__device__ __forceinline__ void copy_words(const unsigned char* __restrict__ s,
                                           unsigned char* __restrict__ d, unsigned long long n) {
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long nw = n / sizeof(T);
    const T* sw = reinterpret_cast<const T*>(s);
    T* dw = reinterpret_cast<T*>(d);
    unsigned long long i = tid;
    for (; i + 3 * stride < nw; i += 4 * stride) {
        const T a = sw[i], b = sw[i + stride], c = sw[i + 2 * stride], e = sw[i + 3 * stride];
        dw[i] = a;
        dw[i + stride] = b;
        dw[i + 2 * stride] = c;
        dw[i + 3 * stride] = e;
    }
    for (; i < nw; i += stride) dw[i] = sw[i];
}

// Safetensors only aligns tensor data to 8 bytes, so the widest word that both ends allow.
__device__ __forceinline__ void copy_part(const unsigned char* __restrict__ s,
                                          unsigned char* __restrict__ d, unsigned long long n) {
    const unsigned long long a = (uintptr_t)s | (uintptr_t)d | n;
    if ((a & 15) == 0) copy_words<uint4>(s, d, n);
    else if ((a & 7) == 0) copy_words<uint2>(s, d, n);
    else if ((a & 3) == 0) copy_words<uint32_t>(s, d, n);
    else if ((a & 1) == 0) copy_words<uint16_t>(s, d, n);
    else copy_words<unsigned char>(s, d, n);
}

// Part p (gate, up, down: blockIdx.z) of each routed expert not resident yet copied from its
// registered host address into its home slot: `len[p]` bytes at byte `at[p]` of the slot's
// gate_up row (`gu_row` bytes a slot) or down row (`dn_row`). The same for bf16 slots (parts
// of H·I·2 bytes) and GGUF ones (each part its blocks, of its own type).
extern "C" __global__ void fill_routed_experts(const uint32_t* __restrict__ ids,
                                               const uint32_t* __restrict__ resident,
                                               const uint32_t* __restrict__ home,
                                               const unsigned long long* __restrict__ src,
                                               unsigned char* __restrict__ gate_up,
                                               unsigned char* __restrict__ down,
                                               unsigned long long gu_row, unsigned long long dn_row,
                                               unsigned long long len0, unsigned long long len1,
                                               unsigned long long len2, unsigned long long at0,
                                               unsigned long long at1, unsigned long long at2,
                                               int n_ids, int n_experts) {
    const int j = blockIdx.y;
    if (j >= n_ids) return;
    const uint32_t e = ids[j];
    if (e >= (uint32_t)n_experts || resident[e] != 0) return;
    const unsigned long long slot = home[e];
    const int p = blockIdx.z;
    const unsigned char* s = reinterpret_cast<const unsigned char*>(src[3ull * e + p]);
    const unsigned long long len = p == 0 ? len0 : p == 1 ? len1 : len2;
    unsigned char* d = p == 0   ? gate_up + slot * gu_row + at0
                       : p == 1 ? gate_up + slot * gu_row + at1
                                : down + slot * dn_row + at2;
    copy_part(s, d, len);
}

extern "C" __global__ void mark_filled(const uint32_t* __restrict__ ids,
                                       uint32_t* __restrict__ resident, int n_ids, int n_experts) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_ids) return;
    const uint32_t e = ids[j];
    if (e < (uint32_t)n_experts) resident[e] = 1;
}
