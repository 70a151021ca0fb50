//! Host → device copies straight into a slot of a preallocated pool: no temporary device tensor,
//! so no allocation and no free (which synchronises the whole device) per expert miss.

use candle_core::{DType, Tensor};

/// Copies `bytes` (elements of `dst`'s dtype) into `dst` starting at element `elem_offset`.
#[cfg(feature = "cuda")]
pub fn htod_into(dst: &Tensor, elem_offset: usize, bytes: &[u8]) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, result};
    let (storage, layout) = dst.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("slot upload: the pool is not on a CUDA device")
    };
    let esize = dst.dtype().size_in_bytes();
    if bytes.len() % esize != 0 || elem_offset * esize + bytes.len() > dst.elem_count() * esize {
        candle_core::bail!(
            "slot upload: {} bytes at element {elem_offset} do not fit the pool",
            bytes.len()
        )
    }
    let start = ((layout.start_offset() + elem_offset) * esize) as u64;
    let stream = cs.device.cuda_stream();
    let base = match dst.dtype() {
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        other => candle_core::bail!("slot upload: unsupported pool dtype {other:?}"),
    };
    // SAFETY: the destination range was bounds-checked above; the copy is ordered on candle's
    // stream and waited for, so `bytes` outlives it and no kernel sees a half-written slot.
    unsafe { result::memcpy_htod_async(base + start, bytes, stream.cu_stream()) }
        .map_err(candle_core::Error::wrap)?;
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn htod_into(_dst: &Tensor, _elem_offset: usize, _bytes: &[u8]) -> candle_core::Result<()> {
    let _ = DType::BF16;
    candle_core::bail!("slot upload needs a build with --features cuda")
}
