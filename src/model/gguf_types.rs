//! A second look at a GGUF header that candle's reader refused, to name what it could not read.
//!
//! Why: candle's reader stops at the first tensor whose GGML type it does not know with "unknown
//! dtype for tensor 23" — the 23 is the type id, not a tensor — and that is what a user with one
//! of the files people actually share (llama.cpp's i-quants such as `IQ4_XS`, the ternary
//! types) would read. This walk reads the same header on its own, only far enough to list each
//! tensor's name and type, so the error can say which tensor is stored in which type and what to
//! convert it to — or, for MXFP4, IQ4_NL and IQ4_XS, which moescope reads itself, hand candle
//! the header with those types rewritten ([`with_lut4_as_f32`]). It keeps only names and offsets and stops at the
//! first thing that does not parse (returning `None`: the caller keeps candle's message).

use std::io::{Read, Seek, SeekFrom};

/// GGML type ids candle's quantized module reads (its `GgmlDType::from_u32`).
const CANDLE_READS: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// The name llama.cpp gives GGML type `id` (`ggml.h`'s `ggml_type`), or `type N` for one it
/// does not define.
pub fn type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        _ => return format!("type {id}"),
    };
    name.to_string()
}

/// Each tensor (name, GGML type id) whose type candle cannot read, in header order; `None` when
/// the header does not parse this far (then there is nothing better to say than candle's
/// message).
pub fn unreadable_tensors<R: Read + Seek>(r: &mut R) -> Option<Vec<(String, u32)>> {
    let (tensors, _) = walk(r)?;
    Some(
        tensors
            .into_iter()
            .filter(|t| !CANDLE_READS.contains(&t.ty))
            .map(|t| (t.name, t.ty))
            .collect(),
    )
}

/// The tensor table's names and data offsets in header order — what candle's reader, which keeps
/// the tensors in a map, cannot tell: a name listed twice. None where the header does not parse.
pub fn tensor_table<R: Read + Seek>(r: &mut R) -> Option<Vec<(String, u64)>> {
    let (tensors, _) = walk(r)?;
    Some(tensors.into_iter().map(|t| (t.name, t.offset)).collect())
}

/// GGML's type id for MXFP4.
pub const MXFP4: u32 = 39;

/// For a header whose only types candle cannot read are the ones moescope decodes itself
/// (MXFP4, IQ4_NL, IQ4_XS: [`Lut4`](super::lut4::Lut4)): the header's bytes (up to the end of
/// the tensor table) with each such tensor's type rewritten to F32, and those tensors' names
/// and types. Why: candle's reader refuses the whole file at the first type it does not know,
/// and moescope reads these itself (`lut4.rs`); the rewrite keeps every length and offset, so
/// candle's reader then parses the rest — metadata, shapes, offsets, alignment — as it would
/// have, and the caller restores the type by name. None for anything else.
pub fn with_lut4_as_f32<R: Read + Seek>(r: &mut R) -> Option<(Vec<u8>, Vec<TypedName>)> {
    let (tensors, end) = walk(r)?;
    let foreign: Vec<&Walked> = tensors
        .iter()
        .filter(|t| !CANDLE_READS.contains(&t.ty))
        .collect();
    if foreign.is_empty()
        || foreign
            .iter()
            .any(|t| super::lut4::Lut4::from_ggml(t.ty).is_none())
    {
        return None;
    }
    let mut header = vec![0u8; usize::try_from(end).ok()?];
    r.seek(SeekFrom::Start(0)).ok()?;
    r.read_exact(&mut header).ok()?;
    let mut named = Vec::with_capacity(foreign.len());
    for t in &foreign {
        let at = usize::try_from(t.type_at).ok()?;
        header
            .get_mut(at..at + 4)?
            .copy_from_slice(&0u32.to_le_bytes());
        named.push((t.name.clone(), super::lut4::Lut4::from_ggml(t.ty)?));
    }
    Some((header, named))
}

/// A tensor's name and the table-coded type it is stored in.
pub type TypedName = (String, super::lut4::Lut4);

/// One entry of the tensor table: its name, type id, where the type id lies in the file (its
/// dims, `dims` of them, right before it) and whether they are 64-bit.
struct Walked {
    name: String,
    ty: u32,
    type_at: u64,
    dims: u32,
    wide: bool,
    /// The tensor's offset in the data section, as written.
    offset: u64,
}

/// The inverse of [`with_lut4_as_f32`], for a writer: in the GGUF file at `path`, each tensor
/// named in `marks` (written as a 16-bit placeholder of its bytes' length, since candle's
/// writer has none of these types either) gets its table-coded type and its real shape, slowest
/// dimension first as candle's shapes are. The data and every offset stay as written.
pub fn mark_lut4(
    path: &std::path::Path,
    marks: &[(String, Vec<usize>, super::lut4::Lut4)],
) -> std::io::Result<()> {
    use std::io::Write;
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let (tensors, _) =
        walk(&mut f).ok_or_else(|| bad("the GGUF header just written does not parse".into()))?;
    for (name, shape, format) in marks {
        let t = tensors
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| bad(format!("{name} is not in the file just written")))?;
        if !t.wide || t.dims as usize != shape.len() {
            return Err(bad(format!("{name}: placeholder of another rank")));
        }
        let mut patch = Vec::with_capacity(8 * shape.len() + 4);
        // GGUF lists dimensions fastest first.
        for &d in shape.iter().rev() {
            patch.extend_from_slice(&(d as u64).to_le_bytes());
        }
        patch.extend_from_slice(&format.ggml_type().to_le_bytes());
        f.seek(SeekFrom::Start(t.type_at - 8 * u64::from(t.dims)))?;
        f.write_all(&patch)?;
    }
    f.flush()
}

/// The tensor table, and the offset just past it; None where the header does not parse.
fn walk<R: Read + Seek>(r: &mut R) -> Option<(Vec<Walked>, u64)> {
    r.seek(SeekFrom::Start(0)).ok()?;
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" {
        return None;
    }
    let version = u32_of(r)?;
    // Version 1 wrote its counts and lengths in 32 bits, later ones in 64.
    let wide = match version {
        1 => false,
        2 | 3 => true,
        _ => return None,
    };
    let len = |r: &mut R| -> Option<u64> {
        if wide {
            u64_of(r)
        } else {
            u32_of(r).map(u64::from)
        }
    };
    let tensors = len(r)?;
    let kvs = len(r)?;
    for _ in 0..kvs {
        skip_string(r, wide)?;
        let ty = u32_of(r)?;
        skip_value(r, ty, wide, 0)?;
    }
    let mut out = Vec::new();
    for _ in 0..tensors {
        let name = read_name(r, wide)?;
        let dims = u32_of(r)?;
        if dims > 8 {
            return None;
        }
        for _ in 0..dims {
            len(r)?;
        }
        let type_at = r.stream_position().ok()?;
        let ty = u32_of(r)?;
        let offset = u64_of(r)?;
        out.push(Walked {
            name,
            ty,
            type_at,
            dims,
            wide,
            offset,
        });
    }
    Some((out, r.stream_position().ok()?))
}

/// The error message for a file whose tensors `found` are in types candle cannot read:
/// the first one by name, how many more and of which types, and what to do.
pub fn unreadable_message(found: &[(String, u32)]) -> String {
    let (_, ty) = &found[0];
    let mut types: Vec<String> = found.iter().map(|(_, t)| type_name(*t)).collect();
    types.sort();
    types.dedup();
    let others = match found.len() - 1 {
        0 => String::new(),
        n => format!(
            " (and {n} more tensor{} in {})",
            if n == 1 { "" } else { "s" },
            types.join(", ")
        ),
    };
    format!(
        "stored as {} (GGML type {ty}){others}, which moescope cannot compute with: it reads \
         F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the k-quants Q2_K–Q6_K, MXFP4, IQ4_NL \
         and IQ4_XS (so Q4_K_M, Q5_K_M, Q6_K, Q8_0, MXFP4_MOE, IQ4_NL and IQ4_XS files), not \
         llama.cpp's other i-quants (IQ1–IQ3) or ternary (TQ*) types — requantize the original \
         with `llama-quantize … Q4_K_M` (or IQ4_XS, Q8_0)",
        type_name(*ty)
    )
}

fn u32_of<R: Read>(r: &mut R) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn u64_of<R: Read>(r: &mut R) -> Option<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn string_len<R: Read>(r: &mut R, wide: bool) -> Option<u64> {
    if wide {
        u64_of(r)
    } else {
        u32_of(r).map(u64::from)
    }
}

/// Skips `n` bytes. A seek, not a read: a hostile length must not read the file through. (On a
/// `BufReader` a seek drops the buffer; `gguf::Positioned`, which `GgufFile` reads through,
/// keeps it.)
fn skip<R: Seek>(r: &mut R, n: u64) -> Option<()> {
    r.seek(SeekFrom::Current(i64::try_from(n).ok()?)).ok()?;
    Some(())
}

fn skip_string<R: Read + Seek>(r: &mut R, wide: bool) -> Option<()> {
    let n = string_len(r, wide)?;
    skip(r, n)
}

/// A tensor's name: read (names are short; a longer one is not a header we understand).
fn read_name<R: Read>(r: &mut R, wide: bool) -> Option<String> {
    let n = string_len(r, wide)?;
    if n > 4096 {
        return None;
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b).ok()?;
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// Skips one metadata value of GGUF value type `ty` (arrays nest at most a few deep).
fn skip_value<R: Read + Seek>(r: &mut R, ty: u32, wide: bool, depth: u32) -> Option<()> {
    match ty {
        // u8, i8, bool
        0 | 1 | 7 => skip(r, 1),
        // u16, i16
        2 | 3 => skip(r, 2),
        // u32, i32, f32
        4..=6 => skip(r, 4),
        // u64, i64, f64
        10..=12 => skip(r, 8),
        8 => skip_string(r, wide),
        9 if depth < 4 => {
            let elem = u32_of(r)?;
            let n = string_len(r, wide)?;
            let fixed = match elem {
                0 | 1 | 7 => Some(1u64),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            };
            match fixed {
                Some(size) => skip(r, n.checked_mul(size)?),
                None => {
                    for _ in 0..n {
                        skip_value(r, elem, wide, depth + 1)?;
                    }
                    Some(())
                }
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A version-3 header: one string key, one array of strings, two tensors.
    fn header(types: [u32; 2]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kvs
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "qwen3moe");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        for (name, ty) in ["blk.0.ffn_down_exps.weight", "output.weight"]
            .iter()
            .zip(types)
        {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn names_the_tensors_candle_cannot_read() {
        let found = unreadable_tensors(&mut Cursor::new(header([16, 39]))).unwrap();
        assert_eq!(
            found,
            vec![
                ("blk.0.ffn_down_exps.weight".to_string(), 16),
                ("output.weight".to_string(), 39)
            ]
        );
        let msg = unreadable_message(&found);
        assert!(
            msg.starts_with(
                "stored as IQ2_XXS (GGML type 16) (and 1 more tensor in IQ2_XXS, MXFP4)"
            ),
            "{msg}"
        );
        let none = unreadable_tensors(&mut Cursor::new(header([12, 14]))).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn table_coded_tensors_are_handed_to_candle_as_f32_and_named() {
        use super::super::lut4::Lut4;
        use candle_core::quantized::{GgmlDType, gguf_file::Content};
        for (ty, format) in [(39, Lut4::Mxfp4), (20, Lut4::Iq4Nl), (23, Lut4::Iq4Xs)] {
            let h = header([ty, 12]);
            assert!(
                Content::read(&mut Cursor::new(&h)).is_err(),
                "candle reads {format} now?"
            );
            let (patched, names) = with_lut4_as_f32(&mut Cursor::new(h.clone())).unwrap();
            assert_eq!(
                names,
                vec![("blk.0.ffn_down_exps.weight".to_string(), format)]
            );
            assert_eq!(patched.len(), h.len(), "the whole table, nothing after it");
            let c = Content::read(&mut Cursor::new(&patched)).unwrap();
            let t = &c.tensor_infos["blk.0.ffn_down_exps.weight"];
            assert_eq!(t.ggml_dtype, GgmlDType::F32);
            assert_eq!(t.shape.dims(), [4, 256]);
            assert_eq!(c.tensor_infos["output.weight"].ggml_dtype, GgmlDType::Q4K);
            for n in 0..h.len() {
                assert!(with_lut4_as_f32(&mut Cursor::new(&h[..n])).is_none(), "{n}");
            }
        }
        let (_, names) = with_lut4_as_f32(&mut Cursor::new(header([39, 23]))).unwrap();
        assert_eq!(names[1], ("output.weight".to_string(), Lut4::Iq4Xs));
        // Other types candle cannot read are not rewritten: the file is refused as before.
        assert!(with_lut4_as_f32(&mut Cursor::new(header([39, 16]))).is_none());
        assert!(with_lut4_as_f32(&mut Cursor::new(header([12, 14]))).is_none());
    }

    #[test]
    fn a_header_cut_anywhere_gives_none_not_a_panic() {
        let h = header([23, 0]);
        for n in 0..h.len() {
            assert_eq!(unreadable_tensors(&mut Cursor::new(&h[..n])), None, "{n}");
        }
        let mut huge = header([23, 0]);
        // An array claiming 2^62 strings ends at the end of the bytes, not in a long loop.
        let at = huge
            .windows(8)
            .position(|w| w == 2u64.to_le_bytes())
            .unwrap();
        let arr = huge
            .windows(4)
            .rposition(|w| w == 9u32.to_le_bytes())
            .unwrap();
        assert!(at < arr);
        huge[arr + 8..arr + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert_eq!(unreadable_tensors(&mut Cursor::new(huge)), None);
    }
}
