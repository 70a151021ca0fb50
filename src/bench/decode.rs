//! Decode throughput of our native backend against candle-transformers' own `qwen3_moe` on the
//! same files, in the same process, same prompt, same number of tokens — the reference the
//! engine must not fall behind (ratio ≥ 0.95).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen3_moe;
use serde::Serialize;

use crate::engine::{BackendSpec, Engine};
use crate::model::DecodeOptions;
use crate::model::config::{FfnKind, MoeConfig};
use crate::model::error::{ModelError, Result};
use crate::model::generate::Generation;
use crate::model::ports::NoObserver;
use crate::model::sampling::SamplingParams;

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub decode_tok_s: f64,
    /// The first decode step's time, within `decode_s` (NaN where not timed apart): on a GPU it
    /// holds the capture of the step's CUDA graph when the generation captures one.
    pub first_step_s: f64,
    pub tokens: Vec<u32>,
    /// Decode steps that ran as a timed graph replay, and the device time they took.
    pub graph_steps: usize,
    pub graph_device_s: f64,
}

impl DecodeResult {
    /// Decode speed over the steps after the first (NaN with fewer than two).
    pub fn after_first_tok_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(2);
        if n == 0 {
            return f64::NAN;
        }
        n as f64 / (self.decode_s - self.first_step_s).max(1e-12)
    }

    /// On a GPU where every step after the first replayed a graph: the mean device time of a
    /// step and the host's time around it (the rest of the step's wall time: reading the
    /// result, picking the token, launching the next), ms. None elsewhere.
    pub fn step_split_ms(&self) -> Option<(f64, f64)> {
        let n = self.tokens.len().saturating_sub(2);
        if n == 0 || self.graph_steps < n {
            return None;
        }
        let device = self.graph_device_s / self.graph_steps as f64 * 1e3;
        let wall = (self.decode_s - self.first_step_s) / n as f64 * 1e3;
        Some((device, wall - device))
    }
}

/// Deterministic prompt token ids.
pub fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32)
        .collect()
}

/// Our engine: greedy decode of `new_tokens` after `prompt`.
pub fn run_ours(engine: &Engine, prompt: &[u32], new_tokens: usize) -> Result<DecodeResult> {
    run_ours_from(engine, prompt, new_tokens, true)
}

/// [`run_ours`] over what the previous repeat left (`reuse`, as every prompt after the first in
/// a session: `Generation::reusing` says where that is taken up), or on a fresh KV cache with no
/// graphs, as every generation ran before that reuse (the engine's kept state stays as it was).
fn run_ours_from(
    engine: &Engine,
    prompt: &[u32],
    new_tokens: usize,
    reuse: bool,
) -> Result<DecodeResult> {
    let params = SamplingParams {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let mut g = if reuse {
        engine.generation(prompt.to_vec(), params, vec![])?
    } else {
        Generation::new(&engine.model, prompt.to_vec(), params, vec![])?
    };
    let mut first_step_s = f64::NAN;
    while let Some(out) = g.step(&engine.model, engine.provider.as_ref(), &mut NoObserver)? {
        if !out.prefill && first_step_s.is_nan() {
            first_step_s = out.step_time.as_secs_f64();
        }
    }
    let decode_s = g.decode_time.as_secs_f64();
    let result = DecodeResult {
        prefill_s: g.prefill_time.as_secs_f64(),
        decode_s,
        decode_tok_s: (new_tokens.saturating_sub(1)) as f64 / decode_s.max(1e-12),
        first_step_s,
        tokens: std::mem::take(&mut g.generated),
        graph_steps: g.graph_steps,
        graph_device_s: g.graph_device_time.as_secs_f64(),
    };
    if reuse {
        engine.keep(g);
    }
    Ok(result)
}

/// candle-transformers' model: `qwen3_moe` built from our normalised config over the same
/// safetensors, or `quantized_qwen3_moe` over the same GGUF file.
pub struct Reference {
    model: RefModel,
    device: Device,
    dtype: DType,
}

enum RefModel {
    Dense(Box<qwen3_moe::ModelForCausalLM>),
    /// With where it came from: it has no way to clear its KV cache, so each run reloads it.
    Gguf(
        Box<candle_transformers::models::quantized_qwen3_moe::GGUFQWenMoE>,
        PathBuf,
        DType,
    ),
}

impl Reference {
    pub fn load(dir: &Path, cfg: &MoeConfig, dtype: DType, device: &Device) -> Result<Self> {
        if cfg.rope_scaling.is_some() {
            return Err(ModelError::Input(
                "candle-transformers' qwen3_moe models have no RoPE scaling (the config's rope_type \
                 \"yarn\" / \"linear\"): its outputs would not be this model's; compare with \
                 --no-reference"
                    .into(),
            ));
        }
        if crate::model::gguf::is_gguf(dir) {
            return Self::load_gguf(dir, dtype, device);
        }
        if let Some(q) = &cfg.quantization {
            // Why refuse: qwen3_moe's VarBuilder would cast the e4m3 weights to the compute
            // dtype and never read their `weight_scale_inv`, so the "reference" would run
            // another model at bf16's cost — a comparison that looks right and is not.
            return Err(ModelError::Input(format!(
                "{}: candle-transformers has no model for block-scaled FP8 checkpoints                  ({}×{} blocks); its qwen3_moe would read the e4m3 weights without                  their weight_scale_inv. Compare with --no-reference, or run this against the                  bf16 checkpoint the FP8 one was made from",
                dir.display(),
                q.block[0],
                q.block[1]
            )));
        }
        if cfg.layer_kinds.contains(&FfnKind::Dense) {
            return Err(ModelError::Input(
                "candle-transformers' qwen3_moe has no mlp_only_layers; pick a model whose layers are all MoE".into(),
            ));
        }
        let c = qwen3_moe::Config {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size.max(1),
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
            attention_bias: cfg.attention_bias,
            num_key_value_heads: cfg.num_key_value_heads,
            max_position_embeddings: cfg.max_position_embeddings,
            sliding_window: None,
            max_window_layers: cfg.num_hidden_layers,
            tie_word_embeddings: cfg.tie_word_embeddings,
            rope_theta: cfg.rope_theta,
            rms_norm_eps: cfg.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: candle_nn::Activation::Silu,
            decoder_sparse_step: 1,
            moe_intermediate_size: cfg.moe_intermediate_size,
            num_experts_per_tok: cfg.num_experts_per_tok,
            num_experts: cfg.num_experts,
            norm_topk_prob: cfg.norm_topk_prob,
        };
        let files = safetensors_files(dir)?;
        // SAFETY: read-only mapping of checkpoint files, as candle's own examples do.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        let vb = match cfg.tensor_prefix.trim_end_matches('.') {
            "" => vb,
            p => vb.pp(p),
        };
        let model = qwen3_moe::ModelForCausalLM::new(&c, vb)?;
        Ok(Reference {
            model: RefModel::Dense(Box::new(model)),
            device: device.clone(),
            dtype,
        })
    }

    /// Whether candle-transformers has a model for `path` on a device of this kind: its
    /// quantized model's MoE layers call candle's `moe_gemm_gguf`, which exists for CUDA only.
    /// Asked before anything is loaded, so a refusal is immediate.
    pub fn check_device(path: &Path, cuda: bool) -> Result<()> {
        if crate::model::gguf::is_gguf(path) && !cuda {
            return Err(ModelError::Input(
                "candle-transformers' quantized_qwen3_moe runs its experts on CUDA only; on the \
                 CPU compare against llama.cpp (llama-bench, or `moescope bench kld`)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::check_device(path, device.is_cuda())?;
        Ok(Reference {
            model: RefModel::Gguf(
                Box::new(gguf_reference(path, dtype, device)?),
                path.to_path_buf(),
                dtype,
            ),
            device: device.clone(),
            dtype,
        })
    }

    /// Which of candle-transformers' models this is, in which dtype.
    pub fn name(&self) -> String {
        match &self.model {
            RefModel::Dense(_) => format!("qwen3_moe ({:?})", self.dtype),
            RefModel::Gguf(..) => format!("quantized_qwen3_moe ({:?})", self.dtype),
        }
    }

    fn forward(&mut self, input: &Tensor, offset: usize) -> Result<Tensor> {
        Ok(match &mut self.model {
            RefModel::Dense(m) => m.forward(input, offset)?,
            RefModel::Gguf(m, _, _) => m.forward(input, offset)?,
        })
    }

    fn clear(&mut self) -> Result<()> {
        match &mut self.model {
            RefModel::Dense(m) => m.clear_kv_cache(),
            RefModel::Gguf(m, path, dtype) => **m = gguf_reference(path, *dtype, &self.device)?,
        }
        Ok(())
    }

    /// The logits of positions `first .. chunk.len() - 1` of `chunk`, from an empty KV cache:
    /// `chunk[..=first]` as one prompt, then one token at a time.
    pub fn scored_logits(&mut self, chunk: &[u32], first: usize) -> Result<Vec<Vec<f32>>> {
        self.clear()?;
        let row = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
        };
        let input = Tensor::new(&chunk[..=first], &self.device)?.unsqueeze(0)?;
        let mut rows = vec![row(self.forward(&input, 0)?)?];
        for pos in first + 1..chunk.len().saturating_sub(1) {
            let input = Tensor::new(&chunk[pos..=pos], &self.device)?.unsqueeze(0)?;
            rows.push(row(self.forward(&input, pos)?)?);
        }
        Ok(rows)
    }

    pub fn run(&mut self, prompt: &[u32], new_tokens: usize) -> Result<DecodeResult> {
        self.clear()?;
        let argmax = |t: &Tensor| -> Result<u32> {
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            Ok(crate::model::layers::argmax(&v) as u32)
        };
        let start = Instant::now();
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let logits = self.forward(&input, 0)?;
        let mut tok = argmax(&logits)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let mut tokens = vec![tok];
        let start = Instant::now();
        for i in 1..new_tokens {
            let input = Tensor::new(&[tok], &self.device)?.unsqueeze(0)?;
            let logits = self.forward(&input, prompt.len() + i - 1)?;
            tok = argmax(&logits)?;
            tokens.push(tok);
        }
        let decode_s = start.elapsed().as_secs_f64();
        Ok(DecodeResult {
            prefill_s,
            decode_s,
            decode_tok_s: (new_tokens.saturating_sub(1)) as f64 / decode_s.max(1e-12),
            first_step_s: f64::NAN,
            tokens,
            graph_steps: 0,
            graph_device_s: 0.0,
        })
    }
}

fn gguf_reference(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<candle_transformers::models::quantized_qwen3_moe::GGUFQWenMoE> {
    use candle_core::quantized::gguf_file::Content;
    let io = |e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        what: "reading the GGUF file".into(),
        source: e,
    };
    let mut f = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let content = Content::read(&mut f)?;
    Ok(
        candle_transformers::models::quantized_qwen3_moe::GGUFQWenMoE::from_gguf(
            content, &mut f, device, dtype,
        )?,
    )
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let idx = dir.join(crate::model::checkpoint::INDEX_FILE);
    if idx.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&idx).map_err(|e| ModelError::Io {
                path: idx.clone(),
                what: "reading".into(),
                source: e,
            })?)
            .map_err(|e| ModelError::Checkpoint {
                file: idx.clone(),
                msg: e.to_string(),
            })?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        Ok(files.into_iter().map(|f| dir.join(f)).collect())
    } else {
        Ok(vec![dir.join(crate::model::checkpoint::SINGLE_FILE)])
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub model: String,
    pub dtype: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    pub ours_tok_s: f64,
    /// Ours: the first decode step (on a GPU, where a CUDA graph is captured) and the speed of
    /// the steps after it, from the same best run.
    pub ours_first_step_ms: f64,
    pub ours_after_first_tok_s: f64,
    /// On a GPU, the same run's steps after the first: their mean device time (the graph's
    /// replay) and the host's time around each, ms (see `DecodeResult::step_split_ms`).
    pub ours_step_device_ms: Option<f64>,
    pub ours_step_host_ms: Option<f64>,
    pub reference_tok_s: f64,
    pub ratio: f64,
    pub ours_prefill_tok_s: f64,
    pub reference_prefill_tok_s: f64,
    /// Leading greedy tokens on which both agree (a sanity check that both ran the same model).
    pub agreeing_tokens: usize,
    /// On a GPU: ours with CUDA graphs off (every kernel launched from the host), same run.
    pub ours_uncaptured_tok_s: Option<f64>,
    /// On a GPU: whether the greedy tokens with and without graphs are the same.
    pub uncaptured_tokens_equal: Option<bool>,
    /// On a GPU: ours when every run starts on a fresh KV cache and captures its graphs again
    /// (as before generations took over the last one's state), same run: speed and first step.
    pub ours_fresh_tok_s: Option<f64>,
    pub ours_fresh_first_step_ms: Option<f64>,
    /// On a GPU: whether those fresh runs' greedy tokens are the reusing runs'.
    pub fresh_tokens_equal: Option<bool>,
}

/// Best of `repeats` after one warm-up, alternating the two so neither gets a warmer machine.
pub fn compare(
    spec: &BackendSpec,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    with_reference: bool,
) -> Result<Comparison> {
    let mut engine = spec.load(|_, _| {})?;
    let cfg = engine.cfg.clone();
    let device = engine.model.device().clone();
    let mut reference = if with_reference {
        Some(Reference::load(
            &spec.model_dir,
            &cfg,
            spec.dtype.candle(),
            &device,
        )?)
    } else {
        None
    };
    let p = prompt(prompt_tokens, cfg.vocab_size);
    let _ = run_ours(&engine, &p, new_tokens.min(4))?;
    if let Some(r) = &mut reference {
        let _ = r.run(&p, new_tokens.min(4))?;
    }
    let gpu = device.is_cuda() && engine.model.options().cuda_graphs;
    let mut best_ours: Option<DecodeResult> = None;
    let mut best_ref: Option<DecodeResult> = None;
    let mut best_uncaptured: Option<DecodeResult> = None;
    let mut best_fresh: Option<DecodeResult> = None;
    for _ in 0..repeats.max(1) {
        let o = run_ours(&engine, &p, new_tokens)?;
        if gpu {
            let f = run_ours_from(&engine, &p, new_tokens, false)?;
            if best_fresh
                .as_ref()
                .is_none_or(|b| f.decode_tok_s > b.decode_tok_s)
            {
                best_fresh = Some(f);
            }
            let graphs = engine.model.options();
            engine.model.set_options(DecodeOptions {
                cuda_graphs: false,
                ..graphs
            });
            let u = run_ours(&engine, &p, new_tokens);
            engine.model.set_options(graphs);
            let u = u?;
            if best_uncaptured
                .as_ref()
                .is_none_or(|b| u.decode_tok_s > b.decode_tok_s)
            {
                best_uncaptured = Some(u);
            }
        }
        if best_ours
            .as_ref()
            .is_none_or(|b| o.decode_tok_s > b.decode_tok_s)
        {
            best_ours = Some(o);
        }
        if let Some(reference) = &mut reference {
            let r = reference.run(&p, new_tokens)?;
            if best_ref
                .as_ref()
                .is_none_or(|b| r.decode_tok_s > b.decode_tok_s)
            {
                best_ref = Some(r);
            }
        }
    }
    let o = best_ours.expect("ran");
    // Without a reference its figures are NaN (and no token agrees).
    let r = best_ref.unwrap_or(DecodeResult {
        prefill_s: f64::NAN,
        decode_s: f64::NAN,
        decode_tok_s: f64::NAN,
        first_step_s: f64::NAN,
        tokens: vec![],
        graph_steps: 0,
        graph_device_s: 0.0,
    });
    let agreeing = o
        .tokens
        .iter()
        .zip(&r.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    Ok(Comparison {
        model: spec.model_dir.display().to_string(),
        dtype: spec.dtype.name().into(),
        device: spec.device.to_string(),
        prompt_tokens,
        new_tokens,
        repeats,
        ours_tok_s: o.decode_tok_s,
        ours_first_step_ms: o.first_step_s * 1e3,
        ours_after_first_tok_s: o.after_first_tok_s(),
        ours_step_device_ms: o.step_split_ms().map(|s| s.0),
        ours_step_host_ms: o.step_split_ms().map(|s| s.1),
        reference_tok_s: r.decode_tok_s,
        // NaN without a reference (`f64::max` would turn a NaN into the floor).
        ratio: o.decode_tok_s
            / if r.decode_tok_s.is_nan() {
                f64::NAN
            } else {
                r.decode_tok_s.max(1e-12)
            },
        ours_prefill_tok_s: prompt_tokens as f64 / o.prefill_s.max(1e-12),
        reference_prefill_tok_s: prompt_tokens as f64
            / if r.prefill_s.is_nan() {
                f64::NAN
            } else {
                r.prefill_s.max(1e-12)
            },
        agreeing_tokens: agreeing,
        uncaptured_tokens_equal: best_uncaptured.as_ref().map(|u| u.tokens == o.tokens),
        ours_uncaptured_tok_s: best_uncaptured.map(|u| u.decode_tok_s),
        fresh_tokens_equal: best_fresh.as_ref().map(|f| f.tokens == o.tokens),
        ours_fresh_tok_s: best_fresh.as_ref().map(|f| f.decode_tok_s),
        ours_fresh_first_step_ms: best_fresh.map(|f| f.first_step_s * 1e3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(tokens: usize, graph_steps: usize) -> DecodeResult {
        DecodeResult {
            prefill_s: 0.01,
            // A first step of 3 ms, then 10 more of 1 ms each.
            decode_s: 0.013,
            decode_tok_s: 10.0 / 0.013,
            first_step_s: 0.003,
            tokens: vec![7; tokens],
            graph_steps,
            graph_device_s: graph_steps as f64 * 0.0008,
        }
    }

    #[test]
    fn a_steps_split_is_its_device_time_and_the_rest_of_its_wall_time() {
        // 12 tokens: the prompt's, the first decode step's and 10 after it, all replays.
        let (device, host) = result(12, 10).step_split_ms().unwrap();
        assert!((device - 0.8).abs() < 1e-9, "{device}");
        assert!((host - 0.2).abs() < 1e-9, "{host}");
        // A step after the first that did not replay a timed graph: no split to give.
        assert_eq!(result(12, 9).step_split_ms(), None);
        assert_eq!(result(2, 0).step_split_ms(), None);
    }
}
