//! The summary of a session — per prompt and overall, per backend: plain serde data, a function
//! of the state alone, so an old recording can be exported or re-judged under another profile.
//! Its formats (JSON with its schema, markdown, the headless table) are in `report/`.

use serde::{Deserialize, Serialize};

use super::event::{AgreementStats, Backend};
use super::metrics::{BackendMetrics, Comparison, backend_metrics, comparison};
use super::quality::{
    Coherence, TokenAgreement, coherence, coherence_pct, token_agreement, token_agreement_on,
};
use super::state::SessionState;
use super::thinking::Part;
use super::verdict::{Profile, Verdict, judge, metric_values};

/// The summary's format name and version, in its `schema` field.
pub const SCHEMA_ID: &str = "moescope-export/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub model: String,
    pub model_type: String,
    pub config_fingerprint: String,
    pub created_utc: String,
    pub tool_version: String,
    pub device: String,
    pub dtype: String,
    pub cache: String,
    pub schedule: String,
    pub prompt_set: String,
    pub profile: String,
    pub host: String,
    pub finished: Option<String>,
    /// The run's settings that differ from the defaults, in words ("" when none do); absent
    /// when the recording does not say (made before settings were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finished: bool,
    pub ttft_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
    pub coherence: Coherence,
    /// A Thinking checkpoint's output in its two parts (absent when it did not reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<ThinkingSummary>,
}

/// Reasoning and answer of one output, each with its own coherence check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThinkingSummary {
    pub thinking_tokens: usize,
    pub answer_tokens: usize,
    pub thinking_text: String,
    pub answer_text: String,
    pub thinking_coherence: Coherence,
    pub answer_coherence: Coherence,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSummary {
    pub index: usize,
    pub id: String,
    pub category: String,
    pub text: String,
    pub max_new_tokens: usize,
    pub native: Option<BackendOutput>,
    pub selective: Option<BackendOutput>,
    pub token_agreement: Option<TokenAgreement>,
    pub distribution_agreement: Option<AgreementStats>,
    /// Token agreement over native's reasoning and over its answer, when it reasoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_agreement: Option<TokenAgreement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_agreement: Option<TokenAgreement>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QualitySummary {
    pub token_agreement_pct: Option<f64>,
    pub top1_agreement_pct: Option<f64>,
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub native_perplexity: Option<f64>,
    pub selective_perplexity: Option<f64>,
    pub perplexity_increase_pct: Option<f64>,
    pub native_coherence_pct: Option<f64>,
    pub selective_coherence_pct: Option<f64>,
    /// Mean same-token share over the reasoning and over the answers of the finished prompts
    /// where native reasoned (absent when no output reasoned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_token_agreement_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_token_agreement_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backends {
    pub native: BackendMetrics,
    pub selective: BackendMetrics,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub schema: String,
    pub session: SessionInfo,
    pub degraded: bool,
    pub backends: Backends,
    pub comparison: Comparison,
    pub quality: QualitySummary,
    pub prompts: Vec<PromptSummary>,
    pub verdict: Verdict,
    pub warnings: Vec<String>,
    /// moescope native checked against a reference implementation on the same weights
    /// (`--reference-impl`); absent when none was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSummary>,
}

/// moescope native against a reference implementation (transformers) on the same weights and
/// the same token ids — a check of moescope itself, apart from the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceSummary {
    pub implementation: Option<String>,
    /// Why it did not run, when it did not.
    pub unavailable: Option<String>,
    pub load_s: Option<f64>,
    /// The reference's own greedy decode speed over all prompts, and its peak memory.
    pub decode_tok_s: Option<f64>,
    pub peak_bytes: Option<u64>,
    pub peak_gpu: Option<u64>,
    /// Teacher-forced on native's tokens: KL(native ‖ reference), mean and max over positions,
    /// and top-1 agreement, %.
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1_agreement_pct: Option<f64>,
    /// True when every KL was over the whole vocabulary (else a lower bound over native's top-K).
    pub exact: bool,
    /// The reference's own greedy tokens against native's: mean % identical over prompts, and
    /// per prompt the first position where they differ (None: identical).
    pub token_agreement_pct: Option<f64>,
    pub first_divergence: Vec<Option<usize>>,
    /// Teacher-forced on native's tokens, (position, MoE layer) pairs where both picked the
    /// same experts, % — and the share of picks in common, % (absent: routing not compared).
    #[serde(default)]
    pub routing_same_pct: Option<f64>,
    #[serde(default)]
    pub routing_shared_pct: Option<f64>,
}

/// The reference check's figures from a session (None when no reference was asked for).
pub fn reference_summary(s: &SessionState) -> Option<ReferenceSummary> {
    let r = s.reference.as_ref()?;
    let done: Vec<(usize, &crate::session::state::ReferencePromptResult)> = r
        .prompts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
        .collect();
    let stats: Vec<&AgreementStats> = done
        .iter()
        .filter_map(|(_, p)| p.agreement.as_ref())
        .filter(|a| a.positions > 0)
        .collect();
    let positions: usize = stats.iter().map(|a| a.positions).sum();
    let weighted = |f: fn(&AgreementStats) -> f64| {
        (positions > 0).then(|| {
            stats.iter().map(|a| f(a) * a.positions as f64).sum::<f64>() / positions as f64
        })
    };
    // Decode speed over all prompts: tokens after the first over their time.
    let (mut toks, mut secs) = (0.0, 0.0);
    for (_, p) in &done {
        if let Some(v) = p.decode_tok_s.filter(|v| *v > 0.0) {
            let n = p.token_ids.len().saturating_sub(1) as f64;
            toks += n;
            secs += n / v;
        }
    }
    let mut routing = crate::session::event::RoutingAgreement::default();
    for (_, p) in &done {
        if let Some(r) = &p.routing {
            routing.merge(r);
        }
    }
    let mut agree = Vec::new();
    let mut first_divergence = Vec::new();
    for (i, p) in &done {
        if let Some(n) = s.backend(Backend::Native).runs[*i].done.as_ref() {
            let a = token_agreement(&n.token_ids, &p.token_ids);
            agree.push(a.identical_pct);
            first_divergence.push(a.first_divergence);
        }
    }
    Some(ReferenceSummary {
        implementation: r.implementation.clone(),
        unavailable: r.unavailable.clone(),
        load_s: r.load_s,
        decode_tok_s: (secs > 0.0).then(|| toks / secs),
        peak_bytes: r.peak_bytes,
        peak_gpu: r.peak_gpu,
        mean_kl: weighted(|a| a.mean_kl),
        max_kl: (!stats.is_empty()).then(|| {
            stats
                .iter()
                .map(|a| a.max_kl)
                .fold(0.0, crate::session::quality::nan_max)
        }),
        top1_agreement_pct: weighted(|a| 100.0 * a.top1_agreement),
        exact: !stats.is_empty() && stats.iter().all(|a| a.exact),
        token_agreement_pct: (!agree.is_empty())
            .then(|| agree.iter().sum::<f64>() / agree.len() as f64),
        first_divergence,
        routing_same_pct: routing.same_pct(),
        routing_shared_pct: routing.shared_pct(),
    })
}

fn output(s: &SessionState, b: Backend, i: usize) -> Option<BackendOutput> {
    let run = s.backend(b).run(i)?;
    let (text, ids) = match &run.done {
        Some(d) => (d.text.clone(), d.token_ids.clone()),
        None => (run.text.clone(), run.tokens.iter().map(|t| t.id).collect()),
    };
    let thinking = run.thinking().map(|t| ThinkingSummary {
        thinking_tokens: t.thinking_tokens,
        answer_tokens: t.answer_tokens,
        thinking_coherence: coherence(&t.thinking_text),
        answer_coherence: coherence(&t.answer_text),
        thinking_text: t.thinking_text,
        answer_text: t.answer_text,
    });
    Some(BackendOutput {
        thinking,
        coherence: coherence(&text),
        text,
        token_ids: ids,
        finished: run.done.is_some(),
        ttft_s: run.ttft(),
        decode_tok_s: run.decode_tok_s(),
    })
}

pub fn summarize(s: &SessionState, profile: &Profile) -> Summary {
    let h = &s.header;
    let prompts: Vec<PromptSummary> = h
        .prompts
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let native = output(s, Backend::Native, i);
            let selective = output(s, Backend::Selective, i);
            let token_agreement = match (&native, &selective) {
                (Some(a), Some(b)) if a.finished && b.finished => {
                    Some(token_agreement(&a.token_ids, &b.token_ids))
                }
                _ => None,
            };
            // Native's parts decide which positions are reasoning (see `session::thinking`).
            let native_parts = s
                .backend(Backend::Native)
                .run(i)
                .filter(|_| native.as_ref().is_some_and(|n| n.thinking.is_some()))
                .map(|r| r.parts());
            let on_part = |part: Part| match (&native_parts, &native, &selective) {
                (Some(parts), Some(a), Some(b)) if a.finished && b.finished => {
                    token_agreement_on(&a.token_ids, &b.token_ids, |k| parts.get(k) == Some(&part))
                }
                _ => None,
            };
            let (thinking_agreement, answer_agreement) =
                (on_part(Part::Thinking), on_part(Part::Answer));
            PromptSummary {
                thinking_agreement,
                answer_agreement,
                index: i,
                id: p.id.clone(),
                category: p.category.clone(),
                text: p.text.clone(),
                max_new_tokens: h.prompts.max_new_tokens_of(i),
                native,
                selective,
                token_agreement,
                distribution_agreement: s.agreement[i].clone(),
            }
        })
        .collect();
    let m = metric_values(s, None);
    let finished_texts = |b: Backend| -> Vec<String> {
        s.backend(b)
            .runs
            .iter()
            .filter_map(|r| r.done.as_ref().map(|d| d.text.clone()))
            .collect()
    };
    let nat_texts = finished_texts(Backend::Native);
    let sel_texts = finished_texts(Backend::Selective);
    let native_coherence_pct = coherence_pct(nat_texts.iter().map(|s| s.as_str()));
    let selective_coherence_pct = coherence_pct(sel_texts.iter().map(|s| s.as_str()));
    let mut cmp = comparison(s);
    cmp.native_coherence_pct = native_coherence_pct;
    cmp.sage_coherence_pct = selective_coherence_pct;
    let mean_pct = |pick: fn(&PromptSummary) -> Option<&TokenAgreement>| {
        let v: Vec<f64> = prompts
            .iter()
            .filter_map(|p| pick(p).map(|a| a.identical_pct))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let thinking_token_agreement_pct = mean_pct(|p| p.thinking_agreement.as_ref());
    let answer_token_agreement_pct = mean_pct(|p| p.answer_agreement.as_ref());
    let quality = QualitySummary {
        thinking_token_agreement_pct,
        answer_token_agreement_pct,
        token_agreement_pct: m.get("token_agreement_pct").copied(),
        top1_agreement_pct: m.get("top1_agreement_pct").copied(),
        mean_kl: m.get("mean_kl").copied(),
        max_kl: m.get("max_kl").copied(),
        native_perplexity: s.backends[0].perplexity.map(|p| p.0),
        selective_perplexity: s.backends[1].perplexity.map(|p| p.0),
        perplexity_increase_pct: m.get("perplexity_increase_pct").copied(),
        native_coherence_pct,
        selective_coherence_pct,
    };
    Summary {
        schema: SCHEMA_ID.into(),
        session: SessionInfo {
            model: h.model.clone(),
            model_type: h.model_type.clone(),
            config_fingerprint: h.config_fingerprint.clone(),
            created_utc: h.created_utc.clone(),
            tool_version: h.tool_version.clone(),
            device: h.device.clone(),
            dtype: h.dtype.clone(),
            cache: h.cache_describe.clone(),
            schedule: h.schedule.name().into(),
            prompt_set: h.prompts.name.clone(),
            profile: profile.name.clone(),
            host: h.host.clone(),
            finished: s.finished.clone(),
            settings: h.settings.as_ref().map(|x| x.describe_changes()),
        },
        degraded: s.degraded(),
        backends: Backends {
            native: backend_metrics(s, Backend::Native),
            selective: backend_metrics(s, Backend::Selective),
        },
        comparison: cmp,
        quality,
        prompts,
        verdict: judge(s, profile),
        warnings: s.warnings.clone(),
        reference: reference_summary(s),
    }
}
