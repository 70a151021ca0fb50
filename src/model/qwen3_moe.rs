//! The Qwen3-MoE forward pass (also the Qwen3-Omni thinker's text path).
//!
//! embeddings → per layer [RMSNorm → GQA attention (q/k RMSNorm, NeoX RoPE, KV cache) → residual
//! → RMSNorm → MoE block or dense MLP → residual] → final RMSNorm → lm_head.
//!
//! The MoE block follows HF's `Qwen3MoeSparseMoeBlock` exactly: router logits in the compute dtype,
//! softmax in f32 over *all* experts, top-k, optional renormalisation in f32, weights cast to the
//! compute dtype, then experts applied in ascending expert order and summed into a zero tensor.
//! Expert weights come from an [`ExpertProvider`]; nothing here depends on which one.

use candle_core::{DType, Device, Tensor};

use super::DecodeOptions;
use super::checkpoint::Checkpoint;
use super::config::{FfnKind, MoeConfig};
use super::embedding::Embedding;
use super::error::{ModelError, Result};
use super::layers::{
    Attention, DecodeInputs, KvCache, Linear, LinearWeight, Mlp, Positions, RmsNorm, Rope,
};
use super::moe_block::DeviceRouting;
use super::moe_block::MoeBlock;
use super::ports::{ExpertProvider, RoutingObserver};

/// Anything non-expert weights can be loaded from by name (a checkpoint, or the seed layout).
pub trait WeightStore {
    fn load_tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;
    /// Whether a tensor exists (for optional tensors).
    fn has_tensor(&self, name: &str) -> bool;

    /// Whether the tensor is stored block-quantized (then [`load_linear`](Self::load_linear)
    /// keeps it so).
    fn holds_quantized(&self, _name: &str) -> bool {
        false
    }

    /// The token embedding: dense in `dtype`, unless the store keeps it block-quantized and
    /// the model runs on the CPU, or on a GPU in bf16 in a type the block kernels decode (see
    /// `embedding.rs`).
    fn load_embedding(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Embedding> {
        Ok(Embedding::Dense(
            self.load_tensor(name, shape, dtype, device)?,
        ))
    }

    /// A linear layer's matrix: kept block-quantized where the store holds it so (GGUF), else
    /// dense in `dtype`.
    fn load_linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<LinearWeight> {
        Ok(LinearWeight::Dense(
            self.load_tensor(name, shape, dtype, device)?,
        ))
    }
}

impl WeightStore for Checkpoint {
    fn load_tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.load(name, shape, dtype, device)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }

    fn load_embedding(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Embedding> {
        if let Some(g) = self.gguf()
            && (device.is_cpu() || dtype == DType::BF16)
            && let Some(rows) = g.load_rows(name, shape, dtype)?
        {
            if device.is_cpu() {
                return Ok(Embedding::Rows(rows));
            }
            if let Some(d) = super::embedding::DeviceRows::new(&rows, device)? {
                return Ok(Embedding::DeviceRows(d));
            }
        }
        Ok(Embedding::Dense(self.load(name, shape, dtype, device)?))
    }

    fn holds_quantized(&self, name: &str) -> bool {
        self.gguf()
            .and_then(|g| g.tensor(&super::gguf::gguf_name(name)?))
            .is_some_and(|t| t.dtype.ggml().is_some())
    }

    fn load_linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<LinearWeight> {
        if let Some(g) = self.gguf() {
            return g.load_linear(name, shape, dtype, device);
        }
        match self.load_fp8(name, shape, device)? {
            Some(m) => Ok(LinearWeight::Fp8(m)),
            None => Ok(LinearWeight::Dense(self.load(name, shape, dtype, device)?)),
        }
    }
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher-forced scoring, perplexity).
    All,
}

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// Qwen3-MoE with resident non-expert weights.
#[derive(Debug, Clone)]
pub struct Qwen3Moe {
    cfg: MoeConfig,
    dtype: DType,
    device: Device,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    options: DecodeOptions,
}

impl Qwen3Moe {
    /// Loads every non-expert weight (shapes checked against the config) in `dtype`.
    pub fn load(
        store: &dyn WeightStore,
        cfg: &MoeConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let d = cfg.head_dim;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let load = |name: &str, shape: &[usize]| {
            store.load_tensor(&cfg.tensor_name(name), shape, dtype, device)
        };
        let load_linear = |name: &str, shape: &[usize]| {
            store.load_linear(&cfg.tensor_name(name), shape, dtype, device)
        };
        let embed = store.load_embedding(
            &cfg.tensor_name("model.embed_tokens.weight"),
            &[cfg.vocab_size, h],
            dtype,
            device,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, kind) in cfg.layer_kinds.iter().enumerate() {
            let p = |rest: &str| format!("model.layers.{l}.{rest}");
            let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                let w = load_linear(&p(&format!("{name}.weight")), &[out, inp])?;
                let b = if cfg.attention_bias {
                    Some(load(&p(&format!("{name}.bias")), &[out])?)
                } else {
                    None
                };
                Ok(Linear::with_weight(w, b))
            };
            let attn = Attention {
                q_proj: lin("self_attn.q_proj", nh * d, h)?,
                k_proj: lin("self_attn.k_proj", nkv * d, h)?,
                v_proj: lin("self_attn.v_proj", nkv * d, h)?,
                o_proj: lin("self_attn.o_proj", h, nh * d)?,
                q_norm: RmsNorm::new(load(&p("self_attn.q_norm.weight"), &[d])?, cfg.rms_norm_eps)?,
                k_norm: RmsNorm::new(load(&p("self_attn.k_norm.weight"), &[d])?, cfg.rms_norm_eps)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: d,
                attn_kernel: DecodeOptions::default().attn_kernel,
            };
            let ffn = match kind {
                FfnKind::Moe => Ffn::Moe(MoeBlock {
                    layer: l,
                    router: load(&p("mlp.gate.weight"), &[cfg.num_experts, h])?,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                    moe_kernel: DecodeOptions::default().moe_kernel,
                    router_arrived: if device.is_cuda() {
                        Some(Tensor::zeros(1, DType::U32, device)?)
                    } else {
                        None
                    },
                }),
                FfnKind::Dense => {
                    let i = cfg.intermediate_size;
                    let no_bias = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                        Ok(Linear::with_weight(
                            load_linear(&p(name), &[out, inp])?,
                            None,
                        ))
                    };
                    Ffn::Dense(Mlp {
                        gate_proj: no_bias("mlp.gate_proj.weight", i, h)?,
                        up_proj: no_bias("mlp.up_proj.weight", i, h)?,
                        down_proj: no_bias("mlp.down_proj.weight", h, i)?,
                    })
                }
            };
            layers.push(DecoderLayer {
                input_norm: RmsNorm::new(
                    load(&p("input_layernorm.weight"), &[h])?,
                    cfg.rms_norm_eps,
                )?,
                attn,
                post_norm: RmsNorm::new(
                    load(&p("post_attention_layernorm.weight"), &[h])?,
                    cfg.rms_norm_eps,
                )?,
                ffn,
            });
        }
        let norm = RmsNorm::new(load("model.norm.weight", &[h])?, cfg.rms_norm_eps)?;
        let embed_name = cfg.tensor_name("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings && store.holds_quantized(&embed_name) {
            // A quantized embedding is also the output matrix in its block format (as llama.cpp
            // multiplies it).
            Linear::with_weight(
                load_linear("model.embed_tokens.weight", &[cfg.vocab_size, h])?,
                None,
            )
        } else if let (true, Some(table)) = (cfg.tie_word_embeddings, embed.dense()) {
            Linear::new(table.clone(), None)
        } else {
            Linear::with_weight(load_linear("lm_head.weight", &[cfg.vocab_size, h])?, None)
        };
        Ok(Qwen3Moe {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::for_config(d, cfg.rope_theta, cfg.rope_scaling.as_ref()),
            options: DecodeOptions::default(),
        })
    }

    /// How decode steps may run on a GPU (from the run's settings).
    pub fn options(&self) -> DecodeOptions {
        self.options
    }

    pub fn set_options(&mut self, options: DecodeOptions) {
        self.options = options;
        for layer in &mut self.layers {
            layer.attn.attn_kernel = options.attn_kernel;
            if let Ffn::Moe(m) = &mut layer.ffn {
                m.moe_kernel = options.moe_kernel;
            }
        }
    }

    /// The first MoE block after layer `l`.
    fn next_moe_after(&self, l: usize) -> Option<&MoeBlock> {
        self.layers[l + 1..]
            .iter()
            .find_map(|layer| match &layer.ffn {
                Ffn::Moe(m) => Some(m),
                Ffn::Dense(_) => None,
            })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Bytes of the resident non-expert weights (the tied lm_head counted once).
    pub fn resident_bytes(&self) -> u64 {
        let t = |x: &Tensor| (x.elem_count() * x.dtype().size_in_bytes()) as u64;
        let lin = |l: &Linear| l.bytes();
        let mut total = self.embed.bytes();
        // A tied, dense lm_head is the embedding itself; anything else is held apart.
        let shared = self.cfg.tie_word_embeddings
            && self.embed.dense().is_some()
            && self.lm_head.bytes() == self.embed.bytes();
        if !shared {
            total += lin(&self.lm_head);
        }
        let hb = (self.cfg.hidden_size * self.dtype.size_in_bytes()) as u64;
        let db = (self.cfg.head_dim * self.dtype.size_in_bytes()) as u64;
        total += hb; // final norm
        for layer in &self.layers {
            let a = &layer.attn;
            total += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj) + lin(&a.o_proj);
            total += 2 * db + 2 * hb;
            total += match &layer.ffn {
                Ffn::Moe(m) => t(&m.router),
                Ffn::Dense(m) => lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj),
            };
        }
        total
    }

    /// Runs `tokens` (positions cache.len()..) through the model and returns f32 logits:
    /// [1, vocab] for [`Logits::Last`], [T, vocab] for [`Logits::All`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        logits: Logits,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is out of range (vocab_size = {})",
                self.cfg.vocab_size
            )));
        }
        let t = tokens.len();
        let offset = cache.len();
        let ids = Tensor::from_vec(tokens.to_vec(), t, &self.device)?;
        if t == 1 && logits == Logits::Last && cache.is_static_on(&self.device) {
            // The GPU decode step: its position goes to the device like its token, and the
            // step runs exactly as a captured graph replays it (see `graph.rs`).
            self.reserve_decode(cache, offset + 1)?;
            let pos = Tensor::from_vec(vec![offset as u32], 1, &self.device)?;
            let mut sink = DeviceRouting::new();
            let defer = observer.wants_routing() && !experts.needs_ids_on_host();
            let out = self.decode_step(
                &ids,
                &pos,
                cache,
                experts,
                observer,
                defer.then_some(&mut sink),
            )?;
            cache.advance(1);
            deliver_routing(&sink, offset, observer)?;
            return Ok(out);
        }
        let x = self.embed.lookup(&ids)?;
        let (cos, sin) = self.rope.tables(offset, t, self.dtype, &self.device)?;
        let x = self.run_layers(
            x,
            offset,
            cache,
            experts,
            observer,
            &Positions::Host {
                cos: &cos,
                sin: &sin,
            },
            None,
        )?;
        cache.advance(t);
        let x = match logits {
            Logits::Last => x.narrow(0, t - 1, 1)?,
            Logits::All => x,
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The RoPE tables, made to cover at least `len` positions.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn rope_full(&self, len: usize) -> Result<(Tensor, Tensor)> {
        self.rope.full(len, self.dtype, &self.device)
    }

    /// Makes the static KV buffers hold at least `rows` positions.
    pub(crate) fn reserve_decode(&self, cache: &mut KvCache, rows: usize) -> Result<()> {
        if cache.static_capacity() >= rows {
            return Ok(());
        }
        let (nkv, d) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        cache.reserve_static(rows, |_| (nkv, d, self.dtype, self.device.clone()))
    }

    /// One decode token (`ids`, u32 `[1]`) at the position held on the device in `pos` (u32
    /// `[1]`), into static KV buffers that already hold that row; f32 logits `[1, vocab]`.
    /// Reads nothing back to the host unless the expert provider must (selective) or the
    /// observer listens without a `sink` — so for native with a sink it can be captured as a
    /// CUDA graph. The caller advances the cache.
    pub(crate) fn decode_step(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        sink: Option<&mut DeviceRouting>,
    ) -> Result<Tensor> {
        let dec = self.decode_inputs(pos, cache)?;
        let x = self.embed.lookup(ids)?;
        let offset = cache.len();
        let x = self.run_layers(
            x,
            offset,
            cache,
            experts,
            observer,
            &Positions::Device(&dec),
            sink,
        )?;
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The position-derived inputs of a one-token step whose position is `pos` on the device.
    fn decode_inputs(&self, pos: &Tensor, cache: &mut KvCache) -> Result<DecodeInputs> {
        let cap = cache.static_capacity();
        let statics = cache.decode_statics(self.dtype, &self.device)?;
        let (cos, sin) = self.rope.full(cap, self.dtype, &self.device)?;
        DecodeInputs::build(
            pos,
            &statics,
            &cos,
            &sin,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        )
    }

    /// Whether layer `l` has a MoE block.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn is_moe_layer(&self, l: usize) -> bool {
        matches!(self.layers[l].ffn, Ffn::Moe(_))
    }

    /// Piecewise decode, first piece: the token's embedding into `x` and the step's
    /// position-derived inputs into the static `dec` (see `graph::Piecewise`).
    #[cfg(feature = "cuda")]
    pub(crate) fn piece_start(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        cache: &mut KvCache,
        dec: &DecodeInputs,
        x: &Tensor,
    ) -> Result<()> {
        let d = self.decode_inputs(pos, cache)?;
        dec.cos.slice_set(&d.cos, 0, 0)?;
        dec.sin.slice_set(&d.sin, 0, 0)?;
        dec.rows.slice_set(&d.rows, 0, 0)?;
        dec.mask.slice_set(&d.mask, 0, 0)?;
        x.slice_set(&self.embed.lookup(ids)?, 0, 0)?;
        Ok(())
    }

    /// Layer `l` of a device-positioned decode step up to its FFN: attention with the residual
    /// added (`x1`), and `x1` normalised for the FFN (`h2`). What the piecewise and the whole
    /// gated step share.
    #[cfg(feature = "cuda")]
    fn attention_part(
        &self,
        l: usize,
        cache: &mut KvCache,
        dec: &DecodeInputs,
        x: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[l];
        let hn = layer.input_norm.forward(x)?;
        let x1 = layer
            .attn
            .forward_residual(&hn, x, l, cache, &Positions::Device(dec))?;
        let h2 = layer.post_norm.forward(&x1)?;
        Ok((x1, h2))
    }

    /// Piecewise decode, layer `l` up to its experts: attention and residual into `x_mid`, the
    /// normalised state into `h`, the routing into `ids`/`w`. A dense layer runs whole, into `x`.
    /// The same ops, in the same order, as `run_layers` with the fused GPU path.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn piece_attention(
        &self,
        l: usize,
        cache: &mut KvCache,
        dec: &DecodeInputs,
        x: &Tensor,
        x_mid: &Tensor,
        h: &Tensor,
        ids: &Tensor,
        w: &Tensor,
    ) -> Result<()> {
        let (x1, h2) = self.attention_part(l, cache, dec, x)?;
        match &self.layers[l].ffn {
            Ffn::Dense(m) => x.slice_set(&(x1 + m.forward(&h2)?)?, 0, 0)?,
            Ffn::Moe(moe) => {
                let (i, ww) = moe.route_on_device(&h2, 1, &[])?.ok_or_else(|| {
                    ModelError::Input("piecewise decode needs the routing kernel".into())
                })?;
                x_mid.slice_set(&x1, 0, 0)?;
                h.slice_set(&h2, 0, 0)?;
                ids.slice_set(&i, 0, 0)?;
                w.slice_set(&ww, 0, 0)?;
            }
        }
        Ok(())
    }

    /// A whole gated step's layer `l` (`graph::WholeGated`): the ops of [`piece_attention`]
    /// then [`piece_experts`](Self::piece_experts), in the same order, without the static
    /// buffers the pieces trade through — `x` in, the layer's output out. For a MoE layer
    /// `gate` turns the routing (ids, weights) into the slot ids the experts kernel reads from
    /// `stacks` (it queues the layer's gate kernel).
    ///
    /// [`piece_attention`]: Self::piece_attention
    #[cfg(feature = "cuda")]
    pub(crate) fn layer_gated(
        &self,
        l: usize,
        cache: &mut KvCache,
        dec: &DecodeInputs,
        x: &Tensor,
        stacks: Option<&super::ports::Stacked>,
        gate: &mut dyn FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (x1, h2) = self.attention_part(l, cache, dec, x)?;
        match (&self.layers[l].ffn, stacks) {
            (Ffn::Dense(m), _) => Ok((x1 + m.forward(&h2)?)?),
            (Ffn::Moe(moe), Some(stacks)) => {
                let (ids, w) = moe.route_on_device(&h2, 1, &[])?.ok_or_else(|| {
                    ModelError::Input("a gated step needs the routing kernel".into())
                })?;
                let slots = gate(&ids, &w)?;
                Ok(super::moe_decode::moe_decode(
                    &h2,
                    &stacks.gate_up,
                    &stacks.down,
                    &slots,
                    None,
                    &w,
                    Some(&x1),
                    stacks.format(),
                )?)
            }
            (Ffn::Moe(_), None) => Err(ModelError::Input(format!(
                "a gated step's layer {l} has no slot pool"
            ))),
        }
    }

    /// Piecewise decode, layer experts: `x = x_mid + Σ w · expert(h)` over `slot_ids` rows of
    /// the stacks.
    #[cfg(feature = "cuda")]
    pub(crate) fn piece_experts(
        &self,
        stacks: &super::ports::Stacked,
        x_mid: &Tensor,
        h: &Tensor,
        slot_ids: &Tensor,
        w: &Tensor,
        x: &Tensor,
    ) -> Result<()> {
        let y = super::moe_decode::moe_decode(
            h,
            &stacks.gate_up,
            &stacks.down,
            slot_ids,
            None,
            w,
            Some(x_mid),
            stacks.format(),
        )?;
        x.slice_set(&y, 0, 0)?;
        Ok(())
    }

    /// Piecewise decode, last piece: f32 logits of `x` into `logits`.
    #[cfg(feature = "cuda")]
    pub(crate) fn piece_head(&self, x: &Tensor, logits: &Tensor) -> Result<()> {
        let y = self
            .lm_head
            .forward(&self.norm.forward(x)?)?
            .to_dtype(DType::F32)?;
        logits.slice_set(&y, 0, 0)?;
        Ok(())
    }

    /// One stage of decode layer `l` (or of the head, `l` ignored) on the step profile's static
    /// buffers (`step_profile.rs`): the ops `piece_attention`/`piece_experts`/`piece_head` run,
    /// cut at each stage, every stage ending in a copy into its buffer.
    #[cfg(feature = "cuda")]
    pub(crate) fn piece_stage(
        &self,
        l: usize,
        stage: super::step_profile::Stage,
        b: &super::step_profile::StageBuffers,
        cache: &mut KvCache,
        stacks: Option<&super::ports::Stacked>,
    ) -> Result<()> {
        use super::step_profile::Stage;
        let layer = &self.layers[l.min(self.layers.len() - 1)];
        let moe = match &layer.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        };
        let need_moe =
            || moe.ok_or_else(|| ModelError::Input(format!("layer {l} has no MoE block")));
        let need_stacks =
            || stacks.ok_or_else(|| ModelError::Input(format!("layer {l}: no stacked experts")));
        match stage {
            Stage::Start => {
                self.piece_start(&b.ids_in, &b.pos, cache, &b.dec, &b.x)?;
            }
            Stage::AttnNorm => b.hn.slice_set(&layer.input_norm.forward(&b.x)?, 0, 0)?,
            Stage::Attention => {
                let x1 = layer.attn.forward_residual(
                    &b.hn,
                    &b.x,
                    l,
                    cache,
                    &Positions::Device(&b.dec),
                )?;
                b.x_mid.slice_set(&x1, 0, 0)?;
            }
            Stage::FfnNorm => b.h.slice_set(&layer.post_norm.forward(&b.x_mid)?, 0, 0)?,
            Stage::Router => {
                let (i, w) = need_moe()?.route_on_device(&b.h, 1, &[])?.ok_or_else(|| {
                    ModelError::Input("the step profile needs the routing kernel".into())
                })?;
                b.route_ids.slice_set(&i, 0, 0)?;
                b.route_w.slice_set(&w, 0, 0)?;
            }
            Stage::GateUp => {
                let st = need_stacks()?;
                let mid = super::moe_decode::moe_gate_up(
                    &b.h,
                    &st.gate_up,
                    &b.route_ids,
                    None,
                    st.format(),
                )?;
                b.mid.slice_set(&mid, 0, 0)?;
            }
            Stage::Down => {
                let st = need_stacks()?;
                // The residual add is folded into the down kernel, as in the whole step.
                let x = super::moe_decode::moe_down(
                    &b.mid,
                    &st.down,
                    &b.route_ids,
                    None,
                    &b.route_w,
                    Some(&b.x_mid),
                    st.format(),
                )?;
                b.x.slice_set(&x, 0, 0)?;
            }
            Stage::Residual => b.x.slice_set(&(&b.x_mid + &b.y)?, 0, 0)?,
            Stage::DenseMlp => match &layer.ffn {
                Ffn::Dense(m) => b.x.slice_set(&(&b.x_mid + m.forward(&b.h)?)?, 0, 0)?,
                Ffn::Moe(_) => return Err(ModelError::Input(format!("layer {l} is MoE"))),
            },
            Stage::FinalNorm => b.hn.slice_set(&self.norm.forward(&b.x)?, 0, 0)?,
            Stage::LmHead => {
                let y = self.lm_head.forward(&b.hn)?.to_dtype(DType::F32)?;
                b.logits.slice_set(&y, 0, 0)?;
            }
        }
        Ok(())
    }

    /// Bytes of weights (and KV rows, at the static capacity `kv_rows`) a stage of layer `l`
    /// reads in a one-token step: what bounds it at full memory bandwidth.
    #[cfg(feature = "cuda")]
    pub(crate) fn stage_bytes(
        &self,
        l: usize,
        stage: super::step_profile::Stage,
        kv_rows: usize,
    ) -> u64 {
        use super::step_profile::Stage;
        let es = self.dtype.size_in_bytes() as u64;
        let (h, d) = (self.cfg.hidden_size as u64, self.cfg.head_dim as u64);
        let layer = &self.layers[l.min(self.layers.len() - 1)];
        let moe = match &layer.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        };
        let (k, inter) = (
            self.cfg.num_experts_per_tok as u64,
            self.cfg.moe_intermediate_size as u64,
        );
        match stage {
            Stage::Start => h * es,
            Stage::AttnNorm | Stage::FfnNorm | Stage::FinalNorm => h * es,
            Stage::Attention => {
                let a = &layer.attn;
                a.q_proj.bytes()
                    + a.k_proj.bytes()
                    + a.v_proj.bytes()
                    + a.o_proj.bytes()
                    + 2 * d * es
                    + 2 * a.num_kv_heads as u64 * kv_rows as u64 * d * es
            }
            Stage::Router => moe.map_or(0, |m| (m.router.elem_count() as u64) * es),
            Stage::GateUp => k * 2 * inter * h * es,
            Stage::Down => k * inter * h * es,
            Stage::Residual => 0,
            Stage::DenseMlp => match &layer.ffn {
                Ffn::Dense(m) => m.gate_proj.bytes() + m.up_proj.bytes() + m.down_proj.bytes(),
                Ffn::Moe(_) => 0,
            },
            Stage::LmHead => self.lm_head.bytes(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        mut x: Tensor,
        offset: usize,
        cache: &mut KvCache,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        pos: &Positions,
        mut sink: Option<&mut DeviceRouting>,
    ) -> Result<Tensor> {
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            x = layer.attn.forward_residual(&h, &x, l, cache, pos)?;
            let h = layer.post_norm.forward(&x)?;
            // Layer l+1's router applied to layer l's normalised hidden state: a cheap guess of
            // what the next layer will pick, loaded while this one computes.
            let hints = experts.wants_hints();
            if let Some(next) = self
                .next_moe_after(l)
                .filter(|_| hints || observer.wants_guesses())
            {
                let rows = next.guess(&h)?;
                for (r, g) in rows.iter().enumerate() {
                    observer.on_guess(next.layer, offset + r, g);
                }
                if hints {
                    // A prompt's rows are loaded together: their union.
                    let mut all: Vec<usize> = rows.into_iter().flatten().collect();
                    all.sort_unstable();
                    all.dedup();
                    experts.prefetch_hint(next.layer, &all);
                }
            }
            x = match &layer.ffn {
                Ffn::Dense(m) => (x + m.forward(&h)?)?,
                Ffn::Moe(m) => {
                    m.forward_residual(&h, &x, offset, experts, observer, sink.as_deref_mut())?
                }
            };
        }
        Ok(x)
    }
}

/// Hands routing collected on the device to the observer, layer by layer, for the one token at
/// `position` — one device→host copy for all layers.
pub(crate) fn deliver_routing(
    sink: &DeviceRouting,
    position: usize,
    observer: &mut dyn RoutingObserver,
) -> Result<()> {
    if sink.is_empty() {
        return Ok(());
    }
    let ids = Tensor::cat(&sink.iter().map(|(_, i, _)| i).collect::<Vec<_>>(), 0)?;
    let w = Tensor::cat(&sink.iter().map(|(_, _, w)| w).collect::<Vec<_>>(), 0)?;
    deliver_rows(
        sink.iter().map(|(l, _, _)| *l),
        &ids.to_vec2()?,
        &w.to_vec2()?,
        position,
        observer,
    );
    Ok(())
}

/// `ids`/`weights`: one row per layer in `layers` (a one-token step).
pub(crate) fn deliver_rows(
    layers: impl Iterator<Item = usize>,
    ids: &[Vec<u32>],
    weights: &[Vec<f32>],
    position: usize,
    observer: &mut dyn RoutingObserver,
) {
    for ((l, row), w) in layers.zip(ids).zip(weights) {
        observer.on_routing(l, position, row, w);
    }
}
