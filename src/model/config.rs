//! HF `config.json` → one normalised [`MoeConfig`] for the text model we run.
//!
//! Two families are read:
//! - `qwen3_moe` (Qwen3MoeForCausalLM): the config is the text config; tensors have no prefix.
//! - `qwen3_omni_moe` (Qwen3OmniMoeForConditionalGeneration): the text model is the *thinker*; its
//!   config sits at `thinker_config.text_config` and its tensors under `thinker.`.
//!
//! Config files in the wild spell the same thing several ways (transformers 4 vs 5, Omni vs plain);
//! every spelling listed in `shared/reference/qwen3-moe-layouts.md` is accepted here so the rest of
//! the program sees exactly one form. Unknown or inconsistent values are errors that name the file
//! and the field — a silently wrong config is how the earlier project got a wrong RoPE.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config_fields::Obj;
use super::error::ModelError;

/// The model families moescope can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Qwen3Moe,
    Qwen3OmniMoe,
}

impl Family {
    pub const SUPPORTED: &'static [&'static str] = &["qwen3_moe", "qwen3_omni_moe"];

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen3Moe => "qwen3_moe",
            Family::Qwen3OmniMoe => "qwen3_omni_moe",
        }
    }
}

/// What the feed-forward block of one decoder layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    /// A plain SwiGLU MLP of `intermediate_size` (layers in `mlp_only_layers`, or skipped by
    /// `decoder_sparse_step`).
    Dense,
    /// A routed mixture of `num_experts` SwiGLU experts of `moe_intermediate_size`.
    Moe,
}

/// The normalised text-model configuration. Field names follow HF where a field exists there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub family: Family,
    /// Prefix of every text-model tensor name: "" for qwen3_moe, "thinker." for Omni.
    pub tensor_prefix: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers (only read when some layer is dense).
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Present for M-RoPE checkpoints. For text-only input the three position streams are
    /// equal and interleaved M-RoPE reduces exactly to 1-D NeoX RoPE over the full head_dim,
    /// so the section split is informational only (the seed project got this wrong).
    pub mrope_section: Option<Vec<usize>>,
    /// RoPE frequencies stretched for longer contexts (`rope_type` "yarn" or "linear"), as
    /// transformers computes them; absent for plain RoPE (and then not serialised, so the
    /// fingerprints of other checkpoints are what they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    /// One entry per decoder layer.
    pub layer_kinds: Vec<FfnKind>,
    /// End-of-sequence ids (generation_config.json over config.json).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The sampling the checkpoint's authors recommend (`generation_config.json`). Shown to the
    /// user; moescope's comparisons stay greedy unless sampling is asked for. Not part of the
    /// config's identity: skipped by serde, so [`MoeConfig::fingerprint`] ignores it.
    #[serde(skip)]
    pub recommended_sampling: Option<RecommendedSampling>,
    /// Block-scaled FP8 (`quantization_config`); absent for float and GGUF checkpoints (and
    /// then not serialised, so their fingerprints are what they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<super::fp8::Fp8Scheme>,
}

pub use crate::prompt_settings::RecommendedSampling;

impl MoeConfig {
    /// Reads `config.json` (and `generation_config.json` when present) from a model directory.
    /// A GGUF file in place of the directory is read through its metadata (see `gguf.rs`).
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        if super::gguf::is_gguf(dir) {
            return super::gguf::GgufFile::open(dir)?.config();
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            what: "reading the model config".into(),
            source: e,
        })?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| ModelError::Io {
                path: gen_path.clone(),
                what: "reading the generation config".into(),
                source: e,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
                file: gen_path.clone(),
                field: String::new(),
                msg: format!("not valid JSON: {e}"),
            })?;
            let obj = Obj::new(&v, &gen_path, "")?;
            if let Some(ids) = obj.opt_token_ids("eos_token_id")? {
                check_token_ids(&obj, "eos_token_id", &ids, cfg.vocab_size)?;
                cfg.eos_token_ids = ids;
            }
            if let Some(mut ids) = obj.opt_token_ids("bos_token_id")? {
                check_token_ids(&obj, "bos_token_id", &ids, cfg.vocab_size)?;
                cfg.bos_token_id = ids.pop();
            }
            let rec = RecommendedSampling {
                do_sample: obj.opt_bool("do_sample")?,
                temperature: obj.opt_f64("temperature")?,
                top_p: obj.opt_f64("top_p")?,
                top_k: obj.opt_usize("top_k")?,
                repetition_penalty: obj.opt_f64("repetition_penalty")?,
            };
            if rec != RecommendedSampling::default() {
                cfg.recommended_sampling = Some(rec);
            }
        }
        Ok(cfg)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let root: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            file: path.to_path_buf(),
            field: String::new(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let top = Obj::new(&root, path, "")?;
        let model_type = top.req_str("model_type")?;
        let quantization = super::fp8::Fp8Scheme::from_config(&root, path)?;
        let with_quantization = |mut c: Self| {
            c.quantization = quantization;
            c
        };
        match model_type {
            "qwen3_moe" => {
                Self::from_text_obj(Family::Qwen3Moe, &top, &top, "").map(with_quantization)
            }
            "qwen3_omni_moe" => {
                let thinker = top.req_obj("thinker_config")?;
                let text = thinker.req_obj("text_config")?;
                Self::from_text_obj(Family::Qwen3OmniMoe, &text, &thinker, "thinker.")
                    .map(with_quantization)
            }
            other => Err(ModelError::Config {
                file: path.to_path_buf(),
                field: "model_type".into(),
                msg: format!(
                    "unsupported model_type \"{other}\"; supported: {}",
                    Family::SUPPORTED.join(", ")
                ),
            }),
        }
    }

    /// `text` holds the text-model fields; `outer` is where `tie_word_embeddings` may also live
    /// (the Omni thinker config carries it one level up).
    fn from_text_obj(
        family: Family,
        text: &Obj<'_>,
        outer: &Obj<'_>,
        prefix: &str,
    ) -> Result<Self, ModelError> {
        let hidden_size = text.req_usize("hidden_size")?;
        let num_attention_heads = text.req_usize("num_attention_heads")?;
        let num_key_value_heads = text
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let num_hidden_layers = text.req_usize("num_hidden_layers")?;
        let head_dim = match text.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(text.err(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not divisible by \
                             num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        // transformers 4 writes num_experts; transformers 5.17 writes num_local_experts.
        let num_experts = match (
            text.opt_usize("num_experts")?,
            text.opt_usize("num_local_experts")?,
        ) {
            (Some(a), Some(b)) if a != b => {
                return Err(text.err(
                    "num_experts",
                    format!("num_experts = {a} disagrees with num_local_experts = {b}"),
                ));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(text.err(
                    "num_experts",
                    "missing (expected num_experts or num_local_experts)".into(),
                ));
            }
        };
        let num_experts_per_tok = text.req_usize("num_experts_per_tok")?;
        let moe_intermediate_size = text.req_usize("moe_intermediate_size")?;
        let decoder_sparse_step = text.opt_usize("decoder_sparse_step")?.unwrap_or(1);
        let mlp_only_layers = text.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
        let max_position_embeddings = text.opt_usize("max_position_embeddings")?.unwrap_or(32768);
        let (rope_theta, mrope_section, rope_scaling) = parse_rope(text, max_position_embeddings)?;

        if let Some(act) = text.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(text.err(
                "hidden_act",
                format!("\"{act}\" is not supported (expected \"silu\")"),
            ));
        }
        if text.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(text.err(
                "use_sliding_window",
                "sliding-window attention is not supported (expected false)".into(),
            ));
        }

        for (field, v) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("num_hidden_layers", num_hidden_layers),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(text.err(field, "must be > 0".into()));
            }
        }
        // Bounds far above any real model, checked before anything is sized by these numbers:
        // a damaged or hostile config must be an error naming the field, not an allocation of
        // terabytes.
        let vocab_size = text.req_usize("vocab_size")?;
        for (field, v, max) in [
            ("hidden_size", hidden_size, 1 << 17),
            ("num_attention_heads", num_attention_heads, 1 << 12),
            ("num_key_value_heads", num_key_value_heads, 1 << 12),
            ("num_hidden_layers", num_hidden_layers, 1 << 12),
            ("head_dim", head_dim, 1 << 12),
            ("num_experts", num_experts, 1 << 14),
            ("moe_intermediate_size", moe_intermediate_size, 1 << 20),
            ("vocab_size", vocab_size, 1 << 24),
        ] {
            if v > max {
                return Err(text.err(
                    field,
                    format!("{v} is beyond any model moescope can run (at most {max})"),
                ));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(text.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(text.err(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head_dim"),
            ));
        }
        if decoder_sparse_step == 0 {
            return Err(text.err("decoder_sparse_step", "must be >= 1".into()));
        }
        if let Some(&bad) = mlp_only_layers.iter().find(|&&l| l >= num_hidden_layers) {
            return Err(text.err(
                "mlp_only_layers",
                format!("layer {bad} does not exist (num_hidden_layers = {num_hidden_layers})"),
            ));
        }

        let layer_kinds: Vec<FfnKind> = (0..num_hidden_layers)
            .map(|l| {
                if !mlp_only_layers.contains(&l)
                    && num_experts > 0
                    && (l + 1) % decoder_sparse_step == 0
                {
                    FfnKind::Moe
                } else {
                    FfnKind::Dense
                }
            })
            .collect();
        let any_moe = layer_kinds.contains(&FfnKind::Moe);
        let any_dense = layer_kinds.contains(&FfnKind::Dense);
        if any_moe && (num_experts_per_tok == 0 || num_experts_per_tok > num_experts) {
            return Err(text.err(
                "num_experts_per_tok",
                format!("{num_experts_per_tok} must be between 1 and num_experts ({num_experts})"),
            ));
        }
        let intermediate_size = match text.opt_usize("intermediate_size")? {
            Some(v) if v > 1 << 20 => {
                return Err(text.err(
                    "intermediate_size",
                    format!(
                        "{v} is beyond any model moescope can run (at most {})",
                        1 << 20
                    ),
                ));
            }
            Some(v) => v,
            None if any_dense => {
                return Err(text.err(
                    "intermediate_size",
                    "missing, but some layers are dense MLPs (mlp_only_layers / decoder_sparse_step)"
                        .into(),
                ));
            }
            None => 0,
        };

        let tie_word_embeddings = match text.opt_bool("tie_word_embeddings")? {
            Some(v) => v,
            None => outer.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        };
        let eos_token_ids = match text.opt_token_ids("eos_token_id")? {
            Some(ids) => ids,
            None => outer.opt_token_ids("eos_token_id")?.unwrap_or_default(),
        };
        let bos_token_id = text
            .opt_token_ids("bos_token_id")?
            .and_then(|mut v| v.pop());
        check_token_ids(text, "eos_token_id", &eos_token_ids, vocab_size)?;
        check_token_ids(text, "bos_token_id", bos_token_id.as_slice(), vocab_size)?;
        let rms_norm_eps = text.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            // A negative epsilon makes every RMSNorm of a quiet row NaN.
            return Err(text.err(
                "rms_norm_eps",
                format!("{rms_norm_eps} (expected a small non-negative number such as 1e-6)"),
            ));
        }
        if max_position_embeddings == 0 {
            return Err(text.err(
                "max_position_embeddings",
                "0 (expected the context length the model supports)".into(),
            ));
        }

        Ok(MoeConfig {
            family,
            tensor_prefix: prefix.to_string(),
            vocab_size,
            hidden_size,
            intermediate_size,
            moe_intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: text.opt_bool("norm_topk_prob")?.unwrap_or(false),
            rms_norm_eps,
            rope_theta,
            mrope_section,
            rope_scaling,
            max_position_embeddings,
            attention_bias: text.opt_bool("attention_bias")?.unwrap_or(false),
            tie_word_embeddings,
            layer_kinds,
            eos_token_ids,
            bos_token_id,
            recommended_sampling: None,
            quantization: None,
        })
    }

    /// Indices of the layers whose feed-forward block is a routed MoE.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layer_kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == FfnKind::Moe)
            .map(|(i, _)| i)
    }

    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers().count()
    }

    /// Positions the checkpoint was trained (or stretched) for: `max_position_embeddings`, or
    /// more where RoPE scaling says so — YaRN's original context × factor (Qwen's model cards
    /// add YaRN ×4 over 32,768 to a config whose `max_position_embeddings` stays 40,960), linear
    /// scaling's factor × `max_position_embeddings`. Past it the model still runs (RoPE has no
    /// end) but its output is no longer what it was trained to give: runs warn, they do not stop.
    pub fn trained_context(&self) -> usize {
        let stretched = match &self.rope_scaling {
            None => 0.0,
            Some(RopeScaling::Linear { factor }) => self.max_position_embeddings as f64 * factor,
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            }) => original_max_position_embeddings * factor,
        };
        // Rounded, as 32768 × 4.0 is exact but a computed factor (max / original) may not be.
        self.max_position_embeddings.max(stretched.round() as usize)
    }

    /// The warning for `what` ("prompt 3", "the prompt") when its tokens and the new tokens
    /// asked for go past [`MoeConfig::trained_context`]; `None` within it.
    pub fn past_context_warning(
        &self,
        what: &str,
        prompt_tokens: usize,
        max_new_tokens: usize,
    ) -> Option<String> {
        past_context_message(what, prompt_tokens, max_new_tokens, self.trained_context())
    }

    /// Total number of (layer, expert) pairs the config implies — what `verify` must count.
    pub fn total_experts(&self) -> usize {
        self.num_moe_layers() * self.num_experts
    }

    /// Elements of one expert (gate + up + down).
    pub fn expert_params(&self) -> usize {
        3 * self.hidden_size * self.moe_intermediate_size
    }

    /// Elements of every weight that is not an expert: embeddings, attention, norms, routers,
    /// dense MLPs, and `lm_head` unless tied (as `Qwen3Moe::load` loads them).
    pub fn non_expert_params(&self) -> u64 {
        let (h, d) = (self.hidden_size as u64, self.head_dim as u64);
        let (nh, nkv) = (
            self.num_attention_heads as u64,
            self.num_key_value_heads as u64,
        );
        let bias = |n: u64| if self.attention_bias { n } else { 0 };
        let attention = nh * d * h
            + bias(nh * d)
            + 2 * (nkv * d * h + bias(nkv * d))
            + h * nh * d
            + bias(h)
            + 2 * d;
        let per_layer: u64 = self
            .layer_kinds
            .iter()
            .map(|k| {
                2 * h
                    + attention
                    + match k {
                        FfnKind::Moe => self.num_experts as u64 * h,
                        FfnKind::Dense => 3 * h * self.intermediate_size as u64,
                    }
            })
            .sum();
        let embed = self.vocab_size as u64 * h;
        embed + per_layer + h + if self.tie_word_embeddings { 0 } else { embed }
    }

    /// A short stable digest of everything that shapes the weights, so recordings and extracted
    /// directories can say which model they belong to.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_string(self).expect("config serialises");
        blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
    }

    /// Name of a text-model tensor, with the family's prefix.
    pub fn tensor_name(&self, rest: &str) -> String {
        format!("{}{}", self.tensor_prefix, rest)
    }

    pub fn expert_tensor_name(&self, layer: usize, expert: usize, proj: ExpertProj) -> String {
        self.tensor_name(&format!(
            "model.layers.{layer}.mlp.experts.{expert}.{}.weight",
            proj.name()
        ))
    }
}

/// The three matrices of one SwiGLU expert, in on-disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertProj {
    Gate,
    Up,
    Down,
}

impl ExpertProj {
    pub const ALL: [ExpertProj; 3] = [ExpertProj::Gate, ExpertProj::Up, ExpertProj::Down];

    pub fn name(self) -> &'static str {
        match self {
            ExpertProj::Gate => "gate_proj",
            ExpertProj::Up => "up_proj",
            ExpertProj::Down => "down_proj",
        }
    }

    /// Expected [rows, cols] of this matrix for the config.
    pub fn shape(self, cfg: &MoeConfig) -> [usize; 2] {
        match self {
            ExpertProj::Gate | ExpertProj::Up => [cfg.moe_intermediate_size, cfg.hidden_size],
            ExpertProj::Down => [cfg.hidden_size, cfg.moe_intermediate_size],
        }
    }
}

/// Special token ids must be rows of the embedding: an end-of-sequence id past the vocabulary
/// could never be generated, so generation would never stop on it.
fn check_token_ids(obj: &Obj<'_>, key: &str, ids: &[u32], vocab: usize) -> Result<(), ModelError> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(obj.err(
            key,
            format!("{id} is outside the vocabulary (vocab_size {vocab})"),
        )),
        None => Ok(()),
    }
}

/// The one wording of "this run goes past the trained context", for `generate` and for the
/// scheduler (which has the limit from a worker's `Loaded` event, not the config).
pub fn past_context_message(
    what: &str,
    prompt_tokens: usize,
    max_new_tokens: usize,
    limit: usize,
) -> Option<String> {
    let positions = prompt_tokens + max_new_tokens;
    (positions > limit).then(|| {
        let beyond = if prompt_tokens > limit {
            "the prompt alone is longer".to_string()
        } else {
            format!(
                "new tokens after the first {} lie beyond it",
                limit - prompt_tokens
            )
        };
        format!(
            "{what}: {prompt_tokens} prompt tokens + up to {max_new_tokens} new = {positions} \
             positions, past the {limit} the model was trained for ({beyond}); text there may \
             degrade — shorten the prompt or --max-new-tokens"
        )
    })
}

/// How a checkpoint stretches RoPE past the context it was trained on, resolved to what the
/// frequencies need (transformers' `modeling_rope_utils`: `_compute_yarn_parameters`,
/// `_compute_linear_scaling_rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// YaRN: each frequency a blend of itself and itself / `factor`, by where its wavelength
    /// falls against the original context (`beta_fast` .. `beta_slow` rotations), and cos/sin
    /// times `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
}

impl RopeScaling {
    /// For a run's description: "RoPE YaRN ×4 over 32768 positions", "RoPE linear ×2".
    pub fn describe(&self) -> String {
        match self {
            RopeScaling::Linear { factor } => format!("RoPE linear ×{factor}"),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => format!("RoPE YaRN ×{factor} over {original_max_position_embeddings} positions"),
        }
    }
}

/// The RoPE base, the M-RoPE section and the scaling, as [`parse_rope`] reads them.
type ParsedRope = (f64, Option<Vec<usize>>, Option<RopeScaling>);

/// Reads the RoPE base, the (optional) M-RoPE section and the (optional) scaling from any of
/// the spellings in use: `rope_parameters {rope_theta, rope_type, mrope_section, factor, …}`
/// (transformers 5), or a top-level `rope_theta` with an optional `rope_scaling {type|rope_type,
/// mrope_section, interleaved, factor, …}` (Qwen's own instructions for long contexts add
/// `"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
/// 32768}`).
fn parse_rope(text: &Obj<'_>, max_position_embeddings: usize) -> Result<ParsedRope, ModelError> {
    let params = text.opt_obj("rope_parameters")?;
    let scaling = text.opt_obj("rope_scaling")?;
    let theta = match (&params, text.opt_f64("rope_theta")?) {
        (Some(p), top) => match (p.opt_f64("rope_theta")?, top) {
            (Some(a), Some(b)) if (a - b).abs() > f64::EPSILON * a.abs().max(1.0) => {
                return Err(p.err(
                    "rope_theta",
                    format!("{a} disagrees with the top-level rope_theta {b}"),
                ));
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => return Err(p.err("rope_theta", "missing".into())),
        },
        (None, Some(t)) => t,
        (None, None) => {
            return Err(text.err(
                "rope_theta",
                "missing (expected rope_theta or rope_parameters.rope_theta)".into(),
            ));
        }
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(text.err("rope_theta", format!("{theta} is not a valid RoPE base")));
    }
    // RoPE over part of each head (GLM, Phi): moescope rotates whole heads, as Qwen3 does.
    for obj in [Some(text), params.as_ref(), scaling.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(p) = obj.opt_f64("partial_rotary_factor")?
            && p != 1.0
        {
            return Err(obj.err(
                "partial_rotary_factor",
                format!("{p}: RoPE over part of each head is not supported (expected 1.0)"),
            ));
        }
    }
    let mut section = None;
    let mut scaled = None;
    for obj in [params.as_ref(), scaling.as_ref()].into_iter().flatten() {
        let kind = match obj.opt_str("rope_type")? {
            Some(k) => Some(k),
            None => obj.opt_str("type")?,
        };
        match kind {
            // "mrope" is how Qwen2.5-style configs name M-RoPE; "default" is plain RoPE.
            None | Some("default") | Some("mrope") => {
                if let Some(f) = obj.opt_f64("factor")?
                    && (f - 1.0).abs() > 1e-12
                {
                    return Err(obj.err(
                        "factor",
                        format!(
                            "RoPE scaling factor {f} without a rope_type that uses it (expected \
                             none or 1.0, or rope_type \"yarn\" or \"linear\")"
                        ),
                    ));
                }
            }
            Some("yarn") | Some("linear") => {
                let s = rope_scaling(obj, kind == Some("yarn"), text, max_position_embeddings)?;
                if scaled.as_ref().is_some_and(|prev| prev != &s) {
                    return Err(obj.err(
                        "rope_type",
                        "disagrees with the other RoPE scaling object (rope_parameters / \
                         rope_scaling)"
                            .into(),
                    ));
                }
                scaled = Some(s);
            }
            Some(other) => {
                return Err(obj.err(
                    "rope_type",
                    format!(
                        "\"{other}\" is not supported (expected \"default\", \"mrope\", \"yarn\" \
                         or \"linear\")"
                    ),
                ));
            }
        }
        if let Some(s) = obj.opt_usize_list("mrope_section")? {
            section = Some(s);
        }
    }
    if let Some(s) = &section {
        let head_half = text.opt_usize("head_dim")?.map(|d| d / 2);
        if let Some(half) = head_half
            && s.iter().sum::<usize>() != half
        {
            return Err(text.err(
                "mrope_section",
                format!(
                    "{s:?} sums to {}, expected head_dim / 2 = {half}",
                    s.iter().sum::<usize>()
                ),
            ));
        }
    }
    Ok((theta, section, scaled))
}

/// One scaling object's "yarn" or "linear" parameters, with transformers' defaults:
/// `original_max_position_embeddings` from the top level over the object, else
/// `max_position_embeddings`; a YaRN factor missing is their ratio; `beta_fast` 32, `beta_slow`
/// 1 (also for 0, as transformers' `or` reads them); `attention_factor` from `mscale` and
/// `mscale_all_dim` when both are given, else 0.1 ln(factor) + 1.
fn rope_scaling(
    obj: &Obj<'_>,
    yarn: bool,
    text: &Obj<'_>,
    max_position_embeddings: usize,
) -> Result<RopeScaling, ModelError> {
    let positive = |key: &str, v: Option<f64>| -> Result<Option<f64>, ModelError> {
        match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(obj.err(key, format!("{x} (expected a positive number)")))
            }
            v => Ok(v),
        }
    };
    if !yarn {
        let factor = positive("factor", obj.opt_f64("factor")?)?
            .ok_or_else(|| obj.err("factor", "missing (linear RoPE scaling needs one)".into()))?;
        return Ok(RopeScaling::Linear { factor });
    }
    let original = match text.opt_usize("original_max_position_embeddings")? {
        Some(o) => o,
        None => obj
            .opt_usize("original_max_position_embeddings")?
            .unwrap_or(max_position_embeddings),
    };
    if original == 0 {
        return Err(obj.err(
            "original_max_position_embeddings",
            "0 (expected the context the model was trained on)".into(),
        ));
    }
    let original = original as f64;
    let factor = match positive("factor", obj.opt_f64("factor")?)? {
        Some(f) => f,
        None => max_position_embeddings as f64 / original,
    };
    if factor < 1.0 {
        return Err(obj.err(
            "factor",
            format!("{factor} (YaRN stretches: expected >= 1)"),
        ));
    }
    let mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention_factor = match positive("attention_factor", obj.opt_f64("attention_factor")?)? {
        Some(a) => a,
        None => match (obj.opt_f64("mscale")?, obj.opt_f64("mscale_all_dim")?) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(factor, m) / mscale(factor, all)
            }
            _ => mscale(factor, 1.0),
        },
    };
    let or_default = |key: &str, d: f64| -> Result<f64, ModelError> {
        Ok(
            match positive(key, obj.opt_f64(key)?.filter(|&v| v != 0.0))? {
                Some(v) => v,
                None => d,
            },
        )
    };
    Ok(RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        attention_factor,
        beta_fast: or_default("beta_fast", 32.0)?,
        beta_slow: or_default("beta_slow", 1.0)?,
        truncate: obj.opt_bool("truncate")?.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base_text() -> Value {
        json!({
            "model_type": "qwen3_moe",
            "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "norm_topk_prob": true,
            "max_position_embeddings": 512
        })
    }

    fn parse(v: &Value) -> Result<MoeConfig, ModelError> {
        MoeConfig::from_json_str(&v.to_string(), Path::new("config.json"))
    }

    fn err_text(v: &Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn plain_qwen3_moe() {
        let c = parse(&base_text()).unwrap();
        assert_eq!(c.family, Family::Qwen3Moe);
        assert_eq!(c.tensor_prefix, "");
        assert_eq!(c.head_dim, 16, "head_dim defaults to hidden / heads");
        assert_eq!(c.layer_kinds, vec![FfnKind::Moe; 4]);
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.norm_topk_prob);
        assert_eq!(c.total_experts(), 32);
    }

    #[test]
    fn num_local_experts_spelling_and_explicit_head_dim() {
        let mut v = base_text();
        let o = v.as_object_mut().unwrap();
        o.remove("num_experts");
        o.insert("num_local_experts".into(), json!(16));
        o.insert("head_dim".into(), json!(32));
        let c = parse(&v).unwrap();
        assert_eq!(c.num_experts, 16);
        assert_eq!(c.head_dim, 32);
    }

    #[test]
    fn disagreeing_expert_counts_are_an_error() {
        let mut v = base_text();
        v["num_local_experts"] = json!(16);
        assert!(err_text(&v).contains("num_local_experts"));
    }

    #[test]
    fn rope_parameters_spelling() {
        let mut v = base_text();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
        assert_eq!(parse(&v).unwrap().rope_theta, 5e5);
    }

    #[test]
    fn rope_scaling_with_mrope_is_plain_rope() {
        let mut v = base_text();
        v["head_dim"] = json!(16);
        v["rope_scaling"] =
            json!({"mrope_section": [4, 2, 2], "interleaved": true, "rope_type": "default"});
        let c = parse(&v).unwrap();
        assert_eq!(c.mrope_section, Some(vec![4, 2, 2]));
        v["rope_scaling"] = json!({"type": "mrope", "mrope_section": [4, 2, 2]});
        assert_eq!(parse(&v).unwrap().rope_theta, 1e6);
    }

    #[test]
    fn unsupported_rope_type_names_the_field() {
        let mut v = base_text();
        v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 4.0});
        let e = err_text(&v);
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("dynamic"),
            "{e}"
        );
    }

    #[test]
    fn rope_scaling_describes_itself() {
        let mut v = base_text();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32768});
        let d = parse(&v).unwrap().rope_scaling.unwrap().describe();
        assert_eq!(d, "RoPE YaRN ×4 over 32768 positions");
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.5});
        assert_eq!(
            parse(&v).unwrap().rope_scaling.unwrap().describe(),
            "RoPE linear ×2.5"
        );
    }

    #[test]
    fn partial_rope_is_refused_wherever_it_is_written() {
        for at in ["top", "rope_parameters"] {
            let mut v = base_text();
            if at == "top" {
                v["partial_rotary_factor"] = json!(0.5);
            } else {
                v["rope_parameters"] = json!({"rope_theta": 1e6, "partial_rotary_factor": 0.5});
            }
            let e = err_text(&v);
            assert!(
                e.contains("partial_rotary_factor") && e.contains("0.5"),
                "{at}: {e}"
            );
        }
        let mut v = base_text();
        v["partial_rotary_factor"] = json!(1.0);
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn trained_context_counts_rope_stretching() {
        let mut v = base_text();
        assert_eq!(parse(&v).unwrap().trained_context(), 512);
        v["max_position_embeddings"] = json!(40960);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32768});
        assert_eq!(parse(&v).unwrap().trained_context(), 131072);
        // A YaRN factor left out is max / original: the context is max_position_embeddings.
        v["rope_scaling"] = json!({"rope_type": "yarn", "original_max_position_embeddings": 10000});
        assert_eq!(parse(&v).unwrap().trained_context(), 40960);
        v["max_position_embeddings"] = json!(4096);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
        assert_eq!(parse(&v).unwrap().trained_context(), 8192);
        let c = parse(&v).unwrap();
        assert_eq!(c.past_context_warning("the prompt", 8000, 192,), None);
        let w = c.past_context_warning("the prompt", 8000, 193).unwrap();
        assert!(
            w.contains("8193 positions, past the 8192")
                && w.contains("(new tokens after the first 192 lie beyond it)"),
            "{w}"
        );
        let w = c.past_context_warning("prompt 2", 9000, 1).unwrap();
        assert!(
            w.starts_with("prompt 2: 9000 prompt tokens")
                && w.contains("(the prompt alone is longer)")
        );
    }

    #[test]
    fn yarn_takes_transformers_defaults() {
        let mut v = base_text();
        // No original_max_position_embeddings: max_position_embeddings (512), as transformers'
        // standardize_rope_params sets it.
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 0});
        let yarn = |orig: f64, factor: f64, attention_factor: f64| RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            attention_factor,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
        };
        let m = |f: f64| 0.1 * f.ln() + 1.0;
        assert_eq!(
            parse(&v).unwrap().rope_scaling,
            Some(yarn(512.0, 4.0, m(4.0)))
        );
        // A top-level original_max_position_embeddings wins over the object's; no factor:
        // max_position_embeddings over it.
        v["original_max_position_embeddings"] = json!(128);
        v["rope_scaling"] = json!({"rope_type": "yarn", "original_max_position_embeddings": 64});
        assert_eq!(
            parse(&v).unwrap().rope_scaling,
            Some(yarn(128.0, 4.0, m(4.0)))
        );
        // Both objects must agree.
        v["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0});
        assert!(err_text(&v).contains("disagrees"), "{}", err_text(&v));
    }

    #[test]
    fn bad_mrope_section_sum() {
        let mut v = base_text();
        v["head_dim"] = json!(16);
        v["rope_parameters"] = json!({"rope_theta": 1e6, "mrope_section": [4, 4, 4]});
        assert!(err_text(&v).contains("mrope_section"));
    }

    #[test]
    fn dense_layers_from_mlp_only_layers_and_sparse_step() {
        let mut v = base_text();
        v["mlp_only_layers"] = json!([0]);
        v["decoder_sparse_step"] = json!(2);
        let c = parse(&v).unwrap();
        // layer 0: listed; layer 2: (2+1) % 2 != 0
        assert_eq!(
            c.layer_kinds,
            vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Dense, FfnKind::Moe]
        );
        assert_eq!(c.moe_layers().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn dense_layers_need_intermediate_size() {
        let mut v = base_text();
        v.as_object_mut().unwrap().remove("intermediate_size");
        v["mlp_only_layers"] = json!([1]);
        assert!(err_text(&v).contains("intermediate_size"));
    }

    #[test]
    fn omni_thinker_text_config() {
        let mut text = base_text();
        text.as_object_mut().unwrap().remove("model_type");
        text["head_dim"] = json!(16);
        let v = json!({
            "model_type": "qwen3_omni_moe",
            "thinker_config": {"text_config": text, "tie_word_embeddings": true,
                               "audio_config": {}, "vision_config": {}},
            "talker_config": {}
        });
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::Qwen3OmniMoe);
        assert_eq!(c.tensor_prefix, "thinker.");
        assert!(c.tie_word_embeddings, "tie read from the thinker level");
        assert_eq!(
            c.expert_tensor_name(3, 7, ExpertProj::Down),
            "thinker.model.layers.3.mlp.experts.7.down_proj.weight"
        );
    }

    #[test]
    fn omni_errors_name_nested_fields() {
        let v = json!({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": {}}});
        let e = err_text(&v);
        assert!(e.contains("thinker_config.text_config.hidden_size"), "{e}");
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        let v = json!({"model_type": "llama"});
        let e = err_text(&v);
        assert!(e.contains("llama") && e.contains("qwen3_moe") && e.contains("qwen3_omni_moe"));
    }

    #[test]
    fn wrong_types_and_values() {
        let mut v = base_text();
        v["hidden_size"] = json!("64");
        assert!(err_text(&v).contains("hidden_size"));
        let mut v = base_text();
        v["num_key_value_heads"] = json!(3);
        assert!(err_text(&v).contains("num_key_value_heads"));
        let mut v = base_text();
        v["num_experts_per_tok"] = json!(9);
        assert!(err_text(&v).contains("num_experts_per_tok"));
        let mut v = base_text();
        v["hidden_act"] = json!("gelu");
        assert!(err_text(&v).contains("hidden_act"));
        assert!(
            MoeConfig::from_json_str("{not json", Path::new("c.json"))
                .unwrap_err()
                .to_string()
                .contains("c.json")
        );
    }

    #[test]
    fn eos_from_generation_config_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = base_text();
        v["eos_token_id"] = json!(5);
        // Qwen3's vocabulary, for its generation_config.json below.
        v["vocab_size"] = json!(151_936);
        std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        assert_eq!(
            MoeConfig::from_dir(dir.path()).unwrap().eos_token_ids,
            vec![5]
        );
        std::fs::write(
            dir.path().join("generation_config.json"),
            json!({"eos_token_id": [7, 8]}).to_string(),
        )
        .unwrap();
        assert_eq!(
            MoeConfig::from_dir(dir.path()).unwrap().eos_token_ids,
            vec![7, 8]
        );
        assert_eq!(
            MoeConfig::from_dir(dir.path())
                .unwrap()
                .recommended_sampling,
            None
        );
        // Qwen3's generation_config.json: every eos id, and the sampling it recommends.
        std::fs::write(
            dir.path().join("generation_config.json"),
            json!({"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
                   "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                   "transformers_version": "4.51.0"})
            .to_string(),
        )
        .unwrap();
        let cfg = MoeConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg.eos_token_ids, vec![151645, 151643]);
        let rec = cfg.recommended_sampling.unwrap();
        assert_eq!(rec.describe(), "temperature 0.6, top_p 0.95, top_k 20");
        // A field of the wrong type names the file and the field.
        std::fs::write(
            dir.path().join("generation_config.json"),
            json!({"temperature": "hot"}).to_string(),
        )
        .unwrap();
        let e = MoeConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("temperature"),
            "{e}"
        );
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = parse(&base_text()).unwrap();
        let mut v = base_text();
        v["num_experts"] = json!(16);
        let b = parse(&v).unwrap();
        assert_eq!(a.fingerprint(), parse(&base_text()).unwrap().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
