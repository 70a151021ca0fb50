//! When a selective GPU decode step should be tried as one CUDA graph over the resident experts.
//!
//! A step that guesses "nothing will miss" runs as one graph at native's speed; if routing then
//! shows a miss, that launch was wasted and the step runs again piecewise (reading each layer's
//! routing back, see `model::graph`). A step that does not guess runs piecewise straight away,
//! about 10 % slower than a graph when nothing misses (576 vs 637 tok/s on an H100). So guessing
//! pays only when a clean step is likely: with graph step T and piecewise step u ≈ 1.1 T,
//! guessing costs T + (1 − q)·u against u, which wins when q > T / u ≈ 0.91.
//!
//! The first rule guessed after every clean step. That is right in steady state (every step
//! clean) and at small caches (almost no step clean), but while a large cache fills, clean and
//! missing steps alternate and half the guesses fail, each costing a whole step. The gate below
//! guesses only after a clean step *and* while the recent clean rate (an exponential average
//! over steps) is at least T / u — with T and u the clean graph and clean piecewise step times
//! it has seen (on H100s u / T was 1.1–1.4 between runs, so the break-even moves), 0.9 until it
//! has seen both. Pure logic: the live cache and the simulator share it, so the sweep's
//! prediction counts the same failed guesses the run makes.

use serde::{Deserialize, Serialize};

use crate::step_path::StepPath;

/// Which rule decides (the `speculate` setting: [`Rule::Gate`] unless asked otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Never guess (every step that may miss reads routing back).
    Never,
    /// The first rule: guess after every clean step, for comparison.
    AfterCleanStep,
    /// Guess after a clean step while the recent clean rate is above the break-even.
    #[default]
    Gate,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Never => "never",
            Rule::AfterCleanStep => "last",
            Rule::Gate => "gate",
        }
    }
}

/// Weight of the newest step in the clean rate (about the last 8 steps count).
const ALPHA: f64 = 1.0 / 8.0;
/// The clean rate above which guessing pays before step times are known (see the module docs),
/// and the range the measured break-even is held to.
const THRESHOLD: f64 = 0.9;
const THRESHOLD_RANGE: (f64, f64) = (0.5, 0.95);

#[derive(Debug, Clone)]
pub struct Gate {
    rule: Rule,
    clean_rate: f64,
    last_clean: bool,
    /// Mean clean step times, seconds: one graph, and piecewise.
    graph_s: Option<f64>,
    piecewise_s: Option<f64>,
    /// The last step's path and time, until the next step says whether it was clean.
    pending: Option<(StepPath, f64)>,
}

impl Gate {
    /// Starts pessimistic: a fresh cache misses, and ~17 clean steps in a row open the gate.
    pub fn new(rule: Rule) -> Self {
        Gate {
            rule,
            clean_rate: 0.0,
            last_clean: false,
            graph_s: None,
            piecewise_s: None,
            pending: None,
        }
    }

    /// With step times known up front (the simulator, from the sweep's measurements).
    pub fn with_costs(mut self, graph_s: f64, piecewise_s: f64) -> Self {
        self.graph_s = Some(graph_s);
        self.piecewise_s = Some(piecewise_s);
        self
    }

    /// The clean rate above which a guess pays: T / u once both are known.
    pub fn threshold(&self) -> f64 {
        match (self.graph_s, self.piecewise_s) {
            (Some(t), Some(u)) if u > 0.0 => (t / u).clamp(THRESHOLD_RANGE.0, THRESHOLD_RANGE.1),
            _ => THRESHOLD,
        }
    }

    /// After a decode step: how it ran and how long it took (counted once the next step says
    /// whether it was clean).
    pub fn step_ran(&mut self, path: StepPath, secs: f64) {
        self.pending = Some((path, secs));
    }

    /// At the start of a decode step: whether anything missed since the last one began (the
    /// last step, and a prompt's prefill if one ran in between), then whether to guess.
    pub fn next_step(&mut self, clean_since_last: bool) -> bool {
        if let (Some((path, secs)), true) = (self.pending.take(), clean_since_last) {
            let mean = match path {
                StepPath::Graph => &mut self.graph_s,
                StepPath::Piecewise => &mut self.piecewise_s,
                _ => &mut None,
            };
            *mean = Some(mean.map_or(secs, |m| m + ALPHA * (secs - m)));
        }
        self.last_clean = clean_since_last;
        let x = if clean_since_last { 1.0 } else { 0.0 };
        self.clean_rate += ALPHA * (x - self.clean_rate);
        match self.rule {
            Rule::Never => false,
            Rule::AfterCleanStep => self.last_clean,
            Rule::Gate => self.last_clean && self.clean_rate >= self.threshold(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rule: Rule, clean: &[bool]) -> Vec<bool> {
        let mut g = Gate::new(rule);
        clean.iter().map(|&c| g.next_step(c)).collect()
    }

    #[test]
    fn steady_state_guesses_every_step_once_warm() {
        let tries = run(Rule::Gate, &[true; 40]);
        let first = tries.iter().position(|&t| t).unwrap();
        assert!(
            (10..=20).contains(&first),
            "opens after ~17 clean steps: {first}"
        );
        assert!(tries[first..].iter().all(|&t| t));
    }

    #[test]
    fn alternating_steps_never_guess_but_the_first_rule_does_half_the_time() {
        let pattern: Vec<bool> = (0..60).map(|i| i % 2 == 0).collect();
        assert!(run(Rule::Gate, &pattern).iter().all(|&t| !t));
        let last = run(Rule::AfterCleanStep, &pattern);
        assert_eq!(last.iter().filter(|&&t| t).count(), 30);
    }

    #[test]
    fn a_miss_closes_the_gate_and_a_few_clean_steps_reopen_it() {
        let mut steps = vec![true; 40];
        steps.push(false);
        steps.extend([true; 5]);
        let t = run(Rule::Gate, &steps);
        assert!(t[39]);
        assert!(!t[40], "the step after a miss is not guessed");
        // 1.0 → 0.875 after the miss; two clean steps bring it back over 0.9.
        assert_eq!(&t[41..], &[false, true, true, true, true]);
    }

    #[test]
    fn the_break_even_follows_the_clean_step_times_it_has_seen() {
        let mut g = Gate::new(Rule::Gate);
        assert_eq!(g.threshold(), 0.9);
        // A clean piecewise step of 2 ms, then a clean graph step of 1.5 ms: T / u = 0.75.
        g.step_ran(StepPath::Piecewise, 0.002);
        g.next_step(true);
        g.step_ran(StepPath::Graph, 0.0015);
        g.next_step(true);
        assert!((g.threshold() - 0.75).abs() < 1e-12);
        // A step that missed says nothing about clean step times.
        g.step_ran(StepPath::Piecewise, 0.009);
        g.next_step(false);
        assert!((g.threshold() - 0.75).abs() < 1e-12);
        // Held to its range.
        assert_eq!(
            Gate::new(Rule::Gate).with_costs(1.0, 1.01).threshold(),
            0.95
        );
        assert_eq!(Gate::new(Rule::Gate).with_costs(1.0, 4.0).threshold(), 0.5);
        // A lower break-even opens the gate sooner: 1 − (7/8)^n ≥ 0.75 after 11 clean steps.
        let mut g = Gate::new(Rule::Gate).with_costs(1.5, 2.0);
        let first = (0..40).position(|_| g.next_step(true)).unwrap();
        assert_eq!(first, 10);
    }

    #[test]
    fn never_means_never() {
        assert!(run(Rule::Never, &[true; 50]).iter().all(|&t| !t));
    }
}
