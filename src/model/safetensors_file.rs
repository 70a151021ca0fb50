//! One `.safetensors` file: memory-mapped, header parsed and checked, tensors addressable by name.
//!
//! We parse the header ourselves instead of calling `safetensors::SafeTensors::read_metadata`
//! because a user with a damaged 60 GiB checkpoint needs to know *which* tensor is wrong and how
//! (the library reports "invalid offset" or "incomplete buffer" without the numbers), and because
//! a checkpoint whose unused tensors are damaged must still run: we check every entry's own bounds,
//! not that the file is one contiguous, complete buffer.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde_json::Value;

use super::error::{ModelError, Result};

/// The safetensors format caps the JSON header at 100 MB; a larger length means a damaged file.
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types that can appear in a checkpoint. Only the float ones can be computed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StDtype {
    BF16,
    F16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    BOOL,
    F8E4M3,
    F8E5M2,
    /// GGML block-quantized types: only GGUF files hold them (safetensors never names them, so
    /// [`StDtype::parse`] does not accept them). Stored as blocks of
    /// [`block_size`](candle_core::quantized::GgmlDType::block_size) elements.
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// GGUF block types of 4-bit codes through a 16-value table, which candle does not read and
    /// moescope decodes itself (see `model/lut4.rs`): MXFP4 (llama.cpp's `MXFP4_MOE` files hold
    /// their experts so), IQ4_NL and IQ4_XS (`IQ4_XS` files: experts and attention). Experts are
    /// kept as stored; anything else is widened at load.
    Lut4(super::lut4::Lut4),
}

impl StDtype {
    /// The table-coded type, if it is one (see [`super::lut4`]).
    pub fn lut4(self) -> Option<super::lut4::Lut4> {
        match self {
            Self::Lut4(f) => Some(f),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BF16" => Self::BF16,
            "F16" => Self::F16,
            "F32" => Self::F32,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U8" => Self::U8,
            "U16" => Self::U16,
            "U32" => Self::U32,
            "U64" => Self::U64,
            "BOOL" => Self::BOOL,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes `elems` elements take as stored; None when they overflow or do not fill whole
    /// blocks of a quantized type.
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let plain = match self {
            Self::BF16 | Self::F16 | Self::I16 | Self::U16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::I8 | Self::U8 | Self::BOOL | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::Lut4(f) => {
                let per = f.block_weights() as u64;
                let blocks = elems.is_multiple_of(per).then_some(elems / per)?;
                return blocks.checked_mul(f.block_bytes() as u64);
            }
            _ => {
                let g = self.ggml()?;
                let block = g.block_size() as u64;
                return elems
                    .is_multiple_of(block)
                    .then(|| (elems / block).checked_mul(g.type_size() as u64))?;
            }
        };
        elems.checked_mul(plain)
    }

    /// Elements per block of a block-stored dtype (GGML's types and the table-coded ones); None
    /// for plain ones.
    pub fn block_elems(self) -> Option<u64> {
        match self {
            Self::Lut4(f) => Some(f.block_weights() as u64),
            _ => self.ggml().map(|g| g.block_size() as u64),
        }
    }

    /// The GGML type of a block-quantized dtype candle reads (None for plain ones and the
    /// table-coded ones).
    pub fn ggml(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType as G;
        Some(match self {
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
            Self::Q2K => G::Q2K,
            Self::Q3K => G::Q3K,
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
            _ => return None,
        })
    }

    /// The dtype a GGUF tensor of GGML type `g` is stored in (None for types moescope does not
    /// read: Q8_1 and Q8_K are only ever activations).
    pub fn from_ggml(g: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match g {
            G::F32 => Self::F32,
            G::F16 => Self::F16,
            G::BF16 => Self::BF16,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q2K => Self::Q2K,
            G::Q3K => Self::Q3K,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            G::Q8_1 | G::Q8K => return None,
        })
    }

    /// Whether a tensor of this dtype can be turned into weights (plain floats, or a quantized
    /// type dequantised or multiplied as it is).
    pub fn is_weight(self) -> bool {
        self.float_dtype().is_some() || self.ggml().is_some()
    }

    /// The candle dtype for weights we can compute with (float types only).
    pub fn float_dtype(self) -> Option<DType> {
        match self {
            Self::BF16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
            Self::F32 => Some(DType::F32),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            Self::BF16 => D::BF16,
            Self::F16 => D::F16,
            Self::F32 => D::F32,
            Self::F64 => D::F64,
            Self::I64 => D::I64,
            Self::I32 => D::I32,
            Self::I16 => D::I16,
            Self::I8 => D::I8,
            Self::U8 => D::U8,
            Self::U16 => D::U16,
            Self::U32 => D::U32,
            Self::U64 => D::U64,
            Self::BOOL => D::BOOL,
            Self::F8E4M3 => D::F8_E4M3,
            Self::F8E5M2 => D::F8_E5M2,
            // Callers refuse quantized parts before writing safetensors (extract.rs); bytes
            // would be written as they are, never reinterpreted.
            _ => D::U8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U8 => "U8",
            Self::U16 => "U16",
            Self::U32 => "U32",
            Self::U64 => "U64",
            Self::BOOL => "BOOL",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Lut4(f) => f.name(),
        }
    }
}

/// Where one tensor's bytes are, as absolute offsets in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    pub offset: u64,
    pub len: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            what: "opening safetensors file".into(),
            source: e,
        })?;
        // SAFETY: the map is read-only; a checkpoint modified while we run is outside what we
        // promise (as with every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            what: "memory-mapping safetensors file".into(),
            source: e,
        })?;
        let tensors = parse_header(&mmap, path)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    /// The raw bytes of a tensor (bounds were checked when the header was parsed).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.len) as usize]
    }

    /// Tells the kernel we are done with these pages of the mapping, so the copy we made is the
    /// only one counted in this process's RSS (the page cache keeps them for the next reader).
    pub fn release(&self, info: &TensorInfo) {
        let page = page_size();
        let start = (info.offset as usize / page) * page;
        let end = (info.offset + info.len) as usize;
        if end > start {
            // SAFETY: DONTNEED on a read-only file mapping only drops our page-table entries; a
            // later access faults the (unchanged) file contents back in. No reference into the
            // range outlives this call: callers copy out of `bytes()` before releasing.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// Loads a tensor, converting it to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| ModelError::Tensor {
            file: self.path.clone(),
            tensor: name.into(),
            msg: "not in this file".into(),
        })?;
        let t = bytes_to_tensor(self.bytes(info), info, dtype, device).map_err(|e| {
            ModelError::Tensor {
                file: self.path.clone(),
                tensor: name.into(),
                msg: e.to_string(),
            }
        })?;
        self.release(info);
        Ok(t)
    }
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub struct OwnedTensor<'a> {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

struct ViewOf<'a>(&'a OwnedTensor<'a>);

impl safetensors::View for ViewOf<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.0.bytes)
    }
    fn data_len(&self) -> usize {
        self.0.bytes.len()
    }
}

/// Writes a safetensors file atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. A crash leaves either the old file, or none, or the complete new one.
pub fn write_atomic(
    path: &Path,
    tensors: &[OwnedTensor<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    use std::io::Write;
    let io_err = |what: &str, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        what: what.into(),
        source: e,
    };
    let bytes = safetensors::serialize(
        tensors.iter().map(|t| (t.name.clone(), ViewOf(t))),
        metadata,
    )
    .map_err(|e| ModelError::Checkpoint {
        file: path.to_path_buf(),
        msg: format!("serialising: {e}"),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp).map_err(|e| io_err("creating temporary file", e))?;
        f.write_all(&bytes).map_err(|e| io_err("writing", e))?;
        f.sync_all().map_err(|e| io_err("fsync", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming into place", e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Converts little-endian tensor bytes of `info.dtype` into a `dtype` tensor on `device`.
pub fn bytes_to_tensor(
    bytes: &[u8],
    info: &TensorInfo,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let Some(src) = info.dtype.float_dtype() else {
        candle_core::bail!(
            "dtype {} cannot be used as a weight (expected BF16, F16 or F32)",
            info.dtype.name()
        )
    };
    if src == dtype && !device.is_cpu() {
        // Straight to the device: no host-side copy first.
        return Tensor::from_raw_buffer(bytes, src, &info.shape, device);
    }
    let t = Tensor::from_raw_buffer(bytes, src, &info.shape, &Device::Cpu)?;
    let t = if src == dtype {
        t
    } else if (src, dtype) == (DType::BF16, DType::F16) {
        // candle's `to_dtype` converts one value per call; this one eight at a time, same bits.
        let f16 = {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("a tensor just made on the CPU is not on the CPU")
            };
            let start = layout.start_offset();
            let v = &cpu.as_slice::<half::bf16>()?[start..start + t.elem_count()];
            super::cpu_gemv::bf16_to_f16(v)
        };
        Tensor::from_vec(f16, t.shape(), &Device::Cpu)?
    } else {
        t.to_dtype(dtype)?
    };
    if device.is_cpu() {
        Ok(t)
    } else {
        t.to_device(device)
    }
}

/// Parses and checks a safetensors file's header from the file's bytes (`path` names it in
/// errors). Public so that the parser can be fuzzed on bytes alone.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<HashMap<String, TensorInfo>> {
    let err = |msg: String| ModelError::Checkpoint {
        file: path.to_path_buf(),
        msg,
    };
    let file_len = buf.len() as u64;
    if file_len < 8 {
        return Err(err(format!(
            "truncated: {file_len} bytes, but a safetensors file starts with an 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(err(format!(
            "header length {n} bytes is absurd (the format allows at most {MAX_HEADER_BYTES}); \
             not a safetensors file or damaged"
        )));
    }
    if 8 + n > file_len {
        return Err(err(format!(
            "truncated: header declares {n} bytes but the file has only {} after the length field",
            file_len - 8
        )));
    }
    let header = std::str::from_utf8(&buf[8..(8 + n) as usize])
        .map_err(|e| err(format!("header is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(header.trim_end_matches(' '))
        .map_err(|e| err(format!("header is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(err("header is not a JSON object".into()));
    };
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut out = HashMap::with_capacity(map.len());
    for (name, entry) in map {
        if name == "__metadata__" {
            continue;
        }
        let terr = |msg: String| ModelError::Tensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            msg,
        };
        let dtype_s = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| terr("header entry has no `dtype` string".into()))?;
        let dtype =
            StDtype::parse(dtype_s).ok_or_else(|| terr(format!("unknown dtype \"{dtype_s}\"")))?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| terr("header entry has no `shape` list".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| terr("shape has a non-integer dimension".into()))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| terr("header entry has no `data_offsets` [begin, end]".into()))?;
        let (begin, end) = offsets;
        if end < begin {
            return Err(terr(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        if end > data_len {
            return Err(terr(format!(
                "data_offsets [{begin}, {end}] lie beyond the end of the file (its data section \
                 has {data_len} bytes): truncated or damaged file"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        let expected = dtype
            .bytes_for(numel)
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if end - begin != expected {
            return Err(terr(format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {} needs {expected}",
                end - begin,
                dtype.name()
            )));
        }
        out.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                offset: data_start + begin,
                len: end - begin,
            },
        );
    }
    check_tiling(&out, data_start, data_len, path)?;
    Ok(out)
}

/// Each tensor's (begin, end, name), in the order its bytes sit: what the packing checks of both
/// container formats walk (this file's tiling, `gguf.rs`'s packing). `span` gives a tensor's
/// start and length. Ties (empty tensors share an offset) are broken by name, so that a message
/// naming one is the same on every run.
pub(super) fn spans_in_order<T>(
    tensors: &HashMap<String, T>,
    span: impl Fn(&T) -> (u64, u64),
) -> Vec<(u64, u64, &str)> {
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(name, t)| {
            let (at, len) = span(t);
            (at, at + len, name.as_str())
        })
        .collect();
    spans.sort_unstable();
    spans
}

/// The format's rule that the tensors tile the data section: sorted by offset, each begins where
/// the one before ends, the first at 0 and the last at the section's end. Why enforce it: a
/// tensor whose offsets were shifted or pointed at another tensor's bytes has the right length,
/// so every per-entry check passes and the model would run on someone else's weights. The
/// `safetensors` crate (and so every file transformers or HF's writers produce) holds to the same
/// rule, so nothing real is refused.
fn check_tiling(
    tensors: &HashMap<String, TensorInfo>,
    data_start: u64,
    data_len: u64,
    path: &Path,
) -> Result<()> {
    let spans = spans_in_order(tensors, |t| (t.offset - data_start, t.len));
    let mut at = 0u64;
    let mut before: Option<&str> = None;
    for &(begin, end, name) in &spans {
        if begin != at {
            let after = match before {
                Some(b) => format!("tensor `{b}` ends at {at}"),
                None => "the data section starts at 0".into(),
            };
            let what = if begin < at {
                "overlap the bytes of another tensor"
            } else {
                "leave a gap no tensor accounts for"
            };
            return Err(ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: name.to_string(),
                msg: format!(
                    "data_offsets [{begin}, {end}] {what}: {after}, and safetensors tensors must \
                     tile the data section in order (shifted offsets or a damaged header)"
                ),
            });
        }
        at = end;
        before = Some(name);
    }
    if at != data_len {
        return Err(ModelError::Checkpoint {
            file: path.to_path_buf(),
            msg: format!(
                "the tensors end at byte {at} of the data section, but it has {data_len}: {} \
                 bytes that no tensor accounts for (a header that lost an entry, or a damaged file)",
                data_len - at
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        p
    }

    #[test]
    fn reads_a_valid_file_and_converts() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [1.5f32, -2.0];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = write_file(
            dir.path(),
            "a.safetensors",
            r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &data,
        );
        let f = SafetensorsFile::open(&p).unwrap();
        let t = f.load("w", DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        let back: Vec<f32> = t.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        assert_eq!(back, vec![1.5, -2.0]);
        assert_eq!(f.info("w").unwrap().offset, 8 + 85);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases: Vec<(PathBuf, &str)> = vec![
            (
                {
                    let p = d.join("short.safetensors");
                    std::fs::write(&p, [1, 2, 3]).unwrap();
                    p
                },
                "truncated",
            ),
            (
                {
                    let p = d.join("absurd.safetensors");
                    let mut b = (u64::MAX / 2).to_le_bytes().to_vec();
                    b.extend_from_slice(b"{}");
                    std::fs::write(&p, b).unwrap();
                    p
                },
                "absurd",
            ),
            (
                {
                    let p = d.join("hdr.safetensors");
                    let mut b = 1000u64.to_le_bytes().to_vec();
                    b.extend_from_slice(b"{}");
                    std::fs::write(&p, b).unwrap();
                    p
                },
                "truncated",
            ),
            (
                write_file(
                    d,
                    "beyond.safetensors",
                    r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &[0u8; 8],
                ),
                "beyond the end",
            ),
            (
                write_file(
                    d,
                    "size.safetensors",
                    r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    &[0u8; 8],
                ),
                "needs 12",
            ),
            (
                write_file(d, "json.safetensors", "{nope", &[]),
                "not valid JSON",
            ),
            (
                // the right length, shifted onto the neighbour's bytes
                write_file(
                    d,
                    "shifted.safetensors",
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                        "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    &[0u8; 12],
                ),
                "`b`: data_offsets [4, 12] overlap",
            ),
            (
                write_file(
                    d,
                    "gap.safetensors",
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                        "b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                    &[0u8; 12],
                ),
                "`b`: data_offsets [8, 12] leave a gap",
            ),
            (
                write_file(
                    d,
                    "tail.safetensors",
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0u8; 12],
                ),
                "8 bytes that no tensor accounts for",
            ),
            (
                write_file(
                    d,
                    "dtype.safetensors",
                    r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                    &[0u8; 1],
                ),
                "unknown dtype",
            ),
        ];
        for (p, needle) in cases {
            let e = SafetensorsFile::open(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{}: {e}", p.display());
            assert!(e.contains(p.file_name().unwrap().to_str().unwrap()), "{e}");
        }
    }

    #[test]
    fn integer_tensors_cannot_be_weights() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(
            dir.path(),
            "i.safetensors",
            r#"{"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#,
            &[1, 2],
        );
        let f = SafetensorsFile::open(&p).unwrap();
        let e = f
            .load("w", DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("I8"), "{e}");
    }
}
