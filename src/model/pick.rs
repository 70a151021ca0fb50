//! The greedy pick on the GPU (`kernels/pick.cu`): the token a greedy decode step chooses,
//! computed at the end of the step's CUDA graph, so the host reads back two words instead of the
//! whole logits row.
//!
//! Why: between two graph steps the host read 151,936 f32 logits (Qwen's vocabulary), made a
//! vector of them and scanned it for the largest, and the GPU waited meanwhile. The pick is
//! the host's [`super::layers::argmax_of_numbers`] key for key — the largest value in
//! `f32::total_cmp` order, the first of equals, and "not a number" for NaN of either sign or +∞
//! — so the token is the one the host would pick from the same logits, which stay on the device
//! for whoever asks for them (`Generation::last_logits`).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};

const PTX: &str = include_str!("kernels/pick.ptx");
const MODULE: &str = "moescope_pick";
/// Blocks of the first launch (each reduces a strided share of the row to one pair); the
/// second reduces their pairs with one warp.
const PARTS: usize = 128;
/// Threads of a first-launch block (`PICK_THREADS`).
const THREADS: u32 = 256;

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(format!("greedy pick kernel ({what}): {e}"))
}

/// The device buffers of one pick: its scratch pairs and its two output words, made before a
/// graph is captured (nothing is allocated inside it).
pub struct DevicePick {
    /// [PARTS] keys then [PARTS] indices (as u32).
    scratch: Tensor,
    /// [index, not-a-number flag].
    out: Tensor,
}

impl DevicePick {
    pub fn new(device: &Device) -> Result<Self> {
        Ok(DevicePick {
            scratch: Tensor::zeros(2 * PARTS, DType::U32, device)?,
            out: Tensor::zeros(2, DType::U32, device)?,
        })
    }

    /// The two output words: the index of the pick, then 1 when the row holds NaN or +∞ (or is
    /// empty), else 0.
    pub fn out(&self) -> &Tensor {
        &self.out
    }

    /// Queues the pick over `logits` (f32, contiguous, every element one logit) on candle's
    /// stream.
    pub fn launch(&self, logits: &Tensor) -> Result<()> {
        if logits.dtype() != DType::F32 || !logits.is_contiguous() {
            return Err(err(
                "input",
                format!(
                    "logits must be contiguous f32, not {:?} {:?}",
                    logits.dtype(),
                    logits.dims()
                ),
            ));
        }
        let n = logits.elem_count();
        if n == 0 || n > i32::MAX as usize {
            return Err(err(
                "input",
                format!("{n} logits: nothing to pick from, or more than it indexes"),
            ));
        }
        let dev = logits.device().as_cuda_device()?.clone();
        let (at, _) = super::raw::device_range(logits, 0, n * 4).map_err(|e| err("logits", e))?;
        let (keys, _) =
            super::raw::device_range(&self.scratch, 0, PARTS * 4).map_err(|e| err("scratch", e))?;
        let (idx, _) = super::raw::device_range(&self.scratch, PARTS, PARTS * 4)
            .map_err(|e| err("scratch", e))?;
        let (out, _) = super::raw::device_range(&self.out, 0, 8).map_err(|e| err("out", e))?;
        let (n_, parts_) = (n as i32, PARTS as i32);
        let f = dev.get_or_load_custom_func("pick_partial", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&at).arg(&n_).arg(&keys).arg(&idx);
        let cfg = LaunchConfig {
            grid_dim: (PARTS as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's (pointers to n f32, PARTS i32 twice), every
        // range checked above; it writes keys[b] and idx[b] of its own block only.
        unsafe { b.launch(cfg) }.map_err(|e| err("launch", e))?;
        let f = dev.get_or_load_custom_func("pick_final", MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&keys).arg(&idx).arg(&parts_).arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; one warp reads the PARTS pairs and writes the two words.
        unsafe { b.launch(cfg) }.map_err(|e| err("launch", e))?;
        Ok(())
    }

    /// [`launch`](Self::launch), then the two words read back (for tests and one-off picks):
    /// `Some(index)`, or `None` where the host's `argmax_of_numbers` says None.
    pub fn pick(&self, logits: &Tensor) -> Result<Option<u32>> {
        self.launch(logits)?;
        let w = self.out.to_vec1::<u32>()?;
        Ok((w[1] == 0).then_some(w[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::argmax_of_numbers;

    /// The device pick against the host's on rows with ties, signed zeros, infinities and NaNs
    /// of either sign anywhere, at lengths around the launch's strides and Qwen's vocabulary.
    #[test]
    fn gpu_pick_is_the_hosts_argmax_of_numbers() {
        let Some(dev) = crate::util::gpu_test::device("greedy pick") else {
            return;
        };
        let pick = DevicePick::new(&dev).unwrap();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = [
            f32::NAN,
            f32::from_bits(0xFFC0_0000),
            f32::from_bits(0x7F80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN,
        ];
        let mut checked = 0;
        for n in [1usize, 2, 31, 255, 256, 257, 32_768, 32_769, 151_936] {
            for case in 0..12 {
                // Few distinct values, so ties are common; some rows with a special or two.
                let mut row: Vec<f32> = (0..n).map(|_| ((next() % 7) as f32 - 3.0) * 0.5).collect();
                if case >= 4 {
                    for _ in 0..(case - 3) {
                        let at = (next() % n as u64) as usize;
                        row[at] = specials[(next() % specials.len() as u64) as usize];
                    }
                }
                if case == 3 {
                    // The maximum only at the very end.
                    row[n - 1] = 100.0;
                }
                let t = Tensor::from_vec(row.clone(), n, &dev).unwrap();
                let want = argmax_of_numbers(&row).map(|i| i as u32);
                assert_eq!(pick.pick(&t).unwrap(), want, "n {n}, case {case}");
                checked += 1;
            }
        }
        assert_eq!(checked, 108);
        let bf16 = Tensor::zeros(4, DType::BF16, &dev).unwrap();
        assert!(pick.pick(&bf16).is_err(), "bf16 logits are refused");
    }
}
