//! Expert bytes → [`ExpertWeights`]: the one conversion both backends use, so native's resident
//! experts and selective's cached ones are the same tensors, bit for bit.

use candle_core::{DType, Device, Tensor};

use super::source::{PartSpan, RawExpert};
use crate::model::error::Result;
use crate::model::fp8::{Fp8Matrix, Fp8Scheme};
use crate::model::ports::{ExpertWeights, GgmlLayout, held_dtype};
use crate::model::safetensors_file::StDtype;
use crate::model::safetensors_file::{TensorInfo, bytes_to_tensor};

/// Builds compute tensors from an expert's on-disk bytes. Gate and up are both [I, H]
/// row-major, so their byte concatenation *is* the stacked [2I, H] matrix. `fp8` is the
/// checkpoint's block scheme (its config's `quantization`), needed for `F8_E4M3` parts.
pub fn from_raw(
    raw: &RawExpert,
    fp8: Option<Fp8Scheme>,
    dtype: DType,
    device: &Device,
) -> Result<ExpertWeights> {
    from_raw_with(raw, fp8, dtype, device, true)
}

/// [`from_raw`], saying whether a GGUF expert may become GPU blocks (see
/// [`gpu_block_layout`]): only where the caller holds every MoE layer so (`gpu_block_layouts`
/// is Some) — a model whose other layers take candle's quantized products keeps all its experts
/// that way, rather than some as blocks multiplied one by one outside the block kernels.
pub fn from_raw_with(
    raw: &RawExpert,
    fp8: Option<Fp8Scheme>,
    dtype: DType,
    device: &Device,
    gpu_blocks: bool,
) -> Result<ExpertWeights> {
    let lut4 = raw.parts.iter().any(|p| p.dtype.lut4().is_some());
    if lut4 || raw.parts.iter().any(|p| p.dtype.ggml().is_some()) {
        if gpu_blocks
            && let Some(layout) = gpu_block_layout(
                raw.parts.each_ref().map(|p| (p.dtype, p.shape.as_slice())),
                dtype,
                device,
            )
        {
            return blocks_on_device(raw, layout, device);
        }
        return if lut4 {
            lut4_expert(raw, device)
        } else {
            quantized(raw, device)
        };
    }
    if raw.parts.iter().any(|p| p.dtype == StDtype::F8E4M3) {
        return fp8_expert(raw, fp8, device);
    }
    let [gate, up, down] = &raw.parts;
    let (i, h) = (gate.shape[0], gate.shape[1]);
    // Held as stored where the compute allows (`held_dtype`): all three parts of one type.
    let dtype = match [gate, up, down].map(|p| p.dtype.float_dtype()) {
        [Some(g), Some(u), Some(d)] if g == u && u == d => held_dtype(g, dtype, device),
        _ => dtype,
    };
    let gate_up = if gate.dtype == up.dtype {
        let mut bytes = Vec::with_capacity(gate.bytes.len() + up.bytes.len());
        bytes.extend_from_slice(&gate.bytes);
        bytes.extend_from_slice(&up.bytes);
        let info = TensorInfo {
            dtype: gate.dtype,
            shape: vec![2 * i, h],
            offset: 0,
            len: bytes.len() as u64,
        };
        bytes_to_tensor(&bytes, &info, dtype, device)
    } else {
        let g = bytes_to_tensor(&gate.bytes, &gate.info(), dtype, device)?;
        let u = bytes_to_tensor(&up.bytes, &up.info(), dtype, device)?;
        Tensor::cat(&[&g, &u], 0)
    }
    .map_err(|e| raw.error(format!("converting gate/up: {e}")))?;
    let down = bytes_to_tensor(&down.bytes, &down.info(), dtype, device)
        .map_err(|e| raw.error(format!("converting down_proj: {e}")))?;
    Ok(ExpertWeights::new(gate_up, down, i))
}

/// A GGUF expert with block-quantized parts: each part becomes a `QMatMul` over its bytes as
/// stored (no dequantisation). A part a converter left in a float type (llama.cpp falls back to
/// F16 for rows that are not whole blocks) is multiplied in f32, which is what the quantized
/// products compute in.
fn quantized(raw: &RawExpert, device: &Device) -> Result<ExpertWeights> {
    use crate::model::ports::GateUp;
    let mut held = 0u64;
    let [g, u, d] = &raw.parts;
    let (i, h) = (g.shape[0], g.shape[1]);
    // GGML rows are independent, so gate's bytes then up's are the [2I, H] matrix.
    let gate_up = if g.dtype == u.dtype && g.shape == u.shape {
        GateUp::Fused(candle_matrix(
            raw,
            &g.name,
            g.dtype,
            vec![2 * i, h],
            &[g.bytes.as_slice(), u.bytes.as_slice()],
            device,
            &mut held,
        )?)
    } else {
        GateUp::Apart(
            candle_part(raw, g, device, &mut held)?,
            candle_part(raw, u, device, &mut held)?,
        )
    };
    let down = candle_part(raw, d, device, &mut held)?;
    Ok(ExpertWeights::quantized(gate_up, down, i, held))
}

/// One part of a GGUF expert as candle's quantized products take it ([`candle_matrix`]).
fn candle_part(
    raw: &RawExpert,
    p: &super::source::RawPart,
    device: &Device,
    held: &mut u64,
) -> Result<candle_core::quantized::QMatMul> {
    candle_matrix(
        raw,
        &p.name,
        p.dtype,
        p.shape.clone(),
        &[&p.bytes],
        device,
        held,
    )
}

/// One matrix from bytes as stored (`parts` concatenated): a block type stays so; a float one
/// is held in f32. Adds the bytes held to `held`.
fn candle_matrix(
    raw: &RawExpert,
    name: &str,
    dtype: StDtype,
    shape: Vec<usize>,
    parts: &[&[u8]],
    device: &Device,
    held: &mut u64,
) -> Result<candle_core::quantized::QMatMul> {
    use crate::model::error::candle_msg;
    use candle_core::quantized::{QMatMul, ggml_file::qtensor_from_ggml};
    let err =
        |e: candle_core::Error| raw.error(format!("{name} ({}): {}", dtype.name(), candle_msg(&e)));
    match dtype.ggml() {
        Some(g) => {
            *held += parts.iter().map(|p| p.len() as u64).sum::<u64>();
            let q = match qtensor_of_parts(g, parts, &shape, device) {
                Some(q) => q,
                None => qtensor_from_ggml(g, &parts.concat(), shape, device),
            }
            .map_err(err)?;
            QMatMul::from_qtensor(q).map_err(err)
        }
        None => {
            let bytes = parts.concat();
            let bytes = bytes.as_slice();
            let info = TensorInfo {
                dtype,
                shape,
                offset: 0,
                len: bytes.len() as u64,
            };
            let t = bytes_to_tensor(bytes, &info, DType::F32, device).map_err(err)?;
            *held += (t.elem_count() * 4) as u64;
            Ok(QMatMul::Tensor(t))
        }
    }
}

/// Why a table-coded expert the GPU block kernels did not take is refused there (they take MXFP4,
/// IQ4_NL and IQ4_XS in bf16 compute beside parts in block types), naming its first table-coded
/// part, every part's type and the way out.
fn gpu_refusal(parts: &[super::source::RawPart; 3]) -> String {
    let [g, u, d] = parts;
    let first = parts.iter().find(|p| p.dtype.lut4().is_some()).unwrap_or(g);
    format!(
        "{} is stored as {}, which moescope's GPU kernels take in bf16 and beside parts in block \
         types of whole-block rows only (this expert: gate {} {:?}, up {} {:?}, down {} {:?}): \
         run with --dtype bf16, or --device cpu",
        first.name,
        first.dtype.name(),
        g.dtype.name(),
        g.shape,
        u.dtype.name(),
        u.shape,
        d.dtype.name(),
        d.shape
    )
}

/// A GGUF expert with table-coded parts (llama.cpp's `MXFP4_MOE`, `IQ4_XS`, `IQ4_NL`; see
/// `model/lut4.rs`): each such matrix held as stored and multiplied by moescope's own CPU
/// product, any other part as in [`quantized`] — so a file that mixes these with other types
/// expert by expert or matrix by matrix is read too. On a GPU, where the block kernels did not
/// take the expert (outside bf16 compute, or beside a float part or rows not whole blocks), it
/// is refused by name.
fn lut4_expert(raw: &RawExpert, device: &Device) -> Result<ExpertWeights> {
    use crate::model::lut4::Lut4Matrix;
    use crate::model::ports::{BlockMat, Lut4GateUp};
    let [g, u, d] = &raw.parts;
    if !device.is_cpu() {
        return Err(raw.error(gpu_refusal(&raw.parts)));
    }
    let mut held = 0u64;
    let mx = |p: &super::source::RawPart, bytes: Vec<u8>, shape: [usize; 2]| {
        let format = p.dtype.lut4().expect("a table-coded part");
        Lut4Matrix::new(format, bytes, shape)
            .map_err(|msg| raw.error(format!("{} ({format}): {msg}", p.name)))
    };
    let shape2 = |p: &super::source::RawPart| -> Result<[usize; 2]> {
        match p.shape.as_slice() {
            &[r, c] => Ok([r, c]),
            s => Err(raw.error(format!("{}: shape {s:?} is not a matrix", p.name))),
        }
    };
    let part = |p: &super::source::RawPart, held: &mut u64| -> Result<BlockMat> {
        if p.dtype.lut4().is_some() {
            *held += p.bytes.len() as u64;
            Ok(BlockMat::Lut4(mx(p, p.bytes.clone(), shape2(p)?)?))
        } else {
            candle_part(raw, p, device, held).map(BlockMat::Candle)
        }
    };
    let [i, h] = shape2(g)?;
    let gate_up = if g.dtype.lut4().is_some() && g.dtype == u.dtype && g.shape == u.shape {
        let mut bytes = Vec::with_capacity(g.bytes.len() + u.bytes.len());
        bytes.extend_from_slice(&g.bytes);
        bytes.extend_from_slice(&u.bytes);
        held += bytes.len() as u64;
        Lut4GateUp::Fused(mx(g, bytes, [2 * i, h])?)
    } else {
        Lut4GateUp::Apart(part(g, &mut held)?, part(u, &mut held)?)
    };
    let down = part(d, &mut held)?;
    Ok(ExpertWeights::lut4(gate_up, down, i, held))
}

/// The layout a GGUF expert of these parts (dtype, shape: gate and up [I, H], down [H, I])
/// takes on the GPU — its blocks as stored, for moescope's block decode kernels — when they
/// apply: bf16 compute on a CUDA device (see [`block_layout`]). None otherwise (candle's
/// quantized products then take the expert one matrix at a time).
pub fn gpu_block_layout(
    parts: [(StDtype, &[usize]); 3],
    dtype: DType,
    device: &Device,
) -> Option<GgmlLayout> {
    if !device.is_cuda() || dtype != DType::BF16 {
        return None;
    }
    block_layout(parts)
}

/// The block layout of a GGUF expert of these parts when the block kernels decode every type
/// and each row is whole blocks; None otherwise (float parts, other block types, odd shapes).
pub fn block_layout(parts: [(StDtype, &[usize]); 3]) -> Option<GgmlLayout> {
    let [(g, gs), (u, us), (d, ds)] = parts;
    let &[i, h] = gs else { return None };
    (us == [i, h] && ds == [h, i])
        .then(|| GgmlLayout::new([g, u, d], h, i))
        .flatten()
}

/// Per model layer, the GPU block layout of `source`'s experts (see [`gpu_block_layout`]),
/// taken from each MoE layer's first expert present — GGUF stores a layer's experts in one
/// tensor per matrix, so they share it; None unless every MoE layer has one.
pub fn gpu_block_layouts(
    source: &dyn super::source::ExpertSource,
    dtype: DType,
    device: &Device,
) -> Option<Vec<Option<GgmlLayout>>> {
    let cfg = source.config();
    let mut out = vec![None; cfg.num_hidden_layers];
    for layer in cfg.moe_layers() {
        let e = (0..cfg.num_experts).find(|&e| source.has(layer, e))?;
        let locs = source.part_locations(layer, e)?;
        out[layer] = Some(gpu_block_layout(
            locs.each_ref().map(|l| (l.dtype, l.shape.as_slice())),
            dtype,
            device,
        )?);
    }
    Some(out)
}

/// A GGUF expert's blocks copied to the device as they are (see [`gpu_block_layout`]).
fn blocks_on_device(raw: &RawExpert, layout: GgmlLayout, device: &Device) -> Result<ExpertWeights> {
    let [g, u, d] = &raw.parts;
    let want = [layout.gate_bytes(), layout.up_bytes(), layout.down_bytes()];
    for (p, n) in raw.parts.iter().zip(want) {
        if p.bytes.len() != n {
            return Err(raw.error(format!(
                "{} ({} {:?}) holds {} bytes, where its type and shape take {n}",
                p.name,
                p.dtype.name(),
                p.shape,
                p.bytes.len()
            )));
        }
    }
    // The checks the CPU's table-coded matrices make when built: a scale that is not finite is
    // named here rather than decoded into NaN logits on the device.
    for p in &raw.parts {
        if let Some(format) = p.dtype.lut4() {
            let cols = p.shape.last().copied().unwrap_or(0);
            crate::model::lut4::check_scales(format, &p.bytes, cols)
                .map_err(|why| raw.error(format!("{} ({format}): {why}", p.name)))?;
        }
    }
    let mut gate_up = Vec::with_capacity(want[0] + want[1]);
    gate_up.extend_from_slice(&g.bytes);
    gate_up.extend_from_slice(&u.bytes);
    let n = gate_up.len();
    ExpertWeights::blocks(
        Tensor::from_vec(gate_up, n, device)?,
        Tensor::from_slice(&d.bytes, d.bytes.len(), device)?,
        layout,
    )
}

/// Typed CPU block storage not yet filled: `len` bytes at `ptr` (the spare capacity of a
/// `Vec` of blocks), then `finish` — once every byte is written — the block tensor over them.
struct UninitBlocks {
    ptr: *mut std::mem::MaybeUninit<u8>,
    len: usize,
    finish: Box<dyn FnOnce() -> candle_core::Result<candle_core::quantized::QTensor>>,
}

/// Storage for a CPU block tensor of `dims` in type `g`, unfilled; None for a type not listed,
/// Err for dims that are not whole blocks.
fn uninit_blocks(
    g: candle_core::quantized::GgmlDType,
    dims: Vec<usize>,
) -> Option<candle_core::Result<UninitBlocks>> {
    use candle_core::quantized::k_quants::*;
    use candle_core::quantized::{GgmlDType as G, GgmlType, QStorage, QTensor};
    fn typed<T: GgmlType + Send + Sync + 'static>(
        dims: Vec<usize>,
    ) -> candle_core::Result<UninitBlocks> {
        let elems: usize = dims.iter().product();
        if !elems.is_multiple_of(T::BLCK_SIZE) {
            candle_core::bail!("{dims:?} is not whole {:?} blocks", T::DTYPE);
        }
        let n = elems / T::BLCK_SIZE;
        let mut blocks: Vec<T> = Vec::with_capacity(n);
        let ptr = blocks.as_mut_ptr() as *mut std::mem::MaybeUninit<u8>;
        Ok(UninitBlocks {
            ptr,
            len: n * std::mem::size_of::<T>(),
            finish: Box::new(move || {
                // SAFETY: called once the caller has written all `n` blocks' bytes; block types
                // are plain data, every byte pattern a value (candle reads file bytes as them).
                unsafe { blocks.set_len(n) };
                QTensor::new(QStorage::Cpu(Box::new(blocks)), dims)
            }),
        })
    }
    Some(match g {
        G::Q4_0 => typed::<BlockQ4_0>(dims),
        G::Q4_1 => typed::<BlockQ4_1>(dims),
        G::Q5_0 => typed::<BlockQ5_0>(dims),
        G::Q5_1 => typed::<BlockQ5_1>(dims),
        G::Q8_0 => typed::<BlockQ8_0>(dims),
        G::Q2K => typed::<BlockQ2K>(dims),
        G::Q3K => typed::<BlockQ3K>(dims),
        G::Q4K => typed::<BlockQ4K>(dims),
        G::Q5K => typed::<BlockQ5K>(dims),
        G::Q6K => typed::<BlockQ6K>(dims),
        _ => return None,
    })
}

/// A block-quantized CPU expert read straight into its block storage: `read(gate_up, down)`
/// writes gate's and up's bytes back to back into the first buffer and down's into the second
/// (`ExpertSource::read_split_into_uninit`), so a miss writes each byte once — where reading
/// into owned parts, clearing the blocks and copying them in wrote it three times. The same
/// bytes as [`from_raw`] makes blocks of, so the same products. None (the caller takes the
/// general path) for float parts, gate and up of different types or shapes, or a `read` that
/// says it cannot.
pub fn quantized_direct(
    parts: [(StDtype, &[usize]); 3],
    read: impl FnOnce(
        &mut [std::mem::MaybeUninit<u8>],
        &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<bool>,
) -> Result<Option<ExpertWeights>> {
    use crate::model::ports::GateUp;
    use candle_core::quantized::QMatMul;
    if let Some(format) = parts[0].0.lut4() {
        return lut4_direct(format, parts, read);
    }
    let [(gd, gs), (ud, us), (dd, ds)] = parts;
    let (Some(gq), Some(dq)) = (gd.ggml(), dd.ggml()) else {
        return Ok(None);
    };
    if gd != ud || gs != us || gs.len() != 2 || ds.len() != 2 {
        return Ok(None);
    }
    let (i, h) = (gs[0], gs[1]);
    let (Some(Ok(gu)), Some(Ok(dn))) = (
        uninit_blocks(gq, vec![2 * i, h]),
        uninit_blocks(dq, ds.to_vec()),
    ) else {
        return Ok(None);
    };
    // SAFETY: each is its Vec's spare capacity, `len` bytes, alive until `finish` (the Vec
    // moved into it keeps its heap buffer); MaybeUninit asks nothing of the bytes.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts_mut(gu.ptr, gu.len),
            std::slice::from_raw_parts_mut(dn.ptr, dn.len),
        )
    };
    if !read(a, b)? {
        return Ok(None);
    }
    let held = (gu.len + dn.len) as u64;
    let gate_up = QMatMul::from_qtensor((gu.finish)()?)?;
    let down = QMatMul::from_qtensor((dn.finish)()?)?;
    Ok(Some(ExpertWeights::quantized(
        GateUp::Fused(gate_up),
        down,
        i,
        held,
    )))
}

/// [`quantized_direct`] for table-coded gate and up of one type (down table-coded or a GGML
/// block type): gate's then up's bytes read straight into the fused [2I, H] matrix's storage
/// and down's into its own, so a miss writes each byte once ([`lut4_expert`] reads the expert
/// and then copies it again).
/// None where the parts do not allow it, the read says it cannot, or a block fails
/// `Lut4Matrix`'s checks: the general path then reads the expert and names what is wrong.
fn lut4_direct(
    format: crate::model::lut4::Lut4,
    parts: [(StDtype, &[usize]); 3],
    read: impl FnOnce(
        &mut [std::mem::MaybeUninit<u8>],
        &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<bool>,
) -> Result<Option<ExpertWeights>> {
    use crate::model::lut4::Lut4Matrix;
    use crate::model::ports::{BlockMat, Lut4GateUp};
    use candle_core::quantized::QMatMul;
    let [(gd, gs), (ud, us), (dd, ds)] = parts;
    if gd != ud || gs != us || gs.len() != 2 || ds.len() != 2 {
        return Ok(None);
    }
    let (i, h) = (gs[0], gs[1]);
    let len = |d: StDtype, elems: usize| d.bytes_for(elems as u64).map(|n| n as usize);
    let Some(gu_len) = len(gd, 2 * i * h) else {
        return Ok(None);
    };
    enum Down {
        Lut4(crate::model::lut4::Lut4, Vec<u8>, usize),
        Blocks(UninitBlocks),
    }
    let mut down = if let Some(df) = dd.lut4() {
        match len(dd, ds[0] * ds[1]) {
            Some(n) => Down::Lut4(df, Vec::with_capacity(n), n),
            None => return Ok(None),
        }
    } else {
        match dd.ggml().and_then(|q| uninit_blocks(q, ds.to_vec())) {
            Some(Ok(b)) => Down::Blocks(b),
            _ => return Ok(None),
        }
    };
    let mut gu: Vec<u8> = Vec::with_capacity(gu_len);
    let dn: &mut [std::mem::MaybeUninit<u8>] = match &mut down {
        Down::Lut4(_, v, n) => &mut v.spare_capacity_mut()[..*n],
        // SAFETY: the block Vec's spare capacity, `len` bytes, alive until `finish` (the Vec
        // moved into it keeps its heap buffer); MaybeUninit asks nothing of the bytes.
        Down::Blocks(b) => unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) },
    };
    let dn_len = dn.len();
    if !read(&mut gu.spare_capacity_mut()[..gu_len], dn)? {
        return Ok(None);
    }
    // SAFETY: `read` returned true, so it wrote every byte of both buffers.
    unsafe { gu.set_len(gu_len) };
    let Ok(gate_up) = Lut4Matrix::new(format, gu, [2 * i, h]) else {
        return Ok(None);
    };
    let down = match down {
        Down::Lut4(df, mut v, n) => {
            // SAFETY: as above.
            unsafe { v.set_len(n) };
            match Lut4Matrix::new(df, v, [ds[0], ds[1]]) {
                Ok(m) => BlockMat::Lut4(m),
                Err(_) => return Ok(None),
            }
        }
        Down::Blocks(b) => BlockMat::Candle(QMatMul::from_qtensor((b.finish)()?)?),
    };
    let held = (gu_len + dn_len) as u64;
    Ok(Some(ExpertWeights::lut4(
        Lut4GateUp::Fused(gate_up),
        down,
        i,
        held,
    )))
}

/// A CPU block tensor of `dims` whose blocks are `parts`' bytes one after another, copied once
/// into typed block storage that is not cleared first (a concatenation and then
/// `qtensor_from_ggml` copied twice: gate and up are separate tensors in a GGUF file but one
/// [2I, H] matrix here). None off the CPU or for a type not listed (the caller concatenates);
/// Err when the bytes do not fill the shape.
fn qtensor_of_parts(
    g: candle_core::quantized::GgmlDType,
    parts: &[&[u8]],
    dims: &[usize],
    device: &Device,
) -> Option<candle_core::Result<candle_core::quantized::QTensor>> {
    if !device.is_cpu() {
        return None;
    }
    let blocks = match uninit_blocks(g, dims.to_vec())? {
        Ok(b) => b,
        Err(e) => return Some(Err(e)),
    };
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total != blocks.len {
        return Some(Err(candle_core::Error::Msg(format!(
            "{total} bytes for {dims:?} in {g:?} blocks, expected {}",
            blocks.len
        ))));
    }
    let dst = blocks.ptr as *mut u8;
    let mut at = 0;
    for p in parts {
        // SAFETY: the parts' bytes sum to the blocks' size (checked above) and are written into
        // the storage's spare capacity back to back, every byte of it.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.add(at), p.len()) };
        at += p.len();
    }
    Some((blocks.finish)())
}

/// An FP8 expert: each of the three matrices kept as stored with its scales. All three must be
/// FP8 (a writer that quantizes experts quantizes all of their matrices).
fn fp8_expert(raw: &RawExpert, fp8: Option<Fp8Scheme>, device: &Device) -> Result<ExpertWeights> {
    let Some(scheme) = fp8 else {
        return Err(raw.error(
            "its matrices are F8_E4M3 but the model's config.json declares no FP8 \
             quantization_config (the block size of the scales is unknown)"
                .into(),
        ));
    };
    let matrix = |p: &super::source::RawPart| -> Result<Fp8Matrix> {
        if p.dtype != StDtype::F8E4M3 {
            return Err(raw.error(format!(
                "{} is {} while the expert's other matrices are F8_E4M3 \
                 (an expert is expected to be quantized as a whole)",
                p.name,
                p.dtype.name()
            )));
        }
        let Some(s) = &p.scale else {
            return Err(raw.error(format!("{} is F8_E4M3 but came without its scales", p.name)));
        };
        let want = scheme.scale_shape(&p.shape);
        if p.shape.len() != 2 || s.shape != want {
            return Err(raw.error(format!(
                "{}: scales of shape {:?}, expected {want:?} for a {:?} matrix in {:?} blocks",
                s.name, s.shape, p.shape, scheme.block
            )));
        }
        let scales = bytes_to_tensor(&s.bytes, &s.info(), DType::F32, &Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| raw.error(format!("{}: {e}", s.name)))?;
        Fp8Matrix::new(
            &p.bytes,
            [p.shape[0], p.shape[1]],
            scales,
            scheme.block,
            device,
        )
        .map_err(|e| raw.error(format!("{}: {e}", p.name)))
    };
    let [g, u, d] = &raw.parts;
    Ok(ExpertWeights::fp8(matrix(g)?, matrix(u)?, matrix(d)?))
}

/// The scale block of `source`'s experts when they are block-scaled FP8 (every part of the
/// first expert present `F8_E4M3` with scales, and the config declaring the scheme); None for
/// any other checkpoint.
pub fn fp8_block(source: &dyn super::source::ExpertSource) -> Option<[usize; 2]> {
    let cfg = source.config();
    let scheme = cfg.quantization?;
    let layer = cfg.moe_layers().next()?;
    let e = (0..cfg.num_experts).find(|&e| source.has(layer, e))?;
    let parts = source.part_locations(layer, e)?;
    parts
        .iter()
        .all(|p| p.dtype == StDtype::F8E4M3 && p.scale.is_some())
        .then_some(scheme.block)
}

/// Whether `source`'s experts are kept as stored — GGUF or MXFP4 blocks, or FP8 with scales
/// (judged by each MoE layer's first expert present): no exact float conversion from a read
/// buffer.
pub fn kept_as_stored(source: &dyn super::source::ExpertSource) -> bool {
    let cfg = source.config();
    cfg.moe_layers().any(|layer| {
        (0..cfg.num_experts)
            .find(|&e| source.has(layer, e))
            .and_then(|e| source.part_locations(layer, e))
            .is_some_and(|parts| {
                parts
                    .iter()
                    .any(|p| p.dtype.block_elems().is_some() || p.scale.is_some())
            })
    })
}

/// Bytes one expert of `source` occupies once held for compute in `dtype` on `device`
/// ([`crate::model::held::expert_held_bytes`], the rule the memory estimates use too): the
/// largest over the MoE layers, each judged by its first expert present — a mixed file such as
/// `Q4_K_M` stores some layers' down matrices in a larger type, and a budget counted at a
/// smaller layer's size would be exceeded (GPU slot pools hold the largest). Sources without
/// plain part locations (the seed layout) are judged by their stored size: twice the parameters
/// is 16-bit, held as [`held_dtype`] says.
pub fn held_bytes(source: &dyn super::source::ExpertSource, dtype: DType, device: &Device) -> u64 {
    let cfg = source.config();
    let firsts: Vec<(usize, usize)> = cfg
        .moe_layers()
        .filter_map(|layer| Some((layer, (0..cfg.num_experts).find(|&e| source.has(layer, e))?)))
        .collect();
    let located = firsts.iter().filter_map(|&(l, e)| {
        let parts = source.part_locations(l, e)?;
        Some(crate::model::held::expert_held_bytes(
            &parts,
            dtype.size_in_bytes() as u64,
            device.is_cpu(),
        ))
    });
    if let Some(max) = located.max() {
        return max;
    }
    let params = cfg.expert_params();
    let first = firsts.first().map(|&(l, e)| source.stored_bytes(l, e));
    let size = if first == Some(params as u64 * 2) {
        held_dtype(DType::BF16, dtype, device).size_in_bytes()
    } else {
        dtype.size_in_bytes()
    };
    (params * size) as u64
}

/// An expert read straight into the storage of its tensors: `whole` holds the three matrices'
/// bytes back to back (gate, up, down, as [`ExpertSource::read_into`] lays them) and the file's
/// dtype is the compute dtype `T`, so gate_up and down are views of one tensor and the miss
/// copies the bytes once (out of the page cache) instead of twice. Err gives the buffer back
/// when the layout or dtype is not that (the caller converts from its bytes instead).
pub fn from_whole_buffer<T: candle_core::WithDType>(
    whole: Vec<T>,
    spans: &[PartSpan; 3],
    dtype: DType,
) -> std::result::Result<ExpertWeights, Vec<T>> {
    let [g, u, d] = spans;
    let esize = std::mem::size_of::<T>();
    let fits = cfg!(target_endian = "little")
        && T::DTYPE == dtype
        && [g, u, d]
            .iter()
            .all(|p| p.scale.is_none() && p.dtype.float_dtype() == Some(dtype))
        && g.shape.len() == 2
        && g.shape == u.shape
        && d.shape == [g.shape[1], g.shape[0]]
        && g.range.start == 0
        && u.range.start == g.range.end
        && d.range.start == u.range.end
        && [g, u, d]
            .iter()
            .all(|p| p.range.len() == g.shape[0] * g.shape[1] * esize)
        && d.range.end == whole.len() * esize;
    if !fits {
        return Err(whole);
    }
    let (i, h) = (g.shape[0], g.shape[1]);
    let views = || -> candle_core::Result<(Tensor, Tensor)> {
        let t = Tensor::from_vec(whole, 3 * i * h, &Device::Cpu)?;
        Ok((
            t.narrow(0, 0, 2 * i * h)?.reshape((2 * i, h))?,
            t.narrow(0, 2 * i * h, i * h)?.reshape((h, i))?,
        ))
    };
    // Sizes were checked above: the views cannot fail.
    let (gate_up, down) = views().expect("views of a buffer of the checked size");
    Ok(ExpertWeights::new(gate_up, down, i))
}

/// Builds a CPU expert straight out of a read buffer (the spans of
/// [`ExpertSource::read_into`]) when the conversion is exact — the dtype it is held in
/// (`held_dtype`: for f32 compute, bf16 and f16 as stored) — so the result is bit-for-bit what
/// [`from_raw`] makes. One
/// allocation per matrix and the conversion spread over threads: an expert miss on the CPU
/// otherwise spends more time allocating and copying transients than reading. `None` for
/// any other combination or an unexpected shape (the caller falls back to `from_raw`).
pub fn from_spans_exact(buf: &[u8], spans: &[PartSpan; 3], dtype: DType) -> Option<ExpertWeights> {
    let [g, u, d] = spans;
    if cfg!(target_endian = "big") {
        return None; // the views below read safetensors' little-endian bytes natively
    }
    if g.shape.len() != 2 || g.shape != u.shape || d.shape != [g.shape[1], g.shape[0]] {
        return None;
    }
    let (i, h) = (g.shape[0], g.shape[1]);
    let src = g.dtype.float_dtype()?;
    if u.dtype.float_dtype()? != src || d.dtype.float_dtype()? != src {
        return None;
    }
    let n = i * h;
    let esize = src.size_in_bytes();
    if [g, u, d]
        .iter()
        .any(|p| p.range.len() != n * esize || p.range.end > buf.len())
    {
        return None;
    }
    if u.range.start != g.range.end {
        return None; // gate and up not adjacent: not worth a special case
    }
    let (gu, dn) = (&buf[g.range.start..u.range.end], &buf[d.range.clone()]);
    // f32 compute holds bf16 and f16 experts as stored (`held_dtype`): nothing widens here.
    let (gate_up, down) = match (src, held_dtype(src, dtype, &Device::Cpu)) {
        (DType::F32, DType::F32) => cpu_pair(gu, dn, i, h, same::<f32>)?,
        (DType::BF16, DType::BF16) => cpu_pair(gu, dn, i, h, same::<half::bf16>)?,
        (DType::F16, DType::F16) => cpu_pair(gu, dn, i, h, same::<half::f16>)?,
        _ => return None,
    };
    Some(ExpertWeights::new(gate_up, down, i))
}

/// gate_up [2I, H] and down [H, I] as CPU tensors made by `conv` from their bytes.
fn cpu_pair<T: candle_core::WithDType>(
    gu: &[u8],
    dn: &[u8],
    i: usize,
    h: usize,
    conv: fn(&[u8]) -> Option<Vec<T>>,
) -> Option<(Tensor, Tensor)> {
    let a = Tensor::from_vec(conv(gu)?, (2 * i, h), &Device::Cpu).ok()?;
    let b = Tensor::from_vec(conv(dn)?, (h, i), &Device::Cpu).ok()?;
    Some((a, b))
}

/// `bytes` viewed as elements of `S` (None when misaligned, which a `Vec<u8>` from the
/// allocator never is at the offsets of a safetensors part).
fn view<S: PlainData>(bytes: &[u8]) -> Option<&[S]> {
    // SAFETY: `PlainData` types are plain old data: every bit pattern is a valid value.
    let (pre, mid, post) = unsafe { bytes.align_to::<S>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Element types for which any bit pattern is a valid value.
trait PlainData: Copy {}
impl PlainData for u16 {}
impl PlainData for f32 {}
impl PlainData for half::bf16 {}
impl PlainData for half::f16 {}

/// Same dtype: a copy into an owned, aligned Vec.
fn same<S: PlainData>(bytes: &[u8]) -> Option<Vec<S>> {
    Some(view::<S>(bytes)?.to_vec())
}

#[cfg(test)]
mod tests {
    /// On a GPU a table-coded expert the block kernels did not take is refused naming its first
    /// table-coded tensor, every part's type and shape, and what to do (bf16, or the CPU).
    #[test]
    fn gpu_refusals_name_the_tensor_and_the_way_out() {
        use crate::model::lut4::Lut4;
        let part = |name: &str, dtype| super::super::source::RawPart {
            name: name.into(),
            dtype,
            shape: vec![32, 48],
            bytes: Vec::new(),
            scale: None,
        };
        let iq4 = StDtype::Lut4(Lut4::Iq4Xs);
        let msg = gpu_refusal(&[
            part("blk.3.ffn_gate_exps.weight", iq4),
            part("blk.3.ffn_up_exps.weight", iq4),
            part("blk.3.ffn_down_exps.weight", StDtype::F16),
        ]);
        assert!(
            msg.starts_with("blk.3.ffn_gate_exps.weight is stored as IQ4_XS")
                && msg.contains("gate IQ4_XS [32, 48], up IQ4_XS [32, 48], down F16 [32, 48]")
                && msg.contains("--dtype bf16")
                && msg.contains("--device cpu"),
            "{msg}"
        );
        let mx = StDtype::Lut4(Lut4::Mxfp4);
        let msg = gpu_refusal(&[
            part("blk.0.ffn_gate_exps.weight", StDtype::Q8_0),
            part("blk.0.ffn_up_exps.weight", mx),
            part("blk.0.ffn_down_exps.weight", mx),
        ]);
        assert!(
            msg.starts_with("blk.0.ffn_up_exps.weight is stored as MXFP4")
                && msg.contains("gate Q8_0 [32, 48]"),
            "{msg}"
        );
    }

    use super::*;

    /// The block that decides FP8 slot pools: the scheme's for a block-scaled FP8 checkpoint,
    /// none for a float one or a GGUF file.
    #[test]
    fn fp8_block_is_the_schemes_for_fp8_checkpoints_only() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let source = |dir: &std::path::Path| {
            let cfg = crate::model::MoeConfig::from_dir(dir).unwrap();
            let ckpt = crate::model::Checkpoint::open(dir).unwrap();
            super::super::source::ShardSource::new(&ckpt, &cfg).unwrap()
        };
        for fx in ["fp8/qwen3-moe-tiny-fp8", "fp8/qwen3-omni-tiny-fp8"] {
            let s = source(&root.join(fx));
            let want = super::super::source::ExpertSource::config(&s)
                .quantization
                .map(|q| q.block);
            assert!(want.is_some(), "{fx}");
            assert_eq!(fp8_block(&s), want, "{fx}");
        }
        for other in ["qwen3-moe-tiny", "gguf/kquant-Q8_0.gguf"] {
            assert_eq!(fp8_block(&source(&root.join(other))), None, "{other}");
        }
    }
    use crate::experts::source::RawPart;
    use crate::model::safetensors_file::StDtype;

    use crate::util::f32_bits;

    /// Little-endian bytes as a vector of `T`.
    fn bytes_as<T: candle_core::WithDType>(b: &[u8]) -> Vec<T> {
        let n = b.len() / std::mem::size_of::<T>();
        let mut v = vec![T::from_f64(0.0); n];
        // SAFETY: `v` holds n plain numbers, initialised; the copy fills exactly its bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                v.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            )
        };
        v
    }

    /// The fast CPU path must make exactly what `from_raw` makes, bit for bit, for every
    /// stored/compute dtype pair it accepts — including NaN, infinities and subnormals.
    #[test]
    fn spans_path_is_bit_identical_to_from_raw() {
        let (i, h) = (3usize, 5usize);
        for (st, esize) in [(StDtype::BF16, 2), (StDtype::F16, 2), (StDtype::F32, 4)] {
            let part = |name: &str, shape: Vec<usize>, seed: u8| RawPart {
                name: name.into(),
                dtype: st,
                shape,
                bytes: (0..i * h * esize)
                    .map(|b| (b as u8).wrapping_mul(37).wrapping_add(seed))
                    .collect(),
                scale: None,
            };
            let raw = RawExpert {
                layer: 0,
                expert: 0,
                parts: [
                    part("g", vec![i, h], 1),
                    part("u", vec![i, h], 99),
                    part("d", vec![h, i], 200),
                ],
            };
            let mut buf = Vec::new();
            let mut spans = Vec::new();
            for p in &raw.parts {
                let at = buf.len();
                buf.extend_from_slice(&p.bytes);
                spans.push(PartSpan {
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    range: at..buf.len(),
                    scale: None,
                });
            }
            let spans: [PartSpan; 3] = spans.try_into().unwrap();
            let src = st.float_dtype().unwrap();
            for dtype in [DType::F32, src] {
                let fast = from_spans_exact(&buf, &spans, dtype)
                    .unwrap_or_else(|| panic!("{st:?} -> {dtype:?} has a fast path"));
                let slow = from_raw(&raw, None, dtype, &Device::Cpu).unwrap();
                let ((fg, fd), (sg, sd)) = (fast.dense().unwrap(), slow.dense().unwrap());
                for (a, b) in [(fg, sg), (fd, sd)] {
                    assert_eq!(a.dims(), b.dims());
                    assert_eq!(f32_bits(a), f32_bits(b), "{st:?} -> {dtype:?}");
                }
            }
            // A narrowing conversion is not "exact": no fast path.
            if src == DType::F32 {
                assert!(from_spans_exact(&buf, &spans, DType::BF16).is_none());
            }
            // Read straight into the tensors' storage: the same bits again, as views of one
            // tensor; the buffer comes back for any other dtype or layout.
            let whole = |b: &[u8]| -> Vec<u8> { b.to_vec() };
            let in_place = match src {
                DType::BF16 => from_whole_buffer(bytes_as::<half::bf16>(&whole(&buf)), &spans, src)
                    .map_err(|_| ()),
                DType::F16 => from_whole_buffer(bytes_as::<half::f16>(&whole(&buf)), &spans, src)
                    .map_err(|_| ()),
                _ => from_whole_buffer(bytes_as::<f32>(&whole(&buf)), &spans, src).map_err(|_| ()),
            }
            .expect("same dtype, back to back: read in place");
            let slow = from_raw(&raw, None, src, &Device::Cpu).unwrap();
            let ((a1, a2), (b1, b2)) = (in_place.dense().unwrap(), slow.dense().unwrap());
            for (a, b) in [(a1, b1), (a2, b2)] {
                assert_eq!(a.dims(), b.dims());
                assert!(a.is_contiguous());
                assert_eq!(f32_bits(a), f32_bits(b), "{st:?} in place");
            }
            let other = if src == DType::F32 {
                DType::BF16
            } else {
                DType::F32
            };
            assert!(
                from_whole_buffer(
                    bytes_as::<f32>(&whole(&buf[..buf.len() / 4 * 4])),
                    &spans,
                    other
                )
                .is_err()
            );
            let mut swapped = spans.clone();
            swapped.swap(0, 1);
            assert!(
                from_whole_buffer(
                    bytes_as::<f32>(&whole(&buf[..buf.len() / 4 * 4])),
                    &swapped,
                    DType::F32
                )
                .is_err()
            );
        }
    }

    /// Blocks copied once from several parts are the blocks `qtensor_from_ggml` makes of the
    /// parts concatenated: same dequantised bits; a size that does not fill the shape is an error.
    /// The GPU block layout of every expert of the GGUF fixtures (llama.cpp's conversions: Q8_0,
    /// Q4_K_M's Q4_K gate/up with Q6_K or Q4_K down, IQ4_XS, IQ4_NL, MXFP4_MOE) is what the file
    /// stores — its
    /// types, and byte counts equal to each part's — and on a CPU none is taken (candle's
    /// products keep the experts there).
    #[test]
    fn gguf_experts_block_layouts_are_their_parts_as_stored() {
        use super::super::source::ExpertSource;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut downs = std::collections::BTreeSet::new();
        for kind in ["Q8_0", "Q4_K_M", "IQ4_XS", "IQ4_NL", "MXFP4_MOE"] {
            let path = root.join(format!("tests/fixtures/gguf/kquant-{kind}.gguf"));
            let cfg = &crate::model::MoeConfig::from_dir(&path).unwrap();
            let ckpt = crate::model::Checkpoint::open(&path).unwrap();
            let source = super::super::source::ShardSource::new(&ckpt, cfg).unwrap();
            for layer in cfg.moe_layers() {
                for e in 0..cfg.num_experts {
                    let locs = source.part_locations(layer, e).unwrap();
                    let parts = locs.each_ref().map(|l| (l.dtype, l.shape.as_slice()));
                    let l = block_layout(parts).expect("these parts have a block layout");
                    assert_eq!([l.gate, l.up, l.down], locs.each_ref().map(|p| p.dtype));
                    assert_eq!(
                        [l.gate_bytes(), l.up_bytes(), l.down_bytes()],
                        locs.each_ref().map(|p| p.len as usize),
                        "{kind} {layer}/{e}"
                    );
                    downs.insert(format!("{:?}", l.down));
                    assert!(gpu_block_layout(parts, DType::BF16, &Device::Cpu).is_none());
                    let raw = source.read(layer, e).unwrap();
                    let w = from_raw(&raw, None, DType::BF16, &Device::Cpu).unwrap();
                    assert!(w.block_parts().is_none(), "CPU experts stay candle's");
                }
            }
            assert!(gpu_block_layouts(&source, DType::BF16, &Device::Cpu).is_none());
        }
        assert_eq!(
            downs.len(),
            6,
            "Q8_0, Q4_K, Q6_K, IQ4_XS, IQ4_NL and MXFP4 down stacks: {downs:?}"
        );
        // Shapes the kernels cannot take: a float part, gate and up apart in shape, down not
        // [H, I].
        let (q, f) = (StDtype::Q4K, StDtype::F16);
        let (a, b): (&[usize], &[usize]) = (&[256, 512], &[512, 256]);
        assert!(block_layout([(q, a), (q, a), (q, b)]).is_some());
        assert!(block_layout([(q, a), (f, a), (q, b)]).is_none());
        assert!(block_layout([(q, a), (q, b), (q, b)]).is_none());
        assert!(block_layout([(q, a), (q, a), (q, a)]).is_none());
    }

    /// On a GPU in bf16 the MXFP4_MOE fixture's experts are taken by the block kernels as
    /// stored; one whose scale byte is E8M0's NaN is refused naming the tensor, row and block,
    /// as the CPU refuses it.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_table_coded_experts_are_blocks_and_bad_scales_refused() {
        use super::super::source::ExpertSource;
        let Some(dev) = crate::util::gpu_test::device("table-coded expert load") else {
            return;
        };
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = root.join("tests/fixtures/gguf/kquant-MXFP4_MOE.gguf");
        let cfg = &crate::model::MoeConfig::from_dir(&path).unwrap();
        let ckpt = crate::model::Checkpoint::open(&path).unwrap();
        let source = super::super::source::ShardSource::new(&ckpt, cfg).unwrap();
        let mut raw = source.read(0, 1).unwrap();
        let w = from_raw(&raw, None, DType::BF16, &dev).unwrap();
        assert!(w.block_parts().is_some(), "MXFP4 experts held as blocks");
        // Row 1, block 2 of the down matrix (rows of intermediate / 32 blocks of 17 bytes).
        let per_row = cfg.moe_intermediate_size / 32;
        raw.parts[2].bytes[(per_row + 2) * 17] = 0xFF;
        let e = from_raw(&raw, None, DType::BF16, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.ffn_down_exps.weight")
                && e.contains("row 1 block 2")
                && e.contains("0xFF"),
            "{e}"
        );
    }

    #[test]
    fn block_tensor_from_parts_is_the_concatenations() {
        use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml};
        let (rows, cols) = (8usize, 512usize);
        let t = crate::util::test_matrix(rows, cols, 0, 1013, 0.002);
        for g in [
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
        ] {
            let bytes = QTensor::quantize(&t, g).unwrap().data().unwrap().to_vec();
            let (a, b) = bytes.split_at(bytes.len() / 2);
            let ours = qtensor_of_parts(g, &[a, b], &[rows, cols], &Device::Cpu)
                .expect("a CPU block type")
                .unwrap();
            let theirs = qtensor_from_ggml(g, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
            let (x, y) = (
                ours.dequantize(&Device::Cpu).unwrap(),
                theirs.dequantize(&Device::Cpu).unwrap(),
            );
            assert_eq!(f32_bits(&x), f32_bits(&y), "{g:?}");
            let short = qtensor_of_parts(g, &[a], &[rows, cols], &Device::Cpu).unwrap();
            assert!(short.unwrap_err().to_string().contains("expected"), "{g:?}");
        }
    }
}
