//! Picking the next token: greedy, or seeded sampling with temperature, top-k and top-p.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result};
use super::layers::{argmax, argmax_of_numbers};

/// Decoding settings. `temperature == 0` is greedy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 50,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Input(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Whether every token is the largest logit's (temperature 0): then the pick needs no
    /// more than [`super::layers::argmax_of_numbers`], which a GPU step makes on the device.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// The next token. Sampling keeps the `top_k` best (all when 0), weights each by
    /// exp((logit − max) / temperature) (f32, summed in f64), keeps the shortest run of best tokens whose
    /// weight reaches `top_p` of the whole (all when 1), and draws from what is kept with the
    /// seeded generator, walking from the best. Only the heaviest candidates — enough to cover
    /// the walk — are ever sorted. Why: sorting a 151,936-token vocabulary took ~12 ms a token — nine GPU
    /// decode steps. A NaN or infinite logit is picked as greedy decoding would pick it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_from(logits, argmax(logits))
    }

    /// [`sample`](Self::sample) from logits that must be numbers: `None` when any is NaN or
    /// +∞ (a generation then stops with an error instead of emitting whatever such a row's
    /// order gives), at no extra pass over the vocabulary.
    pub fn sample_numbers(&mut self, logits: &[f32]) -> Option<u32> {
        let best = argmax_of_numbers(logits)?;
        Some(self.sample_from(logits, best))
    }

    /// The draw, given the index of the largest logit (`argmax`'s).
    fn sample_from(&mut self, logits: &[f32], best: usize) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || logits.is_empty() {
            return best as u32;
        }
        let max = logits[best];
        if !max.is_finite() {
            return best as u32;
        }
        // Weights in f32 (exact enough for a draw, and the pass over the vocabulary is most of
        // the sampler's time), summed in f64.
        let t = p.temperature;
        let weight = |i: usize| f64::from(((logits[i] - max) / t).exp());
        // The candidates (the top k, or every token) with their weights, in id order.
        let ids: Vec<usize> = if p.top_k > 0 && p.top_k < logits.len() {
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.select_nth_unstable_by(p.top_k - 1, |a, b| order(logits, a, b));
            idx.truncate(p.top_k);
            idx.sort_unstable();
            idx
        } else {
            (0..logits.len()).collect()
        };
        let ws_id: Vec<f64> = ids.iter().map(|&i| weight(i)).collect();
        let total: f64 = ws_id.iter().sum();
        let r: f64 = self.rng.random();
        // Sorted, only the candidates of weight ≥ `floor`: every other one weighs less than each
        // of them, so comes after them in the order — enough while their mass covers what the
        // nucleus and the draw need; else the floor is lowered (at 0: every candidate).
        let mut floor = total / 4096.0;
        loop {
            let mut run: Vec<(usize, f64)> = ids
                .iter()
                .zip(&ws_id)
                .filter(|(_, w)| **w >= floor)
                .map(|(&i, &w)| (i, w))
                .collect();
            run.sort_by(|a, b| order(logits, &a.0, &b.0));
            let covered: f64 = run.iter().map(|(_, w)| w).sum();
            let complete = floor == 0.0;
            // The nucleus: the shortest run reaching top_p of the total (all when top_p is 1).
            let (kept, mass) = if p.top_p < 1.0 {
                let goal = f64::from(p.top_p) * total;
                let mut cum = 0.0;
                match run.iter().position(|(_, w)| {
                    cum += w;
                    cum >= goal
                }) {
                    Some(e) => (e + 1, run[..=e].iter().map(|(_, w)| w).sum::<f64>()),
                    None if !complete => {
                        floor = lower(floor);
                        continue;
                    }
                    None => (run.len(), covered),
                }
            } else {
                (run.len(), total)
            };
            let goal = r * mass;
            let mut cum = 0.0;
            for (i, w) in &run[..kept] {
                cum += w;
                if goal < cum {
                    return *i as u32;
                }
            }
            if complete || kept < run.len() || p.top_p < 1.0 {
                // Rounding left the draw past the kept mass: the last kept token.
                return run[kept - 1].0 as u32;
            }
            floor = lower(floor);
        }
    }
}

/// The next weight floor of [`Sampler::sample`]'s walk: 4,096 times lower, then 0.
fn lower(floor: f64) -> f64 {
    if floor < 1e-300 { 0.0 } else { floor / 4096.0 }
}

/// Higher logit first, then lower id: a total order (NaN above everything).
fn order(logits: &[f32], a: &usize, b: &usize) -> std::cmp::Ordering {
    logits[*b].total_cmp(&logits[*a]).then(a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token ids by logit, highest first (ties: lower id first), the best `top_k` only when it is
    /// not 0. The k best are selected before only they are sorted — the order is total, so they
    /// are the full sort's first k in its order.
    fn ranked(logits: &[f32], top_k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        if top_k > 0 && top_k < idx.len() {
            idx.select_nth_unstable_by(top_k - 1, |a, b| order(logits, a, b));
            idx.truncate(top_k);
        }
        idx.sort_by(|a, b| order(logits, a, b));
        idx
    }

    #[test]
    fn ranking_the_top_k_is_the_full_sorts_head() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 613) as f32 / 8.0).floor() - 30.0)
            .chain([f32::NAN, -0.0, 0.0, f32::INFINITY])
            .collect();
        let full = ranked(&logits, 0);
        assert_eq!(full.len(), logits.len());
        for k in [1, 2, 40, 4999, 5003, 5004, 9000] {
            assert_eq!(ranked(&logits, k), full[..k.min(full.len())], "top {k}");
        }
    }

    /// The sampler's rule with every candidate sorted up front: what `sample` must draw, draw
    /// for draw, while sorting only as far as it walks.
    fn sample_by_full_sort(p: &SamplingParams, logits: &[f32], r: f64) -> u32 {
        let all = ranked(logits, p.top_k);
        let max = logits[all[0]];
        let w = |i: usize| f64::from(((logits[i] - max) / p.temperature).exp());
        let mut by_id = all.clone();
        by_id.sort_unstable();
        let total: f64 = by_id.iter().map(|&i| w(i)).sum();
        let ws: Vec<f64> = all.iter().map(|&i| w(i)).collect();
        let (kept, mass) = if p.top_p < 1.0 {
            let mut cum = 0.0;
            let e = ws
                .iter()
                .position(|x| {
                    cum += x;
                    cum >= f64::from(p.top_p) * total
                })
                .unwrap_or(ws.len() - 1);
            (e + 1, ws[..=e].iter().sum::<f64>())
        } else {
            (ws.len(), total)
        };
        let mut cum = 0.0;
        for k in 0..kept {
            cum += ws[k];
            if r * mass < cum {
                return all[k] as u32;
            }
        }
        all[kept - 1] as u32
    }

    #[test]
    fn sampling_walks_only_as_far_as_a_full_sort_would_draw() {
        // A Qwen-sized vocabulary with ties, flat and peaked temperatures, every filter.
        let logits: Vec<f32> = (0..151_936usize)
            .map(|i| ((i * 7919 % 6007) as f32 / 256.0).floor() - 12.0)
            .collect();
        for (temperature, top_p, top_k) in [
            (1.0, 1.0, 0),
            (0.7, 0.8, 0),
            (0.7, 0.8, 20),
            (2.0, 0.95, 0),
            (0.05, 1.0, 0),
            (1.0, 0.3, 5000),
        ] {
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: 11,
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone());
            let mut rng = StdRng::seed_from_u64(11);
            for _ in 0..40 {
                let r: f64 = rng.random();
                let want = sample_by_full_sort(&p, &logits, r);
                assert_eq!(s.sample(&logits), want, "{p:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_picks_a_nan() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            ..Default::default()
        });
        let n = 40_000;
        let mut count = [0usize; 4];
        for _ in 0..n {
            count[s.sample(&logits) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (i, &c) in count.iter().enumerate() {
            let want = f64::from(logits[i]).exp() / z;
            assert!(
                (c as f64 / n as f64 - want).abs() < 0.01,
                "token {i}: {c} of {n}"
            );
        }
        assert_eq!(s.sample(&[0.0, f32::NAN, 1.0]), 1);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]), 1);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let logits = [0.0, 1.0, 1.1, -5.0];
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "only the top-2 are drawn"
        );
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        // token 0 alone has > 50 % of the mass
        for _ in 0..20 {
            assert_eq!(s.sample(&[5.0, 1.0, 1.0, 1.0]), 0);
        }
    }

    #[test]
    fn bad_sampling_params_are_rejected() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top-p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().is_err());
    }
}
