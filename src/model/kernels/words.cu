// A few 32-bit words from `src` to `dst`, either of which may be page-locked host memory mapped
// into the device's address space: a gated piecewise step's routing out to the host and its
// slot ids back in (`model/gates.rs`). Why a kernel: a copy-engine copy queued behind a stream
// wait cost ~8 µs more than the wait itself on an H200 (21.5 against 5.5 µs a round trip),
// a one-block kernel's loads and stores over the bus a few.
//
// The loads are volatile: host memory the host has just written must be read again, not served
// from a cache. The fence makes the stores to host memory visible before anything the stream
// does next (the signal that follows writes with its own barrier too).
extern "C" __global__ void copy_words(const volatile unsigned int* src, volatile unsigned int* dst,
                                      int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    __threadfence_system();
}

#define NOT_RESIDENT 0xffffffffu

// A gated step's gate for one MoE layer (one warp; k <= 32): writes the layer's routed expert
// ids out to the host and signals `point`, looks each up in the layer's exact residency table
// (its slot, or NOT_RESIDENT) and, when all are resident, writes their slots and returns at
// once — the host serves the layer later, for the cache's bookkeeping alone. When one is not,
// it waits until the host has loaded it, updated the table and opened `point`, then reads the
// table again. The table is read volatile: the host's copies change it between launches, and
// no stale line may answer.
extern "C" __global__ void gate_layer(const unsigned int* __restrict__ route_ids,
                                      const unsigned int* table, int k,
                                      volatile unsigned int* host_ids,
                                      volatile unsigned int* host_signal, unsigned int point,
                                      const volatile unsigned int* host_go,
                                      unsigned int* __restrict__ slot_ids) {
    const int lane = threadIdx.x;
    const unsigned int e = lane < k ? route_ids[lane] : 0u;
    if (lane < k) host_ids[lane] = e;
    __threadfence_system();
    __syncwarp();
    if (lane == 0) *host_signal = point;
    const volatile unsigned int* t = table;
    unsigned int slot = lane < k ? t[e] : 0u;
    const bool all = __all_sync(0xffffffffu, lane >= k || slot != NOT_RESIDENT);
    if (!all) {
        if (lane == 0) {
            while (*host_go < point) __nanosleep(256);
        }
        __syncwarp();
        slot = lane < k ? t[e] : 0u;
        // Still absent only when the host gave the step up and opened every gate: any slot
        // of the pool will do, since the step's results are dropped.
        if (slot == NOT_RESIDENT) slot = 0u;
    }
    if (lane < k) slot_ids[lane] = slot;
}

// Run blockIdx.x of three: `n` bytes from `s` to `d` (either may be page-locked host memory
// mapped into the device's address space). For an FP8 miss's three block-scale tables — a few
// hundred bytes each — from its registered expert file into its slot's scale pools. Why a
// kernel: a copy-engine copy that small cost ~9 µs of the copy engine's time on an H200, three
// of them a quarter of the miss (BENCHMARKS.md §103). Words where both addresses and the length
// allow, bytes otherwise: a safetensors file need not align its tensors.
extern "C" __global__ void copy_runs3(const unsigned char* s0, unsigned char* d0, int n0,
                                      const unsigned char* s1, unsigned char* d1, int n1,
                                      const unsigned char* s2, unsigned char* d2, int n2) {
    const unsigned char* s = blockIdx.x == 0 ? s0 : blockIdx.x == 1 ? s1 : s2;
    unsigned char* d = blockIdx.x == 0 ? d0 : blockIdx.x == 1 ? d1 : d2;
    const int n = blockIdx.x == 0 ? n0 : blockIdx.x == 1 ? n1 : n2;
    if ((((size_t)s | (size_t)d | (size_t)n) & 3) == 0) {
        const unsigned int* sw = (const unsigned int*)s;
        unsigned int* dw = (unsigned int*)d;
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) dw[i] = sw[i];
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
    }
}

// Words written to scattered device addresses, the addresses and values carried in the launch's
// own arguments: the changed entries of the residency tables after a gated layer's misses
// (`experts/cache/slots.rs`, `Residency::sync`). Why a kernel with its data as arguments: each
// changed table used to be a fresh device tensor from a host vector — a pageable copy and a copy
// kernel, 32–65 µs of the host's time for every layer that missed (BENCHMARKS.md §95) — and the
// arguments are copied when the kernel is queued, so no host buffer has to outlive the launch.
#define SCATTER_MAX 100
struct ScatterWords {
    unsigned int n;
    unsigned int pad;
    unsigned long long addr[SCATTER_MAX];
    unsigned int val[SCATTER_MAX];
};

extern "C" __global__ void scatter_words(const ScatterWords w) {
    for (unsigned int i = threadIdx.x; i < w.n && i < SCATTER_MAX; i += blockDim.x)
        *(unsigned int*)w.addr[i] = w.val[i];
}
