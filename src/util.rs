//! Small helpers shared by several layers: byte sizes for humans, and back; the host's
//! available memory.

/// "1.5 GiB", "512 MiB", "12 KiB", "7 B".
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses "4GiB", "512 MiB", "4GB", "1.5G", "1000000" into bytes.
/// Binary units (KiB, MiB, GiB, TiB, and the bare K/M/G/T) are powers of 1024; KB/MB/GB/TB are
/// powers of 1000, as their SI names say.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        format!("bad size \"{s}\": expected a number with an optional unit (e.g. 4GiB)")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "bad size \"{s}\": unknown unit \"{other}\" (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let v = num * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("bad size \"{s}\": out of range"));
    }
    Ok(v.round() as u64)
}

/// Writes a file atomically and durably: a temporary beside it, fsynced, renamed over it, the
/// directory fsynced — so after a crash or a power cut the file is the old one or the new one,
/// never half of either. A failed write leaves no temporary behind.
pub fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// The host's available memory (MemAvailable), bytes; 0 when it cannot be read.
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| {
            sysinfo::System::new()
                .map(|mut s| {
                    s.refresh_memory();
                    s.available_memory()
                })
                .unwrap_or(0)
        })
}

/// A file shipped with the repository (prompts, themes): relative to the working directory when
/// it is there, else to the source tree this binary was built from.
pub fn repo_file(rel: &str) -> std::path::PathBuf {
    let local = std::path::PathBuf::from(rel);
    if local.exists() {
        return local;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A deterministic [rows, cols] f32 matrix for tests: element i is
/// `((i + seed) · 7919 mod m − ⌊m/2⌋) · scale`, so values spread evenly over about ±m/2 · scale
/// with no pattern a kernel could be lucky on.
#[cfg(test)]
pub(crate) fn test_matrix(
    rows: usize,
    cols: usize,
    seed: usize,
    m: usize,
    scale: f32,
) -> candle_core::Tensor {
    candle_core::Tensor::from_vec(
        (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % m) as f32 - (m / 2) as f32) * scale)
            .collect::<Vec<_>>(),
        (rows, cols),
        &candle_core::Device::Cpu,
    )
    .expect("a CPU tensor of the given size")
}

/// A tensor's values as f32 bits, for tests that compare results bit for bit: widening to f32 is
/// exact for every storage dtype, so NaN payloads and all compare.
#[cfg(test)]
pub(crate) fn f32_bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F32)
        .expect("a tensor widens to f32")
        .flatten_all()
        .expect("a tensor flattens")
        .to_vec1::<f32>()
        .expect("f32 values")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// What the GPU kernels' unit tests share (`model::attn_decode`, `model::moe_decode`): they run
/// where a CUDA device is (`scripts/gpu_unit_tests.sh`) and skip, saying so, where none is.
#[cfg(all(test, feature = "cuda"))]
pub(crate) mod gpu_test {
    use candle_core::{DType, Device, Tensor};

    /// The first CUDA device, or None after a line saying which tests it skips.
    pub fn device(tests: &str) -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("no CUDA device ({e}): the {tests} tests need one, skipped");
                None
            }
        }
    }

    /// Values rounded to 8-bit blocks as the GGUF kernels' `quantize_q8_bf16` documents it: per
    /// 32 values d = max|x| / 127 and q = round(x / d) (0 for an all-zero block; d NaN and q 0
    /// where the block holds a NaN). The codes and the scales.
    pub fn q8_blocks(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let (mut q, mut d) = (Vec::new(), Vec::new());
        for b in x.chunks(32) {
            let nan = b.iter().any(|v| v.is_nan());
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if nan { f32::NAN } else { amax / 127.0 };
            d.push(s);
            q.extend(b.iter().map(|&v| {
                if amax == 0.0 || nan {
                    0
                } else {
                    (v / s).round() as i8
                }
            }));
        }
        (q, d)
    }

    /// [`q8_blocks`]'s values as f64 (code × scale): what the GGUF kernels multiply.
    pub fn q8_values(x: &[f32]) -> Vec<f64> {
        let (q, d) = q8_blocks(x);
        q.iter()
            .enumerate()
            .map(|(i, &c)| c as f64 * d[i / 32] as f64)
            .collect()
    }

    /// A tensor's values as f32 on the host, flattened.
    pub fn host(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("a tensor readable as f32")
    }

    /// [`super::test_matrix`] rounded to bf16 on `dev`, and its values on the host.
    pub fn bf16_matrix(
        rows: usize,
        cols: usize,
        seed: usize,
        m: usize,
        scale: f32,
        dev: &Device,
    ) -> (Tensor, Vec<f32>) {
        let t = super::test_matrix(rows, cols, seed, m, scale)
            .to_dtype(DType::BF16)
            .expect("bf16");
        let values = host(&t);
        (t.to_device(dev).expect("on the device"), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_sizes() {
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(
            parse_bytes("4 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_bytes("lots").is_err());
        assert_eq!(fmt_bytes(9 << 20), "9.00 MiB");
        assert_eq!(fmt_bytes(3), "3 B");
        assert_eq!(fmt_bytes(66 << 30), "66.0 GiB");
    }
}
