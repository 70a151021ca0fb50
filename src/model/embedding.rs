//! The token embedding: a dense table, or — a GGUF file's block-quantized `token_embd` on the
//! CPU — its rows kept in their block format and dequantised when a token is looked up.
//!
//! Why: a dense copy of a quantized embedding is the largest single tensor moescope would hold
//! (Qwen3-30B-A3B: 151,936 × 2,048 — 1.24 GB in f32 against 0.33 GB as Q8_0), and a token needs
//! one row of it. A row of a GGUF tensor is whole blocks, stored contiguously, so it dequantises
//! on its own to exactly the values the whole table would. On a GPU in bf16 a table of a type
//! moescope's block kernels decode stays in its blocks on the device too, and the looked-up rows
//! are dequantised there by one kernel over token ids on the device, so the decode step still
//! looks tokens up inside a CUDA graph; other GPU tables are dense.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};

#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Rows(QuantizedRows),
    DeviceRows(DeviceRows),
}

/// A block-quantized table on a GPU (U8 `[rows, row bytes]`, as stored), looked up by the block
/// kernels into bf16 rows.
#[derive(Debug, Clone)]
pub struct DeviceRows {
    table: Tensor,
    ggml: GgmlDType,
    cols: usize,
}

impl DeviceRows {
    /// `rows` copied to `device` as they are, when the block kernels decode its type and the
    /// compute dtype is bf16; None otherwise (the caller keeps a dense table).
    pub fn new(rows: &QuantizedRows, device: &Device) -> Result<Option<Self>> {
        if !device.is_cuda()
            || rows.dtype != DType::BF16
            || super::ports::GgmlLayout::kernel_type_ggml(rows.ggml).is_none()
        {
            return Ok(None);
        }
        let table = Tensor::from_slice(&rows.bytes, (rows.rows, rows.row_bytes()), device)?;
        Ok(Some(DeviceRows {
            table,
            ggml: rows.ggml,
            cols: rows.cols,
        }))
    }

    #[cfg(feature = "cuda")]
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        super::moe_decode::ggml_rows_bf16(&self.table, self.ggml, self.cols, ids)
    }

    #[cfg(not(feature = "cuda"))]
    fn lookup(&self, _: &Tensor) -> Result<Tensor> {
        Err(ModelError::Input(format!(
            "a {:?} table of {} values a row on a GPU needs a build with the cuda feature",
            self.ggml, self.cols
        )))
    }
}

/// A [rows, cols] block-quantized table, looked up row by row.
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    ggml: GgmlDType,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
    /// Rows come back in this dtype (the model's compute dtype).
    dtype: DType,
}

impl QuantizedRows {
    /// `bytes` as stored in the file for a [rows, cols] tensor of type `ggml`. Err names what
    /// does not fit: a row that is not whole blocks, or a byte count that is not rows × row size.
    pub fn new(
        ggml: GgmlDType,
        bytes: Vec<u8>,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> std::result::Result<Self, String> {
        let block = ggml.block_size();
        if block == 0 || !cols.is_multiple_of(block) {
            return Err(format!(
                "a row of {cols} values is not whole {ggml:?} blocks of {block}"
            ));
        }
        let want = rows * (cols / block) * ggml.type_size();
        if bytes.len() != want {
            return Err(format!(
                "{} bytes for {rows} × {cols} {ggml:?}, expected {want}",
                bytes.len()
            ));
        }
        Ok(QuantizedRows {
            ggml,
            bytes,
            rows,
            cols,
            dtype,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ggml.block_size() * self.ggml.type_size()
    }

    /// Rows `ids` as a [n, cols] tensor in the compute dtype.
    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let rb = self.row_bytes();
        let mut rows = Vec::with_capacity(ids.len());
        for &id in ids {
            let r = id as usize;
            if r >= self.rows {
                return Err(ModelError::Input(format!(
                    "token id {id} is out of range ({} embedding rows)",
                    self.rows
                )));
            }
            let q = qtensor_from_ggml(
                self.ggml,
                &self.bytes[r * rb..(r + 1) * rb],
                vec![1, self.cols],
                &Device::Cpu,
            )?;
            rows.push(q.dequantize(&Device::Cpu)?);
        }
        Ok(Tensor::cat(&rows, 0)?.to_dtype(self.dtype)?)
    }
}

impl Embedding {
    /// The rows of `ids` (u32 `[n]`, on the model's device).
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.index_select(ids, 0)?),
            Embedding::Rows(q) => q.lookup(&ids.to_vec1::<u32>()?),
            Embedding::DeviceRows(d) => d.lookup(ids),
        }
    }

    /// The dense table, where there is one (a tied, float lm_head shares it).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Embedding::Dense(t) => Some(t),
            Embedding::Rows(_) | Embedding::DeviceRows(_) => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        match self {
            Embedding::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Embedding::Rows(q) => q.bytes.len() as u64,
            Embedding::DeviceRows(d) => d.table.elem_count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// Each looked-up row has the bits the whole table dequantised and indexed would give.
    #[test]
    fn rows_are_the_whole_tables_rows() {
        let (rows, cols) = (40usize, 512usize);
        let t = crate::util::test_matrix(rows, cols, 0, 1009, 0.003);
        for ggml in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&t, ggml).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let whole = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let e = Embedding::Rows(
                QuantizedRows::new(ggml, bytes.clone(), rows, cols, DType::BF16).unwrap(),
            );
            let ids = Tensor::new(&[3u32, 0, 39, 3], &Device::Cpu).unwrap();
            let got = e.lookup(&ids).unwrap();
            let want = whole.index_select(&ids, 0).unwrap();
            let bits = |x: &Tensor| -> Vec<u16> {
                x.flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&got), bits(&want), "{ggml:?}");
            assert_eq!(e.bytes(), bytes.len() as u64);
            // Out of range: an error naming the id, not a panic.
            let bad = Tensor::new(&[40u32], &Device::Cpu).unwrap();
            let err = e.lookup(&bad).unwrap_err().to_string();
            assert!(err.contains("token id 40"), "{err}");
            // Bytes that do not fit the shape are refused by name.
            assert!(
                QuantizedRows::new(ggml, bytes[1..].to_vec(), rows, cols, DType::BF16).is_err()
            );
        }
        assert!(
            QuantizedRows::new(GgmlDType::Q8_0, vec![0; 34], 1, 48, DType::F32)
                .unwrap_err()
                .contains("not whole")
        );
    }
}
