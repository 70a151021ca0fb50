//! `moescope sweep`, the measuring: one native run for the reference and the routing trace, then
//! one selective run per capacity — each in its own worker process, so memory is measured honestly — set against
//! the simulated hit rate and decode speed at the same capacities.

use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::mpsc::unbounded_channel;

use crate::cache::access::{accesses, accesses_prefetched, has_guesses};
use crate::cache::sim::{SimPolicy, simulate, simulate_gated};
use crate::cache::speculation::{Gate, Rule};
use crate::cache::stats::Costs;
use crate::cache::study::{parse_capacities, predict_tok_s};
use crate::cli::{RunArgs, SweepArgs};
use crate::errors::InputError;
use crate::report::sweep::{PairedSteady, Sweep, SweepRow};
use crate::session::event::Backend;
use crate::session::metrics::{PathShare, backend_metrics, decode_paths};
use crate::session::state::SessionState;
use crate::session::study;
use crate::settings::Settings;
use crate::worker::scheduler;

/// Decode steps by path over the prompts from `first` on.
fn paths_from(s: &SessionState, b: Backend, first: usize) -> Vec<PathShare> {
    decode_paths(s.backend(b).runs.iter().skip(first).flat_map(|r| &r.tokens))
}

/// Decode tok/s over the prompts from `first` on: their decode tokens over their decode time.
fn decode_tok_s_from(s: &SessionState, b: Backend, first: usize) -> Option<f64> {
    let (n, secs) = s
        .backend(b)
        .runs
        .iter()
        .skip(first)
        .flat_map(|r| r.decode_latencies())
        .fold((0usize, 0f64), |(n, t), dt| (n + 1, t + dt));
    (n > 0 && secs > 0.0).then(|| n as f64 / secs)
}

fn session(args: &RunArgs, only: Backend, settings: &Settings) -> Result<SessionState> {
    run_session(args, Some(only), settings)
}

/// A session of `args` — one backend, or both (`None`: prompts alternate between them) —
/// run with `settings`.
fn run_session(args: &RunArgs, only: Option<Backend>, settings: &Settings) -> Result<SessionState> {
    let mut args = args.clone();
    if only.is_some() {
        // One backend is loaded: the memory guard must not ask room for both (the 48-layer
        // geometry's all-resident run was refused on an 80 GB card for native's share).
        args.schedule = crate::session::record::Schedule::Sequential;
    }
    let plan = super::run::plan(&args, settings)?;
    let mut cfg = plan.config;
    cfg.only = only;
    if only.is_some() {
        // One worker alone: it has every core (the split is for two alive at once).
        cfg.worker_cpus = [None, None];
    }
    cfg.score = false;
    cfg.reference_text = None;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")?;
    let mut state = SessionState::new(plan.header);
    rt.block_on(async {
        let (tx, mut rx) = unbounded_channel();
        let (_ctl_tx, ctl_rx) = unbounded_channel();
        let task = tokio::spawn(scheduler::run(cfg, tx, ctl_rx, Instant::now()));
        while let Some(ev) = rx.recv().await {
            state.apply(&ev);
        }
        let _ = task.await;
    });
    Ok(state)
}

pub fn run(a: &SweepArgs, settings: &Settings) -> Result<()> {
    if let Some(o) = &a.output {
        super::check_output(o)?;
    }
    let mut base = RunArgs::parse_default();
    base.model = a.model.clone();
    base.no_tui = true;
    base.cache.cache_scope = a.cache_scope;
    // The policy that runs: the chosen one, else the default for the prefetch mode that runs.
    let policy = a.policy.unwrap_or(crate::cache::settings::default_policy(
        a.prefetch.resolve(a.model.device.is_cuda(), settings.cores),
    ));
    base.cache.policy = Some(policy);
    base.cache.expert_source = a.expert_source.clone();
    base.cache.cold = a.cold;
    base.cache.prefetch = a.prefetch;
    base.max_new_tokens = a.max_new_tokens;
    base.passes = a.passes;
    base.prompts = Some(a.prompts.clone().unwrap_or_else(|| {
        let p = std::path::PathBuf::from("prompts/long.toml");
        if p.exists() {
            p
        } else {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts/long.toml")
        }
    }));
    let model_dir = base
        .model
        .model
        .clone()
        .unwrap_or_else(crate::engine::default_model_dir);
    let cfg = crate::model::MoeConfig::from_dir(&model_dir)?;
    let total = cfg.total_experts();
    // What `--prefetch` means here (`auto` resolves by device and cores, as in `run`).
    let prefetch = a
        .prefetch
        .resolve(a.model.device.is_cuda(), settings.cores)
        .is_on();
    let capacities = parse_capacities(&a.capacities, total).map_err(InputError)?;

    let MissBandwidth {
        bw: read_bandwidth,
        staged: staged_bandwidth,
        path: miss_path,
    } = measure_miss_bandwidth(&model_dir, &cfg, a.cold, &a.model.device, settings);
    eprintln!("sweep: native reference run…");
    let native = session(&base, Backend::Native, settings)?;
    let nm = backend_metrics(&native, Backend::Native);
    if let Some(r) = &nm.failed {
        crate::bail_input!("the native reference run failed: {r}");
    }
    // On a GPU, native decodes through one CUDA graph, and so does a selective step whose
    // experts are all resident; one that misses cannot (it reads each layer's routing back to
    // load what is missing, between piecewise graphs). The prediction needs that step's cost:
    // selective holding every expert with speculation off, over a second pass (all hits) —
    // and with the host loading misses: a pool holding every expert would otherwise let the
    // GPU fill its own slots, and every step would be a graph.
    let uncaptured = if a.model.device.is_cuda() {
        eprintln!("sweep: selective reading routing back every layer, every expert resident…");
        let mut args = at_capacity(&base, total);
        args.passes = 2;
        let reads_back = Settings {
            speculate: Rule::Never,
            gpu_fill: false,
            ..settings.clone()
        };
        let u = session(&args, Backend::Selective, &reads_back)?;
        let n = u.backend(Backend::Selective).runs.len();
        decode_tok_s_from(&u, Backend::Selective, n - n / 2)
    } else {
        None
    };
    let layers = cfg.num_moe_layers();

    let mut runs = Vec::new();
    for &c in &capacities {
        eprintln!("sweep: selective at {c} experts…");
        runs.push((
            c,
            session(&at_capacity(&base, c), Backend::Selective, settings)?,
        ));
    }
    // Native's trace; with prefetch, the first selective run's, whose routing is the same and
    // which carries the guesses its prefetch made, so the simulation replays them.
    let input = match runs.first() {
        Some((_, s)) if prefetch => study::from_state(s),
        _ => study::from_state(&native),
    };
    let acc = if has_guesses(&input.steps) {
        accesses_prefetched(&input.steps, &input.prompt_tokens)
    } else {
        accesses(&input.steps, &input.prompt_tokens)
    };
    // Calibrate the miss cost on the smallest cache only. Why: larger caches see mostly
    // compulsory misses into memory that was never touched, which costs page faults on top
    // of the read, and averaging them in would make the predicted curve depend on the very
    // runs it is meant to predict. The smallest cache evicts constantly, so its loads reuse
    // warm buffers: the steady-state cost a long session pays.
    let smallest = runs
        .first()
        .and_then(|(_, s)| s.backend(Backend::Selective).cache.as_ref());
    let miss_s = smallest.and_then(|c| c.miss_cost_s());
    let decode_steps = input
        .steps
        .iter()
        .filter(|s| s.position >= input.prompt_tokens.get(&s.prompt).copied().unwrap_or(1))
        .count();
    let costs = match (nm.decode_tok_s, miss_s) {
        (Some(t), Some(m)) => Some(Costs {
            native_step_s: 1.0 / t,
            miss_s: m,
            decode_tokens: decode_steps.max(1),
            uncaptured_step_s: uncaptured.map(|u| 1.0 / u),
            load_ahead_s: None,
            copy_s: smallest.and_then(|c| c.staged_copy_s()),
            copy_tail_s: smallest.and_then(|c| c.staged_copy_tail_s()),
            staged_tail_s: smallest.and_then(|c| c.staged_tail_s()),
        }),
        _ => None,
    };
    // With prefetch, a load ahead is hidden only as far as spare cores allow (on 2 cores, about
    // a quarter of it was). What it adds per load is fitted on the smallest cache, like the miss
    // cost, and that row is then a calibration point, not a prediction.
    let prefetching = has_guesses(&input.steps) && runs.len() > 1;
    let costs = match (costs, runs.first()) {
        (Some(k), Some((c, s))) if prefetching => {
            let sim = simulate(&acc, SimPolicy::Live(policy), *c, a.cache_scope, layers);
            let measured = backend_metrics(s, Backend::Selective).decode_tok_s;
            let n = k.decode_tokens as f64;
            let ahead = sim.decode_prefetch_loads as f64 / n;
            let load_ahead_s = measured.filter(|_| ahead > 0.0).map(|t| {
                let unexplained =
                    1.0 / t - k.native_step_s - sim.decode_misses as f64 / n * k.miss_s;
                (unexplained / ahead).max(0.0)
            });
            Some(Costs { load_ahead_s, ..k })
        }
        (k, _) => k,
    };
    // A GGUF file's block experts on the CPU where candle still repacks them (Q8_0 on a VNNI
    // CPU, most types on aarch64; moescope's own products take Q4_K and the rest elsewhere,
    // BENCHMARKS.md §101): candle packs each matrix into its tiled layout at its first product
    // — after the load the cache times, so the measured miss cost leaves it out, and on a
    // 2-core machine it was a third of a 12.5 % run (§19). There the miss cost is fitted on the
    // smallest cache, as a load ahead is with prefetch (the two are not fitted together: one
    // row, one unknown).
    let gguf = crate::model::gguf::is_gguf(&model_dir);
    let repacks = gguf
        && !a.model.device.is_cuda()
        && crate::model::gguf::experts_repacked_on_cpu(&model_dir);
    // bf16-stored misses on the CPU in bf16 or f32 map the expert in place
    // (`CachedProvider::read_mapped`, where the cache cannot hold every expert, not in cold
    // mode): the timed load is the map alone, and the expert's bytes come from memory in the
    // products that follow — outside it, as a repack is. Fitted the same way (unfitted: 19-29 %
    // too fast, BENCHMARKS.md §69).
    let sixteen_bit = crate::model::held::held_sizes(&model_dir, &cfg, 4, true, false)
        .is_some_and(|h| h.expert_max == (cfg.expert_params() * 2) as u64);
    let maps = !a.model.device.is_cuda()
        && matches!(
            a.model.dtype,
            crate::engine::Dtype::Bf16 | crate::engine::Dtype::F32
        )
        && sixteen_bit
        && cfg.quantization.is_none()
        && !gguf
        && !a.cold
        && runs.first().is_some_and(|(c, _)| *c < total);
    let fitted_miss_s = match (costs, runs.first()) {
        (Some(k), Some((c, s))) if (repacks || maps) && k.load_ahead_s.is_none() => {
            let sim = simulate(&acc, SimPolicy::Live(policy), *c, a.cache_scope, layers);
            let measured = backend_metrics(s, Backend::Selective).decode_tok_s;
            let per_tok = sim.decode_misses as f64 / k.decode_tokens as f64;
            measured
                .filter(|_| per_tok > 0.0)
                .map(|t| ((1.0 / t - k.native_step_s) / per_tok).max(k.miss_s))
        }
        _ => None,
    };
    let costs = costs.map(|k| Costs {
        miss_s: fitted_miss_s.unwrap_or(k.miss_s),
        ..k
    });
    let calibration_row = costs
        .and_then(|k| k.load_ahead_s)
        .or(fitted_miss_s)
        .map(|_| runs[0].0);
    // The first prompt of the last pass (prompts run in order, the list repeated per pass).
    let last_pass = (a.passes > 1).then(|| {
        let n = native.backend(Backend::Native).runs.len();
        n - n / a.passes as usize
    });
    let native_steady = last_pass.and_then(|f| decode_tok_s_from(&native, Backend::Native, f));
    let mut rows = Vec::new();
    for (c, s) in &runs {
        let steady = last_pass.and_then(|f| decode_tok_s_from(s, Backend::Selective, f));
        let m = backend_metrics(s, Backend::Selective);
        // The run's guesses weigh the step times it sees; the simulation's, the measured ones.
        let gate = costs.and_then(|k| {
            let u = k.uncaptured_step_s?;
            Some(Gate::new(settings.speculate).with_costs(k.native_step_s, u))
        });
        let sim = simulate_gated(
            &acc,
            SimPolicy::Live(policy),
            *c,
            a.cache_scope,
            layers,
            gate,
        );
        let cache = s.backend(Backend::Selective).cache.as_ref();
        // Where the GPU fills slots itself every decode step is one graph: native's step plus
        // the loads.
        let fills = cache.is_some_and(|c| c.gpu_fills);
        let predicted = costs.map(|k| {
            let k = Costs {
                uncaptured_step_s: k.uncaptured_step_s.filter(|_| !fills),
                ..k
            };
            predict_tok_s(&k, &sim)
        });
        let calibration = calibration_row == Some(*c);
        let err = match (predicted, m.decode_tok_s) {
            (Some(p), Some(x)) if x > 0.0 && !calibration => Some(100.0 * (p - x).abs() / x),
            _ => None,
        };
        // What a miss moves: the expert as stored (bf16, a GGUF file's blocks, FP8 + scales),
        // averaged over the layers (a mixed file stores some layers' experts larger).
        let stored = crate::model::held::held_sizes(&model_dir, &cfg, 2, true, false)
            .map_or((cfg.expert_params() * 2) as f64, |h| h.stored_mean);
        // Where only some files are registered, this run's share of bytes copied direct.
        let direct_share = staged_bandwidth.and_then(|_| {
            let c = cache?;
            (c.h2d_bytes > 0).then(|| c.h2d_direct_bytes as f64 / c.h2d_bytes as f64)
        });
        let bound = match (nm.decode_tok_s, read_bandwidth) {
            (Some(t), Some(bw)) => {
                // Loads ahead take the same bandwidth as misses.
                let per_tok = (sim.decode_misses + sim.decode_prefetch_loads) as f64
                    / decode_steps.max(1) as f64;
                let per_byte = seconds_per_missed_byte(bw, staged_bandwidth, direct_share);
                Some(1.0 / (1.0 / t + per_tok * stored * per_byte))
            }
            _ => None,
        };
        let expected = m.memory.expected_weights;
        rows.push(SweepRow {
            steady_decode_tok_s: steady,
            steady_vs_native: match (steady, native_steady) {
                (Some(x), Some(n)) if n > 0.0 => Some(x / n),
                _ => None,
            },
            bound_decode_tok_s: bound,
            step_vs_bound: match (bound, m.decode_tok_s) {
                (Some(b), Some(x)) if x > 0.0 => Some(b / x),
                _ => None,
            },
            memory_vs_expected: expected
                .filter(|e| *e > 0)
                .map(|e| m.memory.peak as f64 / e as f64),
            capacity: *c,
            calibration,
            capacity_pct: 100.0 * *c as f64 / total as f64,
            measured_decode_tok_s: m.decode_tok_s,
            predicted_decode_tok_s: predicted,
            prediction_error_pct: err,
            measured_hit_rate: m.cache_hit_rate,
            simulated_hit_rate: sim.hit_rate(),
            peak_memory: m.memory.peak,
            peak_rss_anon: s
                .backend(Backend::Selective)
                .memory
                .iter()
                .map(|(_, x)| x.rss_anon)
                .max(),
            expected_weights: m.memory.expected_weights,
            miss_cost_us: cache.and_then(|c| c.miss_cost_s()).map(|m| m * 1e6),
            h2d_bytes: cache.map_or(0, |c| c.h2d_bytes),
            h2d_time_us: cache.map_or(0, |c| c.h2d_time_us),
            copy_tail_us: cache.and_then(|c| c.staged_copy_tail_s()).map(|t| t * 1e6),
            h2d_fill_bytes: cache.map_or(0, |c| c.h2d_fill_bytes),
            gpu_fills: fills,
            peak_gpu: m.memory.peak_gpu,
            host_pinned_bytes: cache.map_or(0, |c| c.host_pinned_bytes),
            direct_share,
            decode_paths: m.decode_paths.clone(),
            steady_decode_paths: last_pass
                .map_or_else(Vec::new, |f| paths_from(s, Backend::Selective, f)),
            simulated: sim.clone(),
            failed: m.failed.clone(),
        });
    }
    let paired_steady = match last_pass {
        Some(first) if a.model.device.is_cuda() && capacities.contains(&total) => {
            eprintln!("sweep: native and selective at {total} experts side by side…");
            Some(paired(&at_capacity(&base, total), total, first, settings))
        }
        _ => None,
    };
    let errs: Vec<f64> = rows.iter().filter_map(|r| r.prediction_error_pct).collect();
    let sweep = Sweep {
        model: model_dir.display().to_string(),
        device: a.model.device.to_string(),
        dtype: a.model.dtype.name().into(),
        scope: a.cache_scope.name().into(),
        policy: policy.name().into(),
        cold: a.cold,
        prefetch,
        native_decode_tok_s: nm.decode_tok_s,
        selective_uncaptured_decode_tok_s: uncaptured,
        passes: a.passes,
        native_steady_decode_tok_s: native_steady,
        native_decode_paths: nm.decode_paths.clone(),
        native_peak_memory: nm.memory.peak,
        native_peak_gpu: nm.memory.peak_gpu,
        mean_miss_cost_us: miss_s.map(|m| m * 1e6),
        load_ahead_us: costs.and_then(|k| k.load_ahead_s).map(|s| s * 1e6),
        fitted_miss_cost_us: fitted_miss_s.map(|s| s * 1e6),
        read_bandwidth,
        miss_path,
        staged_bandwidth,
        paired_steady,
        mean_prediction_error_pct: (!errs.is_empty())
            .then(|| errs.iter().sum::<f64>() / errs.len() as f64),
        rows,
    };
    let json = serde_json::to_string_pretty(&sweep)? + "\n";
    if let Some(o) = &a.output {
        super::write_output(o, &json)?;
    }
    if a.json {
        print!("{json}");
    } else {
        print!("{}", crate::report::sweep::sweep_table(&sweep));
    }
    Ok(())
}

/// The sweep's run settings with the cache at `capacity` experts.
fn at_capacity(base: &RunArgs, capacity: usize) -> RunArgs {
    let mut args = RunArgs::parse_default();
    args.model = base.model.clone();
    args.cache = base.cache.clone();
    args.cache.cache_experts = Some(capacity);
    args.prompts = base.prompts.clone();
    args.max_new_tokens = base.max_new_tokens;
    args.passes = base.passes;
    args
}

/// Native and selective in one session, compared over the prompts from `first` on.
fn paired(args: &RunArgs, capacity: usize, first: usize, settings: &Settings) -> PairedSteady {
    let mut out = PairedSteady {
        capacity,
        native_tok_s: None,
        selective_tok_s: None,
        ratio: None,
        native_paths: Vec::new(),
        selective_paths: Vec::new(),
        failed: None,
    };
    let s = match run_session(args, None, settings) {
        Ok(s) => s,
        Err(e) => {
            out.failed = Some(format!("{e:#}"));
            return out;
        }
    };
    let failed: Vec<String> = [Backend::Native, Backend::Selective]
        .into_iter()
        .filter_map(|b| {
            backend_metrics(&s, b)
                .failed
                .map(|r| format!("{}: {r}", b.name()))
        })
        .collect();
    if !failed.is_empty() {
        out.failed = Some(failed.join("; "));
    }
    out.native_tok_s = decode_tok_s_from(&s, Backend::Native, first);
    out.selective_tok_s = decode_tok_s_from(&s, Backend::Selective, first);
    out.ratio = match (out.selective_tok_s, out.native_tok_s) {
        (Some(x), Some(n)) if n > 0.0 => Some(x / n),
        _ => None,
    };
    out.native_paths = paths_from(&s, Backend::Native, first);
    out.selective_paths = paths_from(&s, Backend::Selective, first);
    out
}

/// The bound's time per missed byte: at the miss path's bandwidth `bw`; where only some files
/// are registered (`staged` given), the direct share `direct_share` of the bytes at `bw` and the
/// rest at the staged pipeline's — with no share measured, all at the slower of the two.
fn seconds_per_missed_byte(bw: f64, staged: Option<f64>, direct_share: Option<f64>) -> f64 {
    match (staged, direct_share) {
        (Some(st), Some(f)) => f / bw + (1.0 - f) / st,
        (Some(st), None) => 1.0 / bw.min(st),
        (None, _) => 1.0 / bw,
    }
}

/// What the sweep's bound charges a missed byte: the miss path's bandwidth, bytes/s, and on a GPU
/// which path that is.
struct MissBandwidth {
    bw: Option<f64>,
    /// Where the direct path registers only some files: the staged pipeline's bandwidth, which
    /// misses in the others move at (`bw` is then the direct path's).
    staged: Option<f64>,
    path: Option<String>,
}

/// The bandwidth a miss moves at on `device`, and on a GPU which path that is: DMA from the
/// registered expert files when the cache will take that path (see `experts::direct`),
/// else the staged reader; both where only some files are registered.
fn measure_miss_bandwidth(
    dir: &std::path::Path,
    cfg: &crate::model::MoeConfig,
    cold: bool,
    device: &crate::engine::DeviceSpec,
    settings: &Settings,
) -> MissBandwidth {
    use crate::experts::direct::{self, H2dPath};
    use crate::experts::source::ExpertSource;
    let only = |bw: Option<f64>, path: Option<String>| MissBandwidth {
        bw,
        staged: None,
        path,
    };
    if !device.is_cuda() {
        return only(measure_read_bandwidth(dir, cfg, cold), None);
    }
    let opened = crate::model::Checkpoint::open(dir)
        .and_then(|ckpt| crate::experts::source::ShardSource::new(&ckpt, cfg))
        .and_then(|src| Ok((src, device.open()?)));
    let (src, dev) = match opened {
        Ok(x) => x,
        Err(e) => return only(None, Some(format!("not measured: {e}"))),
    };
    src.set_cold(cold);
    // Warm misses on a GPU are read and then copied: the pipeline is the bound, measured as it
    // runs (cold ones are storage reads first, which the read measures).
    let staged = |why: &str| -> (Option<f64>, String) {
        if cold {
            return (
                measure_read_bandwidth(dir, cfg, cold),
                format!("staged: {why}"),
            );
        }
        match crate::experts::upload::staged_bandwidth(&dev, &src, settings.staged_piece) {
            Ok(bw) => (Some(bw), format!("staged, read and copied: {why}")),
            Err(e) => (
                measure_read_bandwidth(dir, cfg, cold),
                format!("staged (read only: the pipeline failed, {e}): {why}"),
            ),
        }
    };
    match direct::choose(&dev, &src, settings) {
        Ok(c) if c.path == H2dPath::Direct => match direct::bandwidth(&dev, &src, &c.register) {
            Ok(bw) if c.partial => {
                let (st, _) = staged("the files left unregistered");
                MissBandwidth {
                    bw: Some(bw),
                    staged: st,
                    path: Some(format!("direct: {}", c.why)),
                }
            }
            Ok(bw) => only(Some(bw), Some(format!("direct: {}", c.why))),
            Err(e) => {
                let (bw, why) = staged(&format!("direct copies failed ({e})"));
                only(bw, Some(why))
            }
        },
        Ok(c) => {
            let (bw, why) = staged(&c.why);
            only(bw, Some(why))
        }
        Err(e) => only(None, Some(format!("not measured: {e}"))),
    }
}

/// Reads up to 1 GiB of expert bytes sequentially (pread, 8 MiB at a time) and returns bytes/s.
/// With `cold` each range is evicted from the page cache first, as `--cold` runs do.
fn measure_read_bandwidth(
    dir: &std::path::Path,
    cfg: &crate::model::MoeConfig,
    cold: bool,
) -> Option<f64> {
    use crate::experts::source::ExpertSource;
    let ckpt = crate::model::Checkpoint::open(dir).ok()?;
    let src = crate::experts::source::ShardSource::new(&ckpt, cfg).ok()?;
    let experts: Vec<(usize, usize)> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| src.location(l, e).is_some())
        .collect();
    let largest = experts.iter().map(|&(l, e)| src.stored_bytes(l, e)).max()? as usize;
    // The miss reader itself into two alternating expert-sized buffers, as the GPU staging ring
    // and the CPU read buffer are used, so the bound is one the cache could meet.
    let mut bufs = [vec![0u8; largest], vec![0u8; largest]];
    if cold {
        let files: std::collections::HashMap<std::path::PathBuf, std::fs::File> = experts
            .iter()
            .filter_map(|&(l, e)| src.location(l, e))
            .flat_map(|loc| loc.parts.iter().map(|p| p.file.clone()).collect::<Vec<_>>())
            .filter_map(|f| std::fs::File::open(&f).ok().map(|h| (f, h)))
            .collect();
        for &(l, e) in &experts {
            for p in &src.location(l, e)?.parts {
                crate::experts::source::drop_page_cache(&files[&p.file], p.offset, p.len);
            }
        }
    }
    let read_all = |bufs: &mut [Vec<u8>; 2]| -> Option<u64> {
        let mut total = 0u64;
        for (i, &(l, e)) in experts.iter().enumerate() {
            let spans = src.read_into(l, e, &mut bufs[i % 2]).ok()?;
            total += spans.iter().map(|p| p.range.len() as u64).sum::<u64>();
            if total >= 1 << 30 {
                break;
            }
        }
        Some(total)
    };
    // Warm means "in the page cache", which nothing guarantees before the native run has read
    // the model: read once untimed so the timed pass measures what warm runs actually get.
    if !cold {
        read_all(&mut bufs)?;
    }
    // Warm: the median of five timed passes, as the GPU's staged probe takes (one pass read
    // 2.9 to 12.7 GB/s on a 2-core VM between runs minutes apart, BENCHMARKS.md §104, and the
    // bound is only as good as this). Cold: one pass, the page cache dropped once above.
    let passes = if cold { 1 } else { 5 };
    let mut rates = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        let total = read_all(&mut bufs)?;
        let secs = start.elapsed().as_secs_f64();
        if secs > 0.0 && total > 0 {
            rates.push(total as f64 / secs);
        }
    }
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::seconds_per_missed_byte;

    #[test]
    fn a_partly_registered_path_charges_each_share_at_its_own_bandwidth() {
        let (direct, staged) = (50e9, 20e9);
        // One path: its bandwidth.
        assert_eq!(seconds_per_missed_byte(direct, None, None), 1.0 / direct);
        assert_eq!(
            seconds_per_missed_byte(direct, None, Some(0.3)),
            1.0 / direct
        );
        // Both: the shares' times add.
        let mixed = seconds_per_missed_byte(direct, Some(staged), Some(0.5));
        assert!((mixed - (0.5 / direct + 0.5 / staged)).abs() < 1e-24);
        assert_eq!(
            seconds_per_missed_byte(direct, Some(staged), Some(1.0)),
            1.0 / direct
        );
        assert_eq!(
            seconds_per_missed_byte(direct, Some(staged), Some(0.0)),
            1.0 / staged
        );
        // No copies to weigh by: every byte at the slower path.
        assert_eq!(
            seconds_per_missed_byte(direct, Some(staged), None),
            1.0 / staged
        );
    }
}
