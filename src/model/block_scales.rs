//! Whether a block-quantized matrix's scales are numbers. GGML's block types store each block's
//! scale (and for some a minimum) as an f16 at a fixed place in the block; a NaN or infinite
//! one decodes its whole block to NaN. candle computes with them as they are, and a GPU slot
//! pool copies a missed expert's blocks as stored, so without this a damaged scale shows only as
//! "logits not finite" — `verify` reads them (BENCHMARKS.md §115).

use super::safetensors_file::StDtype;

/// A block's f16 scale fields: (name, byte offset in the block).
type Fields = &'static [(&'static str, usize)];

/// Per block type: block bytes, weights a block, and the f16 fields that scale it. Layouts are
/// ggml's `block_q*` structs.
fn layout(dtype: StDtype) -> Option<(usize, usize, Fields)> {
    const D0: Fields = &[("d", 0)];
    const DM: Fields = &[("d", 0), ("m", 2)];
    const K_DMIN: Fields = &[("d", 0), ("dmin", 2)];
    Some(match dtype {
        StDtype::Q4_0 => (18, 32, D0),
        StDtype::Q4_1 => (20, 32, DM),
        StDtype::Q5_0 => (22, 32, D0),
        StDtype::Q5_1 => (24, 32, DM),
        StDtype::Q8_0 => (34, 32, D0),
        // scales[16], qs[64], then d and dmin.
        StDtype::Q2K => (84, 256, &[("d", 80), ("dmin", 82)]),
        // hmask[32], qs[64], scales[12], then d.
        StDtype::Q3K => (110, 256, &[("d", 108)]),
        StDtype::Q4K => (144, 256, K_DMIN),
        StDtype::Q5K => (176, 256, K_DMIN),
        // ql[128], qh[64], scales[16], then d.
        StDtype::Q6K => (210, 256, &[("d", 208)]),
        _ => return None,
    })
}

/// Checks every block's scale fields in `bytes` (whole blocks of `dtype`, rows of `cols`
/// weights): the first that is not finite is named by row, block and field. Table-coded types go
/// to their own check (`lut4::check_scales`); other types have nothing to check.
pub fn check(dtype: StDtype, bytes: &[u8], cols: usize) -> Result<(), String> {
    if let Some(format) = dtype.lut4() {
        return super::lut4::check_scales(format, bytes, cols);
    }
    let Some((block_bytes, weights, fields)) = layout(dtype) else {
        return Ok(());
    };
    let per_row = (cols / weights).max(1);
    for (at, b) in bytes.chunks_exact(block_bytes).enumerate() {
        for &(name, off) in fields {
            let v = half::f16::from_le_bytes([b[off], b[off + 1]]);
            if !v.is_finite() {
                return Err(format!(
                    "row {} block {} has scale {name} = {v} (f16 bits {:#06x})",
                    at / per_row,
                    at % per_row,
                    v.to_bits()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For every block type, a NaN or infinite value in each of its scale fields is named by
    /// row, block and field, and the same bytes with the field finite pass; the layouts' sizes
    /// are candle's; a type without scales passes whatever its bytes.
    #[test]
    fn every_scale_field_of_every_block_type_is_read() {
        use candle_core::quantized::GgmlDType as G;
        let types = [
            (StDtype::Q4_0, G::Q4_0),
            (StDtype::Q4_1, G::Q4_1),
            (StDtype::Q5_0, G::Q5_0),
            (StDtype::Q5_1, G::Q5_1),
            (StDtype::Q8_0, G::Q8_0),
            (StDtype::Q2K, G::Q2K),
            (StDtype::Q3K, G::Q3K),
            (StDtype::Q4K, G::Q4K),
            (StDtype::Q5K, G::Q5K),
            (StDtype::Q6K, G::Q6K),
        ];
        for (dtype, g) in types {
            let (block, weights, fields) = layout(dtype).unwrap();
            assert_eq!(
                (block, weights),
                (g.type_size(), g.block_size()),
                "{dtype:?}"
            );
            // Two rows of three blocks, every byte 0x11 (f16 0x1111 is a small finite number).
            let cols = 3 * weights;
            let good = vec![0x11u8; 6 * block];
            check(dtype, &good, cols).unwrap();
            for &(name, off) in fields {
                for bad in [half::f16::NAN, half::f16::INFINITY, half::f16::NEG_INFINITY] {
                    let mut b = good.clone();
                    // Row 1, block 2: the sixth block.
                    let at = 5 * block + off;
                    b[at..at + 2].copy_from_slice(&bad.to_le_bytes());
                    let e = check(dtype, &b, cols).unwrap_err();
                    assert!(
                        e.starts_with(&format!("row 1 block 2 has scale {name} = ")),
                        "{dtype:?} {name} {bad}: {e}"
                    );
                }
            }
        }
        check(StDtype::F16, &[0xFF; 64], 32).unwrap();
        check(StDtype::BF16, &[0xFF; 64], 32).unwrap();
        let mxfp4 = StDtype::Lut4(crate::model::lut4::Lut4::Mxfp4);
        let e = check(mxfp4, &[0xFF; 17], 32).unwrap_err();
        assert!(e.contains("0xFF"), "{e}");
    }
}
