//! Generation: tokenizer + chat template, sampling, streaming detokenisation, stop rules, and a
//! step-wise [`Generation`] that produces one token per call (so a worker can pause, step, or
//! take turns with another backend between any two tokens).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use minijinja::{Environment, context};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ModelError, Result};
use super::layers::{KvCache, argmax};
use super::ports::{ExpertProvider, RoutingObserver, StepPath};
use super::qwen3_moe::{Logits, Qwen3Moe};

/// Qwen's ChatML, used when the checkpoint ships no chat template.
pub const CHATML_FALLBACK: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n\
{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `tokenizer.json` + the chat template from `tokenizer_config.json`.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    chat_template: String,
    template_source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    path: PathBuf,
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer {
                file: path,
                msg: "missing (needed for text prompts; --token-ids works without it)".into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            file: path.clone(),
            msg: format!("cannot be loaded: {e}"),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut chat_template = None;
        let (mut bos_token, mut eos_token) = (None, None);
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io {
                path: cfg_path.clone(),
                what: "reading tokenizer config".into(),
                source: e,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
                file: cfg_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            chat_template = template_from_config(&v);
            bos_token = token_string(v.get("bos_token"));
            eos_token = token_string(v.get("eos_token"));
        }
        // transformers ≥ 4.43 may also put the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = std::fs::read_to_string(&jinja).ok();
        }
        let (chat_template, template_source) = match chat_template {
            Some(t) => (t, cfg_path.display().to_string()),
            None => (CHATML_FALLBACK.to_string(), "built-in ChatML".to_string()),
        };
        let me = TextTokenizer {
            tok,
            chat_template,
            template_source,
            bos_token,
            eos_token,
            path,
        };
        // Fail at load, naming the file, rather than at the first prompt.
        me.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )?;
        Ok(me)
    }

    pub fn template_source(&self) -> &str {
        &self.template_source
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Special tokens written by the template (<|im_start|> …) are added tokens and are matched
        // as such; add_special_tokens=false keeps the tokenizer from adding BOS/EOS of its own.
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                file: self.path.clone(),
                msg: format!("encoding failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.tok.token_to_id(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Renders the chat template (HF semantics: `messages`, `add_generation_prompt`, special
    /// tokens as variables, `enable_thinking = false` so short answers are not spent thinking).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let terr = |e: minijinja::Error| ModelError::Tokenizer {
            file: PathBuf::from(&self.template_source),
            msg: format!("chat template: {e:#}"),
        };
        env.add_template("chat", &self.chat_template)
            .map_err(terr)?;
        let tmpl = env.get_template("chat").map_err(terr)?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            enable_thinking => false,
            tools => minijinja::Value::from(()),
        })
        .map_err(terr)
    }

    /// Token ids of a prompt: the chat template applied to one user turn, or the raw text.
    pub fn prompt_ids(&self, prompt: &str, raw: bool) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt is empty".into()));
        }
        let text = if raw {
            prompt.to_string()
        } else {
            self.apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: prompt.into(),
                }],
                true,
            )?
        };
        self.encode(&text)
    }
}

fn template_from_config(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        Value::Array(items) => items.iter().find_map(|t| {
            (t.get("name")?.as_str()? == "default")
                .then(|| t.get("template")?.as_str().map(String::from))
                .flatten()
        }),
        _ => None,
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// Decoding settings. `temperature == 0` is greedy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 50,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Input(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                cum += x;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (k, &x) in probs.iter().enumerate() {
            cum += x;
            if r < cum {
                return idx[k] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

/// Turns a growing token sequence into text increments that never split a UTF-8 character:
/// a byte-level BPE token can hold half of a multi-byte character, which decodes to U+FFFD
/// until the next token completes it — so we hold text back while it ends in U+FFFD.
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            new
        } else {
            String::new()
        }
    }

    /// Whatever is still held back at the end of generation (may contain U+FFFD if the model
    /// really produced an incomplete character).
    pub fn finish(&mut self, tok: &TextTokenizer) -> String {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.starts_with(&prefix) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    MaxNewTokens,
    Cancelled,
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub index: usize,
    pub token: u32,
    /// Time of the forward pass that produced this token's logits plus sampling.
    pub step_time: Duration,
    /// True for the first token, whose forward pass was the whole prompt (prefill).
    pub prefill: bool,
    /// How its forward pass ran.
    pub path: StepPath,
    pub finish: Option<FinishReason>,
}

/// A generation in progress: prompt → tokens, one per [`Generation::step`].
pub struct Generation {
    prompt: Vec<u32>,
    pub generated: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    max_new_tokens: usize,
    finished: Option<FinishReason>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// The logits the last token was sampled from.
    last_logits: Vec<f32>,
    #[cfg(feature = "cuda")]
    graphs: Vec<super::graph::DecodeGraph>,
    #[cfg(feature = "cuda")]
    pieces: Option<super::graph::Piecewise>,
    #[cfg(feature = "cuda")]
    graph_failed: bool,
}

/// Says once per process that CUDA graphs were given up (decoding goes on uncaptured).
#[cfg(feature = "cuda")]
fn warn_graph_failure(e: &ModelError) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("moescope: decoding without CUDA graphs: {e}"));
}

impl Generation {
    pub fn new(
        model: &Qwen3Moe,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop_ids: Vec<u32>,
    ) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        let max = params.max_new_tokens;
        Ok(Generation {
            prompt,
            generated: Vec::new(),
            cache: model.new_cache(),
            sampler: Sampler::new(params),
            stop_ids,
            max_new_tokens: max,
            finished: if max == 0 {
                Some(FinishReason::MaxNewTokens)
            } else {
                None
            },
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            last_logits: Vec::new(),
            #[cfg(feature = "cuda")]
            graphs: Vec::new(),
            #[cfg(feature = "cuda")]
            pieces: None,
            #[cfg(feature = "cuda")]
            graph_failed: false,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn cancel(&mut self) {
        if self.finished.is_none() {
            self.finished = Some(FinishReason::Cancelled);
        }
    }

    /// The logits the last generated token was sampled from (empty before the first step).
    pub fn last_logits(&self) -> &[f32] {
        &self.last_logits
    }

    pub fn kv_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// A decode step through a CUDA graph where it can be one (native on a GPU; selective
    /// whole when it guesses nothing will miss, else piecewise); `None` when it cannot, or when
    /// capture failed — then this generation decodes uncaptured (the failed capture changed
    /// nothing: its warm-up step wrote the same KV row the uncaptured step will). The path says
    /// which; `Some(Redone)` alone (no row) is a failed guess whose step must run uncaptured.
    #[cfg(feature = "cuda")]
    fn graphed_step(
        &mut self,
        model: &Qwen3Moe,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        input: &[u32],
        prefill: bool,
    ) -> Result<(Option<Vec<f32>>, Option<StepPath>)> {
        use super::graph::Whole;
        if prefill || self.graph_failed {
            return Ok((None, None));
        }
        let graphed = super::graph::step(
            &mut self.graphs,
            model,
            &mut self.cache,
            experts,
            observer,
            input[0],
        )
        .and_then(|whole| {
            let again = match whole {
                Whole::Ran(row) => return Ok((Some(row), Some(StepPath::Graph))),
                Whole::NotApplicable => StepPath::Piecewise,
                Whole::Missed => StepPath::Redone,
            };
            // Not capturable whole (selective that may miss, or whose guess just failed).
            let row = super::graph::piecewise_step(
                &mut self.pieces,
                model,
                &mut self.cache,
                experts,
                observer,
                input[0],
            )?;
            Ok(match (row, again) {
                (Some(row), path) => (Some(row), Some(path)),
                (None, StepPath::Redone) => (None, Some(StepPath::Redone)),
                (None, _) => (None, None),
            })
        });
        match graphed {
            Ok(r) => Ok(r),
            Err(e) => {
                warn_graph_failure(&e);
                self.graphs.clear();
                self.pieces = None;
                self.graph_failed = true;
                Ok((None, None))
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn graphed_step(
        &mut self,
        _: &Qwen3Moe,
        _: &dyn ExpertProvider,
        _: &mut dyn RoutingObserver,
        _: &[u32],
        _: bool,
    ) -> Result<(Option<Vec<f32>>, Option<StepPath>)> {
        Ok((None, None))
    }

    /// Produces the next token, or `None` once finished. The first call runs the prompt.
    pub fn step(
        &mut self,
        model: &Qwen3Moe,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Option<StepOutput>> {
        if self.finished.is_some() {
            return Ok(None);
        }
        let start = Instant::now();
        let prefill = self.generated.is_empty();
        let input: Vec<u32> = if prefill {
            self.prompt.clone()
        } else {
            vec![*self.generated.last().expect("a token was generated")]
        };
        let (row, path) = match self.graphed_step(model, experts, observer, &input, prefill)? {
            (Some(row), path) => (row, path.unwrap_or(StepPath::Graph)),
            (None, path) => {
                let row = model
                    .forward(&input, &mut self.cache, experts, observer, Logits::Last)?
                    .squeeze(0)?
                    .to_vec1()?;
                let path = match path {
                    _ if prefill => StepPath::Prefill,
                    Some(p) => p,
                    None => StepPath::Uncaptured,
                };
                (row, path)
            }
        };
        let token = self.sampler.sample(&row);
        let step_time = start.elapsed();
        self.last_logits = row;
        if prefill {
            self.prefill_time = step_time;
        } else {
            self.decode_time += step_time;
            experts.step_ran(path, step_time.as_secs_f64());
        }
        self.generated.push(token);
        if self.stop_ids.contains(&token) {
            self.finished = Some(FinishReason::Eos);
        } else if self.generated.len() >= self.max_new_tokens {
            self.finished = Some(FinishReason::MaxNewTokens);
        }
        Ok(Some(StepOutput {
            index: self.generated.len() - 1,
            token,
            step_time,
            prefill,
            path,
            finish: self.finished,
        }))
    }
}

/// Timing summary of a finished generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    pub load_s: f64,
    pub ttft_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

impl Timing {
    pub fn of(g: &Generation, load: Duration) -> Self {
        let prefill = g.prefill_time.as_secs_f64();
        let decode = g.decode_time.as_secs_f64();
        let n = g.generated.len();
        Timing {
            load_s: load.as_secs_f64(),
            ttft_s: prefill,
            prefill_tok_s: if prefill > 0.0 {
                g.prompt.len() as f64 / prefill
            } else {
                0.0
            },
            // The first token comes from the prefill; each later one from one decode step.
            decode_tok_s: if n > 1 && decode > 0.0 {
                (n - 1) as f64 / decode
            } else {
                0.0
            },
            prompt_tokens: g.prompt.len(),
            generated_tokens: n,
        }
    }
}

/// Stop ids: the config's eos ids; if it names none, the tokenizer's end-of-turn tokens.
pub fn stop_ids(cfg_eos: &[u32], tok: Option<&TextTokenizer>) -> Vec<u32> {
    if !cfg_eos.is_empty() {
        return cfg_eos.to_vec();
    }
    tok.map(|t| {
        ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|s| t.token_id(s))
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let logits = [0.0, 1.0, 1.1, -5.0];
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "only the top-2 are drawn"
        );
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        // token 0 alone has > 50 % of the mass
        for _ in 0..20 {
            assert_eq!(s.sample(&[5.0, 1.0, 1.0, 1.0]), 0);
        }
    }

    /// A template in the style of Qwen3's (namespace, reversed slices, loop.index0, string
    /// methods, `is defined` tests, tojson, enable_thinking), written for this test.
    const QWEN3_STYLE: &str = r#"{%- if tools %}{{- '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == "user" and not message.content.startswith('<tool_response>') %}{%- set ns.last_user = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- set content = message.content.strip() %}
{%- if message.role == "assistant" and '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"#;

    #[test]
    fn qwen3_style_chat_template_renders() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe");
        std::fs::copy(
            src.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let cfg = serde_json::json!({"chat_template": QWEN3_STYLE, "eos_token": "<|im_end|>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = TextTokenizer::from_dir(dir.path()).unwrap();
        let msgs = vec![
            ChatMessage {
                role: "user".into(),
                content: " hi ".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "<think>x</think>\nhello".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "What is a cache?".into(),
            },
        ];
        let out = t.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nWhat is a cache?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        // A template that does not parse is an error naming the file, at load time.
        let bad = serde_json::json!({"chat_template": "{% for m in messages %}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), bad.to_string()).unwrap();
        let e = TextTokenizer::from_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("chat template"),
            "{e}"
        );
    }

    #[test]
    fn bad_sampling_params_are_rejected() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top-p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().is_err());
    }
}
