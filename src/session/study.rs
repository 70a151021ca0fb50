//! A session's cache study: the routing trace of a recorded run (or of a trace file), its
//! measured costs and the live cache's result, and the study the dashboard's final curve and
//! `moescope simulate` show.

use std::collections::HashMap;
use std::path::Path;

use super::event::Backend;
use super::metrics::backend_metrics;
use super::state::SessionState;
use crate::cache::access::{accesses, accesses_prefetched, has_guesses};
use crate::cache::settings::Scope;
use crate::cache::sim::SimPolicy;
use crate::cache::stats::Costs;
use crate::cache::study::{Study, default_capacities, study};
use crate::cache::trace::{self, LiveCache, TraceInput};

/// The trace, prompt lengths and costs of a session.
pub fn from_state(s: &SessionState) -> TraceInput {
    // Native's trace by preference (it exists without a cache), unless only selective's
    // carries next-layer guesses (a prefetch run): the routing is the same, bit for bit.
    let [nat_trace, sel_trace] = &s.traces;
    let trace_backend =
        if !nat_trace.is_empty() && (has_guesses(nat_trace) || !has_guesses(sel_trace)) {
            Backend::Native
        } else if !sel_trace.is_empty() {
            Backend::Selective
        } else {
            Backend::Native
        };
    let runs = &s.backend(trace_backend).runs;
    let prompt_tokens: HashMap<usize, usize> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.started)
        .map(|(i, r)| (i, r.prompt_tokens))
        .collect();
    let steps = s.traces[trace_backend.index()].clone();
    let decode_tokens = steps
        .iter()
        .filter(|st| st.position >= prompt_tokens.get(&st.prompt).copied().unwrap_or(1))
        .count();
    let nat = backend_metrics(s, Backend::Native);
    let sel_cache = s.backend(Backend::Selective).cache.as_ref();
    let native_step_s = nat.decode_tok_s.map(|t| 1.0 / t);
    let miss_s = sel_cache
        .filter(|c| c.misses > 0)
        .map(|c| c.load_time_us as f64 / 1e6 / c.misses as f64);
    let costs = match (native_step_s, miss_s) {
        (Some(a), Some(b)) => Some(Costs {
            native_step_s: a,
            miss_s: b,
            decode_tokens,
            uncaptured_step_s: None,
            load_ahead_s: None,
            copy_s: sel_cache.and_then(|c| c.staged_copy_s()),
            copy_tail_s: sel_cache.and_then(|c| c.staged_copy_tail_s()),
            staged_tail_s: sel_cache.and_then(|c| c.staged_tail_s()),
        }),
        _ => None,
    };
    let live = sel_cache.map(|c| LiveCache {
        capacity: c.capacity_experts,
        scope: s.header.cache.cache_scope,
        policy: s.header.cache.policy,
        // From what the cache did (it reports prefetch statistics only when it prefetched),
        // not from the flag: a GPU run turns prefetch down.
        prefetch: c.prefetch.is_some(),
        hits: c.hits,
        misses: c.misses,
    });
    TraceInput {
        moe: s.header.moe.clone(),
        steps,
        prompt_tokens,
        costs,
        live,
    }
}

/// Reads a trace file or a recording (told apart by the first line).
pub fn read_input(path: &Path) -> Result<TraceInput, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(first).map_err(|e| {
        format!(
            "{}: line 1 is not JSON ({e}); expected a recording or a trace",
            path.display()
        )
    })?;
    if trace::is_trace_header(&v) {
        return trace::parse(&text, path);
    }
    let rec = super::record::read(path)?;
    let input = from_state(&SessionState::replayed(&rec));
    if input.steps.is_empty() {
        return Err(format!(
            "{}: the recording has no routing trace (no `routing` events)",
            path.display()
        ));
    }
    Ok(input)
}

/// The study behind the dashboard's final curve: every policy and the optimum at 5–100 % of
/// all experts plus the run's own capacity, on the run's own trace. A run that prefetched is
/// studied with its guesses replayed, so its marked point is comparable with what the cache did.
pub fn run_study(state: &SessionState) -> Option<Study> {
    let input = from_state(state);
    if input.steps.is_empty() {
        return None;
    }
    let total = input.moe.total_experts();
    let layers = input.moe.moe_layers.len();
    let mut caps = default_capacities(total, input.moe.top_k * layers);
    if let Some(l) = &input.live {
        caps.push(l.capacity);
        caps.sort_unstable();
        caps.dedup();
    }
    let acc = if input.live.as_ref().is_some_and(|l| l.prefetch) && has_guesses(&input.steps) {
        accesses_prefetched(&input.steps, &input.prompt_tokens)
    } else {
        accesses(&input.steps, &input.prompt_tokens)
    };
    let scope = input.live.as_ref().map_or(Scope::Global, |l| l.scope);
    Some(study(
        &acc,
        total,
        layers,
        &caps,
        &SimPolicy::all(),
        scope,
        input.costs,
    ))
}
