//! A bf16 matrix read in place from a checkpoint file's pages: a map of its byte range, its pages
//! populated when made, unmapped when dropped.
//!
//! Why: on the CPU an expert miss that copies its bytes out of the page cache (`pread`) spends
//! most of its time in that copy — 3 MiB cost ~350 µs to copy and ~70 µs to map
//! (BENCHMARKS.md §68). Where the compute dtype is the stored one (bf16), the map can *be* the
//! cache's slot: the expert kernels read the rows where the page cache holds them. The process's
//! resident memory still shows what the cache holds — a mapped page counts in its RSS (as
//! file-backed) while the slot lives, and leaves it when the slot is evicted.
//!
//! The one risk a map adds over a copy: a checkpoint file truncated by another process while
//! mapped faults the reader (SIGBUS), as with every mmap-based loader (the native loader maps
//! the same files).

use std::fs::File;

use half::bf16;
use memmap2::{Mmap, MmapOptions};

/// `rows × cols` bf16 values, row-major, mapped from a file.
pub struct MappedBf16 {
    map: Mmap,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for MappedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBf16 [{}, {}]", self.rows, self.cols)
    }
}

impl MappedBf16 {
    /// Maps `rows × cols` little-endian bf16 values of `file` from byte `offset`, populating the
    /// pages at once (one call instead of a fault a page). None where the values would not be
    /// 2-byte aligned in memory (an odd offset), or on a big-endian host; an error where the
    /// map fails (the caller then reads the bytes another way).
    pub fn map(
        file: &File,
        offset: u64,
        rows: usize,
        cols: usize,
    ) -> std::io::Result<Option<Self>> {
        if cfg!(target_endian = "big") || !offset.is_multiple_of(2) || rows == 0 || cols == 0 {
            return Ok(None);
        }
        let len = rows * cols * 2;
        if file.metadata()?.len() < offset + len as u64 {
            return Ok(None);
        }
        // SAFETY: a read-only map of a range the file holds (checked just above). Its bytes
        // are read as plain numbers, any bit pattern valid; a file truncated under the map
        // faults its reader, the risk the module's doc names.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(len)
                .populate()
                .map(file)?
        };
        if !(map.as_ptr() as usize).is_multiple_of(2) {
            return Ok(None);
        }
        Ok(Some(MappedBf16 { map, rows, cols }))
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The values, row after row.
    pub fn values(&self) -> &[bf16] {
        // SAFETY: the map holds rows · cols · 2 bytes from a 2-byte aligned address (checked in
        // `map`); bf16 is a plain 2-byte number, every bit pattern valid.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr() as *const bf16, self.rows * self.cols)
        }
    }

    /// The matrix as a CPU tensor (a copy), for the paths that take tensors.
    pub fn to_tensor(&self) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(
            self.values(),
            (self.rows, self.cols),
            &candle_core::Device::Cpu,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_the_values_at_any_even_offset_and_refuses_odd_ones_and_short_files() {
        let values: Vec<bf16> = (0..3 * 5 + 7)
            .map(|v| bf16::from_f32(v as f32 - 3.5))
            .collect();
        // The values start past a page, at an offset no page boundary divides.
        let mut bytes = vec![0x55u8; 4100];
        for v in &values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let f = File::open(&path).unwrap();
        let m = MappedBf16::map(&f, 4100 + 2 * 7, 3, 5).unwrap().unwrap();
        assert_eq!(m.dims(), [3, 5]);
        assert_eq!(m.values(), &values[7..]);
        let t = m.to_tensor().unwrap();
        assert_eq!(t.dims(), [3, 5]);
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<bf16>().unwrap(),
            &values[7..]
        );
        assert!(
            MappedBf16::map(&f, 4101, 3, 5).unwrap().is_none(),
            "odd offset"
        );
        assert!(
            MappedBf16::map(&f, 4100, 3, 10).unwrap().is_none(),
            "past the end"
        );
    }
}
