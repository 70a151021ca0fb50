//! What-if replay of a routing trace through cache policies: the same policy code the live cache
//! uses, Belady's optimum (offline, exact), hit rate per capacity, share of the optimum, the
//! knee of the curve, and a decode-speed prediction from measured costs.
//!
//! Access order mirrors the MoE block exactly: per forward pass (the whole prompt at once, then
//! one token at a time), per MoE layer in order, each selected expert once, in ascending id. So
//! at the run's own capacity, scope and policy, the simulated hits equal the live cache's.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::policy::PolicyKind;
use super::pool::{Admit, Pools, split};
use super::settings::Scope;
use super::speculation::{Gate, Rule};
use super::stats::PrefetchStats;
use super::trace::TraceStep;

/// A policy to simulate: one of the live ones, or the offline optimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimPolicy {
    Live(PolicyKind),
    Belady,
}

impl SimPolicy {
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::Live(p) => p.name(),
            SimPolicy::Belady => "belady",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s == "belady" || s == "opt" {
            return Some(SimPolicy::Belady);
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

/// One expert request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Index of the MoE layer (position in the model's list of MoE layers).
    pub layer: usize,
    pub expert: usize,
    /// True for requests of a decode step (one token), false for the prompt's prefill.
    pub decode: bool,
    /// Which forward pass (prefill or decode step) made the request, counting from 0.
    pub step: usize,
    /// A prefetch of a guessed expert (see [`accesses_prefetched`]), not a request: loaded if
    /// absent, otherwise nothing; never a hit or a miss.
    pub prefetch: bool,
}

/// Builds the request stream from a trace. `prompt_tokens[p]` is the prompt length of prompt p
/// (positions below it were one prefill forward pass).
pub fn accesses(trace: &[TraceStep], prompt_tokens: &HashMap<usize, usize>) -> Vec<Access> {
    build_accesses(trace, prompt_tokens, false)
}

/// The request stream with `--prefetch next-layer` replayed from the guesses the trace carries:
/// before each layer's requests, its guessed experts (the union over a prompt's rows, as live
/// prefetch loads them) — as if every guess finished loading just before its layer ran, the
/// most prefetch can do with these guesses. Steps without guesses get none.
pub fn accesses_prefetched(
    trace: &[TraceStep],
    prompt_tokens: &HashMap<usize, usize>,
) -> Vec<Access> {
    build_accesses(trace, prompt_tokens, true)
}

/// Whether a trace carries next-layer guesses (recorded with `--trace-guesses` or prefetch on).
pub fn has_guesses(trace: &[TraceStep]) -> bool {
    trace
        .iter()
        .any(|s| s.guesses.iter().any(|g| !g.is_empty()))
}

/// How good the replayed guesses are: (precision, recall) over every forward pass and layer
/// that had a guess — guessed and then requested / guessed, requested and guessed / requested —
/// scored exactly as the live cache scores its prefetch. None without guesses.
pub fn guess_accuracy(acc: &[Access]) -> Option<(f64, f64)> {
    let mut score = PrefetchStats::default();
    let mut i = 0;
    while i < acc.len() {
        let (step, layer) = (acc[i].step, acc[i].layer);
        let mut j = i;
        while j < acc.len() && acc[j].step == step && acc[j].layer == layer {
            j += 1;
        }
        let group = &acc[i..j];
        let guess: Vec<usize> = group
            .iter()
            .filter(|a| a.prefetch)
            .map(|a| a.expert)
            .collect();
        if !guess.is_empty() {
            let want: Vec<usize> = group
                .iter()
                .filter(|a| !a.prefetch)
                .map(|a| a.expert)
                .collect();
            score.score(&guess, &want);
        }
        i = j;
    }
    score.precision().zip(score.recall())
}

fn build_accesses(
    trace: &[TraceStep],
    prompt_tokens: &HashMap<usize, usize>,
    prefetch: bool,
) -> Vec<Access> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut step = 0;
    while i < trace.len() {
        let p = trace[i].prompt;
        let plen = prompt_tokens.get(&p).copied().unwrap_or(1);
        // Group: all prefill positions of this prompt, or a single decode position.
        let mut j = i + 1;
        if trace[i].position < plen {
            while j < trace.len() && trace[j].prompt == p && trace[j].position < plen {
                j += 1;
            }
        }
        let layers = trace[i].experts.len();
        let decode = trace[i].position >= plen;
        let union = |pick: &dyn Fn(&TraceStep) -> Option<&Vec<u16>>| {
            let mut v: Vec<usize> = trace[i..j]
                .iter()
                .flat_map(|s| pick(s).into_iter().flatten().map(|&e| e as usize))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for l in 0..layers {
            if prefetch {
                for e in union(&|s| s.guesses.get(l)) {
                    out.push(Access {
                        layer: l,
                        expert: e,
                        decode,
                        step,
                        prefetch: true,
                    });
                }
            }
            for e in union(&|s| s.experts.get(l)) {
                out.push(Access {
                    layer: l,
                    expert: e,
                    decode,
                    step,
                    prefetch: false,
                });
            }
        }
        i = j;
        step += 1;
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
    pub decode_misses: u64,
    /// Decode steps with at least one miss.
    #[serde(default)]
    pub decode_miss_steps: u64,
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

/// The knee of an increasing, concave-ish curve (Kneedle): the point farthest above the chord
/// from the first to the last point, both axes normalised.
pub fn knee(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 3 {
        return None;
    }
    let (x0, y0) = points[0];
    let (x1, y1) = points[points.len() - 1];
    let (dx, dy) = (x1 - x0, y1 - y0);
    if dx <= 0.0 || dy <= 0.0 {
        return None;
    }
    points
        .iter()
        .map(|&(x, y)| ((x, y), (y - y0) / dy - (x - x0) / dx))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|(_, d)| *d > 0.0)
        .map(|(p, _)| p)
}

/// Costs measured in a run, for predicting decode speed at other capacities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// Native's mean decode step, seconds.
    pub native_step_s: f64,
    /// Mean time to load one expert on a miss, seconds.
    pub miss_s: f64,
    /// Decode tokens in the trace.
    pub decode_tokens: usize,
    /// GPU with CUDA graphs: a selective step that reads routing back every layer (piecewise
    /// graphs), seconds. A step guessed clean and clean runs as a graph at native's speed; one
    /// with misses costs this plus its loads, plus one wasted graph launch when it was guessed
    /// clean; a clean step not guessed costs this.
    /// None (CPU, or unmeasured): every step costs native's step.
    #[serde(default)]
    pub uncaptured_step_s: Option<f64>,
    /// With prefetch: what each expert loaded ahead adds to the decode time, seconds — the part
    /// of its load that the forward pass did not hide (it competes for cores and memory
    /// bandwidth). None: assumed hidden entirely. `sweep` calibrates it on its smallest cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ahead_s: Option<f64>,
}

impl Costs {
    /// Predicted decode tok/s: each step costs native's step (or, with graphs, see
    /// `uncaptured_step_s`) plus its misses' load time.
    pub fn predict_tok_s(&self, r: &SimResult) -> f64 {
        let n = self.decode_tokens.max(1) as f64;
        let loads = r.decode_misses as f64 * self.miss_s
            + r.decode_prefetch_loads as f64 * self.load_ahead_s.unwrap_or(0.0);
        let compute = match self.uncaptured_step_s {
            None => n * self.native_step_s,
            Some(u) => {
                let m = ((r.decode_miss_steps + r.unguessed_clean_steps) as f64).min(n);
                (n - m) * self.native_step_s
                    + m * u
                    + r.failed_speculations as f64 * self.native_step_s
            }
        };
        n / (compute + loads)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub capacity: usize,
    pub capacity_pct: f64,
    pub policy: String,
    pub hit_rate: f64,
    /// This policy's hit rate as a share of Belady's at the same capacity (%).
    pub pct_of_optimum: Option<f64>,
    pub misses_per_decode_token: f64,
    /// With prefetch replayed: experts loaded ahead per decode token (right or wrong guesses),
    /// the bandwidth prefetch spends on top of the misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_loads_per_decode_token: Option<f64>,
    /// With prefetch replayed: share of prefetched experts never requested before eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_wasted: Option<f64>,
    pub predicted_decode_tok_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    pub total_experts: usize,
    pub scope: String,
    pub accesses: usize,
    pub decode_tokens: usize,
    /// Whether next-layer prefetch was replayed (hit rates are then of requests, with guesses
    /// loaded ahead; the optimum stays demand loading's).
    #[serde(default)]
    pub prefetch: bool,
    /// With prefetch replayed: precision and recall of the trace's guesses (see
    /// [`guess_accuracy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_recall: Option<f64>,
    pub points: Vec<CurvePoint>,
    /// Knee capacity per policy.
    pub knees: Vec<(String, usize)>,
    pub costs: Option<Costs>,
}

/// Runs every policy at every capacity.
pub fn study(
    acc: &[Access],
    total_experts: usize,
    layers: usize,
    capacities: &[usize],
    policies: &[SimPolicy],
    scope: Scope,
    costs: Option<Costs>,
) -> Study {
    let decode_tokens = costs.map(|c| c.decode_tokens).unwrap_or(0);
    let prefetch = acc.iter().any(|a| a.prefetch);
    let accuracy = guess_accuracy(acc);
    let mut points = Vec::new();
    let mut opt: HashMap<usize, f64> = HashMap::new();
    for &c in capacities {
        opt.insert(
            c,
            simulate(acc, SimPolicy::Belady, c, scope, layers).hit_rate(),
        );
    }
    let mut knees = Vec::new();
    for &p in policies {
        let mut curve = Vec::new();
        for &c in capacities {
            let r = simulate(acc, p, c, scope, layers);
            let h = r.hit_rate();
            let o = opt[&c];
            curve.push((c as f64, h));
            points.push(CurvePoint {
                capacity: c,
                capacity_pct: 100.0 * c as f64 / total_experts.max(1) as f64,
                policy: p.name().into(),
                hit_rate: h,
                pct_of_optimum: (o > 0.0).then(|| 100.0 * h / o),
                misses_per_decode_token: r.decode_misses as f64 / decode_tokens.max(1) as f64,
                prefetch_loads_per_decode_token: (prefetch && p != SimPolicy::Belady)
                    .then(|| r.decode_prefetch_loads as f64 / decode_tokens.max(1) as f64),
                prefetch_wasted: (prefetch && r.prefetch_loads > 0)
                    .then(|| r.prefetch_wasted as f64 / r.prefetch_loads as f64),
                predicted_decode_tok_s: costs.map(|k| k.predict_tok_s(&r)),
            });
        }
        if let Some((x, _)) = knee(&curve) {
            knees.push((p.name().to_string(), x as usize));
        }
    }
    Study {
        total_experts,
        scope: scope.name().into(),
        accesses: acc.iter().filter(|a| !a.prefetch).count(),
        decode_tokens,
        prefetch,
        guess_precision: accuracy.map(|x| x.0),
        guess_recall: accuracy.map(|x| x.1),
        points,
        knees,
        costs,
    }
}

/// The capacities a study looks at when none are given: 5–100 % of all experts in steps, and
/// the working set of one token (top-k per layer).
pub fn default_capacities(total: usize, working_set: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [
        5.0, 10.0, 12.5, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 75.0, 100.0,
    ]
    .iter()
    .map(|p| ((p / 100.0) * total as f64).round() as usize)
    .chain(std::iter::once(working_set.min(total)))
    .filter(|&c| c >= 1)
    .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Capacities from a list like "12.5%,25%,50%" or "8,16,32" (percent of all experts, or counts).
pub fn parse_capacities(s: &str, total: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let c = if let Some(p) = part.strip_suffix('%') {
            let v: f64 = p.parse().map_err(|_| format!("bad capacity \"{part}\""))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("capacity {part} is outside 0–100 %"));
            }
            ((v / 100.0) * total as f64).round() as usize
        } else {
            part.parse::<usize>()
                .map_err(|_| format!("bad capacity \"{part}\": a count or a percentage"))?
        };
        out.push(c.max(1));
    }
    if out.is_empty() {
        return Err("no capacities given".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn accesses_group_prefill_and_sort_experts() {
        let t = vec![
            TraceStep {
                prompt: 0,
                position: 0,
                experts: vec![vec![3, 1], vec![2, 0]],
                guesses: vec![],
            },
            TraceStep {
                prompt: 0,
                position: 1,
                experts: vec![vec![1, 4], vec![0, 5]],
                guesses: vec![],
            },
            TraceStep {
                prompt: 0,
                position: 2,
                experts: vec![vec![4, 3], vec![5, 2]],
                guesses: vec![],
            },
        ];
        let plen = HashMap::from([(0, 2)]);
        let a = accesses(&t, &plen);
        let got: Vec<(usize, usize, bool)> =
            a.iter().map(|x| (x.layer, x.expert, x.decode)).collect();
        assert_eq!(
            got,
            vec![
                (0, 1, false),
                (0, 3, false),
                (0, 4, false),
                (1, 0, false),
                (1, 2, false),
                (1, 5, false),
                (0, 3, true),
                (0, 4, true),
                (1, 2, true),
                (1, 5, true),
            ]
        );
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
    fn knee_and_capacities() {
        let pts: Vec<(f64, f64)> =
            [(1.0, 0.1), (2.0, 0.7), (3.0, 0.8), (4.0, 0.85), (5.0, 0.9)].to_vec();
        assert_eq!(knee(&pts), Some((2.0, 0.7)));
        assert_eq!(
            parse_capacities("12.5%,25%,50%", 192).unwrap(),
            vec![24, 48, 96]
        );
        assert_eq!(parse_capacities("8, 16,8", 192).unwrap(), vec![8, 16]);
        assert!(parse_capacities("lots", 10).is_err());
        assert!(parse_capacities("150%", 10).is_err());
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

    #[test]
    fn graph_prediction_charges_uncaptured_steps_and_wasted_launches() {
        let c = Costs {
            native_step_s: 0.001,
            miss_s: 0.002,
            decode_tokens: 4,
            uncaptured_step_s: Some(0.003),
            load_ahead_s: None,
        };
        let r = SimResult {
            decode_misses: 2,
            decode_miss_steps: 1,
            failed_speculations: 1,
            unguessed_clean_steps: 0,
            ..Default::default()
        };
        // 3 clean steps at 1 ms, 1 uncaptured at 3 ms, 1 wasted launch at 1 ms, 2 loads at 2 ms.
        let want = 4.0 / (0.003 + 0.003 + 0.001 + 0.004);
        assert!((c.predict_tok_s(&r) - want).abs() < 1e-9);
    }

    #[test]
    fn costs_written_to_a_trace_read_back_exactly() {
        // A trace and the recording it came from must predict the same speed to the last bit.
        // serde_json's default float parser can be one ulp off: Cargo.toml turns on its
        // `float_roundtrip` (test builds get it from a dev-dependency too, so this guards the
        // property rather than proving the flag). Values the default parser reads back wrong:
        for bits in [
            4499942606667094846u64,
            4504504056015702419,
            4502118833659027169,
        ] {
            let c = Costs {
                native_step_s: f64::from_bits(bits),
                miss_s: f64::from_bits(bits + 1),
                decode_tokens: 1,
                uncaptured_step_s: Some(f64::from_bits(bits)),
                load_ahead_s: None,
            };
            let back: Costs = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = Costs {
                native_step_s: f64::from_bits(0x3f00_0000_0000_0000 | (x >> 12)),
                miss_s: 1.0 / (1.0 + (x % 1_000_000) as f64 / 7.0),
                decode_tokens: 1,
                uncaptured_step_s: None,
                load_ahead_s: None,
            };
            let back: Costs = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn prediction_adds_miss_cost_to_native_step() {
        let c = Costs {
            native_step_s: 0.01,
            miss_s: 0.001,
            decode_tokens: 10,
            uncaptured_step_s: None,
            load_ahead_s: None,
        };
        let misses = |m: u64| SimResult {
            decode_misses: m,
            ..Default::default()
        };
        assert!((c.predict_tok_s(&misses(0)) - 100.0).abs() < 1e-9);
        assert!(
            (c.predict_tok_s(&misses(100)) - 50.0).abs() < 1e-9,
            "10 misses per token double the step"
        );
    }
}
