//! `moescope run` (and plain `moescope`): validate everything up front, start the recording, drive
//! both workers through the scheduler, and show the session live (dashboard) or headless.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc::unbounded_channel;

use crate::cache::settings::{CacheSettings, PrefetchMode, SourceSpec};
use crate::cache::trace::MoeShape;
use crate::cli::RunArgs;
use crate::engine::{BackendKind, BackendSpec, ModelFiles, default_model_dir};
use crate::model::config::MoeConfig;
use crate::session::event::Stamped;
use crate::session::prompts::PromptSet;
use crate::session::record::{self, Header, Recorder, Sampling};
use crate::session::verdict::{Outcome, Profile};
use crate::settings::Settings;
use crate::worker::protocol;
use crate::worker::scheduler::{self, Control, RunConfig};

/// Everything a live session needs, validated.
pub struct Prepared {
    pub header: Header,
    pub config: RunConfig,
    pub profile: Profile,
    pub recorder: Recorder,
}

use crate::util::repo_file;

/// Header, worker configuration and profile for a run (everything validated, nothing written).
pub struct Plan {
    pub header: Header,
    pub config: RunConfig,
    pub profile: Profile,
}

pub fn prepare(args: &RunArgs, settings: &Settings) -> Result<Prepared> {
    let Plan {
        header,
        config,
        profile,
    } = plan(args, settings)?;
    let rec_path = match &args.record {
        Some(p) => p.clone(),
        None => record::default_path(Path::new("recordings"), &header.model, SystemTime::now()),
    };
    let recorder = Recorder::create(&rec_path, &header).map_err(|e| {
        crate::errors::InputError(format!(
            "{}: cannot create the recording: {e}{}",
            rec_path.display(),
            match e.kind() {
                _ if rec_path.is_dir() =>
                    " (a directory: --record takes the recording's file name)",
                std::io::ErrorKind::AlreadyExists => {
                    " (it exists; moescope never overwrites a recording)"
                }
                _ => "",
            }
        ))
    })?;
    Ok(Prepared {
        header,
        config,
        profile,
        recorder,
    })
}

pub fn plan(args: &RunArgs, settings: &Settings) -> Result<Plan> {
    let model_dir = args.model.model.clone().unwrap_or_else(default_model_dir);
    let cfg_dir = match &args.cache.expert_source {
        SourceSpec::SeedLayout(d) if d.join("config.json").exists() => d.clone(),
        _ => model_dir.clone(),
    };
    let cfg = MoeConfig::from_dir(&cfg_dir)?;
    // Validate the checkpoint here (headers only) so a bad file is one clear error, not two
    // failed workers.
    if !matches!(args.cache.expert_source, SourceSpec::SeedLayout(_)) {
        let files = ModelFiles::open(&model_dir)?;
        if !files.inventory.missing.is_empty() && !args.cache.allow_missing_experts {
            let (l, e) = files.inventory.missing[0];
            crate::bail_input!(
                "{}: layer {l}, expert {e} and {} more experts are missing (see `moescope verify {}`); \
                 --allow-missing-experts runs anyway, labelled DEGRADED",
                model_dir.display(),
                files.inventory.missing.len() - 1,
                model_dir.display()
            );
        }
    }
    // Prompts are text, tokenized by each worker with the model's tokenizer: a missing or broken
    // one is one clear error here, not two workers failing every prompt.
    crate::model::tokenizer::TextTokenizer::from_dir(&model_dir)
        .map_err(|e| {
            crate::errors::InputError(format!(
                "{e}; `run` and `sweep` send text prompts (`bench random-checkpoint` writes the \
                 bundled model's tokenizer beside its checkpoints)"
            ))
        })?
        .check_fits(cfg.vocab_size)?;
    let mut prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => PromptSet::single(p, args.max_new_tokens.unwrap_or(50)),
        (None, Some(f)) => PromptSet::load(f).map_err(crate::errors::InputError)?,
        (None, None) => PromptSet::load(&repo_file("prompts/standard.toml"))
            .map_err(crate::errors::InputError)?,
    };
    if let Some(n) = args.max_new_tokens {
        if n == 0 {
            crate::bail_input!("--max-new-tokens must be at least 1");
        }
        prompts.max_new_tokens = n;
        for p in &mut prompts.prompts {
            p.max_new_tokens = None;
        }
    }
    if args.passes > 1 {
        prompts.repeat(args.passes as usize);
    }
    let profile = Profile::load(&args.profile).map_err(crate::errors::InputError)?;
    let reference_impl: Option<crate::worker::reference::ReferenceImpl> = args
        .reference_impl
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(crate::errors::InputError)?;
    if reference_impl == Some(crate::worker::reference::ReferenceImpl::Moescope)
        && args.reference_model.is_none()
    {
        crate::bail_input!(
            "--reference-impl moescope runs moescope native on another checkpoint: give it \
             --reference-model DIR (e.g. the bf16 original of a quantized --model)"
        );
    }
    if args.reference_model.is_some() && reference_impl.is_none() {
        crate::bail_input!(
            "--reference-model names the checkpoint of a reference run: give --reference-impl \
             moescope (or transformers) with it"
        );
    }
    if reference_impl.is_some() && args.no_score {
        crate::bail_input!(
            "--reference-impl compares the reference with native on native's scored tokens; \
             it cannot be combined with --no-score"
        );
    }
    let reference_text = match args.reference.as_deref() {
        Some("none") => None,
        Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
            crate::errors::InputError(format!("{f}: cannot read reference text: {e}"))
        })?),
        None => std::fs::read_to_string(repo_file("prompts/reference.txt")).ok(),
    };
    let sampling = protocol::Sampling {
        max_new_tokens: prompts.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    if args.temperature.is_nan()
        || args.temperature < 0.0
        || args.top_p.is_nan()
        || args.top_p <= 0.0
        || args.top_p > 1.0
    {
        crate::bail_input!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    // `--prefetch auto` and an unchosen policy become what they mean on this machine
    // (`CacheArgs::settings`).
    let cache = args
        .cache
        .settings(args.model.device.is_cuda(), settings.cores);
    let native = BackendSpec {
        model_dir: model_dir.clone(),
        dtype: args.model.dtype,
        device: args.model.device.clone(),
        backend: BackendKind::Native,
        cache: CacheSettings {
            allow_missing_experts: args.cache.allow_missing_experts,
            ..Default::default()
        },
        settings: settings.clone(),
    };
    let selective = BackendSpec {
        backend: BackendKind::Selective,
        cache: cache.clone(),
        ..native.clone()
    };
    // Refused here, before any worker starts, when it cannot fit (a prompt's tokens are not
    // known yet: 2048 stand in for the longest).
    let tokens = prompts.max_new_tokens.max(
        prompts
            .prompts
            .iter()
            .filter_map(|p| p.max_new_tokens)
            .max()
            .unwrap_or(0),
    ) + 2048;
    super::guard_memory(
        &args.model,
        &[
            ("native", native.footprint(&cfg, tokens)),
            ("selective", selective.footprint(&cfg, tokens)),
        ],
        args.schedule != crate::session::record::Schedule::Sequential,
        &model_dir,
    )?;
    let cache_cfg = cache.cache_config(cfg.total_experts(), cfg.num_experts_per_tok);
    let cache_describe = format!(
        "{}; source {}; {} page cache{}",
        cache_cfg.describe(),
        cache.expert_source,
        if cache.cold { "cold" } else { "warm" },
        match (args.cache.prefetch, cache.prefetch.is_on()) {
            (PrefetchMode::Auto, true) => "; prefetch next-layer (auto)",
            (_, true) => "; prefetch next-layer",
            _ => "",
        }
    );
    // Both workers alive at once on the CPU: each on its half of the cores (worker::cpus).
    let split = if !args.model.device.is_cuda()
        && args.schedule != crate::session::record::Schedule::Sequential
    {
        crate::worker::cpus::split(&crate::worker::cpus::allowed())
    } else {
        None
    };
    let mut settings = settings.clone();
    settings.worker_cpus = split.clone().map(Vec::from).unwrap_or_default();
    let now = SystemTime::now();
    let header = Header {
        format: record::FORMAT.into(),
        version: record::VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created_utc: record::utc_timestamp(now),
        model: model_dir.display().to_string(),
        model_type: cfg.family.model_type().into(),
        config_fingerprint: cfg.fingerprint(),
        moe: MoeShape {
            num_layers: cfg.num_hidden_layers,
            moe_layers: cfg.moe_layers().collect(),
            num_experts: cfg.num_experts,
            top_k: cfg.num_experts_per_tok,
        },
        device: args.model.device.to_string(),
        dtype: args.model.dtype.name().into(),
        cache: cache.clone(),
        cache_describe,
        schedule: args.schedule,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        prompts: prompts.clone(),
        profile: profile.name.clone(),
        profile_definition: Some(profile.clone()),
        prompt_style: args.prompt_style(),
        recommended_sampling: cfg.recommended_sampling.clone(),
        host: sysinfo::System::host_name().unwrap_or_else(|_| "unknown".into()),
        settings: Some(settings.clone()),
        reference: reference_impl.map(|r| r.name().to_string()),
    };
    let exe = std::env::current_exe().context("locating the moescope binary for the workers")?;
    let config = RunConfig {
        native,
        selective,
        schedule: args.schedule,
        prompts,
        sampling,
        prompt_style: args.prompt_style(),
        score: !args.no_score,
        reference_text,
        reference_max_tokens: args.reference_tokens,
        trace_routing: true,
        trace_guesses: args.trace_guesses,
        load_timeout: Duration::from_secs(args.load_timeout),
        step_timeout: Duration::from_secs(args.step_timeout),
        memory_interval: Duration::from_millis(200),
        gpu_memory: args.model.device.0.starts_with("cuda"),
        exe: exe.clone(),
        worker_env: [worker_env("NATIVE"), worker_env("SELECTIVE")],
        worker_cpus: match split {
            Some([a, b]) => [Some(a), Some(b)],
            None => [None, None],
        },
        only: None,
        step: args.step,
        reference: reference_impl.map(|implementation| crate::worker::reference::ReferenceConfig {
            implementation,
            python: args.python.clone(),
            exe: exe.clone(),
            settings: settings.clone(),
            model_dir: args
                .reference_model
                .clone()
                .unwrap_or_else(|| model_dir.clone()),
            vocab_size: cfg.vocab_size,
            dtype: args.model.dtype.name().into(),
            device: args.model.device.0.clone(),
            load_timeout: Duration::from_secs(args.load_timeout),
            step_timeout: Duration::from_secs(args.step_timeout),
            gpu_memory: args.model.device.0.starts_with("cuda"),
        }),
    };
    Ok(Plan {
        header,
        config,
        profile,
    })
}

/// Fault-test hooks: MOESCOPE_TEST_<BACKEND>_<HOOK> in our environment becomes
/// MOESCOPE_TEST_<HOOK> in that worker's.
fn worker_env(backend: &str) -> Vec<(String, String)> {
    let prefix = format!("MOESCOPE_TEST_{backend}_");
    std::env::vars()
        .filter_map(|(k, v)| {
            k.strip_prefix(&prefix)
                .map(|rest| (format!("MOESCOPE_TEST_{rest}"), v))
        })
        .collect()
}

/// Why: the driver compiles moescope's and candle's GPU kernels at their first use on a machine
/// (20–30 s on an H200) and caches them. Inside the workers that time lands in whichever
/// backend loads first — an H200 run measured selective loading in 20.5 s against native's
/// 4.1 s, and 1.6 s once compiled. So a short-lived process compiles them first (its own GPU
/// context is gone before the workers start). A failure is only a warning: the workers then
/// compile what they use themselves.
fn compile_kernels(args: &RunArgs) {
    let start = Instant::now();
    eprintln!(
        "moescope: preparing the GPU kernels (compiled on a machine's first use, then cached)…"
    );
    let out = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args([
                "bench",
                "kernels",
                "--device",
                &args.model.device.to_string(),
            ])
            .args(["--dtype", args.model.dtype.name()])
            .stdin(std::process::Stdio::null())
            .output()
    });
    match out {
        Ok(o) if o.status.success() => eprintln!(
            "moescope: GPU kernels ready in {:.1} s (not counted in either backend's load time)",
            start.elapsed().as_secs_f64()
        ),
        Ok(o) => eprintln!(
            "moescope: preparing the GPU kernels failed ({}); the workers compile their own: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("moescope: preparing the GPU kernels failed: {e}"),
    }
}

pub fn run(args: &RunArgs, settings: &Settings) -> Result<u8> {
    let headless = args.no_tui || !std::io::stdout().is_terminal();
    if args.step && headless {
        crate::bail_input!(
            "--step waits for a key after each prompt: it needs the dashboard (a terminal, \
             without --no-tui)"
        );
    }
    let prepared = prepare(args, settings)?;
    if args.model.device.is_cuda() {
        compile_kernels(args);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = rt.block_on(async move {
        let (ev_tx, ev_rx) = unbounded_channel::<Stamped>();
        let (ctl_tx, ctl_rx) = unbounded_channel::<Control>();
        let start = Instant::now();
        let cfg = prepared.config.clone();
        let sched = tokio::spawn(scheduler::run(cfg, ev_tx, ctl_rx, start));
        let result = if headless {
            crate::headless::consume(
                prepared.header,
                prepared.recorder,
                prepared.profile,
                ev_rx,
                ctl_tx,
            )
            .await
        } else {
            crate::ui::live(
                prepared.header,
                prepared.recorder,
                prepared.profile,
                ev_rx,
                ctl_tx,
                &super::ui_options(&args.ui),
            )
            .await
        };
        let _ = sched.await;
        result
    })?;
    Ok(if args.exit_code {
        match outcome {
            Outcome::Viable => 0,
            Outcome::NativePreferred => 10,
            Outcome::Hybrid => 11,
            Outcome::Inconclusive => 12,
        }
    } else {
        0
    })
}
