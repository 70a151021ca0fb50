//! `moescope simulate`: the cache what-if study of a recorded run.

use anyhow::Result;

use crate::cache::access::{accesses, accesses_prefetched, has_guesses};
use crate::cache::settings::{PrefetchMode, Scope};
use crate::cache::sim::{SimPolicy, simulate};
use crate::cache::study::{default_capacities, parse_capacities, study};
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
        Some(s) => parse_capacities(s, total).map_err(InputError)?,
        None => default_capacities(total, input.moe.top_k * layers),
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
                        "unknown policy \"{p}\": lru, lfu, fifo, s3fifo, belady, or a policy \
                         with +guard (e.g. s3fifo+guard)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let prefetch = match a.prefetch {
        Some(PrefetchMode::NextLayer) => true,
        Some(PrefetchMode::None) => false,
        Some(PrefetchMode::Auto) => has_guesses(&input.steps),
        None => input.live.as_ref().is_some_and(|l| l.prefetch),
    };
    if prefetch && !has_guesses(&input.steps) {
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
        accesses_prefetched(&input.steps, &input.prompt_tokens)
    } else {
        accesses(&input.steps, &input.prompt_tokens)
    };
    let study = study(
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
            let sim = simulate(&acc, SimPolicy::Live(l.policy), l.capacity, l.scope, layers);
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
    print!("{}", crate::report::simulate::study_table(&study));
    if let Some(l) = &input.live {
        let sim = simulate(&acc, SimPolicy::Live(l.policy), l.capacity, l.scope, layers);
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
