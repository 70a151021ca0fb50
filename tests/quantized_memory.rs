//! Block-quantized products must not leave candle's packed copies behind (BENCHMARKS.md §101):
//! candle multiplies Q4_K (and Q6_K for prompts, Q8_0 on VNNI CPUs) by tiles it packs from the
//! matrix on first use and keeps for the matrix's life — 4/3 of a Q4_K matrix's bytes that no
//! budget saw. `quant_rows::product` gives candle's bits (token by token) without keeping one,
//! for prompts as for single tokens. This binary counts
//! the bytes live on the heap (its own global allocator), so it holds one test only.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use moescope::model::quant_rows::{product, takes};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is the system allocator's, with the same layout; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn products_keep_no_packed_copy_and_give_candles_bits() {
    let (n, k) = (512usize, 2048usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| (((i * 7919) % 2003) as f32 - 1001.0) * 1e-3)
        .collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let x = |m: usize| {
        let v: Vec<f32> = (0..m * k)
            .map(|i| (((i * 31) % 97) as f32 - 48.0) * 0.013)
            .collect();
        Tensor::from_vec(v, (m, k), &Device::Cpu).unwrap()
    };
    // Q4_K: 144 bytes a 256 weights, the matrix 589,824 bytes; candle's tiles would add 192.
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
        let blocks = n * k / dtype.block_size() * dtype.type_size();
        for m in [1usize, 16] {
            let ours = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let theirs = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let x = x(m);
            // Once on a third twin to warm the pool's threads and scratch, then measured.
            let warm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            drop(product(&warm, &x).unwrap());
            drop(warm);
            let before = live();
            let y = bits(&product(&ours, &x).unwrap());
            let grown = live() - before - (y.len() * 4) as isize;
            // Where the stacked product does not take the matrix (Q8_0 on a CPU with VNNI,
            // aarch64), candle's product keeps its copy, as documented.
            let QMatMul::QTensor(q) = &ours else {
                unreachable!("a block type")
            };
            assert!(
                !takes(q, m) || grown.abs() < (blocks / 16) as isize,
                "{dtype:?} m={m}: {grown} bytes left live after moescope's product \
                 (the matrix is {blocks})"
            );
            // candle's own product on a twin matrix: what it keeps; and each token's row the
            // bits candle gives that token alone.
            let before = live();
            let whole = bits(&theirs.forward(&x).unwrap());
            let kept = live() - before - (whole.len() * 4) as isize;
            let alone: Vec<u32> = (0..m)
                .flat_map(|t| bits(&theirs.forward(&x.narrow(0, t, 1).unwrap()).unwrap()))
                .collect();
            assert_eq!(y, alone, "{dtype:?} m={m}: candle's bits, token by token");
            // The measurement sees a packed copy where candle makes one: Q4_K on an x86 CPU
            // with AVX2, at any m — 4/3 of the blocks.
            #[cfg(target_arch = "x86_64")]
            if dtype == GgmlDType::Q4K
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                assert!(
                    kept >= (blocks * 4 / 3) as isize,
                    "{dtype:?} m={m}: candle kept {kept} bytes, expected its packed copy \
                     (4/3 of {blocks})"
                );
            }
            let _ = kept;
            drop(theirs);
            drop(ours);
        }
    }
}
