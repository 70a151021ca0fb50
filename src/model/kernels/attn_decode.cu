// Attention of one decode token (batch 1) on the GPU, bf16, in three launches where candle's ops
// took ~17 (`bench steps`: attention was 43–48 % of a step at 16 % of the copy bandwidth — the
// time went to op latency, not to bytes):
//   1. `gemv_rows_bf16`: q, k and v projections in one launch (1–8 warps per output row);
//   2. `attn_decode_bf16`: q/k RMSNorm, NeoX RoPE, the KV-cache write and the attention itself;
//   3. `gemv_rows_bf16` again: o_proj with the residual add folded into its output.
// (FP8 checkpoints: `gemv_rows_fp8` for 1 and 3; GGUF files: `gemv_rows_ggml`, its input first
// rounded to 8-bit blocks by moe_decode.cu's `quantize_q8_bf16`.)
//
// Rounding follows transformers' eager bf16 attention (what the fidelity tests compare against):
// projections rounded to bf16; q/k RMSNorm as candle's kernel computes it (f32 sum of squares in
// its lane order); RoPE in bf16 arithmetic as candle's rope kernel;
// scores = bf16(bf16(q·k) * scale) (torch's matmul output, then its scaling in f32); softmax in
// f32 rounded to bf16; the probability-weighted sum of values in f32, rounded once. (Past the
// first 64 positions the probabilities stay in f32: see attn_decode_bf16.)

#include "common.cuh"
#include "ggml_blocks.cuh"

// y[r] = bf16(W_r · x) for the rows of up to three matrices in one launch: rows [0, n0) of w0
// into y0, the next n1 rows of w1 into y1, the next n2 of w2 into y2. With `res` (one matrix
// only) y = res + bf16(W · x) in bf16 — candle's bf16 add, so the residual's bits are the
// separate add's. `split` warps per row (1, 2, 4 or 8; blockDim 256): each takes a contiguous
// chunk of the columns (dot_part's order within it), the chunks' sums added in chunk order.
// Why split: a warp per 4,096-long row (o_proj) left too few bytes in flight — 45 % of the copy
// bandwidth under ncu, against 77 % for the expert kernels' 2,048-long rows.
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
        const size_t off = (size_t)rb / (size_t)(cols / ggml_block_weights(t)) *
                           (size_t)(c0 / ggml_block_weights(t));
        return ggml_dot_q8(t, row + off, x.at(c0), c1 - c0, lane);
    }
};

extern "C" __global__ void gemv_rows_ggml(
    const uint8_t* __restrict__ w0, const uint8_t* __restrict__ w1,
    const uint8_t* __restrict__ w2, int t0, int t1, int t2, int rb0, int rb1, int rb2,
    int n0, int n1, int n2, const int8_t* __restrict__ xq, const float* __restrict__ xd, int cols,
    __nv_bfloat16* __restrict__ y0, __nv_bfloat16* __restrict__ y1,
    __nv_bfloat16* __restrict__ y2, const __nv_bfloat16* __restrict__ res, int split) {
    gemv_rows(GgmlRows{w0, w1, w2, t0, t1, t2, rb0, rb1, rb2, Q8Act{xq, xd}}, n0, n1, n2,
              nullptr, cols, y0, y1, y2, res, split);
}

// candle's RMSNorm of one row of `d` values by one warp: lane l sums the squares of elements
// l, l + 32, … in f32, then the butterfly sum; out = bf16(scale * x * w) — the order of
// candle's kernel for rows under 1024 (one warp per row).
__device__ __forceinline__ void rms_norm_row(const __nv_bfloat16* __restrict__ x,
                                             const __nv_bfloat16* __restrict__ w, float eps,
                                             int d, int lane, __nv_bfloat16* out) {
    float ss = 0.f;
    for (int i = lane; i < d; i += 32) {
        const float v = __bfloat162float(x[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float scale = rsqrtf(ss / d + eps);
    for (int i = lane; i < d; i += 32)
        out[i] = __float2bfloat16(scale * __bfloat162float(x[i]) * __bfloat162float(w[i]));
}

// NeoX (rotate-half) RoPE of one head in place, in bf16 arithmetic as candle's rope kernel:
// (a, b) → (a·c − b·s, a·s + b·c), each product and sum rounded to bf16.
__device__ __forceinline__ void rope_row(__nv_bfloat16* x, const __nv_bfloat16* __restrict__ cos,
                                         const __nv_bfloat16* __restrict__ sin, int d, int lane) {
    const int half = d / 2;
    for (int i = lane; i < half; i += 32) {
        const __nv_bfloat16 a = x[i], b = x[i + half], c = cos[i], s = sin[i];
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

// Sum (op 0) or max (op 1) of one value per thread over the block; every thread gets the result.
// `red` holds one float per warp.
__device__ __forceinline__ float block_reduce(float v, int op, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = op ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // `red` may still be read by an earlier reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < warps; w++) r = op ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

// Positions a block of attn_decode_bf16 attends over (see there). Why a chunk of positions per
// block rather than a block per head: with 32 heads a block per head left three quarters of an
// H200's SMs idle and walked the positions one round trip after another — decode after a
// 1,024-token prompt ran at a third of the speed after 128 (BENCHMARKS.md §51).
#define ATTN_CHUNK 64
// Heads one launch may have (the finish counters below).
#define ATTN_MAX_HEADS 1024

// Blocks of a head that finished their chunk, per head: 0 between launches (the head's last
// block resets it), so a launch can be replayed in a CUDA graph. One set per loaded module, which
// is one per device and stream: launches on it run one after another.
__device__ unsigned int attn_arrived[ATTN_MAX_HEADS];

// Grid (nh, chunks): block (h, c) attends query head h (kv head g = h / (nh / nkv)) over
// positions [c·ATTN_CHUNK, (c+1)·ATTN_CHUNK) ∩ [0, pos]; blocks past `pos` return at once, so the
// grid is sized for the capacity and a captured launch serves every position. blockDim a multiple
// of 32, ≥ 64 and ≥ d.
// q [nh, d], k and v [nkv, d]: this token's projections before norm and RoPE. The caches
// [nkv, cap, d] hold rows 0..pos-1; chunk 0 of a group's first query head writes row `pos`
// (normalised, rotated k; v as is), and every block uses its own copy of that row, so no block
// reads a row another block of this launch writes. Positions past `pos` are never read (the
// masked rows of candle's path contributed exactly 0). ctx [nh, d] bf16.
// One chunk (pos < ATTN_CHUNK): softmax over the scores, probabilities rounded to bf16, their
// weighted sum of values in f32 rounded once — transformers' eager bf16 attention. Several: each
// block keeps its chunk's max m_c, sum l_c of exp(s - m_c) and the exp-weighted sum of values
// (f32) in `part` [nh, chunks, d + 2]; the head's last block to finish combines them in chunk
// order, ctx = bf16(Σ e^(m_c − m) acc_c / Σ e^(m_c − m) l_c) — the same softmax without rounding
// the probabilities to bf16 (within 2⁻⁹ of each, the unit test's tolerance).
// Dynamic shared memory (`attn_decode.rs` sizes it): ATTN_CHUNK + blockDim + blockDim / 32
// floats, then 2 d bf16.
extern "C" __global__ void attn_decode_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ q_norm,
    const __nv_bfloat16* __restrict__ k_norm, float eps,
    const __nv_bfloat16* __restrict__ cos, const __nv_bfloat16* __restrict__ sin,
    const uint32_t* __restrict__ pos_at, __nv_bfloat16* __restrict__ k_cache,
    __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ ctx, float* part, int nh,
    int nkv, int d, int cap, float scale) {
    extern __shared__ float smem[];
    float* scores = smem;                   // [ATTN_CHUNK]
    float* acc = scores + ATTN_CHUNK;       // [blockDim]: partial sums of the value phase
    float* red = acc + blockDim.x;          // [blockDim / 32]
    __nv_bfloat16* qr = reinterpret_cast<__nv_bfloat16*>(red + blockDim.x / 32);  // [d]
    __nv_bfloat16* kr = qr + d;                                                   // [d]
    __shared__ unsigned int ticket;

    const int h = blockIdx.x, chunk = blockIdx.y;
    const int pos = (int)*pos_at;
    const int j_begin = chunk * ATTN_CHUNK;
    if (j_begin > pos) return;
    const int j_end = min(pos, j_begin + ATTN_CHUNK - 1);  // inclusive
    const int chunks = pos / ATTN_CHUNK + 1;                // blocks of this head that run
    const int groups = nh / nkv;
    const int g = h / groups;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, warps = blockDim.x / 32;
    const __nv_bfloat16* vrow = v + (size_t)g * d;

    // Two warps normalise and rotate this head's q and its group's k (blockDim ≥ 64).
    if (warp == 0) {
        rms_norm_row(q + (size_t)h * d, q_norm, eps, d, lane, qr);
        __syncwarp();
        rope_row(qr, cos, sin, d, lane);
    } else if (warp == 1) {
        rms_norm_row(k + (size_t)g * d, k_norm, eps, d, lane, kr);
        __syncwarp();
        rope_row(kr, cos, sin, d, lane);
    }
    __syncthreads();
    if (chunk == 0 && h % groups == 0) {
        __nv_bfloat16* kc = k_cache + ((size_t)g * cap + pos) * d;
        __nv_bfloat16* vc = v_cache + ((size_t)g * cap + pos) * d;
        for (int i = tid; i < d; i += blockDim.x) {
            kc[i] = kr[i];
            vc[i] = vrow[i];
        }
    }

    // Scores: a quarter warp (8 lanes) per position, two elements per lane per load.
    const __nv_bfloat16* kbase = k_cache + (size_t)g * cap * d;
    const int sub = lane / 8, l8 = lane & 7;
    for (int j0 = j_begin + warp * 4; j0 <= j_end; j0 += warps * 4) {
        const int j = j0 + sub;
        float s = 0.f;
        if (j <= j_end) {
            const __nv_bfloat16* krow = j == pos ? kr : kbase + (size_t)j * d;
            // Unrolled so that a lane's loads are in flight together (a loop of dependent
            // round trips otherwise: these rows come from L2).
#pragma unroll 8
            for (int i = 2 * l8; i < d; i += 16) {
                const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qr + i));
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(krow + i));
                s = fmaf(a.x, b.x, s);
                s = fmaf(a.y, b.y, s);
            }
        }
#pragma unroll
        for (int o = 4; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (l8 == 0 && j <= j_end) scores[j - j_begin] = bf16_round(bf16_round(s) * scale);
    }
    __syncthreads();

    const int n = j_end - j_begin + 1;
    float m = -INFINITY;
    for (int j = tid; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_reduce(m, 1, red);
    float sum = 0.f;
    for (int j = tid; j < n; j += blockDim.x) {
        const float e = expf(scores[j] - m);
        scores[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, 0, red);  // its barriers also order the writes to `scores`
    if (chunks == 1) {
        for (int j = tid; j < n; j += blockDim.x) scores[j] = bf16_round(scores[j] / sum);
        __syncthreads();
    }

    // Values: column c of the head by `parts` threads, part p summing positions p, p + parts, …
    const int parts = blockDim.x / d;
    const int c = tid % d, p = tid / d;
    const __nv_bfloat16* vbase = v_cache + (size_t)g * cap * d;
    float a = 0.f;
    if (p < parts) {
#pragma unroll 8
        for (int j = j_begin + p; j <= j_end; j += parts) {
            const float vj = __bfloat162float(j == pos ? vrow[c] : vbase[(size_t)j * d + c]);
            a = fmaf(scores[j - j_begin], vj, a);
        }
    }
    acc[tid] = a;
    __syncthreads();
    float total = 0.f;
    if (tid < d)
        for (int q_ = 0; q_ < parts; q_++) total += acc[q_ * d + tid];
    if (chunks == 1) {
        if (tid < d) ctx[(size_t)h * d + tid] = __float2bfloat16(total);
        return;
    }

    // Several chunks: this one's share into `part`, then the head's last block combines.
    float* mine = part + ((size_t)h * gridDim.y + chunk) * (d + 2);
    if (tid < d) mine[2 + tid] = total;
    if (tid == 0) {
        mine[0] = m;
        mine[1] = sum;
    }
    __threadfence();  // this block's share visible to the last block before it counts itself
    __syncthreads();
    if (tid == 0) ticket = atomicAdd(&attn_arrived[h], 1u);
    __syncthreads();
    if (ticket != (unsigned)chunks - 1) return;
    __threadfence();
    const float* head = part + (size_t)h * gridDim.y * (d + 2);
    float mx = -INFINITY;
    for (int c_ = 0; c_ < chunks; c_++) mx = fmaxf(mx, __ldcg(head + (size_t)c_ * (d + 2)));
    if (tid < d) {
        float num = 0.f, den = 0.f;
        for (int c_ = 0; c_ < chunks; c_++) {
            const float* sh = head + (size_t)c_ * (d + 2);
            const float w = expf(__ldcg(sh) - mx);
            den = fmaf(w, __ldcg(sh + 1), den);
            num = fmaf(w, __ldcg(sh + 2 + tid), num);
        }
        ctx[(size_t)h * d + tid] = __float2bfloat16(num / den);
    }
    if (tid == 0) attn_arrived[h] = 0u;
}
