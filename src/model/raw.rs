//! Raw device addresses of tensors, for the copies and kernels candle has no op for (slot
//! uploads, direct copies from registered host memory, the MoE decode kernels, the graph's
//! page-locked words). One checked place that turns a tensor range into an address.

use candle_core::{DType, Tensor};

/// Where `len` bytes go in `dst` from element `elem_offset` on: the device address, checked to
/// be whole elements inside `dst`, and candle's stream (the one `dst` is used on).
pub fn device_range(
    dst: &Tensor,
    elem_offset: usize,
    len: usize,
) -> candle_core::Result<(
    u64,
    std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = dst.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("the destination is not on a CUDA device")
    };
    let esize = dst.dtype().size_in_bytes();
    if !len.is_multiple_of(esize) || elem_offset * esize + len > dst.elem_count() * esize {
        candle_core::bail!(
            "{len} bytes at element {elem_offset} do not fit a tensor of {} {:?} elements",
            dst.elem_count(),
            dst.dtype()
        )
    }
    let stream = cs.device.cuda_stream();
    let base = match dst.dtype() {
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        other => candle_core::bail!("raw copies into {other:?} tensors are not supported"),
    };
    let at = base + ((layout.start_offset() + elem_offset) * esize) as u64;
    Ok((at, stream))
}
