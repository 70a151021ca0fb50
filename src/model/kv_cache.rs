//! The KV cache: keys and values of every layer for the tokens seen so far, in the layout each
//! device wants (see [`KvCache`]), and the device-side inputs of a decode step whose position
//! lives in device memory (what lets a step be captured as a CUDA graph).

use candle_core::{DType, Device, Tensor};

use super::error::Result;

/// Keys and values of every layer for the tokens seen so far.
///
/// Two layouts, chosen by the device of the first append:
/// - CPU: token-major `[capacity, kv_heads, head_dim]` buffers grown by doubling and written in
///   place, so a decode step appends one row instead of copying the whole history (the view
///   handed to attention is a prefix, still contiguous). Kept in f32 whatever the compute dtype:
///   bf16/f16 keys are stored exactly (every bf16 is an f32) and the f32 attention kernel reads
///   them without re-converting the history every step.
/// - GPU ("static"): head-major `[kv_heads, capacity, head_dim]` buffers, zero-filled, grown by
///   doubling, written in place, and attended over *whole* with a mask hiding the rows past the
///   current position. Attending over the capacity rather than the filled length is what lets a
///   decode step take its position from device memory, so the step can be captured once as a
///   CUDA graph and replayed (its buffers never move until the capacity doubles). Masked rows
///   are zeros or stale keys — always finite — so they contribute exactly 0 after the softmax.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Use the static layout on any device (tests exercise the GPU layout on the CPU).
    force_static: bool,
    /// Smallest static capacity (rows).
    min_static: usize,
    /// Bumped whenever a static buffer is replaced: a captured graph holding the old buffers'
    /// addresses is stale from then on.
    epoch: u64,
    /// Per-capacity constants of the device-positioned decode step, made once per epoch.
    statics: Option<(u64, DecodeStatics)>,
}

/// Constants a device-positioned decode step derives its mask from: `[capacity]` row indices,
/// zeros and -inf in the compute dtype.
#[derive(Debug, Clone)]
pub struct DecodeStatics {
    rows: Tensor,
    zeros: Tensor,
    neg_inf: Tensor,
}

/// A one-token decode step's position-dependent inputs, computed on the device from the
/// position held in device memory — no host value in them, so the step can be captured.
#[derive(Debug, Clone)]
pub struct DecodeInputs {
    /// RoPE tables at the position, `[1, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[kv_heads, 1, head_dim]` u32, every entry the position: where k and v are written.
    pub rows: Tensor,
    /// Additive attention mask `[capacity]`: 0 for rows ≤ the position, -inf after — the same
    /// values [`causal_mask`] gives a host-positioned step.
    pub mask: Tensor,
}

impl DecodeInputs {
    /// `pos`: u32 `[1]` on the device. `cos_full`/`sin_full`: RoPE tables covering the capacity.
    pub fn build(
        pos: &Tensor,
        statics: &DecodeStatics,
        cos_full: &Tensor,
        sin_full: &Tensor,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let cap = statics.rows.dim(0)?;
        let visible = statics.rows.le(&pos.broadcast_as(cap)?)?;
        Ok(DecodeInputs {
            cos: cos_full.index_select(pos, 0)?,
            sin: sin_full.index_select(pos, 0)?,
            rows: pos
                .reshape((1, 1, 1))?
                .broadcast_as((kv_heads, 1, head_dim))?
                .contiguous()?,
            mask: visible.where_cond(&statics.zeros, &statics.neg_inf)?,
        })
    }
}

/// Smallest static capacity: one doubling covers a typical prompt plus a few hundred tokens.
pub const MIN_STATIC_CAPACITY: usize = 256;

#[derive(Debug, Clone)]
enum LayerKv {
    /// Token-major buffers and how many rows of them are filled.
    Grown { k: Tensor, v: Tensor, filled: usize },
    /// Head-major `[kv_heads, capacity, head_dim]` buffers; rows at or past the cache length are
    /// masked out by attention.
    Static { k: Tensor, v: Tensor },
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
            force_static: false,
            min_static: MIN_STATIC_CAPACITY,
            epoch: 0,
            statics: None,
        }
    }

    /// A cache that uses the static (GPU) layout on every device, starting at `min_capacity`
    /// rows — how the CPU tests reach the GPU attention path.
    pub fn new_static(num_layers: usize, min_capacity: usize) -> Self {
        KvCache {
            force_static: true,
            min_static: min_capacity.max(1),
            ..KvCache::new(num_layers)
        }
    }

    /// Whether attention on `device` uses the static layout.
    pub fn is_static_on(&self, device: &Device) -> bool {
        self.force_static || !device.is_cpu()
    }

    /// Static capacity (rows) of the layers allocated so far; 0 before the first append.
    pub fn static_capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .find_map(|l| match l {
                LayerKv::Static { k, .. } => k.dim(1).ok(),
                LayerKv::Grown { .. } => None,
            })
            .unwrap_or(0)
    }

    /// Changes whenever a static buffer is reallocated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The decode-step constants for the current static capacity (made once per epoch).
    pub fn decode_statics(&mut self, dtype: DType, device: &Device) -> Result<DecodeStatics> {
        if let Some((epoch, st)) = &self.statics
            && *epoch == self.epoch
            && st.zeros.dtype() == dtype
        {
            return Ok(st.clone());
        }
        let cap = self.static_capacity();
        let st = DecodeStatics {
            rows: Tensor::arange(0u32, cap as u32, device)?,
            zeros: Tensor::zeros(cap, dtype, device)?,
            neg_inf: Tensor::from_vec(vec![f32::NEG_INFINITY; cap], cap, device)?
                .to_dtype(dtype)?,
        };
        self.statics = Some((self.epoch, st.clone()));
        Ok(st)
    }

    /// Layers the cache was made for.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Whether this cache, emptied, computes a prompt of `rows` tokens with the bits of a fresh
    /// cache: nothing static allocated yet (a growing cache's reads stop at its filled rows), or
    /// static buffers of the capacity a fresh cache's prefill would allocate for `rows`.
    pub fn reusable_for(&self, rows: usize) -> bool {
        let cap = self.static_capacity();
        cap == 0 || cap == rows.next_power_of_two().max(self.min_static)
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Empties the cache for a new sequence, keeping its buffers (and so its epoch: a graph
    /// captured over them still fits): static buffers are zeroed in place, as a fresh cache's
    /// are, so nothing of the last sequence — not even a non-finite value — reaches the next.
    pub fn reset(&mut self) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            match layer {
                LayerKv::Grown { filled, .. } => *filled = 0,
                LayerKv::Static { k, v } => {
                    k.zero_set()?;
                    v.zero_set()?;
                }
            }
        }
        self.len = 0;
        Ok(())
    }

    /// Drops cached positions from `len` on (used to rewind a generation).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for layer in self.layers.iter_mut().flatten() {
            match layer {
                LayerKv::Grown { filled, .. } => *filled = len,
                // Rows past `len` become masked; the next writes overwrite them.
                LayerKv::Static { .. } => {}
            }
        }
        self.len = len;
        Ok(())
    }

    /// Bytes held by the cache (for memory accounting): allocated capacity, not just the filled
    /// part, because that is what the process holds.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let (k, v) = match l {
                    LayerKv::Grown { k, v, .. } | LayerKv::Static { k, v } => (k, v),
                };
                ((k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()) as u64
            })
            .sum()
    }

    /// Appends token-major k, v `[T, kv_heads, head_dim]`; returns every cached position,
    /// `[total, kv_heads, head_dim]` in f32.
    pub(super) fn append_token_major(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (t, nkv, d) = k.dims3()?;
        let k = k.to_dtype(DType::F32)?.contiguous()?;
        let v = v.to_dtype(DType::F32)?.contiguous()?;
        let entry = &mut self.layers[layer];
        let (filled, capacity) = match entry {
            Some(LayerKv::Grown { k, filled, .. }) => (*filled, k.dim(0)?),
            _ => (0, 0),
        };
        let total = filled + t;
        if total > capacity {
            let cap = total.next_power_of_two().max(64);
            let nk = Tensor::zeros((cap, nkv, d), DType::F32, k.device())?;
            let nv = Tensor::zeros((cap, nkv, d), DType::F32, k.device())?;
            if let Some(LayerKv::Grown { k: ok, v: ov, .. }) = entry.as_ref()
                && filled > 0
            {
                nk.slice_set(&ok.narrow(0, 0, filled)?.contiguous()?, 0, 0)?;
                nv.slice_set(&ov.narrow(0, 0, filled)?.contiguous()?, 0, 0)?;
            }
            *entry = Some(LayerKv::Grown {
                k: nk,
                v: nv,
                filled,
            });
        }
        let Some(LayerKv::Grown {
            k: bk,
            v: bv,
            filled: f,
        }) = entry.as_mut()
        else {
            unreachable!("a grown layer was just ensured")
        };
        // Writes land past every view handed out so far (those end at `filled`), so in-place
        // writes never change what an earlier step saw.
        bk.slice_set(&k, 0, filled)?;
        bv.slice_set(&v, 0, filled)?;
        *f = total;
        Ok((bk.narrow(0, 0, total)?, bv.narrow(0, 0, total)?))
    }

    /// Makes every static layer hold at least `rows` rows (zero-filled, history copied), so that
    /// a captured decode step can run to position `rows - 1` without a reallocation.
    /// `shape_of(layer)` gives `(kv_heads, head_dim, dtype, device)` for layers not yet allocated.
    pub fn reserve_static(
        &mut self,
        rows: usize,
        shape_of: impl Fn(usize) -> (usize, usize, DType, Device),
    ) -> Result<()> {
        for layer in 0..self.layers.len() {
            let (nkv, d, dtype, device) = shape_of(layer);
            self.ensure_static(layer, rows, nkv, d, dtype, &device)?;
        }
        Ok(())
    }

    fn ensure_static(
        &mut self,
        layer: usize,
        rows: usize,
        nkv: usize,
        d: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let have = match &self.layers[layer] {
            Some(LayerKv::Static { k, .. }) => k.dim(1)?,
            _ => 0,
        };
        if rows <= have {
            return Ok(());
        }
        let cap = rows.next_power_of_two().max(self.min_static);
        let nk = Tensor::zeros((nkv, cap, d), dtype, device)?;
        let nv = Tensor::zeros((nkv, cap, d), dtype, device)?;
        if let Some(LayerKv::Static { k, v }) = &self.layers[layer] {
            nk.slice_set(k, 1, 0)?;
            nv.slice_set(v, 1, 0)?;
        }
        self.layers[layer] = Some(LayerKv::Static { k: nk, v: nv });
        self.epoch += 1;
        Ok(())
    }

    /// Writes head-major k, v `[kv_heads, T, head_dim]` at rows `offset..offset + T` (growing
    /// the buffers if needed); returns the whole static buffers.
    pub(super) fn write_static(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (nkv, t, d) = k.dims3()?;
        self.ensure_static(layer, offset + t, nkv, d, k.dtype(), k.device())?;
        let Some(LayerKv::Static { k: bk, v: bv }) = &self.layers[layer] else {
            unreachable!("a static layer was just ensured")
        };
        bk.slice_set(&k.contiguous()?, 1, offset)?;
        bv.slice_set(&v.contiguous()?, 1, offset)?;
        Ok((bk.clone(), bv.clone()))
    }

    /// Writes one decode token's k, v `[kv_heads, 1, head_dim]` at the row given in device
    /// memory by `rows` (`[kv_heads, 1, head_dim]` u32, every entry the position). The buffers
    /// must already hold that row ([`KvCache::reserve_static`]); nothing here reads the
    /// position on the host, which is what makes the step capturable.
    pub(super) fn write_static_at(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        rows: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let Some(LayerKv::Static { k: bk, v: bv }) = &self.layers[layer] else {
            return Err(candle_core::Error::Msg(format!(
                "layer {layer}: device-positioned write into a cache without static buffers"
            ))
            .into());
        };
        bk.scatter_set(rows, &k.contiguous()?, 1)?;
        bv.scatter_set(rows, &v.contiguous()?, 1)?;
        Ok((bk.clone(), bv.clone()))
    }

    /// A layer's static `[kv_heads, capacity, head_dim]` key and value buffers, if it has them
    /// (the GPU attention kernel writes and reads them in place).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn static_buffers(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        match self.layers.get(layer)? {
            Some(LayerKv::Static { k, v }) => Some((k.clone(), v.clone())),
            _ => None,
        }
    }

    /// Called once per forward, after every layer appended `n` new positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `reset` empties a static cache into zeros in place — the same buffers and epoch, so a
    /// graph captured over them still fits — and `reusable_for` takes it up only at the
    /// capacity a fresh cache's prefill of that many rows would allocate.
    #[test]
    fn reset_zeroes_static_buffers_in_place_and_keeps_the_epoch() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new_static(2, 4);
        assert!(cache.reusable_for(100), "nothing allocated yet: any prompt");
        let kv = Tensor::full(7f32, (1, 5, 3), &dev).unwrap();
        for layer in 0..2 {
            cache.write_static(layer, &kv, &kv, 0).unwrap();
        }
        cache.advance(5);
        let (epoch, cap) = (cache.epoch(), cache.static_capacity());
        assert_eq!(cap, 8);
        let Some(LayerKv::Static { k, .. }) = &cache.layers[1] else {
            panic!("a static layer")
        };
        let before = k.clone();
        cache.reset().unwrap();
        assert_eq!(
            (cache.len(), cache.epoch(), cache.static_capacity()),
            (0, epoch, 8)
        );
        let Some(LayerKv::Static { k, v }) = &cache.layers[1] else {
            panic!("a static layer")
        };
        // `before` shares the old buffer: zero too only if the buffer was zeroed in place.
        for t in [k, v, &before] {
            let vals: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(vals.iter().all(|&x| x == 0.0 && x.is_sign_positive()));
        }
        // A fresh cache's prefill of r rows allocates max(r.next_power_of_two(), 4).
        for (rows, ok) in [(5, true), (8, true), (1, false), (4, false), (9, false)] {
            assert_eq!(cache.reusable_for(rows), ok, "{rows} rows");
        }
    }

    #[test]
    fn grown_kv_cache_keeps_every_row_across_regrowth_and_rewind() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1);
        let row = |i: usize| Tensor::full(i as f32, (1, 2, 3), &dev).unwrap();
        // A 5-token prefill, then single tokens past the first capacity (64) and the second.
        let prefill = Tensor::cat(&(0..5).map(row).collect::<Vec<_>>(), 0).unwrap();
        cache.append_token_major(0, &prefill, &prefill).unwrap();
        cache.advance(5);
        let mut last = None;
        for i in 5..150 {
            let r = row(i).to_dtype(DType::BF16).unwrap();
            last = Some(cache.append_token_major(0, &r, &r).unwrap());
            cache.advance(1);
        }
        let (k, v) = last.unwrap();
        assert_eq!(k.dims(), &[150, 2, 3]);
        assert_eq!(k.dtype(), DType::F32, "stored widened, exactly");
        let firsts: Vec<f32> = k
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (0..150).flat_map(|i| [i as f32; 2]).collect();
        assert_eq!(firsts, want);
        assert_eq!(k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        assert_eq!(
            cache.bytes(),
            2 * 256 * 2 * 3 * 4,
            "capacity is what is held"
        );

        // Rewind to 10 and append: position 10 is overwritten, the rows before it are kept.
        cache.truncate(10).unwrap();
        let (k2, _) = cache.append_token_major(0, &row(999), &row(999)).unwrap();
        assert_eq!(k2.dim(0).unwrap(), 11);
        assert_eq!(
            k2.get(10)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
            999.0
        );
        assert_eq!(
            k2.get(9)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0],
            9.0
        );
    }
}
