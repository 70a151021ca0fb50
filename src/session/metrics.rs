//! Numbers derived from a [`SessionState`]: per prompt and per backend timings, memory before /
//! during / after / peak, and the comparison (memory reduction, speed ratio, hit rate).

use serde::{Deserialize, Serialize};

use super::event::Backend;
use super::state::{BackendState, SessionState, TokenRecord};
use crate::step_path::StepPath;

pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q * (v.len() - 1) as f64).round() as usize;
    Some(v[rank.min(v.len() - 1)])
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptMetrics {
    pub prompt: usize,
    pub generated_tokens: usize,
    pub ttft_s: Option<f64>,
    pub prefill_tok_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
    pub token_latency_p50_s: Option<f64>,
    pub token_latency_p95_s: Option<f64>,
    pub finished: bool,
    pub finish: Option<String>,
    pub text: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryMetrics {
    /// Process memory (RSS + GPU) before loading.
    pub before: Option<u64>,
    /// Mean while generating.
    pub during: Option<u64>,
    /// Last sample.
    pub after: Option<u64>,
    /// Largest RSS + GPU sampled.
    pub peak: u64,
    pub peak_rss: u64,
    pub peak_gpu: Option<u64>,
    /// Last sample split by kind.
    pub last_rss_anon: Option<u64>,
    pub last_rss_file: Option<u64>,
    pub gpu_source: Option<String>,
    /// What the backend says it holds (weights): the expected figure for the comparison.
    pub expected_weights: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendMetrics {
    pub backend: String,
    pub status: String,
    pub failed: Option<String>,
    pub degraded: bool,
    pub load_s: Option<f64>,
    pub prompts: Vec<PromptMetrics>,
    pub prompts_done: usize,
    pub generated_tokens: usize,
    /// Decode tokens / decode seconds over all prompts.
    pub decode_tok_s: Option<f64>,
    pub ttft_mean_s: Option<f64>,
    pub token_latency_p50_s: Option<f64>,
    pub token_latency_p95_s: Option<f64>,
    pub memory: MemoryMetrics,
    pub cache_hit_rate: Option<f64>,
    pub cache_hit_rate_per_layer: Vec<Option<f64>>,
    pub perplexity: Option<f64>,
    /// With `--prefetch next-layer`: share of guessed experts that were then needed, and share
    /// of needed experts that had been guessed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_recall: Option<f64>,
    /// Share of guesses dropped because the prefetch thread got to them after their layer had
    /// started (it fell behind the forward pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_late: Option<f64>,
    /// Decode steps by how they ran (see [`StepPath`]); empty when the tokens did not say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_paths: Vec<PathShare>,
}

/// Decode steps that ran one way: how many, and their time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathShare {
    pub path: StepPath,
    pub steps: usize,
    pub seconds: f64,
    /// Mean step time, seconds.
    pub mean_s: f64,
    /// Share of all decode time, %.
    pub time_pct: f64,
}

/// Decode steps grouped by path, in [`StepPath::ALL`] order. Tokens that carry no path (older
/// recordings) are left out; none at all gives an empty list.
pub fn decode_paths<'a>(tokens: impl IntoIterator<Item = &'a TokenRecord>) -> Vec<PathShare> {
    let mut by: std::collections::BTreeMap<StepPath, (usize, f64)> = Default::default();
    let mut total = 0.0;
    for t in tokens.into_iter().filter(|t| !t.prefill) {
        total += t.dt;
        if let Some(p) = t.path {
            let e = by.entry(p).or_default();
            e.0 += 1;
            e.1 += t.dt;
        }
    }
    by.into_iter()
        .map(|(path, (steps, seconds))| PathShare {
            path,
            steps,
            seconds,
            mean_s: seconds / steps as f64,
            // As a ratio first: 100·s/s can round above 100, and a part's float sum can come
            // out an ulp above the whole's.
            time_pct: if total > 0.0 {
                (seconds / total).min(1.0) * 100.0
            } else {
                0.0
            },
        })
        .collect()
}

pub fn backend_metrics(s: &SessionState, b: Backend) -> BackendMetrics {
    let st: &BackendState = s.backend(b);
    let mut prompts = Vec::new();
    let mut all_lat = Vec::new();
    let mut ttfts = Vec::new();
    let mut generated = 0;
    for (i, run) in st.runs.iter().enumerate() {
        if !run.started {
            continue;
        }
        let lat = run.decode_latencies();
        all_lat.extend_from_slice(&lat);
        if let Some(t) = run.ttft() {
            ttfts.push(t);
        }
        generated += run.tokens.len();
        let prefill_tok_s = run
            .ttft()
            .filter(|t| *t > 0.0)
            .map(|t| run.prompt_tokens as f64 / t);
        prompts.push(PromptMetrics {
            prompt: i,
            generated_tokens: run.tokens.len(),
            ttft_s: run.ttft(),
            prefill_tok_s,
            decode_tok_s: run.decode_tok_s(),
            token_latency_p50_s: percentile(&lat, 0.5),
            token_latency_p95_s: percentile(&lat, 0.95),
            finished: run.done.is_some(),
            finish: run
                .done
                .as_ref()
                .map(|d| format!("{:?}", d.finish).to_lowercase()),
            text: run.text.clone(),
        });
    }
    let decode_s: f64 = all_lat.iter().sum();
    let mem = MemoryMetrics {
        before: st.mem_before.as_ref().map(|m| m.total()),
        during: st.mem_during().map(|v| v as u64),
        after: st.mem_last.as_ref().map(|m| m.total()),
        peak: st.mem_peak_total,
        peak_rss: st.mem_peak_rss,
        peak_gpu: st.mem_peak_gpu,
        last_rss_anon: st.mem_last.as_ref().map(|m| m.rss_anon),
        last_rss_file: st.mem_last.as_ref().map(|m| m.rss_file),
        gpu_source: st
            .mem_last
            .as_ref()
            .and_then(|m| m.gpu_source)
            .map(|g| format!("{g:?}")),
        expected_weights: st.resident.as_ref().map(|r| r.expected()),
    };
    let prefetch = st.cache.as_ref().and_then(|c| c.prefetch.as_ref());
    let (hit, per_layer) = match &st.cache {
        Some(c) => (
            c.hit_rate(),
            c.layers.iter().map(|l| l.hit_rate()).collect(),
        ),
        None => (None, Vec::new()),
    };
    BackendMetrics {
        backend: b.name().into(),
        status: match &st.status {
            super::state::Status::Failed(_) => "failed".into(),
            other => format!("{other:?}")
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_lowercase(),
        },
        failed: match &st.status {
            super::state::Status::Failed(r) => Some(r.clone()),
            _ => None,
        },
        degraded: st.degraded,
        load_s: st.load_s,
        prompts_done: st.runs.iter().filter(|r| r.done.is_some()).count(),
        prompts,
        generated_tokens: generated,
        decode_tok_s: (decode_s > 0.0).then(|| all_lat.len() as f64 / decode_s),
        ttft_mean_s: (!ttfts.is_empty()).then(|| ttfts.iter().sum::<f64>() / ttfts.len() as f64),
        token_latency_p50_s: percentile(&all_lat, 0.5),
        token_latency_p95_s: percentile(&all_lat, 0.95),
        memory: mem,
        cache_hit_rate: hit,
        cache_hit_rate_per_layer: per_layer,
        perplexity: st.perplexity.map(|p| p.0),
        prefetch_precision: prefetch.and_then(|p| p.precision()),
        prefetch_recall: prefetch.and_then(|p| p.recall()),
        prefetch_late: prefetch.and_then(|p| p.late_share()),
        decode_paths: decode_paths(st.runs.iter().flat_map(|r| &r.tokens)),
    }
}

/// Selective against native.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// (native peak − selective peak) / native peak × 100, on RSS + GPU.
    pub memory_reduction_pct: Option<f64>,
    /// The same on GPU memory alone, where both backends report it: on a discrete GPU the
    /// memory the cache is for (the RSS then holds what stays on the host, e.g. the expert
    /// files a GPU cache registered for direct copies).
    #[serde(default)]
    pub gpu_memory_reduction_pct: Option<f64>,
    /// selective decode tok/s / native decode tok/s.
    pub speed_ratio: Option<f64>,
    pub native_peak_bytes: u64,
    pub selective_peak_bytes: u64,
    /// Load time of selective / native.
    pub load_time_ratio: Option<f64>,
    /// The earlier project's keys, filled by the quality module.
    pub native_coherence_pct: Option<f64>,
    pub sage_coherence_pct: Option<f64>,
}

pub fn comparison(s: &SessionState) -> Comparison {
    let n = backend_metrics(s, Backend::Native);
    let sel = backend_metrics(s, Backend::Selective);
    let mem = (n.memory.peak > 0 && sel.memory.peak > 0)
        .then(|| (n.memory.peak as f64 - sel.memory.peak as f64) / n.memory.peak as f64 * 100.0);
    let gpu_mem = match (n.memory.peak_gpu, sel.memory.peak_gpu) {
        (Some(a), Some(b)) if a > 0 && b > 0 => Some((a as f64 - b as f64) / a as f64 * 100.0),
        _ => None,
    };
    let speed = match (n.decode_tok_s, sel.decode_tok_s) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    let load = match (n.load_s, sel.load_s) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    Comparison {
        memory_reduction_pct: mem,
        gpu_memory_reduction_pct: gpu_mem,
        speed_ratio: speed,
        native_peak_bytes: n.memory.peak,
        selective_peak_bytes: sel.memory.peak,
        load_time_ratio: load,
        native_coherence_pct: None,
        sage_coherence_pct: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 100.0];
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert_eq!(percentile(&v, 0.95), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    fn tok(dt: f64, prefill: bool, path: Option<StepPath>) -> TokenRecord {
        TokenRecord {
            id: 0,
            text: String::new(),
            dt,
            prefill,
            path,
            loaded: Vec::new(),
            load_us: None,
            position: None,
        }
    }

    #[test]
    fn decode_steps_are_grouped_by_path_with_their_share_of_decode_time() {
        use StepPath::*;
        let toks = [
            tok(9.0, true, Some(Prefill)),
            tok(1.0, false, Some(Graph)),
            tok(1.0, false, Some(Graph)),
            tok(3.0, false, Some(Redone)),
            tok(2.0, false, Some(Piecewise)),
            // A token without a path still counts in the total decode time.
            tok(1.0, false, None),
        ];
        let p = decode_paths(&toks);
        let got: Vec<(StepPath, usize)> = p.iter().map(|x| (x.path, x.steps)).collect();
        assert_eq!(got, [(Graph, 2), (Piecewise, 1), (Redone, 1)]);
        assert_eq!(p[0].mean_s, 1.0);
        assert_eq!(p[2].time_pct, 37.5);
        assert_eq!(
            (p[0].steps, p[0].mean_s, p[0].time_pct),
            (2, 1.0, 25.0),
            "prefill is not a decode step"
        );
        assert!(decode_paths(&[tok(1.0, false, None)]).is_empty());
        // One path: exactly 100 %, whatever the times (100·s/s rounds above 100 for some s).
        for dt in [0.1, 0.7, 1.0 / 3.0, 0.013420691, 2.2e-3] {
            let one: Vec<_> = (0..7).map(|_| tok(dt, false, Some(Graph))).collect();
            assert_eq!(decode_paths(&one)[0].time_pct, 100.0, "{dt}");
        }
    }
}
