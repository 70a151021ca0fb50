//! Generation: a step-wise [`Generation`] that produces one token per call (so a worker can
//! pause, step, or take turns with another backend between any two tokens), on the GPU through
//! CUDA graphs where a step can be one.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result};
use super::layers::KvCache;
use super::ports::{ExpertProvider, RoutingObserver, StepPath};
use super::qwen3_moe::{Logits, Qwen3Moe};
use super::sampling::{Sampler, SamplingParams};

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
    /// The KV cache and, on a GPU, the graphs over it: what [`Generation::into_state`] hands on.
    state: DecodeState,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    max_new_tokens: usize,
    finished: Option<FinishReason>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Decode steps that ran as one timed graph replay, and their device time: what the GPU
    /// spent of `decode_time` on those steps (the rest is the host's, between launches).
    pub graph_steps: usize,
    pub graph_device_time: Duration,
    /// The logits the last token was sampled from, once read back.
    last_logits: Vec<f32>,
    /// Where they still are when a greedy graph step picked its token on the device: the
    /// graphs that ran it (read back on demand by [`Generation::last_logits`]).
    #[cfg(feature = "cuda")]
    logits_in_graph: Option<super::graph::RanBy>,
}

/// What one generation leaves for the next on the same model and provider: its KV cache and the
/// CUDA graphs captured over that cache's buffers. Why: a generation's first decode step
/// captures its graph (a warm-up step, the capture, instantiation and upload), and with a cache
/// of its own every generation — every prompt of a session, every benchmark repeat — paid for
/// that again inside its decode time. See [`Generation::reusing`] for when it is taken up.
pub struct DecodeState {
    cache: KvCache,
    #[cfg(feature = "cuda")]
    graphs: Vec<super::graph::DecodeGraph>,
    #[cfg(feature = "cuda")]
    pieces: Option<super::graph::Piecewise>,
    #[cfg(feature = "cuda")]
    graph_failed: bool,
}

impl DecodeState {
    /// A state holding `cache` (empty) and no graphs — how tests reach the static layout on the
    /// CPU.
    pub fn from_cache(mut cache: KvCache) -> Result<Self> {
        cache.reset()?;
        Ok(DecodeState {
            cache,
            #[cfg(feature = "cuda")]
            graphs: Vec::new(),
            #[cfg(feature = "cuda")]
            pieces: None,
            #[cfg(feature = "cuda")]
            graph_failed: false,
        })
    }
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
        Self::reusing(model, None, prompt, params, stop_ids)
    }

    /// [`Generation::new`] over what an earlier generation left ([`Generation::into_state`]),
    /// where that gives the bits a fresh cache would: on a cache that grows (the CPU's) always;
    /// on a static one (the GPU's) when its capacity is the one this prompt's prefill would
    /// allocate — its buffers zeroed in place ([`KvCache::reset`]), it is then a fresh cache of
    /// that capacity at the same addresses, so its graphs still fit. Otherwise the state is
    /// dropped and the generation starts fresh.
    pub fn reusing(
        model: &Qwen3Moe,
        state: Option<DecodeState>,
        prompt: Vec<u32>,
        params: SamplingParams,
        stop_ids: Vec<u32>,
    ) -> Result<Self> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt has no tokens".into()));
        }
        let state = match state {
            Some(mut st)
                if st.cache.layer_count() == model.config().num_hidden_layers
                    && st.cache.reusable_for(prompt.len()) =>
            {
                st.cache.reset()?;
                st
            }
            _ => DecodeState::from_cache(model.new_cache())?,
        };
        let max = params.max_new_tokens;
        Ok(Generation {
            prompt,
            generated: Vec::new(),
            state,
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
            graph_steps: 0,
            graph_device_time: Duration::ZERO,
            last_logits: Vec::new(),
            #[cfg(feature = "cuda")]
            logits_in_graph: None,
        })
    }

    /// The KV cache and graphs, for the next generation on the same model
    /// ([`Generation::reusing`]).
    pub fn into_state(self) -> DecodeState {
        self.state
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
    /// After a greedy graph step they are read back from the device here, on demand.
    pub fn last_logits(&mut self) -> Result<&[f32]> {
        #[cfg(feature = "cuda")]
        if let Some(by) = self.logits_in_graph.take() {
            self.last_logits =
                super::graph::logits_of(&mut self.state.graphs, &mut self.state.pieces, by)?;
        }
        Ok(&self.last_logits)
    }

    pub fn kv_bytes(&self) -> u64 {
        self.state.cache.bytes()
    }

    /// A decode step through a CUDA graph where it can be one (native on a GPU; selective
    /// whole when it guesses nothing will miss, else piecewise); `None` when it cannot, or when
    /// capture failed — then this generation decodes uncaptured (the failed capture changed
    /// nothing: its warm-up step wrote the same KV row the uncaptured step will). The path says
    /// which; `Some(Redone)` alone (no row) is a failed guess whose step must run uncaptured.
    /// `full`: the caller samples from the logits, so a whole step reads them back; otherwise
    /// it reads only the greedy pick the graph made.
    #[cfg(feature = "cuda")]
    fn graphed_step(
        &mut self,
        model: &Qwen3Moe,
        experts: &dyn ExpertProvider,
        observer: &mut dyn RoutingObserver,
        input: &[u32],
        prefill: bool,
        full: bool,
    ) -> Result<(Option<Stepped>, Option<StepPath>)> {
        use super::graph::{RanBy, Whole};
        if prefill || self.state.graph_failed {
            return Ok((None, None));
        }
        let graphed = super::graph::step(
            &mut self.state.graphs,
            model,
            &mut self.state.cache,
            experts,
            observer,
            input[0],
            full,
        )
        .and_then(|whole| {
            let again = match whole {
                Whole::Ran(ran) => {
                    if let Some(s) = ran.device_s {
                        self.graph_steps += 1;
                        self.graph_device_time += Duration::from_secs_f64(s);
                    }
                    let stepped = Stepped::of(ran.row, RanBy::Whole(ran.graph));
                    return Ok((Some(stepped), Some(StepPath::Graph)));
                }
                Whole::NotApplicable => StepPath::Piecewise,
                Whole::Missed => StepPath::Redone,
            };
            // Not capturable whole (selective that may miss, or whose guess just failed).
            let row = super::graph::piecewise_step(
                &mut self.state.pieces,
                model,
                &mut self.state.cache,
                experts,
                observer,
                input[0],
                full,
            )?;
            Ok(match (row, again) {
                (Some(row), path) => (Some(Stepped::of(row, RanBy::Pieces)), Some(path)),
                (None, StepPath::Redone) => (None, Some(StepPath::Redone)),
                (None, _) => (None, None),
            })
        });
        match graphed {
            Ok(r) => Ok(r),
            Err(e) => {
                warn_graph_failure(&e);
                self.state.graphs.clear();
                self.state.pieces = None;
                self.state.graph_failed = true;
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
        _: bool,
    ) -> Result<(Option<Stepped>, Option<StepPath>)> {
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
        let full = !self.sampler.is_greedy();
        let graphed = self.graphed_step(model, experts, observer, &input, prefill, full)?;
        let (stepped, path) = match graphed {
            (Some(stepped), path) => (stepped, path.unwrap_or(StepPath::Graph)),
            (None, path) => {
                let row = model
                    .forward(
                        &input,
                        &mut self.state.cache,
                        experts,
                        observer,
                        Logits::Last,
                    )?
                    .squeeze(0)?
                    .to_vec1()?;
                let path = match path {
                    _ if prefill => StepPath::Prefill,
                    Some(p) => p,
                    None => StepPath::Uncaptured,
                };
                (Stepped::Logits(row), path)
            }
        };
        let token = match stepped {
            Stepped::Logits(row) => {
                let Some(token) = self.sampler.sample_numbers(&row) else {
                    return Err(not_finite(&row, self.generated.len(), prefill));
                };
                self.last_logits = row;
                #[cfg(feature = "cuda")]
                {
                    self.logits_in_graph = None;
                }
                token
            }
            #[cfg(feature = "cuda")]
            Stepped::Picked { token, numbers, by } => {
                if !numbers {
                    let st = &mut self.state;
                    let row = super::graph::logits_of(&mut st.graphs, &mut st.pieces, by)?;
                    return Err(not_finite(&row, self.generated.len(), prefill));
                }
                self.last_logits.clear();
                self.logits_in_graph = Some(by);
                token
            }
        };
        let step_time = start.elapsed();
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

/// What a step gave for its token.
enum Stepped {
    /// The logits row, sampled on the host.
    Logits(Vec<f32>),
    /// A greedy graph step's pick, made on the device; its logits stay in the graphs that ran
    /// it until the next step (and `numbers` says whether each was one).
    #[cfg(feature = "cuda")]
    Picked {
        token: u32,
        numbers: bool,
        by: super::graph::RanBy,
    },
}

#[cfg(feature = "cuda")]
impl Stepped {
    fn of(row: super::graph::Row, by: super::graph::RanBy) -> Self {
        match row {
            super::graph::Row::Logits(row) => Stepped::Logits(row),
            super::graph::Row::Pick { token, numbers } => Stepped::Picked { token, numbers, by },
        }
    }
}

/// The error for a logits row holding NaN or +∞: which token, which id, how many.
fn not_finite(row: &[f32], index: usize, prefill: bool) -> ModelError {
    let when = if prefill {
        "after the prompt".to_string()
    } else {
        format!("at generated token {}", index + 1)
    };
    non_numbers(row, &when, "NaN or +inf", |v| {
        v.is_nan() || v == f32::INFINITY
    })
    .unwrap_or_else(|| ModelError::Input(format!("the logits {when} are an empty row")))
}

/// The error for a logits row holding values `is_bad` refuses (`what` names them), saying when
/// ("after the prompt"), how many and the first one's token id; None when there is none.
pub fn non_numbers(
    row: &[f32],
    when: &str,
    what: &str,
    is_bad: impl Fn(f32) -> bool,
) -> Option<ModelError> {
    let first = row.iter().position(|&v| is_bad(v))?;
    Some(ModelError::NotFinite(format!(
        "the logits {when} are not finite ({} of {} values {what}, the first at token id \
         {first} = {}): the model's weights or activations are not numbers — check the \
         checkpoint",
        row.iter().filter(|&&v| is_bad(v)).count(),
        row.len(),
        row[first]
    )))
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
