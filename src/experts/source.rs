//! Where expert bytes come from. One trait, three places:
//! - [`ShardSource`]: straight from the checkpoint's safetensors shards, at the byte ranges the
//!   index gives (no extraction, no copy of the model);
//! - `extracted:DIR` (see `extract.rs`): one file per (layer, expert) made by `moescope extract`;
//! - `seedlayout:DIR` (see `seed.rs`): the earlier project's per-expert files, read-only.
//!
//! Reads use `pread` into our own buffer rather than a long-lived map of the whole file: the
//! bytes then live once, in the cache that owns them, and the process RSS shows exactly what the
//! cache holds. The one exception keeps that property: on the CPU, where the compute dtype is
//! the stored bf16, a shard's expert is mapped on its own (`map_bf16`) and the map *is* the
//! cache's slot — in RSS while the slot lives, unmapped when it is evicted — so a miss copies
//! nothing (BENCHMARKS.md §69).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::model::checkpoint::{Checkpoint, ExpertLocation, TensorLocation};
use crate::model::config::MoeConfig;
use crate::model::error::{ModelError, Result};
use crate::model::mapped::MappedBf16;
use crate::model::safetensors_file::{StDtype, TensorInfo};

/// One matrix of an expert, as stored.
#[derive(Debug, Clone)]
pub struct RawPart {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// An FP8 matrix's block scales, read with it.
    pub scale: Option<Box<RawPart>>,
}

impl RawPart {
    pub fn info(&self) -> TensorInfo {
        TensorInfo {
            dtype: self.dtype,
            shape: self.shape.clone(),
            offset: 0,
            len: self.bytes.len() as u64,
        }
    }
}

/// An expert's three matrices (gate, up, down) as read from a source.
#[derive(Debug, Clone)]
pub struct RawExpert {
    pub layer: usize,
    pub expert: usize,
    pub parts: [RawPart; 3],
}

impl RawExpert {
    /// Bytes as stored, scales included.
    pub fn bytes(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| (p.bytes.len() + p.scale.as_ref().map_or(0, |s| s.bytes.len())) as u64)
            .sum()
    }

    pub fn error(&self, msg: String) -> ModelError {
        ModelError::Expert {
            layer: self.layer,
            expert: self.expert,
            msg,
        }
    }
}

/// A place expert bytes can be read from.
pub trait ExpertSource: Send + Sync {
    fn config(&self) -> &MoeConfig;
    /// Whether (layer, expert) can be read at all.
    fn has(&self, layer: usize, expert: usize) -> bool;
    fn read(&self, layer: usize, expert: usize) -> Result<RawExpert>;
    /// Bytes of one expert as stored (for budgets and expected-memory figures).
    fn stored_bytes(&self, layer: usize, expert: usize) -> u64;
    /// Human description, e.g. "shards of /models/qwen".
    fn describe(&self) -> String;
    /// Cold mode: drop each expert's file pages from the page cache after reading it, so every
    /// miss costs a storage read.
    fn set_cold(&self, cold: bool);
    /// Whether cold mode is on.
    fn is_cold(&self) -> bool {
        false
    }

    /// Where the expert's three parts lie in files, for sources whose parts are plain byte
    /// ranges (a GPU cache can then copy them straight out of a registered mapping).
    fn part_locations(&self, _layer: usize, _expert: usize) -> Option<[TensorLocation; 3]> {
        None
    }

    /// [`read_into`](Self::read_into) into a buffer a host→device copy reads next (a GPU's
    /// staged misses): the same bytes, with the cache lines they were written into demoted out
    /// of the writing cores' private caches, so the copy does not have to snoop them there
    /// ([`super::demote`]; BENCHMARKS.md §73). The default demotes after the read, on the
    /// calling thread, which is where `read`-based sources wrote them.
    fn read_into_for_copy(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
    ) -> Result<[PartSpan; 3]> {
        let spans = self.read_into(layer, expert, buf)?;
        super::demote::written(&buf[..spans_end(&spans)]);
        Ok(spans)
    }

    /// [`read_into_for_copy`](Self::read_into_for_copy), handing the bytes over as they land:
    /// `ready(spans, filled)` each time the prefix of `buf` that is read grows (`filled`, back
    /// to back from 0 to the end of the last span), so a copy of the first bytes can start
    /// while the rest are read. Sources that `pread` read in pieces of `piece` bytes
    /// ([`read_locations_streamed`]); the default reads whole, then calls `ready` once.
    fn read_into_for_copy_streamed(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
        piece: usize,
        ready: &mut Ready<'_>,
    ) -> Result<[PartSpan; 3]> {
        let _ = piece;
        let spans = self.read_into_for_copy(layer, expert, buf)?;
        ready(&spans, 0..spans_end(&spans))?;
        Ok(spans)
    }

    /// [`read_into`](Self::read_into) into memory that need not be initialised, for sources
    /// that `pread` (no byte is read before it is written); `None` from the others, whose
    /// callers then use `read_into` on a cleared buffer. On `Some`, the bytes up to the end of
    /// the last span (scales included) are initialised.
    fn read_into_uninit(
        &self,
        _layer: usize,
        _expert: usize,
        _buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<Option<[PartSpan; 3]>> {
        Ok(None)
    }

    /// For block-quantized experts on the CPU: gate's then up's bytes into `gate_up`, down's
    /// into `down`, from the file straight into memory that need not be initialised (the typed
    /// block storage the products read), so a miss writes each byte once. `false` from sources
    /// that cannot, and for parts that do not fill these buffers exactly or carry scales; on
    /// `true` every byte of both buffers is written.
    fn read_split_into_uninit(
        &self,
        _layer: usize,
        _expert: usize,
        _gate_up: &mut [std::mem::MaybeUninit<u8>],
        _down: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<bool> {
        Ok(false)
    }

    /// For bf16 compute of bf16-stored experts on the CPU: the expert's matrices mapped in
    /// place (`crate::model::mapped`) — gate's rows then up's as one [2I, H] map, down [H, I] —
    /// so a miss copies nothing. None from sources that cannot, in cold mode (each miss is to
    /// come from storage), and for experts not stored so (other dtypes, gate and up apart in the
    /// file, a map refused): the caller then reads them.
    fn map_bf16(&self, _layer: usize, _expert: usize) -> Result<Option<(MappedBf16, MappedBf16)>> {
        Ok(None)
    }

    /// Reads the expert's three parts back to back into `buf` (at least `stored_bytes` long)
    /// and says where each landed. Sources that can `pread` override this so a GPU cache reads
    /// straight into its pinned staging buffer; the default copies out of [`read`](Self::read).
    fn read_into(&self, layer: usize, expert: usize, buf: &mut [u8]) -> Result<[PartSpan; 3]> {
        let raw = self.read(layer, expert)?;
        let mut at = 0;
        let mut put = |p: &RawPart| -> Result<PartSpan> {
            let end = at + p.bytes.len();
            let dst = buf.get_mut(at..end).ok_or_else(|| {
                raw.error(format!("staging buffer of {} bytes is too small", end))
            })?;
            dst.copy_from_slice(&p.bytes);
            at = end;
            Ok(PartSpan {
                dtype: p.dtype,
                shape: p.shape.clone(),
                range: at - p.bytes.len()..end,
                scale: None,
            })
        };
        let mut spans = Vec::with_capacity(3);
        for p in &raw.parts {
            spans.push(put(p)?);
        }
        // Scales after the three matrices, so the matrices stay back to back.
        for (span, p) in spans.iter_mut().zip(&raw.parts) {
            if let Some(s) = &p.scale {
                span.scale = Some(Box::new(put(s)?));
            }
        }
        Ok(spans.try_into().expect("three parts"))
    }
}

/// What a streamed read calls as its bytes land: the parts' spans, and the range of the buffer
/// just read (`ExpertSource::read_into_for_copy_streamed`).
pub type Ready<'a> = dyn FnMut(&[PartSpan; 3], std::ops::Range<usize>) -> Result<()> + 'a;

/// The end of the last of `spans` (scales included): the bytes a read filled.
pub fn spans_end(spans: &[PartSpan; 3]) -> usize {
    spans
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p.scale.as_deref()))
        .map(|p| p.range.end)
        .max()
        .unwrap_or(0)
}

/// Where one part of an expert landed in a caller's buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PartSpan {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub range: std::ops::Range<usize>,
    /// Where an FP8 matrix's scales landed (after all three matrices).
    pub scale: Option<Box<PartSpan>>,
}

/// Reads `dst.len()` bytes of `file` at `offset`; large ranges in [`READ_CHUNK`] pieces on
/// several threads. One thread copying out of the page cache reaches ~9–14 GB/s on the machines
/// measured; an expert miss is nothing but this copy, so spreading it is most of the miss cost
/// (and on a cold cache it keeps several storage requests in flight).
pub fn read_range_parallel(file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
    use rayon::prelude::*;
    if dst.len() < 2 * READ_CHUNK {
        return file.read_exact_at(dst, offset);
    }
    dst.par_chunks_mut(READ_CHUNK)
        .enumerate()
        .try_for_each(|(i, chunk)| file.read_exact_at(chunk, offset + (i * READ_CHUNK) as u64))
}

/// Piece size of [`read_range_parallel`].
pub const READ_CHUNK: usize = 1 << 20;

/// Piece size for an expert of `total` bytes read on `threads` threads: at most [`READ_CHUNK`],
/// small enough that every thread gets about two pieces, at least [`MIN_PIECE`]. Why: with
/// 1 MiB pieces a 3 MiB expert on two cores was read in two rounds, the second by one thread.
fn piece_len(total: usize, threads: usize) -> usize {
    total
        .div_ceil(2 * threads.max(1))
        .clamp(MIN_PIECE, READ_CHUNK)
}

/// Smallest piece worth a read call of its own (and a hand-off to another thread).
const MIN_PIECE: usize = 256 << 10;

/// `read_into` for sources whose parts are byte ranges of files. The three parts' pieces are
/// read concurrently as one batch (not part after part): a 3 MiB part is only three pieces, and
/// a host with many cores copies out of the page cache faster with all nine in flight. `then`:
/// what each reading thread does with its piece (for a device copy: demote it).
pub(crate) fn read_locations_into(
    files: &FileTable,
    locs: [&TensorLocation; 3],
    cold: bool,
    then: Then,
    buf: &mut [u8],
) -> Result<[PartSpan; 3]> {
    // SAFETY: `buf` is valid for writes of its length and borrowed mutably for the call.
    unsafe { read_locations_raw(files, locs, cold, then, buf.as_mut_ptr(), buf.len()) }
}

/// What a reading thread does with a piece once it is in memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Then {
    /// Nothing: the CPU computes from it next, so it is best left in the cache it is in.
    Keep,
    /// Demote its cache lines ([`super::demote`]): a device copy reads it next.
    Demote,
}

/// [`read_locations_into`] into memory that need not be initialised (a fresh allocation the
/// bytes will fill): a CPU miss then writes each byte once instead of clearing it first
/// (BENCHMARKS.md §16). On `Ok`, the first `total` bytes are initialised, where `total` is the
/// end of the last span (the matrices, then any scales).
pub(crate) fn read_locations_into_uninit(
    files: &FileTable,
    locs: [&TensorLocation; 3],
    cold: bool,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> Result<[PartSpan; 3]> {
    // SAFETY: as above; only `pread` writes through the pointer (no reference to the
    // uninitialised bytes is made).
    unsafe {
        read_locations_raw(
            files,
            locs,
            cold,
            Then::Keep,
            buf.as_mut_ptr() as *mut u8,
            buf.len(),
        )
    }
}

/// A destination address that may cross to rayon's threads: each piece writes its own range.
#[derive(Clone, Copy)]
struct Dst(*mut u8);
// SAFETY: the pieces written through it are disjoint, and the caller's borrow outlives them.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The address `i` bytes on (a method, so that closures capture the whole `Dst`).
    fn at(&self, i: usize) -> *mut u8 {
        self.0.wrapping_add(i)
    }
}

/// `pread` until `len` bytes of `file` at `offset` are at `dst`, or an error (a short file is
/// `UnexpectedEof`, as `read_exact_at`'s).
///
/// # Safety
/// `dst` is valid for writes of `len` bytes, and nothing else accesses them meanwhile.
unsafe fn pread_exact(file: &File, dst: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: dst + done .. dst + len is within the caller's range.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dst.add(done) as *mut libc::c_void,
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "failed to fill whole buffer",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Where [`read_locations_into`] puts each part in a buffer of `have` bytes: the three matrices
/// back to back, then any FP8 scales (in part order). Returns the parts in buffer order (with
/// the matrix each belongs to), their offsets, the spans, and the total.
#[allow(clippy::type_complexity)]
fn lay_out(
    locs: [&TensorLocation; 3],
    have: usize,
) -> Result<(Vec<(&TensorLocation, usize)>, [PartSpan; 3], usize)> {
    let order: Vec<(usize, &TensorLocation)> = locs
        .iter()
        .copied()
        .enumerate()
        .chain(
            locs.iter()
                .enumerate()
                .filter_map(|(i, l)| l.scale.as_deref().map(|s| (i, s))),
        )
        .collect();
    let total: usize = order.iter().map(|(_, l)| l.len as usize).sum();
    if total > have {
        let loc = locs[0];
        return Err(ModelError::Tensor {
            file: loc.file.clone(),
            tensor: loc.name.clone(),
            msg: format!("staging buffer of {have} bytes is too small ({total} needed)"),
        });
    }
    let mut spans: Vec<PartSpan> = Vec::with_capacity(3);
    let mut placed = Vec::with_capacity(order.len());
    let mut at = 0usize;
    for (k, (part, loc)) in order.iter().enumerate() {
        let len = loc.len as usize;
        placed.push((*loc, at));
        let span = PartSpan {
            dtype: loc.dtype,
            shape: loc.shape.clone(),
            range: at..at + len,
            scale: None,
        };
        if k < 3 {
            spans.push(span);
        } else {
            spans[*part].scale = Some(Box::new(span));
        }
        at += len;
    }
    Ok((placed, spans.try_into().expect("three parts"), total))
}

/// The reads of [`read_locations_into`], into `len` bytes at `base`.
///
/// # Safety
/// `base` is valid for writes of `len` bytes, and nothing else accesses them during the call.
unsafe fn read_locations_raw(
    files: &FileTable,
    locs: [&TensorLocation; 3],
    cold: bool,
    then: Then,
    base: *mut u8,
    have: usize,
) -> Result<[PartSpan; 3]> {
    let (placed, spans, _) = lay_out(locs, have)?;
    let parts: Vec<(&TensorLocation, Dst)> = placed
        .iter()
        .map(|&(loc, at)| (loc, Dst(base.wrapping_add(at))))
        .collect();
    // SAFETY: the parts lie back to back within the first `total ≤ have` bytes at `base`.
    unsafe { read_parts_raw(files, &parts, cold, then)? };
    Ok(spans)
}

/// [`read_locations_into`] for a buffer a device copy reads next, streamed: the bytes in pieces
/// of `piece` bytes (a multiple of 4 KiB; the last of a part shorter) read on rayon's threads,
/// each demoted once read, and `ready(spans, filled)` called on the calling thread each time the
/// prefix of `buf` that is read grows — `filled` is what it grew by, the calls' ranges back to
/// back from 0 to the end of the last span. Why: a staged miss copied only once it was read
/// whole left its whole copy (~190 µs for 9.4 MB) after the read, at every layer that missed;
/// copying each run as it lands leaves only the last one (BENCHMARKS.md §114). An error from
/// `ready` stops the calls (the pieces in flight are still waited for) and is returned.
pub(crate) fn read_locations_streamed(
    files: &FileTable,
    locs: [&TensorLocation; 3],
    cold: bool,
    buf: &mut [u8],
    piece: usize,
    ready: &mut Ready<'_>,
) -> Result<[PartSpan; 3]> {
    if rayon::current_thread_index().is_some() {
        // On one of rayon's own threads, waiting for pieces queued behind this thread could
        // wait forever: read whole, then hand it all over.
        let spans = read_locations_into(files, locs, cold, Then::Demote, buf)?;
        let end = spans_end(&spans);
        ready(&spans, 0..end)?;
        return Ok(spans);
    }
    let (placed, spans, total) = lay_out(locs, buf.len())?;
    if total == 0 {
        ready(&spans, 0..0)?;
        return Ok(spans);
    }
    let placed_locs: Vec<&TensorLocation> = placed.iter().map(|&(l, _)| l).collect();
    let opened = open_parts(files, &placed_locs)?;
    // In buffer order, each at its place in the buffer: the order `ready` hands them over in.
    let pieces = plan_pieces(&placed, (piece & !4095).max(4096));
    let base = Dst(buf.as_mut_ptr());
    let mut failed: Option<ModelError> = None;
    rayon::in_place_scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, std::io::Result<()>)>();
        for (
            i,
            &Piece {
                part,
                off,
                at,
                len: n,
            },
        ) in pieces.iter().enumerate()
        {
            let (tx, file) = (tx.clone(), &opened[part]);
            s.spawn(move |_| {
                let dst = base.at(at);
                // SAFETY: the pieces are disjoint ranges of `buf`, borrowed mutably for the
                // call; `ready` is handed a range only once every piece in it has been read.
                let r = unsafe { pread_exact(file, dst, n, off) };
                if r.is_ok() {
                    // SAFETY: the n bytes at dst were just written by this thread.
                    super::demote::written(unsafe { std::slice::from_raw_parts(dst, n) });
                }
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        let mut landed = vec![false; pieces.len()];
        let (mut next, mut reported) = (0usize, 0usize);
        for (i, r) in rx.iter() {
            if let Err(e) = r {
                let p = &pieces[i];
                failed.get_or_insert(piece_error(placed_locs[p.part], p.off, e));
                continue;
            }
            landed[i] = true;
            while next < pieces.len() && landed[next] {
                next += 1;
            }
            let filled = pieces.get(next).map_or(total, |p| p.at);
            if failed.is_none() && filled > reported {
                if let Err(e) = ready(&spans, reported..filled) {
                    failed = Some(e);
                }
                reported = filled;
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if cold {
        drop_parts(&opened, &placed_locs);
    }
    Ok(spans)
}

/// Reads each located part to its destination, in pieces spread over rayon's threads
/// (`piece_len`); in cold mode evicts the pages afterwards. A failure names the part's tensor
/// and file.
///
/// # Safety
/// Each destination is valid for writes of its part's `len` bytes, the destinations do not
/// overlap, and nothing else accesses them during the call.
unsafe fn read_parts_raw(
    files: &FileTable,
    parts: &[(&TensorLocation, Dst)],
    cold: bool,
    then: Then,
) -> Result<()> {
    let locs: Vec<&TensorLocation> = parts.iter().map(|(l, _)| *l).collect();
    read_pieces(files, &locs, cold, |k, file, off, at, n| {
        let dst = parts[k].1.at(at);
        // SAFETY: at + n ≤ the part's len, within its destination (the caller's contract), and
        // the pieces do not overlap.
        unsafe { pread_exact(file, dst, n, off)? };
        if then == Then::Demote {
            // SAFETY: the n bytes at dst were just written by this thread and nothing else
            // touches them during the call.
            super::demote::written(unsafe { std::slice::from_raw_parts(dst, n) });
        }
        Ok(())
    })
}

/// The pieces of `locs` (`piece_len`, even, so a piece of 2-byte values holds whole ones)
/// handed to `read(part, file, file offset, offset in the part, length)` on rayon's threads;
/// in cold mode the pages evicted afterwards. A failure names the part's tensor and file.
fn read_pieces(
    files: &FileTable,
    locs: &[&TensorLocation],
    cold: bool,
    read: impl Fn(usize, &File, u64, usize, usize) -> std::io::Result<()> + Sync,
) -> Result<()> {
    use rayon::prelude::*;
    let opened = open_parts(files, locs)?;
    let total: usize = locs.iter().map(|l| l.len as usize).sum();
    // Each part's pieces counted from the part's own start.
    let from_part_start: Vec<(&TensorLocation, usize)> = locs.iter().map(|&l| (l, 0)).collect();
    let pieces = plan_pieces(
        &from_part_start,
        piece_len(total, rayon::current_num_threads()) & !1,
    );
    pieces
        .into_par_iter()
        .try_for_each(|p| read(p.part, &opened[p.part], p.off, p.at, p.len).map_err(|e| (p, e)))
        .map_err(|(p, e)| piece_error(locs[p.part], p.off, e))?;
    if cold {
        drop_parts(&opened, locs);
    }
    Ok(())
}

/// One read call of a part: `len` bytes at file offset `off`, landing `at` bytes past where its
/// caller counts from (the part's start for [`read_pieces`], the buffer's for the streamed read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    part: usize,
    off: u64,
    at: usize,
    len: usize,
}

/// Each part (its location and where its first byte lands) cut into pieces of at most `piece`
/// bytes, part after part, in file order within a part.
fn plan_pieces(parts: &[(&TensorLocation, usize)], piece: usize) -> Vec<Piece> {
    let piece = piece.max(1);
    let mut pieces = Vec::new();
    for (part, &(loc, at)) in parts.iter().enumerate() {
        let len = loc.len as usize;
        let mut done = 0usize;
        while done < len {
            let n = piece.min(len - done);
            pieces.push(Piece {
                part,
                off: loc.offset + done as u64,
                at: at + done,
                len: n,
            });
            done += n;
        }
    }
    pieces
}

/// A failed piece, named by its part's tensor and file.
fn piece_error(loc: &TensorLocation, off: u64, e: std::io::Error) -> ModelError {
    ModelError::Tensor {
        file: loc.file.clone(),
        tensor: loc.name.clone(),
        msg: format!(
            "reading {} bytes at offset {} (piece at {off}): {e}",
            loc.len, loc.offset
        ),
    }
}

fn open_parts(files: &FileTable, locs: &[&TensorLocation]) -> Result<Vec<std::sync::Arc<File>>> {
    locs.iter().map(|l| files.get(&l.file)).collect()
}

/// Cold mode: the parts' pages leave the page cache once read.
fn drop_parts(opened: &[std::sync::Arc<File>], locs: &[&TensorLocation]) {
    for (file, loc) in opened.iter().zip(locs) {
        drop_page_cache(file, loc.offset, loc.len);
    }
}

/// Opened files, shared between reads (the seed layout has thousands, so they are opened on
/// first use, not all at once).
#[derive(Default)]
pub(crate) struct FileTable {
    files: Mutex<HashMap<PathBuf, std::sync::Arc<File>>>,
}

impl FileTable {
    pub(crate) fn get(&self, path: &Path) -> Result<std::sync::Arc<File>> {
        let mut files = self.files.lock().expect("file table lock");
        if let Some(f) = files.get(path) {
            return Ok(f.clone());
        }
        let f = File::open(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            what: "opening expert file".into(),
            source: e,
        })?;
        let f = std::sync::Arc::new(f);
        // Keep the table bounded: thousands of per-expert files must not exhaust descriptors.
        if files.len() >= 256 {
            files.clear();
        }
        files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
}

/// Reads the three located parts of (layer, expert) into an owned [`RawExpert`].
pub(crate) fn read_expert(
    files: &FileTable,
    [g, u, d]: [&TensorLocation; 3],
    cold: bool,
    layer: usize,
    expert: usize,
) -> Result<RawExpert> {
    Ok(RawExpert {
        layer,
        expert,
        parts: [
            read_location(files, g, cold)?,
            read_location(files, u, cold)?,
            read_location(files, d, cold)?,
        ],
    })
}

/// Reads `loc` with pread; in cold mode evicts those pages from the page cache afterwards.
pub(crate) fn read_location(
    files: &FileTable,
    loc: &TensorLocation,
    cold: bool,
) -> Result<RawPart> {
    let file = files.get(&loc.file)?;
    let mut bytes = vec![0u8; loc.len as usize];
    read_range_parallel(&file, loc.offset, &mut bytes).map_err(|e| ModelError::Tensor {
        file: loc.file.clone(),
        tensor: loc.name.clone(),
        msg: format!("reading {} bytes at offset {}: {e}", loc.len, loc.offset),
    })?;
    if cold {
        drop_page_cache(&file, loc.offset, loc.len);
    }
    let scale = match &loc.scale {
        Some(s) => Some(Box::new(read_location(files, s, cold)?)),
        None => None,
    };
    Ok(RawPart {
        name: loc.name.clone(),
        dtype: loc.dtype,
        shape: loc.shape.clone(),
        bytes,
        scale,
    })
}

/// posix_fadvise(DONTNEED): a hint, so failure is not an error (the mode is still recorded).
pub fn drop_page_cache(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on a valid descriptor.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Experts read straight from the checkpoint's shards.
pub struct ShardSource {
    cfg: MoeConfig,
    dir: PathBuf,
    /// Indexed [layer][expert]; `None` when the checkpoint lacks that expert.
    locations: Vec<Vec<Option<ExpertLocation>>>,
    files: FileTable,
    cold: AtomicBool,
}

impl ShardSource {
    /// Locates every expert through the checkpoint index (checking shapes and dtypes).
    pub fn new(ckpt: &Checkpoint, cfg: &MoeConfig) -> Result<Self> {
        let mut locations = vec![Vec::new(); cfg.num_hidden_layers];
        for layer in cfg.moe_layers() {
            locations[layer] = (0..cfg.num_experts)
                .map(|e| ckpt.expert_location(cfg, layer, e))
                .collect::<Result<_>>()?;
        }
        Ok(ShardSource {
            cfg: cfg.clone(),
            dir: ckpt.dir().to_path_buf(),
            locations,
            files: FileTable::default(),
            cold: AtomicBool::new(false),
        })
    }

    pub fn location(&self, layer: usize, expert: usize) -> Option<&ExpertLocation> {
        self.locations.get(layer)?.get(expert)?.as_ref()
    }

    /// The expert's three parts, or the error naming what is missing.
    fn parts_of(&self, layer: usize, expert: usize) -> Result<&[TensorLocation; 3]> {
        self.location(layer, expert)
            .map(|l| &l.parts)
            .ok_or_else(|| missing_error(self, layer, expert))
    }
}

impl ExpertSource for ShardSource {
    fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn has(&self, layer: usize, expert: usize) -> bool {
        self.location(layer, expert).is_some()
    }

    fn read(&self, layer: usize, expert: usize) -> Result<RawExpert> {
        let loc = self
            .location(layer, expert)
            .ok_or_else(|| missing_error(self, layer, expert))?;
        let [g, u, d] = &loc.parts;
        let cold = self.cold.load(Ordering::Relaxed);
        read_expert(&self.files, [g, u, d], cold, layer, expert)
    }

    fn stored_bytes(&self, layer: usize, expert: usize) -> u64 {
        self.location(layer, expert)
            .map(|l| l.bytes())
            .unwrap_or_else(|| default_expert_bytes(&self.cfg))
    }

    fn describe(&self) -> String {
        format!("the checkpoint shards in {}", self.dir.display())
    }

    fn set_cold(&self, cold: bool) {
        self.cold.store(cold, Ordering::Relaxed);
    }

    fn is_cold(&self) -> bool {
        self.cold.load(Ordering::Relaxed)
    }

    fn part_locations(&self, layer: usize, expert: usize) -> Option<[TensorLocation; 3]> {
        Some(self.location(layer, expert)?.parts.clone())
    }

    fn map_bf16(&self, layer: usize, expert: usize) -> Result<Option<(MappedBf16, MappedBf16)>> {
        if self.is_cold() {
            return Ok(None);
        }
        map_bf16_parts(&self.files, self.parts_of(layer, expert)?, &self.cfg)
    }

    fn read_into(&self, layer: usize, expert: usize, buf: &mut [u8]) -> Result<[PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        read_locations_into(&self.files, loc.each_ref(), self.is_cold(), Then::Keep, buf)
    }

    fn read_into_for_copy(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
    ) -> Result<[PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        read_locations_into(
            &self.files,
            loc.each_ref(),
            self.is_cold(),
            Then::Demote,
            buf,
        )
    }

    fn read_into_for_copy_streamed(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
        piece: usize,
        ready: &mut Ready<'_>,
    ) -> Result<[PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        read_locations_streamed(
            &self.files,
            loc.each_ref(),
            self.is_cold(),
            buf,
            piece,
            ready,
        )
    }

    fn read_into_uninit(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<Option<[PartSpan; 3]>> {
        let loc = self.parts_of(layer, expert)?;
        read_locations_into_uninit(&self.files, loc.each_ref(), self.is_cold(), buf).map(Some)
    }

    fn read_split_into_uninit(
        &self,
        layer: usize,
        expert: usize,
        gate_up: &mut [std::mem::MaybeUninit<u8>],
        down: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<bool> {
        let [g, u, d] = self.parts_of(layer, expert)?;
        if [g, u, d].iter().any(|p| p.scale.is_some())
            || (g.len + u.len) as usize != gate_up.len()
            || d.len as usize != down.len()
        {
            return Ok(false);
        }
        let (gu, dn) = (
            gate_up.as_mut_ptr() as *mut u8,
            down.as_mut_ptr() as *mut u8,
        );
        // SAFETY: gate fills gate_up's first g.len bytes, up the rest, down all of `down`
        // (lengths checked above); the buffers are borrowed mutably for the call.
        unsafe {
            read_parts_raw(
                &self.files,
                &[
                    (g, Dst(gu)),
                    (u, Dst(gu.wrapping_add(g.len as usize))),
                    (d, Dst(dn)),
                ],
                self.is_cold(),
                Then::Keep,
            )?;
        }
        Ok(true)
    }
}

/// `ExpertSource::map_bf16` for sources whose parts are byte ranges of files: gate's and up's
/// rows mapped as one [2I, H] matrix where they lie back to back in one file (as name-sorted
/// shards and `extract`'s files store them), down [H, I]; None for other layouts and dtypes, or
/// where a map is refused (the caller's read path then reads, and names any error).
pub(crate) fn map_bf16_parts(
    files: &FileTable,
    [g, u, d]: &[TensorLocation; 3],
    cfg: &MoeConfig,
) -> Result<Option<(MappedBf16, MappedBf16)>> {
    let (i, h) = (cfg.moe_intermediate_size, cfg.hidden_size);
    let matrix = (i * h * 2) as u64;
    if [g, u, d]
        .iter()
        .any(|p| p.dtype != StDtype::BF16 || p.scale.is_some() || p.len != matrix)
        || g.shape != [i, h]
        || u.shape != [i, h]
        || d.shape != [h, i]
        || u.file != g.file
        || u.offset != g.offset + g.len
    {
        return Ok(None);
    }
    let (fg, fd) = (files.get(&g.file)?, files.get(&d.file)?);
    match (
        MappedBf16::map(&fg, g.offset, 2 * i, h),
        MappedBf16::map(&fd, d.offset, h, i),
    ) {
        (Ok(Some(gu)), Ok(Some(dn))) => Ok(Some((gu, dn))),
        _ => Ok(None),
    }
}

/// Size of an expert stored in bf16 — the fallback when a source cannot say.
pub fn default_expert_bytes(cfg: &MoeConfig) -> u64 {
    (cfg.expert_params() * 2) as u64
}

/// The error for an expert a source cannot supply, naming the source and the way out.
pub fn missing_error(source: &dyn ExpertSource, layer: usize, expert: usize) -> ModelError {
    ModelError::Expert {
        layer,
        expert,
        msg: format!(
            "missing from {} (run `moescope verify` for the full list; \
             --allow-missing-experts runs anyway, masked out of routing and labelled DEGRADED)",
            source.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an expert whose gate and up lie back to back in one file, all three parts plain
    /// bf16 of the config's shapes, maps; a gap between gate and up, another file, another
    /// dtype or shape, or an FP8 scale leaves it to the read path. The map holds the file's
    /// bytes at the parts' offsets.
    #[test]
    fn only_back_to_back_bf16_experts_map() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-moe-tiny");
        let cfg = MoeConfig::from_dir(&dir).unwrap();
        let (i, h) = (cfg.moe_intermediate_size, cfg.hidden_size);
        let m = (i * h * 2) as u64;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("experts.bin");
        let bytes: Vec<u8> = (0..(4 * m + 64)).map(|b| (b * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let loc = |offset: u64, shape: [usize; 2]| TensorLocation {
            name: format!("t@{offset}"),
            file: path.clone(),
            dtype: StDtype::BF16,
            shape: shape.to_vec(),
            offset,
            len: m,
            scale: None,
        };
        let files = FileTable::default();
        let good = [
            loc(8, [i, h]),
            loc(8 + m, [i, h]),
            loc(8 + 2 * m + 16, [h, i]),
        ];
        let (gu, dn) = map_bf16_parts(&files, &good, &cfg)
            .unwrap()
            .expect("back to back");
        let le = |v: &[half::bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert_eq!(le(gu.values()), &bytes[8..(8 + 2 * m) as usize]);
        assert_eq!(
            le(dn.values()),
            &bytes[(8 + 2 * m + 16) as usize..(8 + 3 * m + 16) as usize]
        );
        let refused = |parts: [TensorLocation; 3], why: &str| {
            assert!(
                map_bf16_parts(&files, &parts, &cfg).unwrap().is_none(),
                "{why}"
            );
        };
        refused(
            [loc(8, [i, h]), loc(8 + m + 2, [i, h]), good[2].clone()],
            "a gap",
        );
        let mut other_file = good.clone();
        other_file[1].file = tmp.path().join("elsewhere.bin");
        refused(other_file, "up in another file");
        let mut f32 = good.clone();
        f32[2].dtype = StDtype::F32;
        refused(f32, "another dtype");
        refused(
            [loc(8, [h, i]), loc(8 + m, [h, i]), good[2].clone()],
            "gate transposed",
        );
        let mut scaled = good.clone();
        scaled[0].scale = Some(Box::new(good[2].clone()));
        refused(scaled, "an FP8 scale");
        refused(
            [loc(9, [i, h]), loc(9 + m, [i, h]), good[2].clone()],
            "an odd offset",
        );
        refused(
            [loc(8, [i, h]), loc(8 + m, [i, h]), loc(4 * m, [h, i])],
            "past the end",
        );
    }

    /// Ranges above the split size come back byte-exact from every piece, at odd offsets and
    /// lengths that are not a multiple of the piece size; a range past the end is an error.
    #[test]
    fn parallel_range_read_matches_the_file() {
        let data: Vec<u8> = (0..(5 * READ_CHUNK + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        for (off, len) in [(0, data.len()), (7, 3 * READ_CHUNK + 1), (100, 1000)] {
            let mut buf = vec![0u8; len];
            read_range_parallel(&f, off as u64, &mut buf).unwrap();
            assert_eq!(&buf[..], &data[off..off + len], "offset {off} length {len}");
        }
        let mut too_far = vec![0u8; 3 * READ_CHUNK];
        assert!(read_range_parallel(&f, (data.len() - READ_CHUNK) as u64, &mut too_far).is_err());
    }

    #[test]
    fn pieces_give_every_thread_about_two_within_bounds() {
        // A 3 MiB expert on two threads: six pieces of 768 KiB, not three of 1 MiB.
        assert_eq!(piece_len(3 << 20, 2), 768 << 10);
        // A 9 MiB expert on 14 threads, at least MIN_PIECE; one thread: READ_CHUNK at most.
        assert_eq!(piece_len(9 << 20, 14), (9usize << 20).div_ceil(28));
        assert_eq!(piece_len(1 << 20, 14), MIN_PIECE);
        assert_eq!(piece_len(64 << 20, 1), READ_CHUNK);
        assert_eq!(piece_len(0, 0), MIN_PIECE);
    }

    /// Pieces cover each part exactly once, in order, none longer than asked; `at` counts from
    /// where the caller placed the part; an empty part has none.
    #[test]
    fn planned_pieces_tile_every_part() {
        let (_dir, _, loc) = patterned_shard(1, 251);
        let parts = [
            loc("a", 3, 10_000),
            loc("b", 20_000, 0),
            loc("down_c", 50_001, 4096),
        ];
        let placed = [(&parts[0], 100), (&parts[1], 10_100), (&parts[2], 10_100)];
        for piece in [1usize, 4096, 4097, 10_000, 1 << 20] {
            let pieces = plan_pieces(&placed, piece);
            for (k, &(l, at)) in placed.iter().enumerate() {
                let mine: Vec<&Piece> = pieces.iter().filter(|p| p.part == k).collect();
                assert_eq!(
                    mine.len(),
                    (l.len as usize).div_ceil(piece),
                    "part {k}, {piece}"
                );
                let (mut off, mut dst) = (l.offset, at);
                for p in mine {
                    assert!(p.len <= piece && p.len > 0);
                    assert_eq!((p.off, p.at), (off, dst), "part {k}, piece size {piece}");
                    off += p.len as u64;
                    dst += p.len;
                }
                assert_eq!(off, l.offset + l.len, "part {k} covered, {piece}");
            }
            // Parts stay in the order given, so a buffer laid out back to back fills from 0.
            assert!(pieces.windows(2).all(|w| w[0].part <= w[1].part));
        }
        let e = piece_error(&parts[2], 52_000, std::io::ErrorKind::UnexpectedEof.into());
        let text = e.to_string();
        assert!(
            text.contains("down_c") && text.contains("piece at 52000"),
            "{text}"
        );
    }

    /// A file of 7 MiB and a bit, byte i being `i * mul % modulus`, and a maker of bf16
    /// locations in it (name, offset, length).
    fn patterned_shard(
        mul: usize,
        modulus: usize,
    ) -> (
        tempfile::TempDir,
        Vec<u8>,
        impl Fn(&str, u64, u64) -> TensorLocation,
    ) {
        let data: Vec<u8> = (0..(7 * READ_CHUNK + 999))
            .map(|i| (i * mul % modulus) as u8)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        std::fs::write(&path, &data).unwrap();
        let loc = move |name: &str, offset: u64, len: u64| TensorLocation {
            name: name.into(),
            file: path.clone(),
            dtype: StDtype::BF16,
            shape: vec![len as usize / 2],
            offset,
            len,
            scale: None,
        };
        (dir, data, loc)
    }

    /// An expert's parts (several pieces each, odd offsets, a scale after the matrices) read
    /// into an uninitialised buffer, or for a device copy, come back as `read_locations_into`
    /// gives them; a part past
    /// the end of its file is an error naming the tensor.
    #[test]
    fn uninit_reads_match_initialised_ones() {
        let (_dir, data, loc) = patterned_shard(17, 253);
        let g = loc("gate", 3, (2 * READ_CHUNK + 10) as u64);
        let mut u = loc("up", (3 * READ_CHUNK) as u64 + 1, READ_CHUNK as u64 + 6);
        u.scale = Some(Box::new(loc("up.scale", 11, 64)));
        let d = loc("down", (5 * READ_CHUNK) as u64, (2 * READ_CHUNK) as u64);
        let total = (g.len + u.len + d.len + 64) as usize;
        let files = FileTable::default();
        let mut init = vec![0u8; total];
        let want = read_locations_into(&files, [&g, &u, &d], false, Then::Keep, &mut init).unwrap();
        let mut raw: Vec<u8> = Vec::with_capacity(total);
        let got = read_locations_into_uninit(
            &files,
            [&g, &u, &d],
            false,
            &mut raw.spare_capacity_mut()[..total],
        )
        .unwrap();
        assert_eq!(got, want);
        // SAFETY: the read wrote every byte up to the last span's end, which is `total`.
        unsafe { raw.set_len(total) };
        assert_eq!(raw, init);
        assert_eq!(&raw[..g.len as usize], &data[3..3 + g.len as usize]);
        assert_eq!(got[1].scale.as_ref().unwrap().range.end, total);

        // Read for a device copy (each piece demoted by its reader): the same spans and bytes.
        let mut for_copy = vec![0u8; total];
        let spans =
            read_locations_into(&files, [&g, &u, &d], false, Then::Demote, &mut for_copy).unwrap();
        assert_eq!(spans, want);
        assert_eq!(for_copy, init);

        let past = loc("down", (data.len() - 100) as u64, 4096);
        let mut buf = Vec::with_capacity(total);
        let e = read_locations_into_uninit(
            &files,
            [&g, &u, &past],
            false,
            &mut buf.spare_capacity_mut()[..total],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("down") && e.contains("reading 4096 bytes"),
            "{e}"
        );
    }

    /// A streamed read hands over back-to-back ranges from 0 to the end of the last span, each
    /// only once its bytes are in the buffer, and ends with the bytes and spans a whole read
    /// gives — at piece sizes that split parts unevenly, and a piece size that is no multiple
    /// of 4 KiB (rounded down); an error from the callback stops the calls and is returned; a
    /// part past the end of its file is an error naming the tensor; on one of rayon's own
    /// threads it reads whole and hands everything over at once.
    #[test]
    fn streamed_reads_hand_over_each_run_once_it_is_read() {
        let (_dir, data, loc) = patterned_shard(31, 251);
        let g = loc("gate", 3, (READ_CHUNK + 10_000) as u64);
        let mut u = loc("up", (3 * READ_CHUNK) as u64 + 1, READ_CHUNK as u64 + 6);
        u.scale = Some(Box::new(loc("up.scale", 11, 64)));
        let d = loc("down", (5 * READ_CHUNK) as u64, (READ_CHUNK / 2) as u64);
        let total = (g.len + u.len + d.len + 64) as usize;
        let files = FileTable::default();
        let mut whole = vec![0u8; total];
        let want =
            read_locations_into(&files, [&g, &u, &d], false, Then::Keep, &mut whole).unwrap();
        for piece in [4096, 64 << 10, 100_000, 256 << 10, 1 << 30] {
            let mut buf = vec![0u8; total + 7];
            let base = buf.as_ptr() as usize;
            let mut seen: Vec<std::ops::Range<usize>> = Vec::new();
            let spans = read_locations_streamed(
                &files,
                [&g, &u, &d],
                false,
                &mut buf,
                piece,
                &mut |spans, filled| {
                    assert_eq!(spans, &want, "piece {piece}");
                    // SAFETY: `filled` is read, and nothing writes it again during the call.
                    let got = unsafe {
                        std::slice::from_raw_parts((base + filled.start) as *const u8, filled.len())
                    };
                    assert!(
                        got == &whole[filled.clone()],
                        "piece {piece}: {filled:?} not read yet"
                    );
                    seen.push(filled);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(spans, want, "piece {piece}");
            assert_eq!(&buf[..total], &whole[..], "piece {piece}");
            assert_eq!(seen.first().map(|r| r.start), Some(0), "piece {piece}");
            assert_eq!(seen.last().map(|r| r.end), Some(total), "piece {piece}");
            assert!(
                seen.windows(2)
                    .all(|w| w[0].end == w[1].start && w[0].start < w[0].end),
                "piece {piece}: {seen:?}"
            );
            if piece == 1 << 30 {
                // Each part one piece: at most one handover a part and its scales.
                assert!(seen.len() <= 4, "{seen:?}");
            }
        }

        // The callback's error stops the calls and comes back.
        let mut calls = 0;
        let mut buf = vec![0u8; total];
        let e =
            read_locations_streamed(&files, [&g, &u, &d], false, &mut buf, 4096, &mut |_, _| {
                calls += 1;
                Err(ModelError::Input("the slot refuses it".into()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("the slot refuses it"), "{e}");
        assert_eq!(calls, 1);

        let past = loc("down", (data.len() - 100) as u64, 8192);
        let e = read_locations_streamed(
            &files,
            [&g, &u, &past],
            false,
            &mut buf,
            4096,
            &mut |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("down") && e.contains("reading 8192 bytes"),
            "{e}"
        );

        let small = read_locations_streamed(
            &files,
            [&g, &u, &d],
            false,
            &mut buf[..100],
            4096,
            &mut |_, _| Ok(()),
        );
        assert!(small.unwrap_err().to_string().contains("too small"));

        // From inside rayon's pool: one handover of everything.
        let (spans, seen) = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| {
                let mut seen = Vec::new();
                let spans = read_locations_streamed(
                    &files,
                    [&g, &u, &d],
                    false,
                    &mut buf,
                    4096,
                    &mut |_, f| {
                        seen.push(f);
                        Ok(())
                    },
                )
                .unwrap();
                (spans, seen)
            });
        assert_eq!(spans, want);
        assert_eq!(seen, vec![0..total]);
        assert_eq!(buf, whole);
    }
}
