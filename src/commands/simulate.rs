//! `moescope simulate`: the cache what-if study of a recorded run.

use anyhow::Result;

use crate::cache::settings::{CacheSettings, PrefetchMode, Scope};
use crate::cache::sim::{self as cachesim, SimPolicy, Study};
use crate::cli::SimulateArgs;
use crate::errors::InputError;
use crate::session::study;

pub fn run(a: &SimulateArgs) -> Result<()> {
    let input = study::read_input(&a.file).map_err(InputError)?;
    let total = input.moe.moe_layers.len() * input.moe.num_experts;
    let layers = input.moe.moe_layers.len();
    let scope = a
        .scope
        .or(input.live.as_ref().map(|l| l.scope))
        .unwrap_or(Scope::Global);
    let mut capacities = match &a.capacities {
        Some(s) => cachesim::parse_capacities(s, total).map_err(InputError)?,
        None => cachesim::default_capacities(total, input.moe.top_k * layers),
    };
    if let (None, Some(l)) = (&a.capacities, &input.live) {
        capacities.push(l.capacity);
        capacities.sort_unstable();
        capacities.dedup();
    }
    let policies: Vec<SimPolicy> = match &a.policies {
        None => SimPolicy::all(),
        Some(v) => v
            .iter()
            .map(|p| {
                SimPolicy::parse(p).ok_or_else(|| {
                    InputError(format!(
                        "unknown policy \"{p}\": lru, lfu, fifo, s3fifo, belady"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let prefetch = match a.prefetch {
        Some(PrefetchMode::NextLayer) => true,
        Some(PrefetchMode::None) => false,
        Some(PrefetchMode::Auto) => cachesim::has_guesses(&input.steps),
        None => input.live.as_ref().is_some_and(|l| l.prefetch),
    };
    if prefetch && !cachesim::has_guesses(&input.steps) {
        crate::bail_input!(
            "{}: the routing trace has no next-layer guesses to replay prefetch from; record \
             the run with `moescope run --trace-guesses` (or `--prefetch next-layer`)",
            a.file.display()
        );
    }
    let guessed = input
        .steps
        .iter()
        .filter(|s| s.guesses.iter().any(|g| !g.is_empty()))
        .count();
    if prefetch && guessed < input.steps.len() {
        // A GPU step captured as a graph makes no guesses: those steps replay without prefetch.
        eprintln!(
            "note: {} of {} positions in the trace carry guesses; the others replay without prefetch",
            guessed,
            input.steps.len()
        );
    }
    let acc = if prefetch {
        cachesim::accesses_prefetched(&input.steps, &input.prompt_tokens)
    } else {
        cachesim::accesses(&input.steps, &input.prompt_tokens)
    };
    let study = cachesim::study(
        &acc,
        total,
        layers,
        &capacities,
        &policies,
        scope,
        input.costs,
    );
    if a.json {
        let check = input.live.as_ref().map(|l| {
            let sim = cachesim::simulate(&acc, SimPolicy::Live(l.policy), l.capacity, l.scope, layers);
            serde_json::json!({"capacity": l.capacity, "policy": l.policy.name(), "scope": l.scope.name(),
                "live_hits": l.hits, "live_misses": l.misses, "simulated_hits": sim.hits, "simulated_misses": sim.misses})
        });
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"study": study, "live_check": check})
            )?
        );
        return Ok(());
    }
    print!("{}", render(&study));
    if let Some(l) = &input.live {
        let sim = cachesim::simulate(&acc, SimPolicy::Live(l.policy), l.capacity, l.scope, layers);
        println!(
            "the run itself: {} experts, {} scope, {}{}: live {} hits / {} misses ({:.1} %), simulated {} / {} ({:.1} %)",
            l.capacity,
            l.scope.name(),
            l.policy.name(),
            match (l.prefetch, prefetch) {
                (true, true) =>
                    ", prefetch (live guesses land late or early, the replay's on time)",
                (true, false) => ", prefetch live but not replayed",
                (false, true) => ", no prefetch live but replayed",
                (false, false) => "",
            },
            l.hits,
            l.misses,
            100.0 * l.hits as f64 / (l.hits + l.misses).max(1) as f64,
            sim.hits,
            sim.misses,
            100.0 * sim.hit_rate()
        );
    }
    Ok(())
}

pub fn render(s: &Study) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let policies: Vec<String> = {
        let mut seen = Vec::new();
        for p in &s.points {
            if !seen.contains(&p.policy) {
                seen.push(p.policy.clone());
            }
        }
        seen
    };
    let _ = writeln!(
        o,
        "{} requests ({} decode tokens) over {} experts, {} scope; hit rate (and % of Belady's optimum)",
        s.accesses, s.decode_tokens, s.total_experts, s.scope
    );
    if s.prefetch {
        let _ = writeln!(
            o,
            "next-layer prefetch replayed: each guess loaded just before its layer (policies only; \
             Belady is the optimum of demand loading); guesses {} precision, {} recall",
            s.guess_precision
                .map_or("–".into(), |p| format!("{:.1} %", 100.0 * p)),
            s.guess_recall
                .map_or("–".into(), |p| format!("{:.1} %", 100.0 * p)),
        );
    }
    let _ = write!(o, "{:>10} {:>7}", "capacity", "%");
    for p in &policies {
        let _ = write!(o, " {:>16}", p);
    }
    // The speed prediction is shown for the default policy (what a run gets without --policy).
    let pred_policy = CacheSettings::default().policy.name();
    if s.prefetch {
        let _ = write!(o, " {:>22}", format!("{pred_policy} ahead/tok (wrong)"));
    }
    if s.costs.is_some() {
        let _ = write!(o, " {:>16}", format!("{pred_policy} tok/s (pred)"));
    }
    let _ = writeln!(o);
    let mut caps: Vec<usize> = s.points.iter().map(|p| p.capacity).collect();
    caps.dedup();
    caps.sort_unstable();
    caps.dedup();
    for c in caps {
        let row: Vec<&cachesim::CurvePoint> = s.points.iter().filter(|p| p.capacity == c).collect();
        let _ = write!(o, "{:>10} {:>6.1}%", c, row[0].capacity_pct);
        for p in &policies {
            match row.iter().find(|x| &x.policy == p) {
                Some(x) => {
                    let pct = x
                        .pct_of_optimum
                        .map(|v| format!("({v:.0}%)"))
                        .unwrap_or_default();
                    let _ = write!(
                        o,
                        " {:>9.1}% {:>6}",
                        100.0 * x.hit_rate,
                        if p == "belady" { String::new() } else { pct }
                    );
                }
                None => {
                    let _ = write!(o, " {:>16}", "–");
                }
            }
        }
        let default = row.iter().find(|x| x.policy == pred_policy);
        if s.prefetch {
            let ahead = default.and_then(|x| x.prefetch_loads_per_decode_token);
            let wrong = default.and_then(|x| x.prefetch_wasted);
            let cell = match (ahead, wrong) {
                (Some(a), Some(w)) => format!("{a:.2} ({:.0} %)", 100.0 * w),
                (Some(a), None) => format!("{a:.2}"),
                _ => "–".into(),
            };
            let _ = write!(o, " {:>22}", cell);
        }
        if let Some(x) = default.and_then(|x| x.predicted_decode_tok_s) {
            let _ = write!(o, " {:>16.1}", x);
        }
        let _ = writeln!(o);
    }
    for (p, k) in &s.knees {
        let _ = writeln!(
            o,
            "knee of the {p} curve: {k} experts ({:.1} %)",
            100.0 * *k as f64 / s.total_experts.max(1) as f64
        );
    }
    if let Some(c) = s.costs {
        let _ = writeln!(
            o,
            "prediction: native step {:.2} ms + misses per token × {:.3} ms per miss (measured in the run){}",
            c.native_step_s * 1e3,
            c.miss_s * 1e3,
            if s.prefetch {
                "; loads ahead assumed hidden behind compute"
            } else {
                ""
            }
        );
    }
    o
}
