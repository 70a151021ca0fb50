// The greedy pick on the device, at the end of a decode step's CUDA graph: the index of the
// largest logit in `f32::total_cmp` order, the first of equals, and whether any value is NaN
// (of either sign) or +inf — the host's `layers::argmax_of_numbers`, key for key. Why on the
// device: the host otherwise reads the whole row back (151,936 f32 for Qwen's vocabulary),
// turns it into a vector and scans it between two steps, with the GPU idle meanwhile.
//
// Two launches, so the result does not depend on which block finishes first: PICK_PARTS blocks
// each reduce a strided share of the row to one (key, index) pair, then one warp reduces those.
// "Better" is a total order on pairs (larger key, then smaller index), so any reduction order
// gives the same pair.
#include <stdint.h>
#include <limits.h>

#define PICK_THREADS 256

// The host's key: `order_key(v)` (an integer that orders as total_cmp orders v), rotated by
// −0x7FFFFF so that negative NaNs come above +inf and every number keeps its place.
__device__ __forceinline__ int pick_key(float v) {
    const int b = __float_as_int(v);
    const int k = b ^ (int)(((unsigned)(b >> 31)) >> 1);
    return (int)((unsigned)k - 0x007FFFFFu);
}

__device__ __forceinline__ void better(int& k, int& i, int k2, int i2) {
    if (k2 > k || (k2 == k && i2 < i)) {
        k = k2;
        i = i2;
    }
}

__device__ __forceinline__ void warp_better(int& k, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const int k2 = __shfl_xor_sync(0xffffffffu, k, o);
        const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        better(k, i, k2, i2);
    }
}

// Block b's best (key, index) over logits[j], j ≡ b·PICK_THREADS + t (mod grid · PICK_THREADS),
// into keys[b], idx[b]. Launched with PICK_THREADS threads a block.
extern "C" __global__ void pick_partial(const float* __restrict__ logits, int n,
                                        int* __restrict__ keys, int* __restrict__ idx) {
    int k = INT_MIN, i = INT_MAX;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x)
        better(k, i, pick_key(logits[j]), j);
    warp_better(k, i);
    __shared__ int sk[PICK_THREADS / 32], si[PICK_THREADS / 32];
    const int w = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (lane == 0) {
        sk[w] = k;
        si[w] = i;
    }
    __syncthreads();
    if (w != 0) return;
    const int warps = blockDim.x / 32;
    k = lane < warps ? sk[lane] : INT_MIN;
    i = lane < warps ? si[lane] : INT_MAX;
    warp_better(k, i);
    if (lane == 0) {
        keys[blockIdx.x] = k;
        idx[blockIdx.x] = i;
    }
}

// The best of `parts` pairs, by one warp: out[0] = its index, out[1] = 1 when the row holds a
// NaN or +inf (or is empty), else 0.
extern "C" __global__ void pick_final(const int* __restrict__ keys, const int* __restrict__ idx,
                                      int parts, uint32_t* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    int k = INT_MIN, i = INT_MAX;
    for (int j = lane; j < parts; j += 32) better(k, i, keys[j], idx[j]);
    warp_better(k, i);
    if (lane == 0) {
        out[0] = (uint32_t)i;
        out[1] = (i == INT_MAX || k >= pick_key(__int_as_float(0x7F800000))) ? 1u : 0u;
    }
}
