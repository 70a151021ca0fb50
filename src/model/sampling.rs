//! Picking the next token: greedy, or seeded sampling with temperature, top-k and top-p.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result};
use super::layers::argmax;

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

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let mut idx = ranked(logits, p.top_k);
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                cum += x;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (k, &x) in probs.iter().enumerate() {
            cum += x;
            if r < cum {
                return idx[k] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

/// Token ids by logit, highest first (ties: lower id first), the best `top_k` only when it is
/// not 0. The k best are selected before only they are sorted — the order is total, so they
/// are the full sort's first k in its order (a full sort of 151,936 logits took milliseconds a
/// token).
fn ranked(logits: &[f32], top_k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if top_k > 0 && top_k < idx.len() {
        idx.select_nth_unstable_by(top_k - 1, order);
        idx.truncate(top_k);
    }
    idx.sort_by(order);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

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
