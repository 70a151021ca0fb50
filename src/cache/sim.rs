//! What-if replay of a request stream through cache policies: the live cache's own bookkeeping
//! ([`Pools`]) for the policies it ships, and Belady's optimum (offline, exact). At the run's own
//! capacity, scope and policy, the simulated hits equal the live cache's.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::access::Access;
use super::policy::PolicyKind;
use super::pool::{Admit, Pools, split};
use super::settings::Scope;
use super::speculation::{Gate, Rule};

/// A policy to simulate: one of the live ones, or the offline optimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimPolicy {
    Live(PolicyKind),
    /// A live policy whose evictions spare the experts guessed for the next layer (the
    /// `--prefetch next-layer` guesses, made while this layer runs): demand loading only — the
    /// guesses are used as knowledge, never loaded. Without guesses in the stream it is `Live`.
    Guarded(PolicyKind),
    Belady,
}

impl SimPolicy {
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::Live(p) => p.name(),
            SimPolicy::Guarded(p) => match p {
                PolicyKind::Lru => "lru+guard",
                PolicyKind::Lfu => "lfu+guard",
                PolicyKind::Fifo => "fifo+guard",
                PolicyKind::S3fifo => "s3fifo+guard",
                PolicyKind::NextUse => "next-use+guard",
            },
            SimPolicy::Belady => "belady",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s == "belady" || s == "opt" {
            return Some(SimPolicy::Belady);
        }
        if let Some(base) = s.strip_suffix("+guard") {
            return PolicyKind::parse(base).map(SimPolicy::Guarded);
        }
        PolicyKind::parse(s).map(SimPolicy::Live)
    }

    pub fn all() -> Vec<SimPolicy> {
        let mut v: Vec<SimPolicy> = PolicyKind::ALL
            .iter()
            .map(|p| SimPolicy::Live(*p))
            .collect();
        v.push(SimPolicy::Belady);
        v
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
    pub decode_misses: u64,
    /// Decode steps with at least one miss.
    #[serde(default)]
    pub decode_miss_steps: u64,
    /// (decode step, layer) pairs with at least one miss: on the staged GPU path a layer's
    /// misses overlap one another's reads and copies, but its first read and last copy do not
    /// (see `Costs::copy_s`).
    #[serde(default)]
    pub decode_miss_layers: u64,
    /// Decode steps that a GPU run guesses clean (see `experts::speculation`) and that then
    /// miss: the graph launch over the resident experts is wasted and the step runs again.
    #[serde(default)]
    pub failed_speculations: u64,
    /// Decode steps without a miss that were not guessed clean: they read routing back
    /// (piecewise) although nothing needed loading.
    #[serde(default)]
    pub unguessed_clean_steps: u64,
    /// Prefetch replay: guessed experts loaded because they were absent (decode steps only).
    #[serde(default)]
    pub decode_prefetch_loads: u64,
    /// Prefetch replay: experts a prefetch loaded that were evicted, or left at the end,
    /// without ever being requested (bandwidth spent on wrong guesses), all steps.
    #[serde(default)]
    pub prefetch_wasted: u64,
    /// Prefetch replay: all experts a prefetch loaded, all steps.
    #[serde(default)]
    pub prefetch_loads: u64,
}

impl SimResult {
    /// Counts hits and misses, and the per-step figures, from which requests missed — the
    /// GPU's guesses made by `gate` (by default a fresh one with the default rule; `sweep`
    /// passes the rule its runs used, primed with their measured step times).
    fn from_misses(acc: &[Access], missed: &[bool], gate: Option<Gate>) -> Self {
        Self::from_misses_with(acc, missed, gate.unwrap_or(Gate::new(Rule::Gate)))
    }

    fn from_misses_with(acc: &[Access], missed: &[bool], mut gate: Gate) -> Self {
        let mut r = SimResult::default();
        // Misses since the last decode step began (what the live cache's gate sees).
        let mut since_check = 0u64;
        let mut i = 0;
        while i < acc.len() {
            let step = acc[i].step;
            let decode = acc[i].decode;
            let speculated = decode && gate.next_step(since_check == 0);
            if decode {
                since_check = 0;
            }
            let mut step_misses = 0u64;
            let mut missed_layer = None;
            while i < acc.len() && acc[i].step == step {
                if acc[i].prefetch {
                    if missed[i] {
                        r.prefetch_loads += 1;
                        if acc[i].decode {
                            r.decode_prefetch_loads += 1;
                        }
                    }
                } else if missed[i] {
                    r.misses += 1;
                    step_misses += 1;
                    if acc[i].decode {
                        r.decode_misses += 1;
                        // A step's requests come layer by layer.
                        if missed_layer != Some(acc[i].layer) {
                            missed_layer = Some(acc[i].layer);
                            r.decode_miss_layers += 1;
                        }
                    }
                } else {
                    r.hits += 1;
                }
                i += 1;
            }
            since_check += step_misses;
            if decode && step_misses > 0 {
                r.decode_miss_steps += 1;
                if speculated {
                    r.failed_speculations += 1;
                }
            } else if decode && !speculated {
                r.unguessed_clean_steps += 1;
            }
        }
        r
    }

    pub fn hit_rate(&self) -> f64 {
        let t = self.hits + self.misses;
        if t == 0 {
            0.0
        } else {
            self.hits as f64 / t as f64
        }
    }
}

/// Replays `acc` through `policy` with `capacity` experts.
pub fn simulate(
    acc: &[Access],
    policy: SimPolicy,
    capacity: usize,
    scope: Scope,
    layers: usize,
) -> SimResult {
    simulate_gated(acc, policy, capacity, scope, layers, None)
}

/// [`simulate`], with the GPU's guesses (see `experts::speculation`) made by `gate` — one that
/// knows the measured step times — instead of a fresh one.
pub fn simulate_gated(
    acc: &[Access],
    policy: SimPolicy,
    capacity: usize,
    scope: Scope,
    layers: usize,
    gate: Option<Gate>,
) -> SimResult {
    match policy {
        SimPolicy::Live(kind) => {
            // The live cache's own bookkeeping, fed the requests in the MoE block's order.
            let moe_layers: Vec<usize> = (0..layers.max(1)).collect();
            let experts = acc.iter().map(|a| a.expert + 1).max().unwrap_or(1);
            let mut pools = Pools::new(&moe_layers, experts, capacity, scope, kind);
            let none = Default::default();
            // For a prefetch, `missed` means "absent, so loaded" (what the live cache does).
            let mut missed = vec![false; acc.len()];
            for (i, a) in acc.iter().enumerate() {
                if a.prefetch {
                    // A prefetch of a resident expert does nothing, like the live one; a pool of
                    // no slots loads nothing ahead.
                    if !pools.contains(a.layer, a.expert) {
                        missed[i] = pools
                            .admit(a.layer, a.expert, Admit::Prefetch, &none)
                            .is_some();
                    }
                } else if pools.request(a.layer, a.expert).is_none() {
                    missed[i] = true;
                    pools.admit(a.layer, a.expert, Admit::Demand, &none);
                }
            }
            let mut r = SimResult::from_misses(acc, &missed, gate);
            r.prefetch_wasted = pools.prefetch_wasted();
            r
        }
        SimPolicy::Guarded(kind) => {
            // What was guessed for each (forward pass, layer): known while the layer before it
            // runs, so a miss there may spare those experts.
            let mut guessed: HashMap<(usize, usize), HashSet<u32>> = HashMap::new();
            for a in acc.iter().filter(|a| a.prefetch) {
                guessed
                    .entry((a.step, a.layer))
                    .or_default()
                    .insert(super::pool::key(a.layer, a.expert));
            }
            let moe_layers: Vec<usize> = (0..layers.max(1)).collect();
            let experts = acc.iter().map(|a| a.expert + 1).max().unwrap_or(1);
            let mut pools = Pools::new(&moe_layers, experts, capacity, scope, kind);
            let none = HashSet::new();
            // Prefetch entries stay `false`: nothing is loaded ahead.
            let mut missed = vec![false; acc.len()];
            for (i, a) in acc.iter().enumerate() {
                if !a.prefetch && pools.request(a.layer, a.expert).is_none() {
                    missed[i] = true;
                    let spare = guessed.get(&(a.step, a.layer + 1)).unwrap_or(&none);
                    pools.admit(a.layer, a.expert, Admit::Demand, spare);
                }
            }
            SimResult::from_misses(acc, &missed, gate)
        }
        SimPolicy::Belady => {
            let caps = split(capacity, scope, layers);
            let pool_of = |a: &Access| if scope == Scope::Global { 0 } else { a.layer };
            belady(acc, &caps, pool_of, gate)
        }
    }
}

/// Belady's MIN: on a miss with a full pool, evict the resident whose next request is farthest
/// away — or keep the pool as it is when the new expert itself is needed last (bypass). Exact,
/// O(n log c). Prefetches in the stream are ignored: this is the optimum of demand loading, the
/// yardstick prefetch is measured against.
fn belady(
    acc: &[Access],
    caps: &[usize],
    pool_of: impl Fn(&Access) -> usize,
    gate: Option<Gate>,
) -> SimResult {
    let n = acc.len();
    let mut next = vec![usize::MAX; n];
    let mut last: HashMap<u32, usize> = HashMap::new();
    for i in (0..n).rev() {
        if acc[i].prefetch {
            continue;
        }
        let k = super::pool::key(acc[i].layer, acc[i].expert);
        next[i] = last.get(&k).copied().unwrap_or(usize::MAX);
        last.insert(k, i);
    }
    let mut resident: Vec<HashMap<u32, usize>> = vec![HashMap::new(); caps.len()];
    let mut order: Vec<BTreeSet<(usize, u32)>> = vec![BTreeSet::new(); caps.len()];
    let mut missed = vec![false; n];
    for (i, a) in acc.iter().enumerate() {
        if a.prefetch {
            continue;
        }
        let p = pool_of(a);
        let k = super::pool::key(a.layer, a.expert);
        if p >= caps.len() {
            missed[i] = true; // a layer with no pool: never cached
            continue;
        }
        if let Some(nu) = resident[p].get(&k).copied() {
            order[p].remove(&(nu, k));
            order[p].insert((next[i], k));
            resident[p].insert(k, next[i]);
            continue;
        }
        missed[i] = true;
        if caps[p] == 0 || next[i] == usize::MAX {
            continue; // never needed again: do not cache
        }
        if resident[p].len() >= caps[p] {
            let &(far, victim) = order[p].iter().next_back().expect("full pool");
            if far <= next[i] {
                continue; // bypass: everything resident is needed sooner
            }
            order[p].remove(&(far, victim));
            resident[p].remove(&victim);
        }
        resident[p].insert(k, next[i]);
        order[p].insert((next[i], k));
    }
    SimResult::from_misses(acc, &missed, gate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A miss evicts the least recently used expert unless it was guessed for the next layer:
    /// then the guarded policy keeps it and the next layer hits.
    #[test]
    fn a_guarded_policy_spares_the_next_layers_guesses() {
        let req = |step, layer, expert| Access {
            layer,
            expert,
            decode: true,
            step,
            prefetch: false,
        };
        let acc = [
            req(0, 1, 7), // B, layer 1
            req(1, 0, 3), // A, layer 0
            req(2, 0, 5), // C, layer 0: the pool (2) is full; LRU's victim is B
            Access {
                prefetch: true,
                ..req(2, 1, 7) // B guessed for layer 1 of the same pass
            },
            req(2, 1, 7),
        ];
        // Demand-only LRU (the same requests, no guesses) misses B; guarded LRU keeps it.
        let plain: Vec<Access> = acc.iter().filter(|a| !a.prefetch).copied().collect();
        let run = |acc: &[Access], p| simulate(acc, p, 2, Scope::Global, 2);
        let lru = run(&plain, SimPolicy::Live(PolicyKind::Lru));
        let guarded = run(&acc, SimPolicy::Guarded(PolicyKind::Lru));
        assert_eq!((lru.hits, guarded.hits), (0, 1));
        // The guess is knowledge only: nothing loaded ahead, and without guesses it is LRU.
        assert_eq!(guarded.prefetch_loads, 0);
        assert_eq!(
            run(&plain, SimPolicy::Guarded(PolicyKind::Lru)).hits,
            lru.hits
        );
        assert_eq!(SimPolicy::parse("belady+guard"), None);
    }
    use crate::cache::access::{accesses, accesses_prefetched, guess_accuracy, has_guesses};
    use crate::cache::trace::TraceStep;

    fn acc(seq: &[(usize, usize)]) -> Vec<Access> {
        seq.iter()
            .enumerate()
            .map(|(i, &(l, e))| Access {
                layer: l,
                expert: e,
                decode: true,
                step: i,
                prefetch: false,
            })
            .collect()
    }

    /// Decode steps of one MoE layer... two layers, top-1: layer 0 always asks for `e0[t]`,
    /// layer 1 for `e1[t]`, and layer 1's guess is `g1[t]`.
    fn two_layer_trace(e0: &[u16], e1: &[u16], g1: &[u16]) -> Vec<TraceStep> {
        (0..e0.len())
            .map(|t| TraceStep {
                prompt: 0,
                position: t + 1,
                experts: vec![vec![e0[t]], vec![e1[t]]],
                guesses: vec![vec![], vec![g1[t]]],
            })
            .collect()
    }

    #[test]
    fn belady_is_optimal_on_a_classic_trace() {
        // 1 2 3 4 1 2 5 1 2 3 4 5 with 3 slots: MIN has 7 misses (5 hits).
        let a = acc(&[
            (0, 1),
            (0, 2),
            (0, 3),
            (0, 4),
            (0, 1),
            (0, 2),
            (0, 5),
            (0, 1),
            (0, 2),
            (0, 3),
            (0, 4),
            (0, 5),
        ]);
        let b = simulate(&a, SimPolicy::Belady, 3, Scope::Global, 1);
        assert_eq!(b.misses, 7);
        for p in PolicyKind::ALL {
            let r = simulate(&a, SimPolicy::Live(p), 3, Scope::Global, 1);
            assert!(r.hits <= b.hits, "{p:?} beat the optimum");
        }
        let lru = simulate(&a, SimPolicy::Live(PolicyKind::Lru), 3, Scope::Global, 1);
        assert_eq!(lru.misses, 10);
    }

    #[test]
    fn belady_never_loses_to_any_policy_on_random_traces() {
        let mut x: u64 = 7;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20 {
            let seq: Vec<(usize, usize)> = (0..400)
                .map(|_| ((rnd() % 3) as usize, (rnd() % 12) as usize))
                .collect();
            let a = acc(&seq);
            for cap in [1, 3, 6, 12, 24] {
                for scope in [Scope::Global, Scope::Layer] {
                    let b = simulate(&a, SimPolicy::Belady, cap, scope, 3);
                    for p in PolicyKind::ALL {
                        let r = simulate(&a, SimPolicy::Live(p), cap, scope, 3);
                        assert!(
                            r.hits <= b.hits,
                            "{p:?} cap {cap} {scope:?}: {} > {}",
                            r.hits,
                            b.hits
                        );
                        assert_eq!(r.hits + r.misses, 400);
                    }
                }
            }
        }
    }

    #[test]
    fn prefetch_replay_loads_guesses_before_their_layer_and_counts_them_apart() {
        let plen = HashMap::from([(0, 1)]);
        // Layer 1 never repeats an expert, so without prefetch it always misses; the guess is
        // right on steps 0 and 2, wrong on step 1.
        let t = two_layer_trace(&[0, 0, 0], &[1, 2, 3], &[1, 7, 3]);
        assert!(has_guesses(&t));
        let plain = accesses(&t, &plen);
        assert!(plain.iter().all(|a| !a.prefetch));
        let acc = accesses_prefetched(&t, &plen);
        let order: Vec<(usize, usize, bool)> = acc[..3]
            .iter()
            .map(|a| (a.layer, a.expert, a.prefetch))
            .collect();
        assert_eq!(order, [(0, 0, false), (1, 1, true), (1, 1, false)]);
        let lru = SimPolicy::Live(PolicyKind::Lru);
        let without = simulate(&plain, lru, 4, Scope::Global, 2);
        let with = simulate(&acc, lru, 4, Scope::Global, 2);
        // Requests are the same six either way; prefetches are neither hits nor misses.
        assert_eq!(with.hits + with.misses, 6);
        assert_eq!((without.hits, without.misses), (2, 4));
        assert_eq!((with.hits, with.misses), (4, 2));
        assert_eq!((with.prefetch_loads, with.decode_prefetch_loads), (3, 3));
        assert_eq!(
            with.prefetch_wasted, 1,
            "expert 7 was loaded and never asked for"
        );
        // The optimum is demand loading's: prefetches do not change it.
        let b = simulate(&acc, SimPolicy::Belady, 4, Scope::Global, 2);
        assert_eq!(b, simulate(&plain, SimPolicy::Belady, 4, Scope::Global, 2));
        assert_eq!(b.prefetch_loads, 0);
        // Layer 1 had a guess on each of three steps, two right: 2/3 both ways.
        let (p, r) = guess_accuracy(&acc).unwrap();
        assert!((p - 2.0 / 3.0).abs() < 1e-12 && (r - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(guess_accuracy(&plain), None);
    }

    #[test]
    fn a_wrong_guess_can_evict_what_was_needed_and_a_resident_guess_costs_nothing() {
        let plen = HashMap::from([(0, 1)]);
        // One slot: layer 0 wants expert 0 every step; layer 1 wants expert 0 too, guessed 5.
        let t = two_layer_trace(&[0, 0], &[0, 0], &[5, 0]);
        let acc = accesses_prefetched(&t, &plen);
        let r = simulate(&acc, SimPolicy::Live(PolicyKind::Lru), 1, Scope::Layer, 2);
        // Layer pools of 0 slots each (1 / 2 floors to 0): nothing is ever cached or loaded.
        assert_eq!((r.hits, r.prefetch_loads), (0, 0));
        let r = simulate(&acc, SimPolicy::Live(PolicyKind::Lru), 2, Scope::Layer, 2);
        // Layer 1: guess 5 loaded, then 0 misses and evicts it (wasted); step 2's guess of 0 is
        // resident: no load, and 0 hits.
        assert_eq!((r.hits, r.misses), (2, 2));
        assert_eq!((r.prefetch_loads, r.prefetch_wasted), (1, 1));
    }

    #[test]
    fn steps_with_misses_and_failed_speculations_are_counted() {
        // Steps: 0 prefill (miss), 1 decode (miss: not speculated, prefill missed),
        // 2 decode (clean), 3 decode (miss after a clean step: a failed speculation),
        // 4 decode (miss, not speculated).
        let a = |step: usize, decode: bool| Access {
            layer: 0,
            expert: 0,
            decode,
            step,
            prefetch: false,
        };
        let acc = vec![a(0, false), a(1, true), a(2, true), a(3, true), a(4, true)];
        let missed = [true, true, false, true, true];
        let r = SimResult::from_misses_with(&acc, &missed, Gate::new(Rule::AfterCleanStep));
        assert_eq!((r.hits, r.misses, r.decode_miss_steps), (1, 4, 3));
        assert_eq!(r.decode_misses, 3);
        assert_eq!(r.failed_speculations, 1);
        // Step 2 was clean but not guessed (step 1 missed): it read routing back for nothing.
        assert_eq!(r.unguessed_clean_steps, 1);
        // The gate wants a run of clean steps first: no guess here, so none fails.
        let r = SimResult::from_misses_with(&acc, &missed, Gate::new(Rule::Gate));
        assert_eq!((r.failed_speculations, r.unguessed_clean_steps), (0, 1));
    }

    #[test]
    fn decode_layers_with_misses_are_counted_once_per_step() {
        let a = |step: usize, layer: usize, expert: usize, decode: bool| Access {
            layer,
            expert,
            decode,
            step,
            prefetch: false,
        };
        // Prefill misses do not count; step 1: layer 0 misses twice, layer 1 hits, layer 2
        // misses once; step 2: layer 0 misses once, layer 1 hits.
        let acc = vec![
            a(0, 0, 7, false),
            a(1, 0, 1, true),
            a(1, 0, 2, true),
            a(1, 1, 3, true),
            a(1, 2, 4, true),
            a(2, 0, 5, true),
            a(2, 1, 6, true),
        ];
        let missed = [true, true, true, false, true, true, false];
        let r = SimResult::from_misses(&acc, &missed, None);
        assert_eq!((r.decode_misses, r.decode_miss_layers), (4, 3));
    }

    #[test]
    fn the_gate_guesses_through_a_long_clean_stretch_and_stops_when_it_ends() {
        let a = |step: usize| Access {
            layer: 0,
            expert: 0,
            decode: step > 0,
            step,
            prefetch: false,
        };
        let acc: Vec<Access> = (0..60).map(a).collect();
        // Prefill misses, then 40 clean steps, then misses and clean steps alternating.
        let missed: Vec<bool> = (0..60).map(|i| i == 0 || (i > 40 && i % 2 == 0)).collect();
        let gate = SimResult::from_misses_with(&acc, &missed, Gate::new(Rule::Gate));
        let last = SimResult::from_misses_with(&acc, &missed, Gate::new(Rule::AfterCleanStep));
        assert_eq!(gate.decode_miss_steps, 9);
        assert_eq!(
            gate.failed_speculations, 1,
            "only the first miss after the clean run"
        );
        assert_eq!(last.failed_speculations, 9);
        assert!(gate.unguessed_clean_steps > last.unguessed_clean_steps);
    }
}
