//! A checkpoint directory: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Every tensor is located through the index — never by guessing which shard holds a layer (the
//! seed project guessed, and lost 532 experts whose layer spanned two shards). Before anything
//! runs, [`Checkpoint::validate`] checks that each tensor the config implies exists with the right
//! shape and a float dtype. Shards that hold only tensors outside the text model (audio tower,
//! vision, talker, code2wav) are never opened.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use super::config::{ExpertProj, FfnKind, MoeConfig};
use super::error::{ModelError, Result};
use super::fp8::{Fp8Matrix, Fp8Scheme};
use super::safetensors_file::{MAX_HEADER_BYTES, SafetensorsFile, StDtype, TensorInfo};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where one expert matrix lives on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorLocation {
    pub name: String,
    pub file: PathBuf,
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in `file`.
    pub offset: u64,
    pub len: u64,
    /// An FP8 matrix's block scales (`X.weight_scale_inv`), read with it wherever it goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Box<TensorLocation>>,
}

impl TensorLocation {
    /// Bytes as stored, scales included.
    pub fn stored_len(&self) -> u64 {
        self.len + self.scale.as_ref().map_or(0, |s| s.len)
    }
}

fn ser_dtype<S: serde::Serializer>(d: &StDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// The three matrices of one (layer, expert), in [`ExpertProj::ALL`] order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpertLocation {
    pub layer: usize,
    pub expert: usize,
    pub parts: [TensorLocation; 3],
}

impl ExpertLocation {
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(TensorLocation::stored_len).sum()
    }
}

/// What validation found about the experts (non-expert problems are hard errors).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExpertInventory {
    /// (layer, expert) pairs with at least one of their three tensors absent.
    pub missing: Vec<(usize, usize)>,
    pub present: usize,
    pub expected: usize,
}

pub struct Checkpoint {
    dir: PathBuf,
    /// Tensor name → shard file name, from the index (or every tensor of the single file).
    weight_map: HashMap<String, String>,
    /// Opened lazily: a shard is only mapped when a tensor we need is in it.
    shards: BTreeMap<String, OnceLock<SafetensorsFile>>,
    index_path: Option<PathBuf>,
    /// A GGUF file instead of safetensors (`--model file.gguf`): tensors are found through it.
    gguf: Option<super::gguf::GgufFile>,
    /// How `F8_E4M3` matrices are scaled, from config.json (block-scaled FP8 checkpoints).
    fp8: Option<Fp8Scheme>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if super::gguf::is_gguf(dir) {
            return Ok(Checkpoint {
                dir: dir.to_path_buf(),
                weight_map: HashMap::new(),
                shards: BTreeMap::new(),
                index_path: None,
                gguf: Some(super::gguf::GgufFile::open(dir)?),
                fp8: None,
            });
        }
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                file: dir.to_path_buf(),
                msg: "not a directory (expected a model directory with config.json and \
                      model.safetensors or model.safetensors.index.json)"
                    .into(),
            });
        }
        let fp8 = read_fp8_scheme(dir)?;
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let mut c = Self::from_index(dir, &index_path)?;
            c.fp8 = fp8;
            return Ok(c);
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let weight_map = file
                .names()
                .map(|n| (n.to_string(), SINGLE_FILE.to_string()))
                .collect();
            let cell = OnceLock::new();
            let _ = cell.set(file);
            return Ok(Checkpoint {
                dir: dir.to_path_buf(),
                weight_map,
                shards: BTreeMap::from([(SINGLE_FILE.to_string(), cell)]),
                index_path: None,
                gguf: None,
                fp8,
            });
        }
        Err(ModelError::Checkpoint {
            file: dir.to_path_buf(),
            msg: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
        })
    }

    /// A checkpoint made of an explicit list of safetensors files under `dir` (relative paths),
    /// every tensor located by reading each file's header — for layouts without an index, such
    /// as the seed project's directories. A tensor present in two files is an error.
    pub fn from_files(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut weight_map = HashMap::new();
        let mut shards = BTreeMap::new();
        for rel in files {
            let key = rel.to_string_lossy().to_string();
            let file = SafetensorsFile::open(&dir.join(rel))?;
            for name in file.names() {
                if let Some(other) = weight_map.insert(name.to_string(), key.clone()) {
                    return Err(ModelError::Tensor {
                        file: dir.join(rel),
                        tensor: name.to_string(),
                        msg: format!("also present in {other}; refusing to guess which is right"),
                    });
                }
            }
            let cell = OnceLock::new();
            let _ = cell.set(file);
            shards.insert(key, cell);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            weight_map,
            shards,
            index_path: None,
            gguf: None,
            fp8: None,
        })
    }

    fn from_index(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::Io {
            path: index_path.to_path_buf(),
            what: "reading the shard index".into(),
            source: e,
        })?;
        Self::from_index_text(dir, index_path, &text)
    }

    /// A checkpoint from the text of its shard index (`index_path` names it in errors); shards
    /// are opened later, when a tensor in them is needed.
    pub fn from_index_text(dir: &Path, index_path: &Path, text: &str) -> Result<Self> {
        let err = |msg: String| ModelError::Checkpoint {
            file: index_path.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| err("no `weight_map` object".into()))?;
        let mut weight_map = HashMap::with_capacity(map.len());
        let mut shards = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                err(format!(
                    "weight_map entry `{name}` is not a file name string"
                ))
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(err(format!(
                    "weight_map entry `{name}` points outside the model directory: \"{file}\""
                )));
            }
            weight_map.insert(name.clone(), file.to_string());
            shards.entry(file.to_string()).or_insert_with(OnceLock::new);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            weight_map,
            shards,
            index_path: Some(index_path.to_path_buf()),
            gguf: None,
            fp8: None,
        })
    }

    /// The model directory, or the GGUF file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The FP8 block scheme, when config.json declares one.
    pub fn fp8_scheme(&self) -> Option<Fp8Scheme> {
        self.fp8
    }

    /// The GGUF file this checkpoint reads, if it is one.
    pub fn gguf(&self) -> Option<&super::gguf::GgufFile> {
        self.gguf.as_ref()
    }

    /// A fingerprint of the weights, not only of the config (two fine-tunes share a config, and
    /// their shard headers too): the config's fingerprint, then for every shard its name, size,
    /// header, and 16 windows of 4 KiB spread over its data. Cheap on any checkpoint (≤ 64 KiB
    /// read per shard), and different for weights that differ anywhere but in a few bytes.
    pub fn weights_fingerprint(&self, cfg: &MoeConfig) -> Result<String> {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        const WINDOWS: u64 = 16;
        const WINDOW: usize = 4096;
        if let Some(g) = &self.gguf {
            return g.weights_fingerprint(cfg);
        }
        let mut h = blake3::Hasher::new();
        h.update(cfg.fingerprint().as_bytes());
        for name in self.shards.keys() {
            let path = self.dir.join(name);
            let io = |what: &str, e: std::io::Error| ModelError::Io {
                path: path.clone(),
                what: what.into(),
                source: e,
            };
            let mut f = std::fs::File::open(&path).map_err(|e| io("opening shard", e))?;
            let size = f.metadata().map_err(|e| io("reading shard size", e))?.len();
            h.update(name.as_bytes());
            h.update(&size.to_le_bytes());
            let mut len = [0u8; 8];
            f.read_exact(&mut len)
                .map_err(|e| io("reading the safetensors header length", e))?;
            // The header is checked (and bounded) when the shard is opened; here it is hashed
            // as it is, at most what the format allows.
            let n = u64::from_le_bytes(len).min(MAX_HEADER_BYTES).min(size - 8);
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header)
                .map_err(|e| io("reading the safetensors header", e))?;
            h.update(&header);
            let data = 8 + n;
            let span = size - data;
            let mut buf = [0u8; WINDOW];
            for i in 0..WINDOWS {
                let at = data + span / WINDOWS * i;
                let want = (WINDOW as u64).min(size - at) as usize;
                f.read_exact_at(&mut buf[..want], at)
                    .map_err(|e| io("sampling shard data", e))?;
                h.update(&buf[..want]);
            }
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }

    /// Number of shard files the index lists (whether or not we opened them).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Shards opened so far (tests use this to prove non-text shards are never touched).
    pub fn opened_shards(&self) -> Vec<String> {
        self.shards
            .iter()
            .filter(|(_, c)| c.get().is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        if let Some(g) = &self.gguf {
            return g.contains(name);
        }
        self.weight_map.contains_key(name)
    }

    fn where_listed(&self) -> PathBuf {
        match &self.index_path {
            Some(p) => p.clone(),
            None if self.shards.len() == 1 => {
                self.dir.join(self.shards.keys().next().expect("one"))
            }
            None => self.dir.clone(),
        }
    }

    fn shard(&self, file: &str) -> Result<&SafetensorsFile> {
        let cell = self.shards.get(file).expect("shard named by weight_map");
        if let Some(f) = cell.get() {
            return Ok(f);
        }
        let path = self.dir.join(file);
        if !path.exists() {
            return Err(ModelError::Checkpoint {
                file: path,
                msg: format!(
                    "missing shard (listed in {})",
                    self.where_listed().display()
                ),
            });
        }
        let opened = SafetensorsFile::open(&path)?;
        // Another thread may have won the race; either copy is identical.
        let _ = cell.set(opened);
        Ok(cell.get().expect("just set"))
    }

    /// Finds a tensor through the index and returns its file and header entry.
    pub fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let Some(file) = self.weight_map.get(name) else {
            return Err(ModelError::Tensor {
                file: self.where_listed(),
                tensor: name.into(),
                msg: "missing (not in the checkpoint)".into(),
            });
        };
        let shard = self.shard(file)?;
        let info = shard.info(name).ok_or_else(|| ModelError::Tensor {
            file: shard.path().to_path_buf(),
            tensor: name.into(),
            msg: format!(
                "{} maps it to this shard, but the shard does not contain it",
                self.where_listed().display()
            ),
        })?;
        Ok((shard, info))
    }

    /// Checks one tensor's shape and dtype, returning its location.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<TensorLocation> {
        if let Some(g) = &self.gguf {
            return g.check(name, shape);
        }
        let (file, info) = self.locate(name)?;
        let terr = |msg: String| ModelError::Tensor {
            file: file.path().to_path_buf(),
            tensor: name.into(),
            msg,
        };
        if info.shape != shape {
            return Err(terr(format!(
                "shape {:?}, expected {shape:?} from config.json",
                info.shape
            )));
        }
        let scale = if info.dtype == StDtype::F8E4M3 {
            Some(Box::new(self.check_fp8_scale(name, file, info)?))
        } else {
            None
        };
        if info.dtype.float_dtype().is_none() && scale.is_none() {
            return Err(terr(format!(
                "dtype {}, expected BF16, F16 or F32",
                info.dtype.name()
            )));
        }
        Ok(TensorLocation {
            name: name.to_string(),
            file: file.path().to_path_buf(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            offset: info.offset,
            len: info.len,
            scale,
        })
    }

    /// The scales of an `F8_E4M3` matrix: present, a float type, one per block of the scheme
    /// config.json declares.
    fn check_fp8_scale(
        &self,
        name: &str,
        file: &SafetensorsFile,
        info: &TensorInfo,
    ) -> Result<TensorLocation> {
        let terr = |msg: String| ModelError::Tensor {
            file: file.path().to_path_buf(),
            tensor: name.into(),
            msg,
        };
        let Some(scheme) = self.fp8 else {
            return Err(terr(
                "dtype F8_E4M3, but config.json declares no `quantization_config` \
                 (quant_method \"fp8\" with weight_block_size) to say how it is scaled"
                    .into(),
            ));
        };
        if info.shape.len() != 2 {
            return Err(terr(format!(
                "dtype F8_E4M3 with shape {:?}: only matrices can be block-scaled",
                info.shape
            )));
        }
        let scale_name = Fp8Scheme::scale_name(name)
            .ok_or_else(|| terr("dtype F8_E4M3, but the name does not end in `.weight`".into()))?;
        if !self.weight_map.contains_key(&scale_name) {
            return Err(terr(format!(
                "dtype F8_E4M3, but its scales `{scale_name}` are not in the checkpoint"
            )));
        }
        let (sfile, sinfo) = self.locate(&scale_name)?;
        let want = scheme.scale_shape(&info.shape);
        let serr = |msg: String| ModelError::Tensor {
            file: sfile.path().to_path_buf(),
            tensor: scale_name.clone(),
            msg,
        };
        if sinfo.shape != want {
            return Err(serr(format!(
                "shape {:?}, expected {want:?} (one scale per {}×{} block of the {:?} matrix \
                 `{name}`, as quantization_config.weight_block_size says)",
                sinfo.shape, scheme.block[0], scheme.block[1], info.shape
            )));
        }
        if sinfo.dtype.float_dtype().is_none() {
            return Err(serr(format!(
                "dtype {}, expected F32, BF16 or F16 scales",
                sinfo.dtype.name()
            )));
        }
        Ok(TensorLocation {
            name: scale_name.clone(),
            file: sfile.path().to_path_buf(),
            dtype: sinfo.dtype,
            shape: sinfo.shape.clone(),
            offset: sinfo.offset,
            len: sinfo.len,
            scale: None,
        })
    }

    /// Reads the block scales of the FP8 matrix at `loc` (nothing to do for any other) and
    /// checks that every one is a finite number, naming the file, the matrix and the block.
    /// Why apart from loading: a GPU slot pool copies a missed expert's scales as stored, so
    /// only `verify` can find a damaged one before a step's logits stop being numbers.
    pub fn check_fp8_scales(&self, loc: &TensorLocation) -> Result<()> {
        let Some(scale) = loc.scale.as_deref().filter(|_| self.gguf.is_none()) else {
            return Ok(());
        };
        let (sfile, _) = self.locate(&scale.name)?;
        let values = sfile
            .load(&scale.name, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let cols = scale.shape.get(1).copied().unwrap_or(1);
        super::fp8::check_scales_finite(&values, cols).map_err(|msg| ModelError::Tensor {
            file: sfile.path().to_path_buf(),
            tensor: loc.name.clone(),
            msg,
        })
    }

    /// A block-quantized GGUF matrix's block scales are numbers (`block_scales::check`): its
    /// bytes are read to find them, since every block carries its own. Nothing to do for other
    /// types and for safetensors checkpoints. An error names the file, the tensor, the row, the
    /// block and the field. Why apart from loading: candle computes with the blocks as stored,
    /// and a GPU slot pool copies them as stored.
    pub fn check_block_scales(&self, loc: &TensorLocation) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if self.gguf.is_none() || (loc.dtype.ggml().is_none() && loc.dtype.lut4().is_none()) {
            return Ok(());
        }
        let terr = |msg: String| ModelError::Tensor {
            file: loc.file.clone(),
            tensor: loc.name.clone(),
            msg,
        };
        thread_local! {
            // One buffer for every matrix `verify` reads: a fresh one per matrix costs its
            // pages' faults each time.
            static BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BYTES.with_borrow_mut(|bytes| {
            bytes.resize(loc.len as usize, 0);
            std::fs::File::open(&loc.file)
                .and_then(|f| f.read_exact_at(bytes, loc.offset))
                .map_err(|e| {
                    terr(format!(
                        "reading {} bytes at offset {}: {e}",
                        loc.len, loc.offset
                    ))
                })?;
            let cols = loc.shape.last().copied().unwrap_or(0);
            super::block_scales::check(loc.dtype, bytes, cols)
                .map_err(|why| terr(format!("{} {why}", loc.dtype.name())))
        })
    }

    /// An FP8 matrix as it is stored (bytes and scales), after the checks of [`check`](Self::check).
    /// `None` when the tensor is not FP8.
    pub fn load_fp8(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<Fp8Matrix>> {
        if self.gguf.is_some() {
            return Ok(None);
        }
        let loc = self.check(name, shape)?;
        let Some(scale) = &loc.scale else {
            return Ok(None);
        };
        let (file, info) = self.locate(name)?;
        let (sfile, _) = self.locate(&scale.name)?;
        let scales = sfile
            .load(&scale.name, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let block = self.fp8.expect("checked").block;
        let m = Fp8Matrix::new(
            file.bytes(info),
            [shape[0], shape[1]],
            scales,
            block,
            device,
        )
        .map_err(|e| ModelError::Tensor {
            file: file.path().to_path_buf(),
            tensor: name.into(),
            msg: e.to_string(),
        })?;
        Ok(Some(m))
    }

    /// Loads a tensor after checking its shape; converts to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(g) = &self.gguf {
            return g.load(name, shape, dtype, device);
        }
        if let Some(m) = self.load_fp8(name, shape, device)? {
            // A tensor used dense (not through a linear layer) is widened once, here.
            return Ok(m.dequantize(dtype)?);
        }
        self.check(name, shape)?;
        let (file, _) = self.locate(name)?;
        file.load(name, dtype, device)
    }

    /// Every non-expert tensor the config implies, with its expected shape.
    pub fn required_tensors(cfg: &MoeConfig) -> Vec<(String, Vec<usize>)> {
        let h = cfg.hidden_size;
        let d = cfg.head_dim;
        let q = cfg.num_attention_heads * d;
        let kv = cfg.num_key_value_heads * d;
        let mut out = vec![(
            cfg.tensor_name("model.embed_tokens.weight"),
            vec![cfg.vocab_size, h],
        )];
        for (l, kind) in cfg.layer_kinds.iter().enumerate() {
            let p = |rest: &str| cfg.tensor_name(&format!("model.layers.{l}.{rest}"));
            out.push((p("input_layernorm.weight"), vec![h]));
            out.push((p("post_attention_layernorm.weight"), vec![h]));
            out.push((p("self_attn.q_proj.weight"), vec![q, h]));
            out.push((p("self_attn.k_proj.weight"), vec![kv, h]));
            out.push((p("self_attn.v_proj.weight"), vec![kv, h]));
            out.push((p("self_attn.o_proj.weight"), vec![h, q]));
            out.push((p("self_attn.q_norm.weight"), vec![d]));
            out.push((p("self_attn.k_norm.weight"), vec![d]));
            if cfg.attention_bias {
                out.push((p("self_attn.q_proj.bias"), vec![q]));
                out.push((p("self_attn.k_proj.bias"), vec![kv]));
                out.push((p("self_attn.v_proj.bias"), vec![kv]));
                out.push((p("self_attn.o_proj.bias"), vec![h]));
            }
            match kind {
                FfnKind::Moe => out.push((p("mlp.gate.weight"), vec![cfg.num_experts, h])),
                FfnKind::Dense => {
                    let i = cfg.intermediate_size;
                    out.push((p("mlp.gate_proj.weight"), vec![i, h]));
                    out.push((p("mlp.up_proj.weight"), vec![i, h]));
                    out.push((p("mlp.down_proj.weight"), vec![h, i]));
                }
            }
        }
        out.push((cfg.tensor_name("model.norm.weight"), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push((cfg.tensor_name("lm_head.weight"), vec![cfg.vocab_size, h]));
        }
        out
    }

    /// Checks every non-expert tensor (hard errors) and takes stock of the experts: a present
    /// expert with a wrong shape or dtype is a hard error; absent ones are listed, and the caller
    /// decides (refuse by default, or run degraded when the user allowed it).
    pub fn validate(&self, cfg: &MoeConfig) -> Result<ExpertInventory> {
        for (name, shape) in Self::required_tensors(cfg) {
            self.check(&name, &shape)?;
        }
        let mut inv = ExpertInventory {
            expected: cfg.total_experts(),
            ..Default::default()
        };
        for layer in cfg.moe_layers() {
            for e in 0..cfg.num_experts {
                match self.expert_location(cfg, layer, e)? {
                    Some(_) => inv.present += 1,
                    None => inv.missing.push((layer, e)),
                }
            }
        }
        Ok(inv)
    }

    /// Where an expert's three matrices are; `None` when any of them is absent from the index.
    pub fn expert_location(
        &self,
        cfg: &MoeConfig,
        layer: usize,
        expert: usize,
    ) -> Result<Option<ExpertLocation>> {
        if let Some(g) = &self.gguf {
            return g.expert_location(cfg, layer, expert);
        }
        let mut parts = Vec::with_capacity(3);
        for proj in ExpertProj::ALL {
            let name = cfg.expert_tensor_name(layer, expert, proj);
            if !self.contains(&name) {
                return self.stacked_expert_location(cfg, layer, expert);
            }
            parts.push(self.check(&name, &proj.shape(cfg))?);
        }
        let parts: [TensorLocation; 3] = parts.try_into().expect("three parts");
        Ok(Some(ExpertLocation {
            layer,
            expert,
            parts,
        }))
    }

    /// An expert of a layer stored the way transformers 5 holds experts in memory: one stack
    /// `mlp.experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and one
    /// `mlp.experts.down_proj` [E, H, I]. `save_pretrained` writes experts one by one, but a
    /// state dict saved as it is (other tools' conversions) keeps the stacks. Each matrix is then
    /// a byte range of its stack, named as the per-expert layout names it (so extraction and
    /// errors speak of one expert). `None` when the layer has neither stack.
    fn stacked_expert_location(
        &self,
        cfg: &MoeConfig,
        layer: usize,
        expert: usize,
    ) -> Result<Option<ExpertLocation>> {
        let stack =
            |rest: &str| cfg.tensor_name(&format!("model.layers.{layer}.mlp.experts.{rest}"));
        let (gate_up, down) = (stack("gate_up_proj"), stack("down_proj"));
        if !self.contains(&gate_up) && !self.contains(&down) {
            return Ok(None);
        }
        let (e, i, h) = (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size);
        let mut stacks = Vec::with_capacity(2);
        for (name, shape) in [(&gate_up, [e, 2 * i, h]), (&down, [e, h, i])] {
            let (file, info) = self.locate(name)?;
            if info.dtype == StDtype::F8E4M3 {
                return Err(ModelError::Tensor {
                    file: file.path().to_path_buf(),
                    tensor: name.clone(),
                    msg: "FP8 experts stacked in one tensor are not supported (moescope reads \
                          FP8 experts one by one, each with its scales, as Qwen's -FP8 \
                          checkpoints store them)"
                        .into(),
                });
            }
            stacks.push(self.check(name, &shape)?);
        }
        let matrix = |stack: &TensorLocation, at: usize, proj: ExpertProj| {
            let [rows, cols] = proj.shape(cfg);
            // The stack's matrices are all of this shape: its length over their count.
            let bytes = stack.len / (stack.shape[0] * stack.shape[1] / rows) as u64;
            TensorLocation {
                name: cfg.expert_tensor_name(layer, expert, proj),
                file: stack.file.clone(),
                dtype: stack.dtype,
                shape: vec![rows, cols],
                offset: stack.offset + at as u64 * bytes,
                len: bytes,
                scale: None,
            }
        };
        Ok(Some(ExpertLocation {
            layer,
            expert,
            parts: [
                matrix(&stacks[0], 2 * expert, ExpertProj::Gate),
                matrix(&stacks[0], 2 * expert + 1, ExpertProj::Up),
                matrix(&stacks[1], expert, ExpertProj::Down),
            ],
        }))
    }

    /// Tensor names in the checkpoint that the text model does not use (audio, vision, talker…),
    /// grouped by their first two name components — for the user's information only.
    pub fn unused_prefixes(&self, cfg: &MoeConfig) -> BTreeSet<String> {
        let wanted = &cfg.tensor_prefix;
        self.weight_map
            .keys()
            .filter(|n| {
                !(n.starts_with(&format!("{wanted}model."))
                    || n.starts_with(&cfg.tensor_name("lm_head.")))
            })
            .map(|n| n.split('.').take(2).collect::<Vec<_>>().join("."))
            .collect()
    }
}

/// The FP8 scheme config.json declares, if any (no config.json: none — the config reader
/// reports a missing file itself).
fn read_fp8_scheme(dir: &Path) -> Result<Option<Fp8Scheme>> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => Fp8Scheme::from_config(&v, &path),
        // Not JSON: MoeConfig::from_dir says so, naming the file.
        Err(_) => Ok(None),
    }
}
