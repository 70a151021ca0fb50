//! The summary of a session — per prompt and overall, per backend — as JSON (schema:
//! `src/session/export.schema.json`, checked by a test) or markdown. A function of the state
//! alone, so an old recording can be exported or re-judged under another profile.

use serde::{Deserialize, Serialize};

use super::event::{AgreementStats, Backend};
use super::metrics::{BackendMetrics, Comparison, backend_metrics, comparison, fmt_paths};
use super::quality::{Coherence, TokenAgreement, coherence, coherence_pct, token_agreement};
use super::state::SessionState;
use super::verdict::{Profile, Verdict, judge, metric_values};
use crate::util::fmt_bytes;

pub const SCHEMA_ID: &str = "moescope-export/1";
pub const SCHEMA: &str = include_str!("export.schema.json");

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finished: bool,
    pub ttft_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
    pub coherence: Coherence,
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
}

fn output(s: &SessionState, b: Backend, i: usize) -> Option<BackendOutput> {
    let run = s.backend(b).run(i)?;
    let (text, ids) = match &run.done {
        Some(d) => (d.text.clone(), d.token_ids.clone()),
        None => (run.text.clone(), run.tokens.iter().map(|t| t.id).collect()),
    };
    Some(BackendOutput {
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
            PromptSummary {
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
    let quality = QualitySummary {
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
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn opt_bytes(v: Option<u64>) -> String {
    v.map(fmt_bytes).unwrap_or_else(|| "–".into())
}

/// The side-by-side table printed by headless runs and used in the markdown export.
pub fn table(sum: &Summary) -> String {
    use std::fmt::Write;
    let (n, s) = (&sum.backends.native, &sum.backends.selective);
    let mut o = String::new();
    let row = |o: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(o, "| {name:<32} | {a:>16} | {b:>16} |");
    };
    let _ = writeln!(o, "| {:<32} | {:>16} | {:>16} |", "", "native", "selective");
    let _ = writeln!(
        o,
        "|{}|{}|{}|",
        "-".repeat(34),
        "-".repeat(18),
        "-".repeat(18)
    );
    row(&mut o, "status", n.status.clone(), s.status.clone());
    row(&mut o, "load time (s)", opt(n.load_s, 2), opt(s.load_s, 2));
    row(
        &mut o,
        "prompts done",
        n.prompts_done.to_string(),
        s.prompts_done.to_string(),
    );
    row(
        &mut o,
        "tokens generated",
        n.generated_tokens.to_string(),
        s.generated_tokens.to_string(),
    );
    row(
        &mut o,
        "TTFT mean (s)",
        opt(n.ttft_mean_s, 3),
        opt(s.ttft_mean_s, 3),
    );
    row(
        &mut o,
        "decode tok/s",
        opt(n.decode_tok_s, 2),
        opt(s.decode_tok_s, 2),
    );
    row(
        &mut o,
        "token latency p50 / p95 (ms)",
        format!(
            "{} / {}",
            opt(n.token_latency_p50_s.map(|v| v * 1e3), 1),
            opt(n.token_latency_p95_s.map(|v| v * 1e3), 1)
        ),
        format!(
            "{} / {}",
            opt(s.token_latency_p50_s.map(|v| v * 1e3), 1),
            opt(s.token_latency_p95_s.map(|v| v * 1e3), 1)
        ),
    );
    row(
        &mut o,
        "memory before (RSS+GPU)",
        opt_bytes(n.memory.before),
        opt_bytes(s.memory.before),
    );
    row(
        &mut o,
        "memory during (mean)",
        opt_bytes(n.memory.during),
        opt_bytes(s.memory.during),
    );
    row(
        &mut o,
        "memory after",
        opt_bytes(n.memory.after),
        opt_bytes(s.memory.after),
    );
    row(
        &mut o,
        "memory peak",
        fmt_bytes(n.memory.peak),
        fmt_bytes(s.memory.peak),
    );
    row(
        &mut o,
        "  of which GPU (peak)",
        n.memory
            .peak_gpu
            .map(fmt_bytes)
            .unwrap_or_else(|| "unavailable".into()),
        s.memory
            .peak_gpu
            .map(fmt_bytes)
            .unwrap_or_else(|| "unavailable".into()),
    );
    row(
        &mut o,
        "expected weights",
        opt_bytes(n.memory.expected_weights),
        opt_bytes(s.memory.expected_weights),
    );
    row(
        &mut o,
        "cache hit rate",
        "–".into(),
        opt(s.cache_hit_rate.map(|h| h * 100.0), 1) + " %",
    );
    if s.prefetch_precision.is_some() || s.prefetch_recall.is_some() {
        row(
            &mut o,
            "prefetch precision / recall",
            "–".into(),
            format!(
                "{} / {} %",
                opt(s.prefetch_precision.map(|h| h * 100.0), 1),
                opt(s.prefetch_recall.map(|h| h * 100.0), 1)
            ),
        );
        row(
            &mut o,
            "prefetch guesses too late",
            "–".into(),
            opt(s.prefetch_late.map(|h| h * 100.0), 1) + " %",
        );
    }
    // Only where some step did not run the plain way (a GPU): on the CPU every step is
    // uncaptured, which says nothing.
    let plain = |m: &BackendMetrics| {
        m.decode_paths
            .iter()
            .all(|p| p.path == crate::step_path::StepPath::Uncaptured)
    };
    if !(plain(n) && plain(s)) {
        row(
            &mut o,
            "decode steps by path",
            fmt_paths(&n.decode_paths),
            fmt_paths(&s.decode_paths),
        );
    }
    row(
        &mut o,
        "perplexity (reference text)",
        opt(n.perplexity, 3),
        opt(s.perplexity, 3),
    );
    row(
        &mut o,
        "coherent outputs",
        opt(sum.quality.native_coherence_pct, 0) + " %",
        opt(sum.quality.selective_coherence_pct, 0) + " %",
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "memory reduction {} %{} · speed ratio {} · token agreement {} % · top-1 agreement {} % · mean KL {} · max KL {}",
        opt(sum.comparison.memory_reduction_pct, 1),
        sum.comparison
            .gpu_memory_reduction_pct
            .map(|g| format!(" (GPU {g:.1} %)"))
            .unwrap_or_default(),
        opt(sum.comparison.speed_ratio, 3),
        opt(sum.quality.token_agreement_pct, 1),
        opt(sum.quality.top1_agreement_pct, 1),
        opt(sum.quality.mean_kl, 6),
        opt(sum.quality.max_kl, 6),
    );
    o
}

pub fn markdown(sum: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let si = &sum.session;
    let _ = writeln!(o, "# moescope session: {}", si.model);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{} · {} · {} · {} · cache: {} · schedule {} · prompts: {} · recorded {} on {}",
        si.model_type,
        si.device,
        si.dtype,
        si.config_fingerprint,
        si.cache,
        si.schedule,
        si.prompt_set,
        si.created_utc,
        si.host
    );
    if sum.degraded {
        let _ = writeln!(o, "\n**DEGRADED RUN**: experts were masked out of routing.");
    }
    let _ = writeln!(o, "\n## Verdict\n\n```");
    for l in sum.verdict.render_lines() {
        let _ = writeln!(o, "{l}");
    }
    let _ = writeln!(o, "```\n\n## Backends\n");
    o.push_str(&table(sum));
    let _ = writeln!(o, "\n## Prompts\n");
    let _ = writeln!(
        o,
        "| # | category | prompt | native tok/s | selective tok/s | identical tokens | first divergence | mean KL |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for p in &sum.prompts {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.index + 1,
            p.category,
            p.text.replace('|', "\\|"),
            opt(p.native.as_ref().and_then(|x| x.decode_tok_s), 2),
            opt(p.selective.as_ref().and_then(|x| x.decode_tok_s), 2),
            p.token_agreement
                .as_ref()
                .map(|a| format!("{:.1} %", a.identical_pct))
                .unwrap_or_else(|| "–".into()),
            p.token_agreement
                .as_ref()
                .map(|a| a
                    .first_divergence
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "none".into()))
                .unwrap_or_else(|| "–".into()),
            opt(p.distribution_agreement.as_ref().map(|a| a.mean_kl), 6),
        );
    }
    let _ = writeln!(o, "\n## Sample outputs\n");
    for p in &sum.prompts {
        let _ = writeln!(o, "**{}** ({})\n", p.text, p.category);
        for (name, out) in [("native", &p.native), ("selective", &p.selective)] {
            let text = out
                .as_ref()
                .map(|x| x.text.trim().replace('\n', " "))
                .unwrap_or_else(|| "(not run)".into());
            let _ = writeln!(o, "- {name}: {text}");
        }
        let _ = writeln!(o);
    }
    if !sum.warnings.is_empty() {
        let _ = writeln!(o, "## Warnings\n");
        for w in &sum.warnings {
            let _ = writeln!(o, "- {w}");
        }
    }
    o
}
