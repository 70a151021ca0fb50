// Attention of one decode token (batch 1) on the GPU, bf16, in three launches where candle's ops
// took ~17 (`bench steps`: attention was 43–48 % of a step at 16 % of the copy bandwidth — the
// time went to op latency, not to bytes):
//   1. `gemv_rows_bf16`: q, k and v projections in one launch (1–4 warps per output row);
//   2. `attn_decode_bf16_np*`: q/k RMSNorm, NeoX RoPE, the KV-cache write and the attention itself;
//   3. `gemv_rows_bf16` again: o_proj with the residual add folded into its output.
// (FP8 checkpoints: `gemv_rows_fp8` for 1 and 3; GGUF files: `gemv_rows_ggml`, its input first
// rounded to 8-bit blocks by moe_decode.cu's `quantize_q8_bf16`.)
//
// Rounding follows transformers' eager bf16 attention (what the fidelity tests compare against):
// projections rounded to bf16; q/k RMSNorm as candle's kernel computes it (f32 sum of squares in
// its lane order); RoPE in bf16 arithmetic as candle's rope kernel;
// scores = bf16(bf16(q·k) * scale) (torch's matmul output, then its scaling in f32); softmax in
// f32 rounded to bf16; the probability-weighted sum of values in f32, rounded once. (Past the
// first chunk, 64 positions, the probabilities stay in f32 — on the tensor-core entries each
// chunk's unnormalised weights are rounded to bf16 — see attn_decode and attn_chunk_mma.) The
// tensor-core entries sum q·k and p·v in the tensor cores' order, the others lane by lane.

#include "common.cuh"
#include "ggml_blocks.cuh"

// y[r] = bf16(W_r · x) for the rows of up to three matrices in one launch: rows [0, n0) of w0
// into y0, the next n1 rows of w1 into y1, the next n2 of w2 into y2. With `res` (one matrix
// only) y = res + bf16(W · x) in bf16 — candle's bf16 add, so the residual's bits are the
// separate add's. `split` warps per row (1, 2 or 4; blockDim 256): each takes a contiguous
// chunk of the columns (dot_part's order within it), the chunks' sums added in chunk order.
// Why split: a warp per 4,096-long row (o_proj) left too few bytes in flight — 45 % of the copy
// bandwidth under ncu, against 77 % for the expert kernels' 2,048-long rows; the host picks
// `split` (`split_for`: about 2,048 columns a warp, so that Qwen3's projections run in
// one wave of blocks).
// `mats` holds the matrices and takes the dot product of a chunk of one of their rows.

struct Bf16Rows {
    static constexpr int ALIGN = 8;  // columns a chunk starts on (whole 16-byte groups)
    const __nv_bfloat16 *w0, *w1, *w2;
    __device__ __forceinline__ float dot(int m, int r, int c0, int c1, int cols,
                                         const __nv_bfloat16* __restrict__ x, int lane) const {
        const __nv_bfloat16* w = m == 0 ? w0 : m == 1 ? w1 : w2;
        return dot_part(w + (size_t)r * cols + c0, x + c0, c1 - c0, lane);
    }
};

struct Fp8Rows {
    static constexpr int ALIGN = 8;
    const uint8_t *w0, *w1, *w2;
    const float *s0, *s1, *s2;
    int br, bc;
    __device__ __forceinline__ float dot(int m, int r, int c0, int c1, int cols,
                                         const __nv_bfloat16* __restrict__ x, int lane) const {
        const uint8_t* rp[1] = {(m == 0 ? w0 : m == 1 ? w1 : w2) + (size_t)r * cols + c0};
        const float* sp[1] = {(m == 0 ? s0 : m == 1 ? s1 : s2) + (size_t)(r / br) * ((cols + bc - 1) / bc)};
        float acc;
        fp8_dot_rows<1>(rp, sp, bc, c0, x + c0, c1 - c0, lane, &acc);
        return acc;
    }
};

template <typename M>
__device__ __forceinline__ void gemv_rows(const M& mats, int n0, int n1, int n2,
                                          const __nv_bfloat16* __restrict__ x, int cols,
                                          __nv_bfloat16* __restrict__ y0,
                                          __nv_bfloat16* __restrict__ y1,
                                          __nv_bfloat16* __restrict__ y2,
                                          const __nv_bfloat16* __restrict__ res, int split) {
    __shared__ float part[8];
    const int wib = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int rows_per_block = (blockDim.x / 32) / split;
    const int n = n0 + n1 + n2;
    {
        const int row = blockIdx.x * rows_per_block + wib / split;
        const int chunk = wib % split;
        // Chunks of whole groups (M::ALIGN columns: 16 bytes of bf16, whole GGML blocks), so
        // each stays aligned when the row is.
        const int per = ((cols + split - 1) / split + M::ALIGN - 1) / M::ALIGN * M::ALIGN;
        const int c0 = min(cols, chunk * per), c1 = min(cols, c0 + per);
        float acc = 0.f;
        if (row < n && c1 > c0) {
            const int m = row < n0 ? 0 : row < n0 + n1 ? 1 : 2;
            const int r = m == 0 ? row : m == 1 ? row - n0 : row - n0 - n1;
            acc = mats.dot(m, r, c0, c1, cols, x, lane);
        }
        acc = warp_sum(acc);
        if (lane == 0) part[wib] = acc;
    }
    __syncthreads();
    const int row = blockIdx.x * rows_per_block + threadIdx.x;
    if (threadIdx.x < rows_per_block && row < n) {
        float total = part[threadIdx.x * split];
        for (int c = 1; c < split; c++) total += part[threadIdx.x * split + c];
        const __nv_bfloat16 o = __float2bfloat16(total);
        if (row < n0) y0[row] = res ? __hadd(res[row], o) : o;
        else if (row < n0 + n1) y1[row - n0] = o;
        else y2[row - n0 - n1] = o;
    }
}

extern "C" __global__ void gemv_rows_bf16(
    const __nv_bfloat16* __restrict__ w0, const __nv_bfloat16* __restrict__ w1,
    const __nv_bfloat16* __restrict__ w2, int n0, int n1, int n2,
    const __nv_bfloat16* __restrict__ x, int cols,
    __nv_bfloat16* __restrict__ y0, __nv_bfloat16* __restrict__ y1,
    __nv_bfloat16* __restrict__ y2, const __nv_bfloat16* __restrict__ res, int split) {
    gemv_rows(Bf16Rows{w0, w1, w2}, n0, n1, n2, x, cols, y0, y1, y2, res, split);
}

// gemv_rows_bf16 over block-scaled FP8 matrices (FP8 checkpoints' attention): w0..w2 e4m3 bytes
// [n_i, cols] with f32 scales s0..s2 [ceil(n_i / br), ceil(cols / bc)] (one block shape); each
// warp's chunk is fp8_dot_rows' dot from the chunk's first column.
extern "C" __global__ void gemv_rows_fp8(
    const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1,
    const uint8_t* __restrict__ w2, const float* __restrict__ s0,
    const float* __restrict__ s1, const float* __restrict__ s2, int br, int bc,
    int n0, int n1, int n2, const __nv_bfloat16* __restrict__ x, int cols,
    __nv_bfloat16* __restrict__ y0, __nv_bfloat16* __restrict__ y1,
    __nv_bfloat16* __restrict__ y2, const __nv_bfloat16* __restrict__ res, int split) {
    gemv_rows(Fp8Rows{w0, w1, w2, s0, s1, s2, br, bc}, n0, n1, n2, x, cols, y0, y1, y2, res, split);
}

// GGUF matrices (llama.cpp's block formats, `ggml_blocks.cuh`): w0..w2 rows of `rb_i` bytes in
// type t_i (each its own: a `Q4_K_M` file mixes Q4_K and Q6_K), against x rounded to 8-bit blocks
// (codes xq, scales xd). Chunks start on multiples of 256 columns, whole blocks of every type.
template <bool LUT4 = false>
struct GgmlRows {
    static constexpr int ALIGN = 256;
    const uint8_t *w0, *w1, *w2;
    int t0, t1, t2, rb0, rb1, rb2;
    Q8Act x;
    __device__ __forceinline__ float dot(int m, int r, int c0, int c1, int cols,
                                         const __nv_bfloat16* __restrict__, int lane) const {
        const int t = m == 0 ? t0 : m == 1 ? t1 : t2;
        const int rb = m == 0 ? rb0 : m == 1 ? rb1 : rb2;
        const uint8_t* row = (m == 0 ? w0 : m == 1 ? w1 : w2) + (size_t)r * rb;
        // c0 / cols of the row's bytes: rows are whole blocks and c0 a multiple of any block.
        const size_t off = (size_t)rb / (size_t)(cols / ggml_block_weights<LUT4>(t)) *
                           (size_t)(c0 / ggml_block_weights<LUT4>(t));
        return ggml_dot_q8<LUT4>(t, row + off, x.at(c0), c1 - c0, lane);
    }
};

extern "C" __global__ void gemv_rows_ggml(
    const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1,
    const uint8_t* __restrict__ w2, int t0, int t1, int t2, int rb0, int rb1, int rb2,
    int n0, int n1, int n2, const int8_t* __restrict__ xq, const float* __restrict__ xd, int cols,
    __nv_bfloat16* __restrict__ y0, __nv_bfloat16* __restrict__ y1,
    __nv_bfloat16* __restrict__ y2, const __nv_bfloat16* __restrict__ res, int split) {
    gemv_rows(GgmlRows<>{w0, w1, w2, t0, t1, t2, rb0, rb1, rb2, Q8Act{xq, xd}}, n0, n1, n2,
              nullptr, cols, y0, y1, y2, res, split);
}
// The same with the table-coded types (IQ4_NL, IQ4_XS, MXFP4) decoded too: a twin for the
// reason the expert kernels have theirs (`ggml_blocks.cuh`), launched only where one of the
// matrices holds such a type.
extern "C" __global__ void gemv_rows_ggml_lut4(
    const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1,
    const uint8_t* __restrict__ w2, int t0, int t1, int t2, int rb0, int rb1, int rb2,
    int n0, int n1, int n2, const int8_t* __restrict__ xq, const float* __restrict__ xd, int cols,
    __nv_bfloat16* __restrict__ y0, __nv_bfloat16* __restrict__ y1,
    __nv_bfloat16* __restrict__ y2, const __nv_bfloat16* __restrict__ res, int split) {
    gemv_rows(GgmlRows<true>{w0, w1, w2, t0, t1, t2, rb0, rb1, rb2, Q8Act{xq, xd}}, n0, n1, n2,
              nullptr, cols, y0, y1, y2, res, split);
}

// candle's RMSNorm of one row of `d` values (d ≤ 64 · NP) by half a warp, then NeoX RoPE.
// candle's kernel, for rows under 1024, is one warp a row: lane l sums the squares of elements
// l, l + 32, … in f32, then the butterfly sum; out = bf16(scale * x * w). Here lane hl of the half
// plays lanes hl and hl + 16 (elements hl + 16 j: even j are lane hl's, odd j lane hl + 16's, each
// summed in order), adds the two — the butterfly's xor-16 step — and the half takes the steps
// 8 … 1: the same sums in the same order, so the same bits. RoPE (a, b) → (a·c − b·s, a·s + b·c)
// in bf16 arithmetic as candle's rope kernel. `load` asks for every value the row needs (the
// row, the norm's weights, cos and sin) at once, `finish` computes; `has`: whether the half has
// a row (the shuffles need the whole warp either way).
// Why half a warp: a group's G queries and its key are G + 1 rows, one more than a block's warps
// for Qwen3's groups of 8, so one warp took two rows one after the other — two chains of round
// trips — while the chunk's rows had long arrived. Why `load` apart: the attention kernel asks
// for the rows before it reads the position, so the two round trips overlap.
template <int NP>
struct NormRope {
    static constexpr int E = 4 * NP;  // elements a lane holds: d / 16 at most
    __nv_bfloat16 xv[E], wv[E], cv[E / 2], sv[E / 2];

    __device__ __forceinline__ void load(const __nv_bfloat16* __restrict__ x,
                                         const __nv_bfloat16* __restrict__ w,
                                         const __nv_bfloat16* __restrict__ cos,
                                         const __nv_bfloat16* __restrict__ sin, int d, int hl,
                                         bool has) {
        const __nv_bfloat16 zero = __float2bfloat16(0.f);
#pragma unroll
        for (int j = 0; j < E; j++) {
            const int i = hl + 16 * j;
            const bool in = has && i < d;
            xv[j] = in ? x[i] : zero;
            wv[j] = in ? w[i] : zero;
        }
#pragma unroll
        for (int j = 0; j < E / 2; j++) {
            const int i = hl + 16 * j;
            const bool in = has && i < d / 2;
            cv[j] = in ? cos[i] : zero;
            sv[j] = in ? sin[i] : zero;
        }
    }

    // The normalised, rotated row into `out` (shared memory), and into `also` (may be null).
    __device__ __forceinline__ void finish(float eps, int d, int hl, bool has,
                                           __nv_bfloat16* out, __nv_bfloat16* also) const {
        const int half = d / 2;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int j = 0; j < E; j += 2) {
            const float v = __bfloat162float(xv[j]);
            s0 += v * v;
        }
#pragma unroll
        for (int j = 1; j < E; j += 2) {
            const float v = __bfloat162float(xv[j]);
            s1 += v * v;
        }
        float ss = s0 + s1;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float scale = rsqrtf(ss / d + eps);
        if (has) {
#pragma unroll
            for (int j = 0; j < E; j++) {
                const int i = hl + 16 * j;
                if (i < d)
                    out[i] = __float2bfloat16(scale * __bfloat162float(xv[j]) * __bfloat162float(wv[j]));
            }
        }
        __syncwarp();
        if (has) {
            // Each pair (i, i + half) is read and written by the lane that holds i.
#pragma unroll
            for (int j = 0; j < E / 2; j++) {
                const int i = hl + 16 * j;
                if (i < half) {
                    const __nv_bfloat16 a = out[i], b = out[i + half];
                    // Why the `_rn` forms: built for compute_90 the operators become plain
                    // mul/sub that ptxas may fuse into one fma, rounding once where this
                    // compute_80 build rounds each product — other keys (BENCHMARKS.md §59).
                    const __nv_bfloat16 ra = __hsub_rn(__hmul_rn(a, cv[j]), __hmul_rn(b, sv[j]));
                    const __nv_bfloat16 rb = __hadd_rn(__hmul_rn(a, sv[j]), __hmul_rn(b, cv[j]));
                    out[i] = ra;
                    out[i + half] = rb;
                    if (also) {
                        also[i] = ra;
                        also[i + half] = rb;
                    }
                }
            }
        }
    }
};
// Why a block per (kv group, chunk of positions), every query head of the group in it: a block
// per (query head, chunk) read each KV row once per query head — eight times for Qwen3's groups
// of eight — and after an 8,000-token prompt a layer's attention took ~123 µs for 16 MB of rows
// (BENCHMARKS.md §56). A group's block reads each row once and uses it for all its heads.
// Why chunks of positions rather than a block per group: with 4 kv heads a block per group would
// leave all but 4 of an H200's 132 SMs idle, walking the positions one round trip after another.
// Why the chunk's rows go to shared memory first, all at once (cp.async): the kernel is a chain
// of round trips, not of bytes — a chunk's keys and values are 32 KB — so each block asks for
// all its rows before anything else, normalises and rotates the queries while they come, and
// then works from shared memory alone.
//
// A chunk is `len` positions (the host's pick: 64, or fewer where a wide head or a large group
// would not fit shared memory); the grid is sized once, for the capacity (so a CUDA graph's
// launch serves every position), and blocks past `pos` return at once.
// Key/value heads one launch may have (the finish counters below).
#define ATTN_MAX_GROUPS 1024
// Warps of a block (`attn_decode.rs` launches this many).
#define ATTN_WARPS 8

// Blocks of a group that finished their chunk, per group: 0 between launches (the group's last
// block resets it), so a launch can be replayed in a CUDA graph. One set per loaded module, which
// is one per device and stream: launches on it run one after another.
__device__ unsigned int attn_arrived[ATTN_MAX_GROUPS];
// Why two levels past ATTN_SUPER chunks: one block reading every chunk's share is one SM reading
// G · chunks · d floats — 512 KB a group after 8,000 tokens, ~4 µs at an SM's L2 bandwidth,
// after the last chunk. The last block of each run of ATTN_SUPER chunks combines its run (16
// shares), and the last of those the runs' shares: the reads spread over the SMs.
#define ATTN_SUPER 16
// Runs of a group at most: MAX_POSITIONS (8,192) over chunks of 16 positions, over ATTN_SUPER.
#define ATTN_MAX_SUPERS 32
// Blocks of a run that finished their chunk, per (group, run); reset as attn_arrived.
__device__ unsigned int attn_super_arrived[ATTN_MAX_GROUPS * ATTN_MAX_SUPERS];

// Whether this block is the last of `n` to count itself on `counter`: thread 0 counts, every
// thread gets the answer (through `ticket`, the block's shared word), and the last block then
// sees every earlier block's writes (each fenced them before counting). Every thread fences
// its own writes: a barrier and then thread 0 alone fencing (cooperative groups' pattern), tried
// with another change beside it, made a step after an 8,000-token prompt 2.4 % slower
// (BENCHMARKS.md §63).
__device__ __forceinline__ bool last_to_count(unsigned int* counter, unsigned int n,
                                              unsigned int& ticket) {
    if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u);
    __syncthreads();
    if (ticket != n - 1) return false;
    __threadfence();
    return true;
}

// Combines `count` shares of each head of group g — share c of head h: its sums at
// nums + (h · stride + first + c) · ps, its (max, sum) at mls[h · stride + first + c] — as
// ctx = bf16(Σ e^(m_c − m) acc_c / Σ e^(m_c − m) l_c) (FINAL) or into one share of the next
// level: sums Σ e^(m_c − m) acc_c at out_nums + (h · out_stride + out_at) · ps, (m, Σ e^(m_c − m)
// l_c) at out_mls[h · out_stride + out_at]. `sm`: G · (count + 2) floats of shared memory.
template <bool FINAL>
__device__ __forceinline__ void combine_shares(const float* nums, const float2* mls, int stride,
                                               int first, int count, int g, int G, int d, int ps,
                                               float* sm, __nv_bfloat16* ctx, float* out_nums,
                                               float2* out_mls, int out_stride, int out_at) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, W = blockDim.x / 32;
    float* wts = sm;                       // [G][count]: e^(m_c − m), over the rows
    float* den = wts + (size_t)G * count;  // [G]
    float* mxs = den + G;                  // [G]
    for (int hh = warp; hh < G; hh += W) {
        const float2* head = mls + (size_t)(g * G + hh) * stride + first;
        float mx = -INFINITY;
#pragma unroll 4
        for (int c = lane; c < count; c += 32) mx = fmaxf(mx, __ldcg(head + c).x);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float l = 0.f;
#pragma unroll 4
        for (int c = lane; c < count; c += 32) {
            const float2 ml = __ldcg(head + c);
            const float w = expf(ml.x - mx);
            wts[hh * count + c] = w;
            l = fmaf(w, ml.y, l);
        }
        l = warp_sum(l);
        if (lane == 0) {
            den[hh] = l;
            mxs[hh] = mx;
        }
    }
    __syncthreads();
    // Each thread a group of columns (4 where d allows: 16-byte loads of the shares, which
    // start on multiples of 4 floats), every share's loads in flight 16 at a time; each column's
    // sum in share order.
    const int cw = d % 4 == 0 ? 4 : 1, groups = d / cw;
    for (int o = tid; o < G * groups; o += blockDim.x) {
        const int hh = o / groups, c = (o % groups) * cw;
        const size_t h = (size_t)g * G + hh;
        const float* col = nums + (h * stride + first) * ps + c;
        const float* w = wts + hh * count;
        __nv_bfloat16* out = ctx + h * d + c;
        float* onum = FINAL ? nullptr : out_nums + (h * out_stride + out_at) * ps + c;
        if (cw == 4) {
            float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
            for (int c_ = 0; c_ < count; c_++) {
                const float4 a = __ldcg(reinterpret_cast<const float4*>(col + (size_t)c_ * ps));
                const float wc = w[c_];
                num.x = fmaf(wc, a.x, num.x);
                num.y = fmaf(wc, a.y, num.y);
                num.z = fmaf(wc, a.z, num.z);
                num.w = fmaf(wc, a.w, num.w);
            }
            if constexpr (FINAL) {
                out[0] = __float2bfloat16(num.x / den[hh]);
                out[1] = __float2bfloat16(num.y / den[hh]);
                out[2] = __float2bfloat16(num.z / den[hh]);
                out[3] = __float2bfloat16(num.w / den[hh]);
            } else {
                *reinterpret_cast<float4*>(onum) = num;
            }
        } else {
            float num = 0.f;
#pragma unroll 16
            for (int c_ = 0; c_ < count; c_++) num = fmaf(w[c_], __ldcg(col + (size_t)c_ * ps), num);
            if constexpr (FINAL) out[0] = __float2bfloat16(num / den[hh]);
            else onum[0] = num;
        }
    }
    if constexpr (!FINAL) {
        for (int hh = tid; hh < G; hh += blockDim.x)
            out_mls[((size_t)g * G + hh) * out_stride + out_at] = make_float2(mxs[hh], den[hh]);
    }
}

// Sums each of the 32 values v[0..32) over the warp's lanes; lane l returns the sum of v[l]. Five
// exchange-and-add steps, each halving the values a lane holds (31 shuffles, where 32 separate
// butterfly sums take 160). Each sum's order is fixed by the lane layout: deterministic.
__device__ __forceinline__ float warp_sums_32(float* v, int lane) {
#pragma unroll
    for (int step = 0; step < 5; step++) {
        const int o = 16 >> step;
        const bool upper = (lane & o) != 0;
#pragma unroll
        for (int k = 0; k < 16; k++) {
            if (k < o) {
                const float send = upper ? v[k] : v[k + o];
                const float keep = upper ? v[k + o] : v[k];
                v[k] = keep + __shfl_xor_sync(0xffffffffu, send, o);
            }
        }
    }
    return v[0];
}

// Tensor-core steps for the chunk's two products (the `MMA` entries): one warp-wide
// m16n8k16 product of bf16 fragments into f32 sums (PTX ISA's fragment layouts: lane l holds
// rows l/4 and l/4 + 8, columns 2(l%4), 2(l%4)+1 and those + 8), and four 8×8 bf16 tiles
// loaded transposed from shared memory (a row-major [k][n] tile as the product's B operand).
__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __nv_bfloat16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
// Two bf16 of shared memory as one 32-bit fragment register (4-byte aligned).
__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// The chunk's scores, softmax and probability-weighted values on tensor cores (heads ≤ 16, d a
// multiple of 16, len of 16): the group's heads are the rows of an m16n8k16 product (rows past G
// read as 0). Scores: warp w takes the chunk's positions 8w … 8w + 7 (then 8(w + W) …), the
// queries' rows against the keys' over d in steps of 16. Softmax: a warp a head as before; the
// probabilities go to `probs` in bf16 — one chunk: bf16(e / sum), as transformers' eager
// attention rounds them; several: bf16(e), their sum l over the rounded values, so that the
// combine's weights and sums agree — zero past the chunk's last position. Values: warp w takes
// columns 16w … 16w + 15 (then 16(w + W) …), probabilities against value rows over the positions
// in steps of 16 (value rows loaded transposed). f32 sums throughout, in the tensor cores' order.
__device__ __forceinline__ void attn_chunk_mma(
    const __nv_bfloat16* ks, const __nv_bfloat16* vs, const __nv_bfloat16* qr, float* scores,
    __nv_bfloat16* probs, int rs, int pl, int G, int d, int n, int len, int chunks, float scale,
    int g, int chunk, int nch, int nh, int ps, __nv_bfloat16* __restrict__ ctx, float* part) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, W = blockDim.x / 32;
    const int gid = lane >> 2, tig = lane & 3;
    const bool lo = gid < G, hi = gid + 8 < G;  // whether fragment rows gid, gid + 8 are heads
    for (int t = warp; t * 8 < n; t += W) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        const __nv_bfloat16* qa = qr + (size_t)gid * rs + 2 * tig;
        const __nv_bfloat16* kb = ks + (size_t)(8 * t + gid) * rs + 2 * tig;
        for (int k0 = 0; k0 < d; k0 += 16) {
            const uint32_t a[4] = {lo ? ld_pair(qa + k0) : 0u, hi ? ld_pair(qa + 8 * rs + k0) : 0u,
                                   lo ? ld_pair(qa + k0 + 8) : 0u,
                                   hi ? ld_pair(qa + 8 * rs + k0 + 8) : 0u};
            const uint32_t b[2] = {ld_pair(kb + k0), ld_pair(kb + k0 + 8)};
            mma_bf16_16816(c, a, b);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int hh = gid + (i >> 1) * 8, r = 8 * t + 2 * tig + (i & 1);
            if (hh < G && r < n) scores[(size_t)hh * len + r] = bf16_round(bf16_round(c[i]) * scale);
        }
    }
    __syncthreads();
    const int n16 = (n + 15) & ~15;
    for (int hh = warp; hh < G; hh += W) {
        float* sc = scores + (size_t)hh * len;
        __nv_bfloat16* pr = probs + (size_t)hh * pl;
        float m = -INFINITY;
        for (int r = lane; r < n; r += 32) m = fmaxf(m, sc[r]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float sum = 0.f, sum_b = 0.f;
        for (int r = lane; r < n; r += 32) {
            const float e = expf(sc[r] - m);
            sc[r] = e;
            sum += e;
            sum_b += bf16_round(e);
        }
        sum = warp_sum(sum);
        sum_b = warp_sum(sum_b);
        __syncwarp();
        for (int r = lane; r < n16; r += 32)
            pr[r] = r >= n ? __float2bfloat16(0.f)
                           : __float2bfloat16(chunks == 1 ? sc[r] / sum : sc[r]);
        if (chunks > 1 && lane == 0) {
            const size_t h = (size_t)g * G + hh;
            reinterpret_cast<float2*>(part + (size_t)nh * nch * ps)[h * nch + chunk] =
                make_float2(m, sum_b);
        }
    }
    __syncthreads();
    for (int t = 2 * warp; t * 8 < d; t += 2 * W) {
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        const __nv_bfloat16* pa = probs + (size_t)gid * pl + 2 * tig;
        // ldmatrix's row addresses: lanes 0–7 the step's rows 0–7 at column 8t, 8–15 rows 8–15,
        // 16–31 the same at column 8t + 8 (the next tile of 8 columns).
        const __nv_bfloat16* vb = vs + (size_t)((lane & 7) + (lane & 8)) * rs + 8 * t + (lane >> 4) * 8;
        for (int k0 = 0; k0 < n; k0 += 16) {
            const uint32_t a[4] = {lo ? ld_pair(pa + k0) : 0u, hi ? ld_pair(pa + 8 * pl + k0) : 0u,
                                   lo ? ld_pair(pa + k0 + 8) : 0u,
                                   hi ? ld_pair(pa + 8 * pl + k0 + 8) : 0u};
            uint32_t b[4];
            ldmatrix_x4_trans(b, vb + (size_t)k0 * rs);
            mma_bf16_16816(c[0], a, b);
            mma_bf16_16816(c[1], a, b + 2);
        }
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int i = 0; i < 4; i += 2) {
                const int hh = gid + (i >> 1) * 8, col = 8 * (t + j) + 2 * tig;
                if (hh >= G) continue;
                const size_t h = (size_t)g * G + hh;
                if (chunks == 1)
                    reinterpret_cast<__nv_bfloat162*>(ctx + h * d + col)[0] =
                        __floats2bfloat162_rn(c[j][i], c[j][i + 1]);
                else
                    reinterpret_cast<float2*>(part + (h * nch + chunk) * ps + col)[0] =
                        make_float2(c[j][i], c[j][i + 1]);
            }
    }
}

// Grid (nkv, chunks), ATTN_WARPS warps: block (g, c) attends every query head of kv group g
// (heads g·G .. g·G + G − 1, G = nh / nkv) over positions [c·len, (c+1)·len) ∩ [0, pos]. A lane
// holds NP pairs of a row's columns (pairs lane, lane + 32, …; so d ≤ 64·NP); scores are taken
// HB heads at a time.
// q [nh, d], k and v [nkv, d]: this token's projections before norm and RoPE. The caches
// [nkv, cap, d] hold rows 0..pos-1; chunk 0 of each group writes row `pos` (normalised, rotated
// k; v as is), and every block uses its own copy of that row, so no block reads a row another
// block of this launch writes. Positions past `pos` are never read (the masked rows of candle's
// path contributed exactly 0). ctx [nh, d] bf16.
// One chunk (pos < len): softmax over the scores, probabilities rounded to bf16, their weighted
// sum of values in f32 in position order, rounded once — transformers' eager bf16 attention.
// Several: each block keeps, per head, its chunk's exp-weighted sum of values (f32), max m_c and
// sum l_c of exp(s − m_c) in `part`: [nh, chunks, ps] sums (ps = d rounded up to 4, so that
// each share starts 16-byte aligned), then [nh, chunks] (m_c, l_c) pairs, which the combine
// reads a chunk a lane; the group's last block to finish combines them,
// ctx = bf16(Σ e^(m_c − m) acc_c / Σ e^(m_c − m) l_c) — the same softmax without rounding the
// probabilities to bf16 (within 2⁻⁹ of each, the unit test's tolerance).
// Dynamic shared memory (`attn_decode.rs` sizes it): rows_bytes ≥ 2 · len · d bf16 for the
// chunk's keys then values (the combine reuses them for its G · (chunks + 2) floats), then
// G · len float scores, then bf16: G · d rotated queries and d for the rotated key.
template <int NP, int HB, bool MMA>
__device__ __forceinline__ void attn_decode(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ q_norm,
    const __nv_bfloat16* __restrict__ k_norm, float eps,
    const __nv_bfloat16* __restrict__ cos, const __nv_bfloat16* __restrict__ sin,
    const uint32_t* __restrict__ pos_at, __nv_bfloat16* __restrict__ k_cache,
    __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ ctx, float* part, int nh,
    int nkv, int d, int cap, float scale, int len, int rows_bytes) {
    // Positions of one score batch: the 32 (position, head) dot products warp_sums_32 reduces.
    constexpr int U = 32 / HB;
    extern __shared__ __align__(16) unsigned char smem_bytes[];
    const int G = nh / nkv;
    // Rows of keys, values and queries in shared memory are `rs` apart: for the tensor-core
    // entries 8 columns more than d, so that the fragments' loads (8 rows at once) fall in
    // different banks.
    const int rs = MMA ? d + 8 : d;
    const int pl = len + 8;  // MMA: a head's row of bf16 probabilities, padded likewise
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_bytes);        // [len][rs]
    __nv_bfloat16* vs = ks + (size_t)len * rs;                                // [len][rs]
    float* scores = reinterpret_cast<float*>(smem_bytes + rows_bytes);       // [G][len]
    __nv_bfloat16* probs = reinterpret_cast<__nv_bfloat16*>(scores + (size_t)G * len);  // MMA: [16][pl]
    __nv_bfloat16* qr = probs + (MMA ? 16 * pl : 0);                          // [G][rs]
    __nv_bfloat16* kr = qr + (size_t)G * rs;                                 // [d]
    __shared__ unsigned int ticket;

    const int g = blockIdx.x, chunk = blockIdx.y, nch = gridDim.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, W = blockDim.x / 32;
    const int half = d / 2;
    const __nv_bfloat16* vrow = v + (size_t)g * d;
    // The rows this block normalises — the group's queries (rows 0..G-1) and its key (row G),
    // half a warp each — asked for before the position, so the round trips overlap; chunk 0,
    // which writes this token's cache rows, also asks for its value row (a pair a thread).
    NormRope<NP> nr;
    const auto row_of = [&](int t) { return t < G ? q + ((size_t)g * G + t) * d : k + (size_t)g * d; };
    const int t_first = 2 * warp + (lane >> 4);
    nr.load(row_of(t_first), t_first < G ? q_norm : k_norm, cos, sin, d, lane & 15, t_first <= G);
    __nv_bfloat162 v_pair;
    if (chunk == 0 && tid < half) v_pair = reinterpret_cast<const __nv_bfloat162*>(vrow)[tid];
    const int pos = (int)*pos_at;
    const int j_begin = chunk * len;
    if (j_begin > pos) return;
    const int j_end = min(pos, j_begin + len - 1);  // inclusive
    const int n = j_end - j_begin + 1;
    const int chunks = pos / len + 1;               // blocks of this group that run

    // The chunk's rows into shared memory (`ggml_blocks.cuh`'s cp.async helpers): keys but row
    // `pos` (this block's own, written by the key's half-warp below), values with row `pos` from
    // this token's projection.
    {
        // Bytes a copy: 16 where every row starts 16-byte aligned, else 4 (d is even).
        const bool wide = d % 8 == 0 &&
            (((uintptr_t)k_cache | (uintptr_t)v_cache | (uintptr_t)vrow) & 15) == 0;
        const int piece = wide ? 16 : 4;
        const int per_row = d * 2 / piece;
        const __nv_bfloat16* kb = k_cache + ((size_t)g * cap + j_begin) * d;
        const __nv_bfloat16* vb = v_cache + ((size_t)g * cap + j_begin) * d;
        for (int i = tid; i < n * per_row; i += blockDim.x) {
            const int r = i / per_row, off = (i % per_row) * (piece / 2);  // elements
            const size_t at = (size_t)r * d + off, sat = (size_t)r * rs + off;
            const __nv_bfloat16* vsrc = j_begin + r == pos ? vrow + off : vb + at;
            uint8_t* kd = reinterpret_cast<uint8_t*>(ks + sat);
            uint8_t* vd = reinterpret_cast<uint8_t*>(vs + sat);
            const uint8_t* ksrc = reinterpret_cast<const uint8_t*>(kb + at);
            if (piece == 16) {
                if (j_begin + r != pos) cp_async16(kd, ksrc);
                cp_async16(vd, reinterpret_cast<const uint8_t*>(vsrc));
            } else {
                if (j_begin + r != pos) cp_async4(kd, ksrc);
                cp_async4(vd, reinterpret_cast<const uint8_t*>(vsrc));
            }
        }
    }
    if (chunk == 0 && tid < half)
        reinterpret_cast<__nv_bfloat162*>(v_cache + ((size_t)g * cap + pos) * d)[tid] = v_pair;
    if constexpr (MMA) {
        // The value rows past the chunk's last position up to the next 16 — the products'
        // last step reads them — zeroed: their probabilities are 0, and 0 · NaN is not.
        const int pad = ((n + 15) & ~15) - n;
        for (int i = tid; i < pad * half; i += blockDim.x)
            reinterpret_cast<__nv_bfloat162*>(vs + (size_t)(n + i / half) * rs)[i % half] =
                __floats2bfloat162_rn(0.f, 0.f);
    }

    // Normalise and rotate: the queries into `qr`; the key into its row of the chunk (when the
    // chunk holds `pos`; else into `kr`, unread) and, by chunk 0, into the cache. The rounds are
    // the block's, so a warp with no row left still joins its half's shuffles.
    for (int t0 = 0; t0 <= G; t0 += 2 * W) {
        const int t = t0 + t_first;
        const bool is_q = t < G;
        if (t0 > 0) nr.load(row_of(t), is_q ? q_norm : k_norm, cos, sin, d, lane & 15, t <= G);
        __nv_bfloat16* out = is_q ? qr + (size_t)t * rs
                                  : pos <= j_end ? ks + (size_t)(pos - j_begin) * rs : kr;
        __nv_bfloat16* also = !is_q && chunk == 0 ? k_cache + ((size_t)g * cap + pos) * d : nullptr;
        nr.finish(eps, d, lane & 15, t <= G, out, also);
    }
    cp_async_wait_all();
    __syncthreads();

    const int ps = (d + 3) / 4 * 4;  // floats of a head's sums in `part`
    if constexpr (MMA) {
        attn_chunk_mma(ks, vs, qr, scores, probs, rs, pl, G, d, n, len, chunks, scale, g, chunk,
                       nch, nh, ps, ctx, part);
    } else {
    // Scores: warp w takes positions w, w + W, … of the chunk, U at a time, HB heads at a time;
    // the U · HB dot products summed by warp_sums_32.
    const __nv_bfloat162* ks2 = reinterpret_cast<const __nv_bfloat162*>(ks);
    const __nv_bfloat162* vs2 = reinterpret_cast<const __nv_bfloat162*>(vs);
    for (int hb = 0; hb < G; hb += HB) {
        const int nb = min(HB, G - hb);
        float2 qv[HB][NP];
#pragma unroll
        for (int hh = 0; hh < HB; hh++)
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int p = lane + 32 * i;
                qv[hh][i] = (hh < nb && p < half)
                    ? __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(qr + (size_t)(hb + hh) * d)[p])
                    : make_float2(0.f, 0.f);
            }
        for (int r0 = warp; r0 < n; r0 += U * W) {
            float sv[32];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int r = r0 + u * W;
                float2 kv[NP];
#pragma unroll
                for (int i = 0; i < NP; i++) {
                    const int p = lane + 32 * i;
                    kv[i] = (r < n && p < half) ? __bfloat1622float2(ks2[(size_t)r * half + p]) : make_float2(0.f, 0.f);
                }
#pragma unroll
                for (int hh = 0; hh < HB; hh++) {
                    float a = 0.f;
#pragma unroll
                    for (int i = 0; i < NP; i++) {
                        a = fmaf(qv[hh][i].x, kv[i].x, a);
                        a = fmaf(qv[hh][i].y, kv[i].y, a);
                    }
                    sv[u * HB + hh] = a;
                }
            }
            const float mine = warp_sums_32(sv, lane);
            const int u = lane / HB, hh = lane % HB, r = r0 + u * W;
            if (r < n && hh < nb) scores[(size_t)(hb + hh) * len + r] = bf16_round(bf16_round(mine) * scale);
        }
    }
    __syncthreads();

    // Softmax, then the values: one warp a head, in position order.
    for (int hh = warp; hh < G; hh += W) {
        float* sc = scores + (size_t)hh * len;
        float m = -INFINITY;
        for (int r = lane; r < n; r += 32) m = fmaxf(m, sc[r]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float sum = 0.f;
        for (int r = lane; r < n; r += 32) {
            const float e = expf(sc[r] - m);
            sc[r] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        __syncwarp();
        if (chunks == 1) {
            for (int r = lane; r < n; r += 32) sc[r] = bf16_round(sc[r] / sum);
            __syncwarp();
        }
        float2 acc[NP];
#pragma unroll
        for (int i = 0; i < NP; i++) acc[i] = make_float2(0.f, 0.f);
#pragma unroll 4
        for (int r = 0; r < n; r++) {
            const float pr = sc[r];
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int p = lane + 32 * i;
                if (p < half) {
                    const float2 vv = __bfloat1622float2(vs2[(size_t)r * half + p]);
                    acc[i].x = fmaf(pr, vv.x, acc[i].x);
                    acc[i].y = fmaf(pr, vv.y, acc[i].y);
                }
            }
        }
        const size_t h = (size_t)g * G + hh;
        if (chunks == 1) {
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int p = lane + 32 * i;
                if (p < half) reinterpret_cast<__nv_bfloat162*>(ctx + h * d)[p] = __floats2bfloat162_rn(acc[i].x, acc[i].y);
            }
        } else {
            float* mine = part + (h * nch + chunk) * ps;
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int p = lane + 32 * i;
                if (p < half) reinterpret_cast<float2*>(mine)[p] = acc[i];
            }
            if (lane == 0)
                reinterpret_cast<float2*>(part + (size_t)nh * nch * ps)[h * nch + chunk] = make_float2(m, sum);
        }
    }
    }
    if (chunks == 1) return;

    // Several chunks: the group's last block to finish combines every chunk's share — past
    // ATTN_SUPER chunks in two levels (runs of ATTN_SUPER chunks, then the runs).
    __threadfence();  // this block's shares visible to the last block before it counts itself
    __syncthreads();
    const float2* mls = reinterpret_cast<const float2*>(part + (size_t)nh * nch * ps);
    float* sm = reinterpret_cast<float*>(smem_bytes);
    const int supers = (chunks + ATTN_SUPER - 1) / ATTN_SUPER;
    if (supers == 1) {
        if (!last_to_count(&attn_arrived[g], chunks, ticket)) return;
        combine_shares<true>(part, mls, nch, 0, chunks, g, G, d, ps, sm, ctx, nullptr, nullptr, 0, 0);
        if (tid == 0) attn_arrived[g] = 0u;
        return;
    }
    // The runs' shares after the chunks' (16-byte aligned): [nh, runs, ps] sums, then
    // [nh, runs] (m, l) pairs, `runs` for the capacity (attn_decode.rs allocates them).
    const int runs = (nch + ATTN_SUPER - 1) / ATTN_SUPER;
    float* snums = part + (((size_t)nh * nch * (ps + 2) + 3) & ~(size_t)3);
    float2* smls = reinterpret_cast<float2*>(snums + (size_t)nh * runs * ps);
    const int run = chunk / ATTN_SUPER, first = run * ATTN_SUPER;
    const int count = min(ATTN_SUPER, chunks - first);
    unsigned int* run_arrived = &attn_super_arrived[g * ATTN_MAX_SUPERS + run];
    if (!last_to_count(run_arrived, count, ticket)) return;
    combine_shares<false>(part, mls, nch, first, count, g, G, d, ps, sm, ctx, snums, smls, runs, run);
    if (tid == 0) *run_arrived = 0u;
    __threadfence();  // this run's share visible to the last run before it counts itself
    __syncthreads();
    if (!last_to_count(&attn_arrived[g], supers, ticket)) return;
    combine_shares<true>(snums, smls, runs, 0, supers, g, G, d, ps, sm, ctx, nullptr, nullptr, 0, 0);
    if (tid == 0) attn_arrived[g] = 0u;
}

// One entry point per NP (pairs of columns a lane holds: head_dim ≤ 64, 128, 192, 256); scores
// 4 heads at a time (a lane's queries in 8 · NP floats). Four blocks an SM (64 registers) for
// head_dim ≤ 128, so that a long context's chunks run in one wave; two for the wide heads. The
// `_mma` entries take the chunk's products on tensor cores (`attn_chunk_mma`: head_dim a
// multiple of 16, groups of up to 16 heads, padded rows — `attn_decode.rs` picks them).
#define ATTN_ENTRY(NAME, NP, HB, MINB, MMA)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS, MINB) NAME(                      \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                 \
        const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ q_norm,            \
        const __nv_bfloat16* __restrict__ k_norm, float eps,                                      \
        const __nv_bfloat16* __restrict__ cos, const __nv_bfloat16* __restrict__ sin,             \
        const uint32_t* __restrict__ pos_at, __nv_bfloat16* __restrict__ k_cache,                 \
        __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ ctx, float* part,        \
        int nh, int nkv, int d, int cap, float scale, int len, int rows_bytes) {                  \
        attn_decode<NP, HB, MMA>(q, k, v, q_norm, k_norm, eps, cos, sin, pos_at, k_cache,         \
                                 v_cache, ctx, part, nh, nkv, d, cap, scale, len, rows_bytes);    \
    }
ATTN_ENTRY(attn_decode_bf16_np1, 1, 4, 4, false)
ATTN_ENTRY(attn_decode_bf16_np2, 2, 4, 4, false)
ATTN_ENTRY(attn_decode_bf16_np3, 3, 4, 2, false)
ATTN_ENTRY(attn_decode_bf16_np4, 4, 4, 2, false)
ATTN_ENTRY(attn_decode_bf16_mma_np1, 1, 4, 4, true)
ATTN_ENTRY(attn_decode_bf16_mma_np2, 2, 4, 4, true)
ATTN_ENTRY(attn_decode_bf16_mma_np3, 3, 4, 2, true)
ATTN_ENTRY(attn_decode_bf16_mma_np4, 4, 4, 2, true)
