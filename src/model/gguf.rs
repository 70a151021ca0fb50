//! A GGUF file as llama.cpp's converter writes Qwen3-MoE (`general.architecture = qwen3moe`):
//! the config in `qwen3moe.*` metadata, the tokenizer in `tokenizer.ggml.*`, every non-expert
//! tensor on its own (`blk.N.attn_q.weight` …) and each layer's experts stacked in three tensors
//! (`blk.N.ffn_{gate,up,down}_exps.weight`, [E, I, H] / [E, H, I]), each of one GGML type — so
//! one expert's matrix is one contiguous byte range of its stack, which is what lets selective
//! read experts on demand from the file people actually run.
//!
//! The header is parsed by candle's GGUF reader; every tensor's extent is then checked against
//! the file here (the reader does not), so a truncated or hostile file is an error naming the
//! tensor, never a read past the end. Non-expert tensors are dequantised to the compute dtype
//! once at load; experts stay in their block format (see `experts/convert.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::checkpoint::{ExpertLocation, TensorLocation};
use super::config::{ExpertProj, MoeConfig};
use super::error::candle_msg;
use super::error::{ModelError, Result};
use super::safetensors_file::{StDtype, TensorInfo, bytes_to_tensor};

/// The architecture moescope reads (llama.cpp's name for Qwen3-MoE).
pub const ARCH: &str = "qwen3moe";

/// True when `path` is a file that starts with GGUF's magic.
pub fn is_gguf(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    path.is_file() && f.read_exact_at(&mut magic, 0).is_ok() && &magic == b"GGUF"
}

/// One tensor of the file: its type, shape (candle's order, outermost first) and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset in its file.
    pub offset: u64,
    pub len: u64,
    /// Which file of a split model holds it (0: the first, or the only one).
    pub part: usize,
}

/// An opened, checked GGUF file.
pub struct GgufFile {
    path: PathBuf,
    /// The file, or for a model split by `llama-gguf-split` every part in order. Empty for a
    /// header parsed from bytes alone (`from_bytes`): nothing can be loaded then.
    parts: Vec<(PathBuf, File)>,
    meta: HashMap<String, Value>,
    tensors: HashMap<String, GgufTensor>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the header and checks that every tensor's type is one moescope reads and that its
    /// bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            what: "opening the GGUF file".into(),
            source: e,
        })?;
        let file_len = file
            .metadata()
            .map_err(|e| ModelError::Io {
                path: path.to_path_buf(),
                what: "reading the GGUF file's size".into(),
                source: e,
            })?
            .len();
        let mut me = Self::parse(Positioned::new(&file), file_len, path)?;
        me.parts.push((path.to_path_buf(), file));
        me.open_other_parts()?;
        Ok(me)
    }

    /// A model split by `llama-gguf-split` (`split.count` > 1): the first part holds the
    /// metadata, every part some tensors; the others are found beside it by llama.cpp's naming,
    /// `NAME-0000k-of-0000n.gguf`.
    fn open_other_parts(&mut self) -> Result<()> {
        let count = self.meta_u64("split.count")?.unwrap_or(1);
        if count <= 1 {
            return Ok(());
        }
        let err = |msg: String| ModelError::Checkpoint {
            file: self.path.clone(),
            msg,
        };
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let suffix = format!("-of-{count:05}.gguf");
        let stem = name
            .strip_suffix(&suffix)
            .and_then(|s| {
                s.get(..s.len().checked_sub(6)?)
                    .map(|p| (p, &s[s.len() - 6..]))
            })
            .filter(|(_, no)| no.starts_with('-') && no[1..].bytes().all(|b| b.is_ascii_digit()));
        let Some((prefix, no)) = stem else {
            return Err(err(format!(
                "part of a model split in {count} (split.count) but not named as llama.cpp names \
                 the parts (NAME-00001-of-{count:05}.gguf)"
            )));
        };
        let this = self.meta_u64("split.no")?.unwrap_or(0);
        if this != 0 || no != "-00001" {
            return Err(err(format!(
                "part {} of {count} of a split model; pass the first part, \
                 {prefix}-00001-of-{count:05}.gguf",
                this + 1
            )));
        }
        if count > 10_000 {
            return Err(err(format!("split.count {count} is not a real split")));
        }
        let dir = self.path.parent().unwrap_or(Path::new("")).to_path_buf();
        for k in 2..=count {
            let path = dir.join(format!("{prefix}-{k:05}-of-{count:05}.gguf"));
            let io = |what: &str, e: std::io::Error| ModelError::Io {
                path: path.clone(),
                what: what.into(),
                source: e,
            };
            let file = File::open(&path).map_err(|e| io("opening a part of the split model", e))?;
            let len = file
                .metadata()
                .map_err(|e| io("reading its size", e))?
                .len();
            let part = Self::parse(Positioned::new(&file), len, &path)?;
            if part.meta_u64("split.no")? != Some(k - 1)
                || part.meta_u64("split.count")? != Some(count)
            {
                return Err(ModelError::Checkpoint {
                    file: path.clone(),
                    msg: format!("its split.no / split.count do not say part {k} of {count}"),
                });
            }
            let idx = self.parts.len();
            for (name, mut t) in part.tensors {
                t.part = idx;
                if self.tensors.insert(name.clone(), t).is_some() {
                    return Err(ModelError::Tensor {
                        file: path.clone(),
                        tensor: name,
                        msg: "also in an earlier part of the split model".into(),
                    });
                }
            }
            self.parts.push((path, file));
        }
        if let Some(n) = self.meta_u64("split.tensors.count")?
            && n != self.tensors.len() as u64
        {
            return Err(err(format!(
                "split.tensors.count says {n} tensors, the {count} parts hold {}",
                self.tensors.len()
            )));
        }
        Ok(())
    }

    /// The header of a file given as bytes (`path` names it in errors): what the fuzzer and
    /// tests drive. Tensors can be located but not loaded.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        // Through `Positioned`, as a file is read, so the fuzzer drives that reader too.
        Self::parse(
            Positioned::new(std::io::Cursor::new(bytes)),
            bytes.len() as u64,
            path,
        )
    }

    fn parse<R: std::io::Read + std::io::Seek>(
        mut reader: R,
        file_len: u64,
        path: &Path,
    ) -> Result<Self> {
        let err = |msg: String| ModelError::Checkpoint {
            file: path.to_path_buf(),
            msg,
        };
        // The reader divides by the file's `general.alignment` without checking it for zero.
        let read = |mut r: &mut dyn ReadSeek| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut r)))
                .map_err(|_| err("not a readable GGUF header (general.alignment is 0?)".into()))
        };
        let (content, lut4) = match read(&mut reader)? {
            Ok(c) => (c, HashMap::new()),
            // MXFP4 / IQ4_NL / IQ4_XS, which candle does not read and moescope does: the header
            // again with those types as F32, the type restored below.
            Err(e) => match super::gguf_types::with_lut4_as_f32(&mut reader) {
                Some((header, names)) => {
                    let c = read(&mut std::io::Cursor::new(header))?.map_err(|e| {
                        err(format!("not a readable GGUF header: {}", candle_msg(&e)))
                    })?;
                    (c, names.into_iter().collect::<HashMap<_, _>>())
                }
                // candle names an unknown type by its id alone: find which tensors hold one.
                None => {
                    // Table-coded tensors are not what stops this file: name the others.
                    let found = super::gguf_types::unreadable_tensors(&mut reader).map(|mut f| {
                        f.retain(|(_, t)| super::lut4::Lut4::from_ggml(*t).is_none());
                        f
                    });
                    return Err(match found {
                        Some(found) if !found.is_empty() => ModelError::Tensor {
                            file: path.to_path_buf(),
                            tensor: found[0].0.clone(),
                            msg: super::gguf_types::unreadable_message(&found),
                        },
                        _ => err(format!("not a readable GGUF header: {}", candle_msg(&e))),
                    });
                }
            },
        };
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let terr = |msg: String| ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: name.clone(),
                msg,
            };
            let dtype = if let Some(&format) = lut4.get(name) {
                StDtype::Lut4(format)
            } else {
                StDtype::from_ggml(info.ggml_dtype).ok_or_else(|| {
                    terr(format!(
                        "GGML type {:?} is not a weight type moescope reads",
                        info.ggml_dtype
                    ))
                })?
            };
            let shape = info.shape.dims().to_vec();
            let elems = shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
            let row = shape.last().copied().unwrap_or(1) as u64;
            let len = dtype
                .bytes_for(elems)
                .filter(|_| row.is_multiple_of(block_of(dtype)))
                .ok_or_else(|| {
                    terr(format!(
                        "shape {shape:?} is not whole {} blocks of {} per row",
                        dtype.name(),
                        block_of(dtype)
                    ))
                })?;
            let offset = content
                .tensor_data_offset
                .checked_add(info.offset)
                .filter(|o| o.checked_add(len).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    terr(format!(
                        "{len} bytes at data offset {} lie beyond the end of the file \
                         ({file_len} bytes): truncated or damaged",
                        info.offset
                    ))
                })?;
            tensors.insert(
                name.clone(),
                GgufTensor {
                    dtype,
                    shape,
                    offset,
                    len,
                    part: 0,
                },
            );
        }
        if let Some(table) = super::gguf_types::tensor_table(&mut reader) {
            let mut seen = std::collections::HashSet::with_capacity(table.len());
            if let Some((name, _)) = table.iter().find(|(n, _)| !seen.insert(n.as_str())) {
                return Err(ModelError::Tensor {
                    file: path.to_path_buf(),
                    tensor: name.clone(),
                    msg: "listed twice in the tensor table: which one holds the weights is \
                          ambiguous (llama.cpp refuses such a file too)"
                        .into(),
                });
            }
        }
        let alignment = match content.metadata.get("general.alignment") {
            None => 32,
            Some(v) => as_u64(v).filter(|&a| a > 0).ok_or_else(|| {
                err(format!(
                    "general.alignment: expected a positive integer, found {v:?}"
                ))
            })?,
        };
        check_packing(
            &tensors,
            content.tensor_data_offset,
            alignment,
            file_len,
            path,
        )?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            parts: Vec::new(),
            meta: content.metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file holding the tensor `name` (of a split model: its part).
    fn file_of(&self, name: &str) -> Result<&File> {
        let part = self.tensors.get(name).map_or(0, |t| t.part);
        self.parts
            .get(part)
            .map(|(_, f)| f)
            .ok_or_else(|| ModelError::Checkpoint {
                file: self.path.clone(),
                msg: "only its header was read (no file to load tensors from)".into(),
            })
    }

    fn part_path(&self, t: &GgufTensor) -> PathBuf {
        self.parts
            .get(t.part)
            .map_or_else(|| self.path.clone(), |(p, _)| p.clone())
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    /// Every tensor name (for the user's information and fingerprints).
    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    fn meta_err(&self, key: &str, msg: String) -> ModelError {
        ModelError::Config {
            file: self.path.clone(),
            field: key.into(),
            msg,
        }
    }

    /// A metadata string.
    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.meta_err(key, format!("expected a string, found {v:?}"))),
        }
    }

    /// A non-negative integer, whatever integer type the writer chose.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.meta.get(key) else {
            return Ok(None);
        };
        as_u64(v).map(Some).ok_or_else(|| {
            self.meta_err(key, format!("expected a non-negative integer, found {v:?}"))
        })
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.meta.get(key) else {
            return Ok(None);
        };
        let f = match v {
            Value::F32(f) => *f as f64,
            Value::F64(f) => *f,
            other => as_u64(other)
                .map(|u| u as f64)
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found {other:?}")))?,
        };
        Ok(Some(f))
    }

    fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.meta_err(key, format!("expected a bool, found {v:?}"))),
        }
    }

    fn meta_array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.meta_err(key, format!("expected an array, found {v:?}"))),
        }
    }

    /// The model config, from the `qwen3moe.*` metadata and the tensors present. It is built as
    /// the `config.json` a Qwen3-MoE repo would have and read by the same code, so the same
    /// bounds hold; an error names the GGUF key it came from.
    pub fn config(&self) -> Result<MoeConfig> {
        let arch = self
            .meta_str("general.architecture")?
            .ok_or_else(|| self.meta_err("general.architecture", "missing".into()))?;
        if arch != ARCH {
            return Err(self.meta_err(
                "general.architecture",
                format!(
                    "\"{arch}\"; moescope runs \"{ARCH}\" (Qwen3-MoE as llama.cpp's \
                     convert_hf_to_gguf.py writes it)"
                ),
            ));
        }
        let key = |k: &str| format!("{ARCH}.{k}");
        let req = |k: &str| -> Result<u64> {
            self.meta_u64(&key(k))?
                .ok_or_else(|| self.meta_err(&key(k), "missing".into()))
        };
        let embd = self
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::Tensor {
                file: self.path.clone(),
                tensor: "token_embd.weight".into(),
                msg: "missing (the token embedding)".into(),
            })?;
        let vocab = embd.shape.first().copied().unwrap_or(0);
        let layers = req("block_count")?;
        let heads = req("attention.head_count")?;
        let hidden = req("embedding_length")?;
        let mut mlp_only = Vec::new();
        for l in 0..layers.min(1 << 16) {
            if self
                .tensor(&format!("blk.{l}.ffn_gate_exps.weight"))
                .is_some()
            {
                continue;
            }
            if self.tensor(&format!("blk.{l}.ffn_gate.weight")).is_some() {
                mlp_only.push(l);
                continue;
            }
            return Err(ModelError::Tensor {
                file: self.path.clone(),
                tensor: format!("blk.{l}.ffn_gate_exps.weight"),
                msg: format!("missing (and no dense blk.{l}.ffn_gate.weight either)"),
            });
        }
        // Blocks past block_count would be left out of the forward pass without a word: a count
        // edited down, or a file of another model. llama.cpp refuses a file with tensors it does
        // not use ("wrong number of tensors").
        if let Some((name, n)) = self
            .tensors
            .keys()
            .filter_map(|n| {
                let rest = n.strip_prefix("blk.")?;
                let block: u64 = rest.get(..rest.find('.')?)?.parse().ok()?;
                Some((n, block))
            })
            .filter(|&(_, b)| b >= layers)
            .min_by_key(|&(n, b)| (b, n.clone()))
        {
            return Err(self.meta_err(
                &key("block_count"),
                format!(
                    "{layers}, but the file holds tensors of block {n} (`{name}`): the count \
                     does not match the file's layers"
                ),
            ));
        }
        let eos: Vec<u64> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| self.meta_u64(k).transpose())
            .collect::<Result<_>>()?;
        let mut cfg = json!({
            "model_type": "qwen3_moe",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta_u64(&key("attention.head_count_kv"))?.unwrap_or(heads),
            "num_experts": req("expert_count")?,
            "num_experts_per_tok": req("expert_used_count")?,
            "moe_intermediate_size": req("expert_feed_forward_length")?,
            "mlp_only_layers": mlp_only,
            // llama.cpp's qwen3moe graph always renormalises the top-k weights (build_moe_ffn
            // with norm_w = true); a file may say otherwise explicitly.
            "norm_topk_prob": self.meta_bool(&key("expert_weights_norm"))?.unwrap_or(true),
            // Required, as llama.cpp requires it for qwen3moe: a guessed epsilon would change
            // every norm's output without a word.
            "rms_norm_eps": self.meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| self.meta_err(&key("attention.layer_norm_rms_epsilon"), "missing".into()))?,
            "rope_theta": self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            "max_position_embeddings": self.meta_u64(&key("context_length"))?.unwrap_or(32_768),
            "attention_bias": self.tensor("blk.0.attn_q.bias").is_some(),
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "eos_token_id": eos,
        });
        let obj = cfg.as_object_mut().expect("an object");
        // RoPE over part of each head: llama.cpp rotates `rope.dimension_count` dimensions;
        // moescope rotates whole heads, as Qwen3 does.
        let head_dim = match self.meta_u64(&key("attention.key_length"))? {
            Some(d) => Some(d),
            None => Some(hidden / heads.max(1)).filter(|_| heads > 0 && hidden % heads == 0),
        };
        if let (Some(rot), Some(d)) = (self.meta_u64(&key("rope.dimension_count"))?, head_dim)
            && rot != d
        {
            return Err(self.meta_err(
                &key("rope.dimension_count"),
                format!(
                    "{rot}, but each head is {d} wide: RoPE over part of a head is not supported"
                ),
            ));
        }
        if let Some(d) = self.meta_u64(&key("attention.key_length"))? {
            obj.insert("head_dim".into(), d.into());
            if let Some(v) = self.meta_u64(&key("attention.value_length"))?
                && v != d
            {
                return Err(self.meta_err(
                    &key("attention.value_length"),
                    format!("{v}, but Qwen3-MoE's values are as wide as its keys ({d})"),
                ));
            }
        }
        if let Some(scaling) = self.rope_scaling()? {
            obj.insert("rope_scaling".into(), scaling);
        }
        if let Some(f) = self.meta_u64(&key("feed_forward_length"))? {
            obj.insert("intermediate_size".into(), f.into());
        }
        if let Some(b) = self.meta_u64("tokenizer.ggml.bos_token_id")? {
            obj.insert("bos_token_id".into(), b.into());
        }
        MoeConfig::from_json_str(&cfg.to_string(), &self.path).map_err(|e| match e {
            ModelError::Config { file, field, msg } => ModelError::Config {
                file,
                field: gguf_key(&field),
                msg,
            },
            other => other,
        })
    }

    /// The file's RoPE scaling as a config.json `rope_scaling` object, from the keys llama.cpp's
    /// converter writes (`rope.scaling.type` "yarn" or "linear", `.factor`,
    /// `.original_context_length`, `.yarn_attn_factor` — transformers' `attention_factor` —,
    /// `.yarn_beta_fast`, `.yarn_beta_slow`; older files' `rope.scale_linear`); None for plain
    /// RoPE. The settings llama.cpp has and transformers has not are refused unless neutral.
    fn rope_scaling(&self) -> Result<Option<serde_json::Value>> {
        let key = |k: &str| format!("{ARCH}.rope.{k}");
        for (k, neutral) in [
            ("scaling.yarn_ext_factor", 1.0),
            ("scaling.yarn_log_multiplier", 0.0),
            ("scaling.attn_factor", 1.0),
        ] {
            if let Some(v) = self.meta_f64(&key(k))?
                && v != neutral
            {
                return Err(self.meta_err(
                    &key(k),
                    format!("{v}: moescope computes RoPE scaling as transformers does, which has no such setting (expected {neutral} or none)"),
                ));
            }
        }
        let linear = self.meta_f64(&key("scale_linear"))?.filter(|&f| f != 1.0);
        let kind = self.meta_str(&key("scaling.type"))?;
        let factor = self.meta_f64(&key("scaling.factor"))?;
        let mut o = serde_json::Map::new();
        match (kind, linear) {
            (None | Some("none"), None) => return Ok(None),
            (None | Some("none"), Some(f)) => {
                o.insert("rope_type".into(), "linear".into());
                o.insert("factor".into(), f.into());
            }
            (Some("linear"), _) => {
                o.insert("rope_type".into(), "linear".into());
                if let Some(f) = factor.or(linear) {
                    o.insert("factor".into(), f.into());
                }
            }
            (Some("yarn"), _) => {
                o.insert("rope_type".into(), "yarn".into());
                if let Some(f) = factor {
                    o.insert("factor".into(), f.into());
                }
                let extra = [
                    (
                        "scaling.original_context_length",
                        "original_max_position_embeddings",
                    ),
                    ("scaling.yarn_attn_factor", "attention_factor"),
                    ("scaling.yarn_beta_fast", "beta_fast"),
                    ("scaling.yarn_beta_slow", "beta_slow"),
                ];
                for (k, name) in extra {
                    if let Some(v) = self.meta_f64(&key(k))? {
                        o.insert(name.into(), v.into());
                    }
                }
                if let Some(v) = o.get_mut("original_max_position_embeddings") {
                    // A context length: an integer in config.json.
                    *v = (v.as_f64().unwrap_or(0.0).max(0.0) as u64).into();
                }
            }
            (Some(other), _) => {
                return Err(self.meta_err(
                    &key("scaling.type"),
                    format!(
                        "\"{other}\" is not supported (expected \"none\", \"yarn\" or \"linear\")"
                    ),
                ));
            }
        }
        Ok(Some(serde_json::Value::Object(o)))
    }

    /// The tokenizer and chat template the file carries (`tokenizer.ggml.*`,
    /// `tokenizer.chat_template`): Qwen2's byte-level BPE, built as from `vocab.json` +
    /// `merges.txt`, control and user-defined tokens added at their ids.
    pub fn tokenizer(&self) -> Result<(tokenizers::Tokenizer, super::chat::ChatTemplate)> {
        use super::bpe_files::{Added, assemble};
        let terr = |key: &str, msg: String| ModelError::Tokenizer {
            file: self.path.clone(),
            msg: format!("{key}: {msg}"),
        };
        match self.meta_str("tokenizer.ggml.model")? {
            Some("gpt2") => {}
            Some(other) => {
                return Err(terr(
                    "tokenizer.ggml.model",
                    format!("\"{other}\"; moescope reads byte-level BPE (\"gpt2\") tokenizers"),
                ));
            }
            None => return Err(terr("tokenizer.ggml.model", "missing".into())),
        }
        match self.meta_str("tokenizer.ggml.pre")? {
            Some("qwen2") | None => {}
            Some(other) => {
                return Err(terr(
                    "tokenizer.ggml.pre",
                    format!("\"{other}\"; moescope splits text as Qwen2 does (\"qwen2\")"),
                ));
            }
        }
        let tokens = self
            .meta_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| terr("tokenizer.ggml.tokens", "missing".into()))?;
        let types = self.meta_array("tokenizer.ggml.token_type")?;
        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut added = BTreeMap::new();
        for (id, t) in tokens.iter().enumerate() {
            let Value::String(s) = t else {
                return Err(terr(
                    "tokenizer.ggml.tokens",
                    format!("entry {id} is not a string"),
                ));
            };
            let id = id as u32;
            // llama.cpp's token types: 3 control (special), 4 user-defined (added, plain).
            let kind = types
                .and_then(|ts| ts.get(id as usize))
                .and_then(|v| match v {
                    Value::I32(i) => Some(*i as i64),
                    other => as_u64(other).map(|u| u as i64),
                })
                .unwrap_or(1);
            if kind == 3 || kind == 4 {
                added.insert(
                    id,
                    Added {
                        content: s.clone(),
                        special: kind == 3,
                        lstrip: false,
                        rstrip: false,
                        normalized: kind == 4,
                        single_word: false,
                    },
                );
            } else if vocab.insert(s.clone(), id).is_some() {
                return Err(terr(
                    "tokenizer.ggml.tokens",
                    format!("{s:?} appears twice (second at id {id})"),
                ));
            }
        }
        let mut merges = Vec::new();
        for (i, m) in self
            .meta_array("tokenizer.ggml.merges")?
            .ok_or_else(|| terr("tokenizer.ggml.merges", "missing".into()))?
            .iter()
            .enumerate()
        {
            let pair = match m {
                Value::String(s) => s.split_once(' '),
                _ => None,
            };
            let Some((a, b)) = pair else {
                return Err(terr(
                    "tokenizer.ggml.merges",
                    format!("entry {i} is not two tokens separated by a space"),
                ));
            };
            merges.push((a.to_string(), b.to_string()));
        }
        let name = |key: &str| -> Option<String> {
            let id = self.meta_u64(key).ok()??;
            match tokens.get(id as usize)? {
                Value::String(s) => Some(s.clone()),
                _ => None,
            }
        };
        let p = &self.path;
        let tok = assemble(vocab, merges, added, [p, p, p], "tokenizer.ggml.tokens")?;
        let template = self
            .meta_str("tokenizer.chat_template")?
            .map(str::to_string);
        let chat = super::chat::ChatTemplate::from_text(
            template,
            &format!("{} (tokenizer.chat_template)", p.display()),
            name("tokenizer.ggml.bos_token_id"),
            name("tokenizer.ggml.eos_token_id"),
        )?;
        Ok((tok, chat))
    }

    /// Checks a non-expert tensor (named as in a Hugging Face checkpoint) against the shape the
    /// config implies.
    pub fn check(&self, hf_name: &str, shape: &[usize]) -> Result<TensorLocation> {
        let name = gguf_name(hf_name).ok_or_else(|| ModelError::Tensor {
            file: self.path.clone(),
            tensor: hf_name.into(),
            msg: "has no GGUF counterpart moescope knows".into(),
        })?;
        let t = self.tensor(&name).ok_or_else(|| ModelError::Tensor {
            file: self.path.clone(),
            tensor: name.clone(),
            msg: format!("missing (for {hf_name})"),
        })?;
        if t.shape != shape {
            return Err(ModelError::Tensor {
                file: self.path.clone(),
                tensor: name,
                msg: format!("shape {:?}, expected {shape:?} from the metadata", t.shape),
            });
        }
        Ok(self.location(&name, t, t.shape.clone(), t.offset, t.len))
    }

    fn location(
        &self,
        name: &str,
        t: &GgufTensor,
        shape: Vec<usize>,
        offset: u64,
        len: u64,
    ) -> TensorLocation {
        TensorLocation {
            name: name.to_string(),
            file: self.part_path(t),
            dtype: t.dtype,
            shape,
            offset,
            len,
            scale: None,
        }
    }

    /// Whether the non-expert tensor `hf_name` is in the file.
    pub fn contains(&self, hf_name: &str) -> bool {
        gguf_name(hf_name).is_some_and(|n| self.tensors.contains_key(&n))
    }

    /// A tensor's bytes as stored, from the file (or part) that holds it.
    fn read_bytes(&self, loc: &TensorLocation) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; loc.len as usize];
        self.file_of(&loc.name)?
            .read_exact_at(&mut bytes, loc.offset)
            .map_err(|e| ModelError::Tensor {
                file: loc.file.clone(),
                tensor: loc.name.clone(),
                msg: format!("reading {} bytes at offset {}: {e}", loc.len, loc.offset),
            })?;
        Ok(bytes)
    }

    /// Loads a non-expert tensor in `dtype` on `device`, dequantising a quantized one.
    pub fn load(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let loc = self.check(hf_name, shape)?;
        let bytes = self.read_bytes(&loc)?;
        let terr = |e: candle_core::Error| ModelError::Tensor {
            file: loc.file.clone(),
            tensor: loc.name.clone(),
            msg: format!("converting from {}: {}", loc.dtype.name(), candle_msg(&e)),
        };
        if let Some(format) = loc.dtype.lut4() {
            // A table-coded matrix outside the experts (IQ4_XS files hold attention so; MXFP4_MOE
            // files do not, but `--tensor-type` makes them): widened once at load.
            let cols = loc.shape.last().copied().unwrap_or(0);
            let rows = loc.shape.iter().product::<usize>() / cols.max(1);
            let m = super::lut4::Lut4Matrix::new(format, bytes, [rows, cols]).map_err(|msg| {
                ModelError::Tensor {
                    file: loc.file.clone(),
                    tensor: loc.name.clone(),
                    msg,
                }
            })?;
            return m
                .dequantize(dtype)
                .and_then(|t| t.reshape(loc.shape.as_slice()))
                .and_then(|t| t.to_device(device))
                .map_err(terr);
        }
        match loc.dtype.ggml() {
            None => {
                let info = TensorInfo {
                    dtype: loc.dtype,
                    shape: loc.shape.clone(),
                    offset: 0,
                    len: loc.len,
                };
                bytes_to_tensor(&bytes, &info, dtype, device).map_err(terr)
            }
            Some(g) => {
                use candle_core::quantized::ggml_file::qtensor_from_ggml;
                let q =
                    qtensor_from_ggml(g, &bytes, loc.shape.clone(), &Device::Cpu).map_err(terr)?;
                q.dequantize(&Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(device))
                    .map_err(terr)
            }
        }
    }

    /// A block-quantized [rows, cols] tensor's bytes as rows to look up one at a time (the
    /// token embedding on the CPU, `embedding.rs`); None for a float tensor.
    pub fn load_rows(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Option<super::embedding::QuantizedRows>> {
        let loc = self.check(hf_name, shape)?;
        let (Some(g), [rows, cols]) = (loc.dtype.ggml(), loc.shape.as_slice()) else {
            return Ok(None);
        };
        let bytes = self.read_bytes(&loc)?;
        super::embedding::QuantizedRows::new(g, bytes, *rows, *cols, dtype)
            .map(Some)
            .map_err(|msg| ModelError::Tensor {
                file: loc.file.clone(),
                tensor: loc.name.clone(),
                msg,
            })
    }

    /// A linear layer's matrix: a block-quantized tensor stays in its format (a `QMatMul`;
    /// on the CPU a table-coded one too, as a [`Lut4Matrix`](super::lut4::Lut4Matrix) — on a GPU
    /// it is widened, candle's kernels not reading it), a float one is loaded dense in `dtype`.
    pub fn load_linear(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<super::layers::LinearWeight> {
        use candle_core::quantized::{QMatMul, ggml_file::qtensor_from_ggml};
        let loc = self.check(hf_name, shape)?;
        if let Some(format) = loc.dtype.lut4() {
            let cols = loc.shape.last().copied().unwrap_or(0);
            let rows = loc.shape.iter().product::<usize>() / cols.max(1);
            let terr = |msg| ModelError::Tensor {
                file: loc.file.clone(),
                tensor: loc.name.clone(),
                msg,
            };
            if device.is_cpu() {
                let m = super::lut4::Lut4Matrix::new(format, self.read_bytes(&loc)?, [rows, cols])
                    .map_err(terr)?;
                return Ok(super::layers::LinearWeight::Lut4(m));
            }
            // Only attention's projections: the fused decode kernels read their blocks, where
            // an lm_head's product would widen its whole matrix every step.
            if hf_name.contains(".self_attn.")
                && lut4_blocks_on_gpu(format, &loc.shape, dtype, device)
            {
                // Checked as the CPU's matrix checks it (sizes, every scale), then copied.
                let bytes = self.read_bytes(&loc)?;
                let row_bytes = cols / format.block_weights() * format.block_bytes();
                if bytes.len() != rows * row_bytes {
                    return Err(terr(format!(
                        "{} bytes of {format} for a [{rows}, {cols}] matrix ({} expected)",
                        bytes.len(),
                        rows * row_bytes
                    )));
                }
                super::lut4::check_scales(format, &bytes, cols).map_err(terr)?;
                return Ok(super::layers::LinearWeight::Lut4Device {
                    blocks: Tensor::from_slice(&bytes, (rows, row_bytes), device)?,
                    format,
                    dims: [rows, cols],
                });
            }
        }
        let Some(g) = loc.dtype.ggml() else {
            return Ok(super::layers::LinearWeight::Dense(
                self.load(hf_name, shape, dtype, device)?,
            ));
        };
        let bytes = self.read_bytes(&loc)?;
        let terr = |e: candle_core::Error| ModelError::Tensor {
            file: loc.file.clone(),
            tensor: loc.name.clone(),
            msg: format!("{}: {}", loc.dtype.name(), candle_msg(&e)),
        };
        let q = qtensor_from_ggml(g, &bytes, loc.shape.clone(), device).map_err(terr)?;
        Ok(super::layers::LinearWeight::Quantized {
            matmul: QMatMul::from_qtensor(q).map_err(terr)?,
            bytes: loc.len,
        })
    }

    /// Where one expert's three matrices lie: rows `expert × I … (expert + 1) × I` of each
    /// stacked tensor, contiguous since a GGUF tensor is stored row after row. `None` when
    /// the layer has no stacked experts.
    pub fn expert_location(
        &self,
        cfg: &MoeConfig,
        layer: usize,
        expert: usize,
    ) -> Result<Option<ExpertLocation>> {
        let mut parts = Vec::with_capacity(3);
        for proj in ExpertProj::ALL {
            let name = format!("blk.{layer}.ffn_{}_exps.weight", proj_key(proj));
            let Some(t) = self.tensor(&name) else {
                return Ok(None);
            };
            let [rows, cols] = proj.shape(cfg);
            let want = [cfg.num_experts, rows, cols];
            if t.shape != want {
                return Err(ModelError::Tensor {
                    file: self.path.clone(),
                    tensor: name,
                    msg: format!("shape {:?}, expected {want:?} from the metadata", t.shape),
                });
            }
            if t.dtype.float_dtype().is_none() && t.dtype.block_elems().is_none() {
                return Err(ModelError::Tensor {
                    file: self.path.clone(),
                    tensor: name,
                    msg: format!("type {} cannot hold weights", t.dtype.name()),
                });
            }
            let per = t.len / cfg.num_experts as u64;
            let offset = t.offset + per * expert as u64;
            parts.push(self.location(&name, t, vec![rows, cols], offset, per));
        }
        Ok(Some(ExpertLocation {
            layer,
            expert,
            parts: parts.try_into().expect("three parts"),
        }))
    }

    /// The GGML types the experts are stored in, with how many stacked tensors use each — what
    /// the header shows for a mixed file such as `Q4_K_M`.
    pub fn expert_types(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.tensors {
            if name.contains("_exps.") {
                *out.entry(t.dtype.name()).or_insert(0) += 1;
            }
        }
        out
    }

    /// A fingerprint of the weights: the config's, the header's tensor table, and 16 windows
    /// of 4 KiB spread over the file.
    pub fn weights_fingerprint(&self, cfg: &MoeConfig) -> Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(cfg.fingerprint().as_bytes());
        let mut names: Vec<_> = self.tensors.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (n, t) in names {
            h.update(
                format!(
                    "{n} {} {:?} {} {}\n",
                    t.dtype.name(),
                    t.shape,
                    t.offset,
                    t.len
                )
                .as_bytes(),
            );
        }
        if self.parts.is_empty() {
            return Err(ModelError::Checkpoint {
                file: self.path.clone(),
                msg: "only its header was read (no file to sample)".into(),
            });
        }
        let mut buf = [0u8; 4096];
        for (path, file) in &self.parts {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            for i in 0..16u64 {
                let at = size / 16 * i;
                let want = (4096u64).min(size - at) as usize;
                file.read_exact_at(&mut buf[..want], at)
                    .map_err(|e| ModelError::Io {
                        path: path.clone(),
                        what: "sampling the GGUF file".into(),
                        source: e,
                    })?;
                h.update(&buf[..want]);
            }
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }
}

/// Sizes of a GGUF model as moescope holds it: (non-expert bytes, bytes of one expert as
/// stored, bytes of one expert held), with float tensors counted at `float_size` bytes an
/// element — what memory estimates and a miss's cost use in place of the bf16 figures. The
/// expert sizes are those of the first MoE layer's expert 0 (one type per stack).
/// Whether a table-coded linear matrix of `shape` stays in its blocks on `device` (a GPU in bf16
/// compute, rows whole blocks: the decode kernels read it there); else it is widened at load.
fn lut4_blocks_on_gpu(
    format: super::lut4::Lut4,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> bool {
    let cols = shape.last().copied().unwrap_or(0);
    device.is_cuda()
        && dtype == DType::BF16
        && shape.len() == 2
        && cols > 0
        && cols.is_multiple_of(format.block_weights())
}

pub fn held_sizes(
    path: &Path,
    cfg: &MoeConfig,
    float_size: u64,
    cpu: bool,
    gpu_bf16: bool,
) -> Option<super::held::HeldSizes> {
    if !is_gguf(path) {
        return None;
    }
    let g = GgufFile::open(path).ok()?;
    // Block types stay in their blocks; so do the table-coded ones on the CPU, and on a GPU in
    // bf16 attention where their rows are whole blocks (`load_linear`).
    let held = |n: &str, t: &GgufTensor| match (t.dtype.ggml(), t.dtype.lut4()) {
        (Some(_), _) => t.len,
        (None, Some(f))
            if cpu
                || (gpu_bf16
                    && n.contains(".attn_")
                    && t.shape.len() == 2
                    && t.shape[1] > 0
                    && t.shape[1].is_multiple_of(f.block_weights())) =>
        {
            t.len
        }
        _ => t.shape.iter().product::<usize>() as u64 * float_size,
    };
    let dense = |t: &GgufTensor| t.shape.iter().product::<usize>() as u64 * float_size;
    let non_expert = g
        .tensors
        .iter()
        .filter(|(n, _)| !n.contains("_exps."))
        .map(|(n, t)| match n.as_str() {
            // Looked up from its blocks on the CPU, and on a GPU in bf16 where the block kernels
            // decode its type; dense otherwise (`embedding.rs`). When tied and quantized, also
            // the output matrix in blocks.
            "token_embd.weight" if t.dtype.ggml().is_some() => {
                let blocks = cpu
                    || (gpu_bf16
                        && t.dtype
                            .ggml()
                            .and_then(super::ports::GgmlLayout::kernel_type_ggml)
                            .is_some());
                let table = if blocks { t.len } else { dense(t) };
                let tied = g.tensor("output.weight").is_none();
                table + if tied { t.len } else { 0 }
            }
            "token_embd.weight" => dense(t),
            // Norms and the router are loaded dense whatever their type.
            _ if t.shape.len() < 2 || n.contains("ffn_gate_inp") => dense(t),
            _ => held(n, t),
        })
        .sum();
    let mut layers = Vec::new();
    for layer in cfg.moe_layers() {
        let Ok(Some(loc)) = g.expert_location(cfg, layer, 0) else {
            continue;
        };
        let stored = loc.parts.iter().map(|p| p.len).sum();
        let expert = super::held::expert_held_bytes(&loc.parts, float_size, cpu);
        // A GGUF layer stores every expert in its stacked tensors.
        layers.push((cfg.num_experts as u64, stored, expert));
    }
    super::held::HeldSizes::of_layers(non_expert, &layers)
}

/// "Q4_K ×66 + Q6_K ×30" for the expert stacks of the GGUF file at `path`; None for anything
/// else (a directory, an unreadable file).
pub fn expert_types_of(path: &Path) -> Option<String> {
    if !is_gguf(path) {
        return None;
    }
    let g = GgufFile::open(path).ok()?;
    let parts: Vec<String> = g
        .expert_types()
        .iter()
        .map(|(t, n)| format!("{t} ×{n}"))
        .collect();
    Some(parts.join(" + "))
}

/// Whether multiplying the expert stacks of the GGUF file at `path` on this CPU leaves candle
/// packing a copy of some of them ([`super::quant_rows::candle_keeps_packed_copy`]): then a
/// miss's cost does not end with its load. False for anything unreadable.
pub fn experts_repacked_on_cpu(path: &Path) -> bool {
    if !is_gguf(path) {
        return false;
    }
    let Ok(g) = GgufFile::open(path) else {
        return false;
    };
    g.tensors.iter().any(|(name, t)| {
        name.contains("_exps.")
            && match (t.dtype.ggml(), t.shape.as_slice()) {
                (Some(d), [.., rows, width]) => {
                    super::quant_rows::candle_keeps_packed_copy(d, *rows, *width)
                }
                _ => false,
            }
    })
}

/// GGUF's layout rule, as ggml's own reader enforces it: in offset order every tensor starts
/// where the one before ends, rounded up to the file's alignment, and the first at the data
/// section's start. Why: each tensor's extent is checked against the file, but a tensor whose
/// type or shape was changed to a smaller one (or whose offset was moved onto a neighbour) still
/// fits the file, and would be read as weights made of another tensor's bytes. Bytes after the
/// last tensor beyond its padding are refused for the same reason (it, too, would be short).
fn check_packing(
    tensors: &HashMap<String, GgufTensor>,
    data_start: u64,
    alignment: u64,
    file_len: u64,
    path: &Path,
) -> Result<()> {
    let spans = super::safetensors_file::spans_in_order(tensors, |t| (t.offset, t.len));
    let padded = |end: u64| end.div_ceil(alignment).saturating_mul(alignment);
    let mut expect = data_start;
    let mut before: Option<(&str, u64)> = None;
    for &(begin, _, name) in &spans {
        if begin != expect {
            let how = if begin < expect {
                "the two overlap".to_string()
            } else {
                format!(
                    "{} bytes between them no tensor accounts for",
                    begin - expect
                )
            };
            let (subject, msg) = match before {
                // The earlier tensor is named: a type or shape changed to a larger or smaller one
                // shows up at its end.
                Some((b, b_end)) => {
                    let t = &tensors[b];
                    (
                        b,
                        format!(
                            "its {} bytes ({}, shape {:?}) end at data offset {} (next tensor \
                             due at {}, padded to {alignment}), but tensor `{name}` starts at \
                             {}: {how}. A type or shape that does not match the bytes written, \
                             or a moved offset",
                            t.len,
                            t.dtype.name(),
                            t.shape,
                            b_end - data_start,
                            expect - data_start,
                            begin - data_start
                        ),
                    )
                }
                None => (
                    name,
                    format!(
                        "the first tensor in the file starts at data offset {}, not 0 (a moved \
                         offset or a damaged header)",
                        begin - data_start
                    ),
                ),
            };
            return Err(ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: subject.to_string(),
                msg,
            });
        }
        expect = padded(begin + tensors[name].len);
        before = Some((name, begin + tensors[name].len));
    }
    if let Some((last, end)) = before
        && file_len > padded(end)
    {
        let t = &tensors[last];
        return Err(ModelError::Tensor {
            file: path.to_path_buf(),
            tensor: last.to_string(),
            msg: format!(
                "the last tensor in the file ends at data offset {} ({} bytes: {}, shape {:?}), \
                 but {} more bytes follow it: its type or shape does not account for its bytes",
                end - data_start,
                t.len,
                t.dtype.name(),
                t.shape,
                file_len - padded(end)
            ),
        });
    }
    Ok(())
}

fn block_of(dtype: StDtype) -> u64 {
    dtype.block_elems().unwrap_or(1)
}

/// What candle's header reader takes, as one trait object (the file, or a header in memory).
trait ReadSeek: std::io::Read + std::io::Seek {}
impl<T: std::io::Read + std::io::Seek> ReadSeek for T {}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

fn proj_key(proj: ExpertProj) -> &'static str {
    match proj {
        ExpertProj::Gate => "gate",
        ExpertProj::Up => "up",
        ExpertProj::Down => "down",
    }
}

/// The GGUF metadata key a config.json field comes from (for errors).
fn gguf_key(field: &str) -> String {
    let k = match field {
        "hidden_size" => "embedding_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "num_experts" => "expert_count",
        "num_experts_per_tok" => "expert_used_count",
        "moe_intermediate_size" => "expert_feed_forward_length",
        "intermediate_size" => "feed_forward_length",
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "max_position_embeddings" => "context_length",
        "rope_scaling.rope_type" => "rope.scaling.type",
        "rope_scaling.factor" => "rope.scaling.factor",
        "rope_scaling.original_max_position_embeddings" => "rope.scaling.original_context_length",
        "rope_scaling.attention_factor" => "rope.scaling.yarn_attn_factor",
        "rope_scaling.beta_fast" => "rope.scaling.yarn_beta_fast",
        "rope_scaling.beta_slow" => "rope.scaling.yarn_beta_slow",
        "vocab_size" => return "token_embd.weight (its rows)".into(),
        other => return other.into(),
    };
    format!("{ARCH}.{k}")
}

/// A non-expert tensor's GGUF name from its Hugging Face name (llama.cpp's tensor map for
/// Qwen3-MoE; no prefix, as GGUF files hold the text model only).
pub fn gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (l, rest) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            let (module, kind) = rest.rsplit_once('.')?;
            let short = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate" => "ffn_gate_inp",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{l}.{short}.{kind}")
        }
    })
}

/// A file's buffered reader that keeps count of its position. Why: candle's GGUF reader asks
/// for the position before every length-prefixed value, and `BufReader` answers each time with
/// an `lseek` — ~300,000 of them for a 150,000-token vocabulary (BENCHMARKS.md §117).
struct Positioned<R> {
    inner: std::io::BufReader<R>,
    pos: u64,
}

impl<R: std::io::Read + std::io::Seek> Positioned<R> {
    fn new(inner: R) -> Self {
        // Headers are read from the start: `parse` is given fresh files and byte slices.
        Positioned {
            inner: std::io::BufReader::new(inner),
            pos: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Positioned<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: std::io::Read + std::io::Seek> std::io::Seek for Positioned<R> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            // Within the buffer this keeps it (a plain seek would drop it).
            std::io::SeekFrom::Current(d) => {
                let at = self.pos.checked_add_signed(d).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "seek before the start of the file",
                    )
                })?;
                self.inner.seek_relative(d)?;
                at
            }
            other => self.inner.seek(other)?,
        };
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counted position is the file's at every step of a walk of reads and seeks of each
    /// kind (across the buffer's edge, past the end, back), and the bytes are the file's; a
    /// seek before the start is an error that moves nothing.
    #[test]
    fn positioned_reader_knows_where_it_is() {
        use std::io::{Read, Seek, SeekFrom};
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        f.rewind().unwrap();
        let mut r = Positioned::new(&f);
        let mut want = std::io::Cursor::new(&data);
        let mut buf = [0u8; 700];
        let steps: [(u8, i64); 12] = [
            (0, 700),
            (1, 5),
            (0, 300),
            (1, 9_000),
            (0, 700),
            (1, -4_000),
            (0, 64),
            (2, 39_990),
            (0, 700),
            (1, 100),
            (3, -10),
            (0, 5),
        ];
        for (k, &(op, n)) in steps.iter().enumerate() {
            match op {
                0 => {
                    let (a, b) = (&mut buf[..n as usize], &mut [0u8; 700][..n as usize]);
                    let got = r.read(a).unwrap();
                    let expect = want.read(b).unwrap();
                    assert_eq!((got, &a[..got]), (expect, &b[..expect]), "step {k}");
                }
                1 => {
                    assert_eq!(
                        r.seek(SeekFrom::Current(n)).unwrap(),
                        want.seek(SeekFrom::Current(n)).unwrap()
                    )
                }
                2 => {
                    let to = SeekFrom::Start(n as u64);
                    assert_eq!(r.seek(to).unwrap(), want.seek(to).unwrap())
                }
                _ => {
                    let to = SeekFrom::End(n);
                    assert_eq!(r.seek(to).unwrap(), want.seek(to).unwrap())
                }
            }
            let pos = r.stream_position().unwrap();
            assert_eq!(pos, want.position(), "step {k}");
            let mut inner = r.inner.get_ref().try_clone().unwrap();
            let real = inner.stream_position().unwrap() - r.inner.buffer().len() as u64;
            assert_eq!(
                pos, real,
                "step {k}: the file's own position, less what is buffered"
            );
        }
        let before = r.stream_position().unwrap();
        assert!(r.seek(SeekFrom::Current(-(before as i64) - 1)).is_err());
        assert_eq!(r.stream_position().unwrap(), before);
    }

    /// On the CPU a table-coded attention matrix (the IQ4_XS and MXFP4_ATTN fixtures, from
    /// llama-quantize) is held as stored — 136 bytes per 256 weights, 17 per 32 — and its
    /// product is the widened matrix's within f32 rounding; on a GPU it would be widened.
    #[test]
    fn table_coded_attention_is_held_as_stored_on_the_cpu() {
        use super::super::layers::{Linear, LinearWeight};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
        for (kind, per) in [("IQ4_XS", 136.0 / 256.0), ("MXFP4_ATTN", 17.0 / 32.0)] {
            let g = GgufFile::open(&root.join(format!("kquant-{kind}.gguf"))).unwrap();
            let name = "model.layers.1.self_attn.q_proj.weight";
            let shape = [256, 256];
            let w = g
                .load_linear(name, &shape, DType::F32, &Device::Cpu)
                .unwrap();
            let LinearWeight::Lut4(m) = &w else {
                panic!("{kind}: attn_q not held as stored: {w:?}")
            };
            assert_eq!(m.bytes(), (256.0 * 256.0 * per) as u64, "{kind}");
            let dense = g.load(name, &shape, DType::F32, &Device::Cpu).unwrap();
            let x = Tensor::from_vec(
                (0..3 * 256)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                    .collect(),
                (3, 256),
                &Device::Cpu,
            )
            .unwrap();
            let product = |l: Linear| -> Vec<f32> {
                let y = l.forward(&x).unwrap();
                y.flatten_all().unwrap().to_vec1().unwrap()
            };
            let got = product(Linear::with_weight(w, None));
            let want = product(Linear::new(dense, None));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    a.is_finite() && (a - b).abs() <= 1e-5 * scale,
                    "{kind}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn names_map_to_llama_cpp_tensors() {
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.self_attn.o_proj.weight").unwrap(),
            "blk.3.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.gate.weight").unwrap(),
            "blk.0.ffn_gate_inp.weight"
        );
        assert_eq!(
            gguf_name("model.layers.12.post_attention_layernorm.weight").unwrap(),
            "blk.12.ffn_norm.weight"
        );
        assert_eq!(gguf_name("model.layers.x.mlp.gate.weight"), None);
        assert_eq!(gguf_name("thinker.model.norm.weight"), None);
    }

    #[test]
    fn a_file_that_is_not_gguf_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
        assert!(is_gguf(&p));
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("GGUF header"), "{e}");
    }
}
