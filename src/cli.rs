//! The command line (clap derive). Parsing only: the commands live in `commands/`. The only
//! place clap reaches: library types stay plain, and their flags are described here (the value
//! names below are what a user types; the recording stores the library types' own serde names).

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand};

use crate::cache::policy::PolicyKind;
use crate::cache::settings::{CacheSettings, PrefetchMode, Scope, SourceSpec};
use crate::engine::{BackendKind, DeviceSpec, Dtype};
use crate::model::tokenizer::PromptStyle;
use crate::session::record::Schedule;

/// `clap::ValueEnum` for a plain library enum: its variants, each with the name a user types
/// and its help line.
macro_rules! value_enum {
    ($ty:ty, $all:expr, $name:ident, $help:ident) => {
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &$all
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(PossibleValue::new(self.$name()).help(self.$help()))
            }
        }
    };
}

value_enum!(PolicyKind, PolicyKind::ALL, name, describe);
value_enum!(Scope, Scope::ALL, name, describe);
value_enum!(PrefetchMode, PrefetchMode::ALL, name, describe);
value_enum!(Schedule, Schedule::ALL, name, describe);
value_enum!(BackendKind, BackendKind::ALL, name, describe);
value_enum!(Dtype, Dtype::ALL, name, name);

#[derive(Debug, Parser)]
#[command(
    name = "moescope",
    version,
    about = "Run a Mixture-of-Experts model natively and with experts loaded on demand, side by side",
    long_about = "moescope compares two ways of running a MoE model: native (every weight resident) \
and selective (experts loaded on demand through a bounded cache). Without a subcommand it opens \
the live dashboard on the bundled model (models/tiny-moe) with prompts/standard.toml."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run both backends on a prompt set: live dashboard, or headless with --no-tui.
    Run(Box<RunArgs>),
    /// Replay a recording through the dashboard (no model needed).
    Replay(ReplayArgs),
    /// Follow a recording that is still being written (a run under nohup/tmux).
    Watch(WatchArgs),
    /// Summarise a recording as JSON or markdown (optionally re-judged under another profile).
    Export(ExportArgs),
    /// Replay a routing trace through cache policies and the optimum: hit rate per capacity,
    /// knee, predicted decode speed.
    Simulate(SimulateArgs),
    /// Selective runs at each capacity (headless): measured tok/s, memory and hit rate next to
    /// the simulated curve.
    Sweep(SweepArgs),
    /// List the colour themes.
    Themes,
    /// (internal) Serve one backend over JSON lines on stdin/stdout.
    #[command(hide = true)]
    Worker,
    /// (internal) Serve moescope native as `run --reference-impl moescope`'s reference.
    #[command(hide = true)]
    ReferenceWorker,
    /// Generate text from a prompt with one backend; streams tokens, ends with a timing line.
    Generate(GenerateArgs),
    /// Print the final-position logits for a token sequence as JSON.
    Logits(LogitsArgs),
    /// Write every expert to its own file with a checksummed manifest (resumable, atomic).
    Extract(ExtractArgs),
    /// Count and check every expert of a checkpoint, extraction or seed-layout directory.
    Verify(VerifyArgs),
    /// Benchmarks (decode speed against candle-transformers, selective sweeps, random models).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Native decode tok/s against candle-transformers' qwen3_moe on the same files.
    Decode(BenchDecodeArgs),
    /// Write a random checkpoint in the real per-expert layout.
    RandomCheckpoint(RandomCheckpointArgs),
    /// Compile the GPU kernels for this machine: both backends' paths on a tiny random model.
    /// The driver caches what it compiles, so only the first use on a machine is slow (20–30 s
    /// on an H200); `run` does this first so that neither backend's load time pays for it.
    Kernels(KernelsArgs),
    /// KL divergence and top-1 agreement against llama.cpp on the same GGUF file: reads the
    /// logits file `llama-perplexity -m FILE.gguf -f TEXT --kl-divergence-base OUT` writes and
    /// scores the same token chunks.
    Kld(KldArgs),
    /// Where a GPU decode step's time goes: each stage of every layer (attention, router, the
    /// expert kernels, norms, lm_head) captured as its own CUDA graph and timed with events,
    /// against the whole-step graph and a device copy's bandwidth measured in the same run.
    Steps(StepsArgs),
}

#[derive(Debug, Args)]
pub struct StepsArgs {
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "cuda:0", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,
    /// Prompt tokens before the profiled step (the KV rows attention reads grow with it).
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Timed rounds after one warm-up (medians are reported).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON (per-layer medians included) to FILE.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KldArgs {
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// llama-perplexity's `--kl-divergence-base` output.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["against", "candle"],
        conflicts_with_all = ["against", "candle"]
    )]
    pub base: Option<PathBuf>,
    /// Instead of llama.cpp's logits: candle-transformers' own model of the same --model
    /// (`qwen3_moe` over safetensors; `quantized_qwen3_moe` over GGUF, CUDA only) in the same
    /// --dtype on the same --device, on --text cut into --ctx-token chunks.
    #[arg(long, conflicts_with = "against")]
    pub candle: bool,
    /// Instead of llama.cpp's logits: another model run by moescope in f32 (e.g. the bf16
    /// checkpoint a quantized file was made from), on --text cut into --ctx-token chunks.
    #[arg(long, value_name = "DIR")]
    pub against: Option<PathBuf>,
    /// Text for --against / --candle (default: prompts/reference.txt).
    #[arg(long, value_name = "FILE", conflicts_with = "base")]
    pub text: Option<PathBuf>,
    /// Chunk length for --against / --candle (llama-perplexity's -c).
    #[arg(long, default_value_t = 64, conflicts_with = "base")]
    pub ctx: usize,
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KernelsArgs {
    #[arg(long, default_value = "cuda:0", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    pub dtype: Dtype,
}

#[derive(Debug, Args)]
pub struct BenchDecodeArgs {
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Compute dtypes to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtype: Vec<Dtype>,
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repeats (best is kept) after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Time moescope alone (where candle-transformers cannot run the model, e.g. a GGUF file
    /// on the CPU; compare with llama-bench then).
    #[arg(long)]
    pub no_reference: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RandomCheckpointArgs {
    /// engine | selective | qwen3-30b-a3b-12l
    #[arg(long, default_value = "engine")]
    pub preset: String,
    /// Override the preset's layer count.
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Largest shard (bigger checkpoints get an index), e.g. 2GiB.
    #[arg(long, default_value = "2GiB", value_parser = crate::util::parse_bytes)]
    pub shard_size: u64,
    /// Write one GGUF file (Q8_0, Q4_K, Q4_K_M, MXFP4_MOE, IQ4_XS_MOE, IQ4_NL_MOE, IQ4_XS or BF16) at
    /// --out instead of a safetensors directory.
    #[arg(long, value_name = "QUANT")]
    pub gguf: Option<String>,
}

/// Dashboard appearance (shared by run, replay and watch).
#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    /// Colour theme (see `moescope themes`).
    #[arg(long, default_value = "default")]
    pub theme: String,
    /// Colour depth: auto (detect), truecolor, 256, 16, none. NO_COLOR is honoured.
    #[arg(long, default_value = "auto")]
    pub color: String,
    /// Draw with ASCII only (terminals without Unicode block characters).
    #[arg(long)]
    pub ascii: bool,
    /// Disable keys that change the run (for shared SSH sessions).
    #[arg(long)]
    pub readonly: bool,
    /// Frames per second at most.
    #[arg(long, default_value_t = 15)]
    pub fps: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Prompt set (TOML). Default: prompts/standard.toml.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// One ad-hoc prompt instead of a prompt file.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// Override the prompt set's max_new_tokens.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Run the prompt list this many times in the same workers. The expert cache stays warm
    /// from one pass to the next, so the last pass shows steady-state speed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub passes: u32,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Send prompts without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Let Qwen3 templates think: `enable_thinking = true` (default false, so comparisons are
    /// not spent reasoning). "Thinking" checkpoints always think.
    #[arg(long, conflicts_with = "raw")]
    pub enable_thinking: bool,
    /// How the two backends share the machine.
    #[arg(long, value_enum, default_value_t = Schedule::Alternate)]
    pub schedule: Schedule,
    /// Decision profile: relative (default), discrete-gpu, seed, or a TOML file.
    #[arg(long, default_value = "relative")]
    pub profile: String,
    /// Recording path. Default: recordings/<UTC time>-<model>.ndjson.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Reference text for perplexity (default: prompts/reference.txt; "none" to skip).
    #[arg(long, value_name = "FILE")]
    pub reference: Option<String>,
    /// Tokens of the reference text scored.
    #[arg(long, default_value_t = 512)]
    pub reference_tokens: usize,
    /// Skip teacher-forced scoring (KL, top-1 agreement).
    #[arg(long)]
    pub no_score: bool,
    /// Once both backends are done, run a reference implementation on the same weights and
    /// token ids and report how closely moescope native matches it (KL, top-1 agreement, first
    /// divergence) with the reference's own speed and memory — its own line; the verdict stays
    /// native against selective. `transformers`: Hugging Face transformers on PyTorch, from
    /// --python. `moescope`: moescope native on --reference-model (the original a GGUF or FP8
    /// file was made from: what the quantization costs). Without them: one line saying so, and
    /// the run goes on.
    #[arg(long, value_name = "IMPL")]
    pub reference_impl: Option<String>,
    /// The checkpoint the reference runs (default: --model): e.g. the bf16 original of a
    /// quantized --model. Its tokenizer must give the same token ids.
    #[arg(long, value_name = "DIR")]
    pub reference_model: Option<PathBuf>,
    /// Step mode: after each prompt both backends stop and the dashboard shows that prompt's
    /// result card until `n` or Enter (`s` switches between step and auto in the dashboard).
    #[arg(long)]
    pub step: bool,
    /// The Python interpreter (with torch and transformers) for --reference-impl.
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: PathBuf,
    /// Also record, in the routing trace, what layer L+1's router picks from layer L's hidden
    /// state (the next-layer guess), so `moescope simulate --prefetch next-layer` can replay
    /// prefetch. Both backends compute it (one router product per layer); a prefetching
    /// selective's trace carries it anyway. On a GPU, steps captured as graphs make none.
    #[arg(long)]
    pub trace_guesses: bool,
    /// No dashboard: progress lines, a final table, files written. Automatic when stdout is not
    /// a terminal.
    #[arg(long)]
    pub no_tui: bool,
    /// Exit code reflects the verdict: 0 VIABLE, 10 NATIVE PREFERRED, 11 HYBRID, 12 INCONCLUSIVE.
    #[arg(long)]
    pub exit_code: bool,
    /// Seconds a worker may take to load.
    #[arg(long, default_value_t = 1800)]
    pub load_timeout: u64,
    /// Seconds a worker may take to answer one step before it counts as hung.
    #[arg(long, default_value_t = 300)]
    pub step_timeout: u64,
    #[command(flatten)]
    pub ui: UiArgs,
}

impl RunArgs {
    /// The arguments `moescope` alone runs with (every default).
    pub fn parse_default() -> Self {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        Wrap::parse_from(["moescope"]).run
    }

    pub fn prompt_style(&self) -> PromptStyle {
        PromptStyle {
            raw: self.raw,
            enable_thinking: self.enable_thinking,
        }
    }
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A recording (.ndjson).
    pub file: PathBuf,
    /// Playback speed (2 = twice as fast; 0 = as fast as possible).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Keep following the file as it grows (same as `moescope watch`).
    #[arg(long)]
    pub follow: bool,
    /// Print the final summary instead of opening the dashboard.
    #[arg(long)]
    pub no_tui: bool,
    /// Judge under this profile (default: the one the run was recorded with).
    #[arg(long)]
    pub profile: Option<String>,
    #[command(flatten)]
    pub ui: UiArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The recording being written.
    pub file: PathBuf,
    /// Judge under this profile (default: the one the run was recorded with).
    #[arg(long)]
    pub profile: Option<String>,
    #[command(flatten)]
    pub ui: UiArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Json,
    Markdown,
    /// One self-contained page: verdict, tables, both outputs, charts (inline SVG, no script).
    Html,
    /// The routing trace alone (for `moescope simulate`).
    Trace,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Capacities: counts or percentages of all experts, e.g. 12.5%,25%,50%,100%.
    #[arg(long, required = true)]
    pub capacities: String,
    #[arg(long, value_enum, default_value_t = Scope::Global)]
    pub cache_scope: Scope,
    /// Eviction policy. Default: S3-FIFO, or LRU when next-layer prefetch runs (as `run`).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyKind>,
    #[arg(long, default_value = "shards", value_parser = SourceSpec::parse)]
    pub expert_source: SourceSpec,
    #[arg(long)]
    pub cold: bool,
    /// Next-layer prefetch: none, next-layer, or auto (as `run`: on a CPU with 4+ cores).
    #[arg(long, value_enum, default_value_t = PrefetchMode::Auto)]
    pub prefetch: PrefetchMode,
    /// Prompt set (default: prompts/long.toml — long generations show steady-state speed).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Passes over the prompt list per run. With 2 or more the sweep also reports the last
    /// pass alone: selective with a warm cache against native, the steady state.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub passes: u32,
    /// Write the results as JSON to this file.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A recording (.ndjson) or a trace (`export --format trace`).
    pub file: PathBuf,
    /// Capacities: counts or percentages of all experts, e.g. 12.5%,25%,50% or 8,16,32.
    /// Default: 5–100 % in steps, plus the run's own capacity.
    #[arg(long)]
    pub capacities: Option<String>,
    /// Pool scope (default: the run's).
    #[arg(long, value_enum)]
    pub scope: Option<Scope>,
    /// Policies: lru, lfu, fifo, s3fifo, belady (default: all).
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<String>>,
    /// Replay next-layer prefetch from the guesses the trace carries (recorded with
    /// `run --trace-guesses`, or by a run that prefetched), as if every guess landed in time.
    /// Default: what the run did; auto: replay when the trace has guesses. Belady stays demand
    /// loading's optimum.
    #[arg(long, value_enum)]
    pub prefetch: Option<PrefetchMode>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A recording (.ndjson).
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
    pub format: ExportFormat,
    /// Output file (default: stdout).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Judge under this profile (built-in name or TOML file) instead of the recorded one.
    #[arg(long)]
    pub profile: Option<String>,
    /// Print the JSON schema of the export and exit.
    #[arg(long)]
    pub schema: bool,
    /// List the metrics a profile criterion can use and exit.
    #[arg(long)]
    pub list_metrics: bool,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The checkpoint to extract from (default: the bundled model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Output directory (created; an interrupted extraction there is resumed).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Testing aid: abort after writing this many new expert files (simulates a crash).
    #[arg(long, hide = true)]
    pub abort_after: Option<usize>,
    /// Testing aid: sleep this many milliseconds after each expert.
    #[arg(long, hide = true, default_value_t = 0)]
    pub delay_ms: u64,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A checkpoint, a `moescope extract` output, or a seed-project layout directory.
    pub dir: PathBuf,
    /// Take config.json from this model directory (for layouts that carry none).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory (config.json + safetensors). Default: the bundled models/tiny-moe.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,
    /// Load even when the memory estimate says the model cannot fit.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Which backend runs the model.
    #[arg(long, value_enum, default_value_t = BackendKind::Native)]
    pub backend: BackendKind,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// The cache and source flags shared by every command that can run the selective backend.
#[derive(Debug, Clone, Args, PartialEq)]
pub struct CacheArgs {
    /// Cache capacity as a number of experts (default: 25 % of all experts).
    #[arg(long, value_name = "N", conflicts_with = "cache_mem")]
    pub cache_experts: Option<usize>,
    /// Cache capacity as a memory budget, e.g. 4GiB (experts as held: in the compute dtype, or
    /// as stored where 16-bit experts meet f32 on the CPU).
    #[arg(long, value_name = "SIZE", value_parser = crate::util::parse_bytes)]
    pub cache_mem: Option<u64>,
    /// One pool for all layers, or an equal share per layer.
    #[arg(long, value_enum, default_value_t = Scope::Global)]
    pub cache_scope: Scope,
    /// Eviction policy. Default S3-FIFO: on every routing trace measured (BENCHMARKS.md §3) it
    /// captures more of the optimum than LRU, LFU or FIFO at caches of 25 % and less on demand
    /// loading. With next-layer prefetch running, LRU (it keeps the guessed experts until their
    /// layer asks: §35).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyKind>,
    /// Where experts are read from: shards | extracted:DIR | seedlayout:DIR.
    #[arg(long, default_value = "shards", value_parser = SourceSpec::parse)]
    pub expert_source: SourceSpec,
    /// Run even if experts are missing: they are masked out of routing and every result of the
    /// run is labelled DEGRADED.
    #[arg(long)]
    pub allow_missing_experts: bool,
    /// Evict each expert's file pages after reading it (posix_fadvise DONTNEED), so every miss
    /// is a storage read. Default: warm (page cache left alone).
    #[arg(long)]
    pub cold: bool,
    /// Load the next layer's guessed experts on a background thread. Default auto: on a CPU
    /// with at least 4 cores (it needs a spare one), off on 2 cores and on a GPU.
    #[arg(long, value_enum, default_value_t = PrefetchMode::Auto)]
    pub prefetch: PrefetchMode,
    /// Testing aid: mask these experts (LAYER:EXPERT,…) out of routing, as if missing. The run is
    /// labelled DEGRADED. Used to prove that quality checks catch a perturbed backend.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_expert, hide = true)]
    pub mask_experts: Vec<(usize, usize)>,
}

impl CacheArgs {
    /// The flags as the plain settings the library, the workers and the recording take, for a
    /// run on a GPU (`cuda`) or a CPU of `cores` cores: `--prefetch auto` becomes the mode it
    /// means there and an unchosen policy that mode's default, so the workers, the recording and
    /// its replay all see what ran.
    pub fn settings(&self, cuda: bool, cores: usize) -> CacheSettings {
        let prefetch = self.prefetch.resolve(cuda, cores);
        CacheSettings {
            cache_experts: self.cache_experts,
            cache_mem: self.cache_mem,
            cache_scope: self.cache_scope,
            policy: self
                .policy
                .unwrap_or(crate::cache::settings::default_policy(prefetch)),
            expert_source: self.expert_source.clone(),
            allow_missing_experts: self.allow_missing_experts,
            cold: self.cold,
            prefetch,
            mask_experts: self.mask_experts.clone(),
        }
    }
}

fn parse_layer_expert(s: &str) -> std::result::Result<(usize, usize), String> {
    let (l, e) = s
        .split_once(':')
        .ok_or_else(|| format!("bad expert \"{s}\": expected LAYER:EXPERT"))?;
    Ok((
        l.parse().map_err(|_| format!("bad layer in \"{s}\""))?,
        e.parse().map_err(|_| format!("bad expert in \"{s}\""))?,
    ))
}

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Stop after this many new tokens (honoured exactly).
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = no top-k filter.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> crate::model::sampling::SamplingParams {
        crate::model::sampling::SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// The prompt (sent through the model's chat template unless --raw).
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub prompt: Option<String>,
    /// Comma-separated prompt token ids (no tokenizer needed).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub token_ids: Option<Vec<u32>>,
    /// Use the prompt text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Let Qwen3 templates think: `enable_thinking = true` (default false).
    #[arg(long, conflicts_with = "raw")]
    pub enable_thinking: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, generated_token_ids, timing) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    pub tokens: Vec<u32>,
    /// Then decode N greedy tokens the way `run` and `generate` do (KV cache, CUDA graphs on a
    /// GPU) and print each step's token, logits and routing too — for checking that every
    /// decode path gives the same numbers.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub greedy: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_args(flags: &[&str]) -> CacheArgs {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            cache: CacheArgs,
        }
        Wrap::parse_from(std::iter::once("moescope").chain(flags.iter().copied())).cache
    }

    /// An unchosen policy becomes the default of the prefetch mode that runs — S3-FIFO on
    /// demand loading, LRU with next-layer prefetch — and `auto` the mode it means on the
    /// machine; a chosen policy is kept whatever the mode.
    #[test]
    fn the_default_policy_follows_the_prefetch_that_runs() {
        use crate::cache::settings::PrefetchMode::{NextLayer, None as NoPrefetch};
        let s = cache_args(&[]).settings(false, 2);
        assert_eq!((s.prefetch, s.policy), (NoPrefetch, PolicyKind::S3fifo));
        let s = cache_args(&[]).settings(false, 16);
        assert_eq!((s.prefetch, s.policy), (NextLayer, PolicyKind::Lru));
        let s = cache_args(&[]).settings(true, 16);
        assert_eq!((s.prefetch, s.policy), (NoPrefetch, PolicyKind::S3fifo));
        let s = cache_args(&["--prefetch", "next-layer"]).settings(false, 2);
        assert_eq!((s.prefetch, s.policy), (NextLayer, PolicyKind::Lru));
        let s = cache_args(&["--prefetch", "none"]).settings(false, 16);
        assert_eq!((s.prefetch, s.policy), (NoPrefetch, PolicyKind::S3fifo));
        let s = cache_args(&["--prefetch", "next-layer", "--policy", "s3fifo"]).settings(false, 2);
        assert_eq!((s.prefetch, s.policy), (NextLayer, PolicyKind::S3fifo));
        let s = cache_args(&["--policy", "lfu"]).settings(false, 2);
        assert_eq!(s.policy, PolicyKind::Lfu);
    }
}
