//! What a worker computes besides generating: a prompt's token ids, teacher-forced
//! log-probabilities on another backend's tokens (for KL and top-1 agreement), and perplexity.

use super::super::protocol::{PromptInput, Support};
use super::Loaded;
use crate::model::ports::NoObserver;
use crate::model::qwen3_moe::Logits;
use crate::model::tokenizer::PromptStyle;
use crate::session::quality::ScoreRow;

pub(super) fn prompt_ids(st: &Loaded, input: PromptInput) -> Result<Vec<u32>, String> {
    let ids = match input {
        PromptInput::Tokens { ids } => ids,
        PromptInput::Text {
            text,
            raw,
            enable_thinking,
        } => match &st.tokenizer {
            Some(t) => t
                .prompt_ids(
                    &text,
                    PromptStyle {
                        raw,
                        enable_thinking,
                    },
                )
                .map_err(|e| e.to_string())?,
            None => {
                return Err(
                    "text prompt, but the model has no tokenizer (tokenizer.json or vocab.json \
                     + merges.txt)"
                        .into(),
                );
            }
        },
    };
    if ids.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    Ok(ids)
}

/// Whether the prompt ends inside an open `<think>` block — a Thinking checkpoint's template
/// opens it in the generation prompt — so the output starts with reasoning.
pub(super) fn opens_thinking(st: &Loaded, ids: &[u32]) -> bool {
    use crate::session::thinking::{CLOSE, OPEN};
    let Some(t) = &st.tokenizer else {
        return false;
    };
    let text = t.decode_with_special(&ids[ids.len().saturating_sub(16)..]);
    match (text.rfind(OPEN), text.rfind(CLOSE)) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Teacher-forced log-softmax rows for positions from..from+count.
pub(super) fn score(
    st: &mut Loaded,
    ids: &[u32],
    from: usize,
    count: usize,
    support: &Support,
) -> Result<(Vec<ScoreRow>, bool), String> {
    score_rows(&st.engine, ids, from, count, support, &mut NoObserver)
}

/// [`score`] on any loaded engine, its routing told to `observer` (the reference worker
/// reports it).
pub(super) fn score_rows(
    engine: &crate::engine::Engine,
    ids: &[u32],
    from: usize,
    count: usize,
    support: &Support,
    observer: &mut dyn crate::model::ports::RoutingObserver,
) -> Result<(Vec<ScoreRow>, bool), String> {
    if count == 0 {
        return Ok((Vec::new(), true));
    }
    if from + count > ids.len() {
        return Err(format!(
            "score: positions {from}..{} beyond the {} tokens given",
            from + count,
            ids.len()
        ));
    }
    let vocab = engine.cfg.vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "score: token id {bad} is outside this model's vocabulary of {vocab}"
        ));
    }
    let model = &engine.model;
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            &ids[..from + count],
            &mut cache,
            engine.provider.as_ref(),
            observer,
            Logits::All,
        )
        .map_err(|e| e.to_string())?;
    let rows: Vec<Vec<f32>> = logits
        .narrow(0, from, count)
        .and_then(|t| t.to_vec2())
        .map_err(|e| e.to_string())?;
    let vocab = rows[0].len();
    let mut full = true;
    let out = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + r.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            let top1 = crate::model::layers::argmax(r) as u32;
            let ids: Vec<u32> = match support {
                Support::TopK(k) if *k >= vocab => (0..vocab as u32).collect(),
                Support::TopK(k) => {
                    full = false;
                    let mut idx: Vec<u32> = (0..vocab as u32).collect();
                    idx.select_nth_unstable_by(*k, |a, b| {
                        r[*b as usize].total_cmp(&r[*a as usize])
                    });
                    idx.truncate(*k);
                    idx
                }
                Support::Ids(v) => {
                    let ids = v.get(i).cloned().unwrap_or_default();
                    full &= ids.len() >= vocab;
                    ids
                }
            };
            let logp = ids
                .iter()
                .map(|&t| {
                    r.get(t as usize)
                        .map(|v| v - lse)
                        .unwrap_or(f32::NEG_INFINITY)
                })
                .collect();
            ScoreRow { ids, logp, top1 }
        })
        .collect();
    Ok((out, full))
}

/// Perplexity of the first `max_tokens` tokens of `text` (raw, no chat template).
pub(super) fn perplexity(
    st: &mut Loaded,
    text: &str,
    max_tokens: usize,
) -> Result<(f64, usize), String> {
    let tok = st
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer.json; perplexity needs one")?;
    let mut ids = tok.encode(text).map_err(|e| e.to_string())?;
    ids.truncate(max_tokens.max(2));
    if ids.len() < 2 {
        return Err("the reference text has fewer than 2 tokens".into());
    }
    let model = &st.engine.model;
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            &ids,
            &mut cache,
            st.engine.provider.as_ref(),
            &mut NoObserver,
            Logits::All,
        )
        .map_err(|e| e.to_string())?;
    let rows: Vec<Vec<f32>> = logits.to_vec2().map_err(|e| e.to_string())?;
    let mut nll = 0.0f64;
    for (i, r) in rows.iter().enumerate().take(ids.len() - 1) {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64 + r.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln();
        nll += lse - r[ids[i + 1] as usize] as f64;
    }
    let n = ids.len() - 1;
    Ok((crate::session::quality::perplexity(nll, n), n))
}
