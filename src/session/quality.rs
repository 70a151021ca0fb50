//! Quality that rests on a reference: agreement with native (identical tokens, first divergence,
//! teacher-forced KL and top-1 agreement), perplexity on a reference text, and — only for a lone
//! output with no reference — coherence heuristics rebuilt so short correct answers pass.
//!
//! The seed project's heuristic demanded more than 8 words and a unique-word ratio above 0.5, so
//! "The capital of France is Paris." failed. Here length is never a criterion: only signs of
//! broken generation are (replacement characters, character runs, word runs, runaway n-gram
//! repetition, text that is mostly not language, case-flipping gibberish).

use serde::{Deserialize, Serialize};

use super::event::AgreementStats;

/// Token-level agreement of selective's output with native's for one prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenAgreement {
    /// Positions compared (native's length).
    pub compared: usize,
    /// % of native's positions where selective produced the same token.
    pub identical_pct: f64,
    /// First position where they differ (None: identical, including length).
    pub first_divergence: Option<usize>,
}

pub fn token_agreement(native: &[u32], selective: &[u32]) -> TokenAgreement {
    let n = native.len();
    let same = native.iter().zip(selective).filter(|(a, b)| a == b).count();
    let first = native.iter().zip(selective).position(|(a, b)| a != b).or(
        if native.len() != selective.len() {
            Some(native.len().min(selective.len()))
        } else {
            None
        },
    );
    TokenAgreement {
        compared: n,
        identical_pct: if n == 0 {
            if selective.is_empty() { 100.0 } else { 0.0 }
        } else {
            100.0 * same as f64 / n as f64
        },
        first_divergence: first,
    }
}

/// Token agreement over the positions of native's output that `keep` selects — its reasoning or
/// its answer: % of them where selective wrote the same token, and the first that differs (a
/// position selective never reached counts as differing). None when `keep` selects none.
pub fn token_agreement_on(
    native: &[u32],
    selective: &[u32],
    keep: impl Fn(usize) -> bool,
) -> Option<TokenAgreement> {
    let kept: Vec<usize> = (0..native.len()).filter(|&i| keep(i)).collect();
    if kept.is_empty() {
        return None;
    }
    let differs = |i: usize| selective.get(i) != Some(&native[i]);
    let same = kept.iter().filter(|&&i| !differs(i)).count();
    Some(TokenAgreement {
        compared: kept.len(),
        identical_pct: 100.0 * same as f64 / kept.len() as f64,
        first_divergence: kept.iter().copied().find(|&i| differs(i)),
    })
}

/// KL(P ‖ Q) from log-probabilities of P and Q on the same token ids (P's support, or the whole
/// vocabulary). Mass outside those ids is lumped into one "rest" outcome on each side, which
/// makes the result exact for the full vocabulary and a lower bound otherwise.
pub fn kl_on_support(p_logp: &[f32], q_logp: &[f32]) -> f64 {
    // A NaN log-probability is a broken forward pass, not agreement: the KL is NaN then (the
    // clamp at the end would otherwise turn it into a perfect 0).
    if p_logp.iter().chain(q_logp).any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let mut kl = 0.0f64;
    let (mut p_mass, mut q_mass) = (0.0f64, 0.0f64);
    for (&lp, &lq) in p_logp.iter().zip(q_logp) {
        let p = (lp as f64).exp();
        let q = (lq as f64).exp();
        p_mass += p;
        q_mass += q;
        if p > 0.0 {
            kl += p * (lp as f64 - lq as f64);
        }
    }
    let p_rest = (1.0 - p_mass).max(0.0);
    let q_rest = (1.0 - q_mass).max(1e-30);
    if p_rest > 1e-12 {
        kl += p_rest * (p_rest / q_rest).ln();
    }
    kl.max(0.0)
}

/// Log-probabilities at one scored position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
    /// The most likely token at this position.
    pub top1: u32,
}

/// KL(native ‖ selective), mean and max over positions, and top-1 agreement.
pub fn agreement(native: &[ScoreRow], selective: &[ScoreRow], full_vocab: bool) -> AgreementStats {
    let n = native.len().min(selective.len());
    if n == 0 {
        return AgreementStats::default();
    }
    let mut sum = 0.0;
    let mut max: f64 = 0.0;
    let mut top1 = 0usize;
    for (a, b) in native.iter().zip(selective).take(n) {
        let kl = kl_on_support(&a.logp, &b.logp);
        sum += kl;
        max = nan_max(max, kl);
        if a.top1 == b.top1 {
            top1 += 1;
        }
    }
    AgreementStats {
        positions: n,
        mean_kl: sum / n as f64,
        max_kl: max,
        top1_agreement: top1 as f64 / n as f64,
        exact: full_vocab,
    }
}

/// One candidate next token: its id, probability and text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    pub id: u32,
    pub p: f32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

/// At one position of native's output (teacher-forced): each backend's most likely next
/// tokens and KL(native ‖ selective) there. Selective's are ranked within native's support;
/// empty when they are native's exactly (the usual case: it keeps recordings small).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionDetail {
    pub native: Vec<Alternative>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selective: Vec<Alternative>,
    pub kl: f64,
}

impl PositionDetail {
    /// Selective's top tokens (native's when recorded as the same).
    pub fn selective(&self) -> &[Alternative] {
        if self.selective.is_empty() {
            &self.native
        } else {
            &self.selective
        }
    }
}

fn top(ids: &[u32], logp: &[f32], k: usize) -> Vec<Alternative> {
    let mut v: Vec<(u32, f32)> = ids.iter().copied().zip(logp.iter().copied()).collect();
    // NaN-aware: a NaN ranks last rather than scrambling the order.
    v.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or_else(|| a.1.is_nan().cmp(&b.1.is_nan()))
    });
    v.into_iter()
        .take(k)
        .map(|(id, lp)| Alternative {
            id,
            // Four decimals are what the inspector shows; more only lengthen the recording.
            p: (lp.exp() * 1e4).round() / 1e4,
            text: String::new(),
        })
        .collect()
}

/// Per position, both backends' `k` most likely tokens and the KL — what the token inspector
/// shows; kept to `k` per side so recordings stay small.
pub fn position_details(
    native: &[ScoreRow],
    selective: &[ScoreRow],
    k: usize,
) -> Vec<PositionDetail> {
    native
        .iter()
        .zip(selective)
        .map(|(a, b)| {
            let native = top(&a.ids, &a.logp, k);
            let selective = top(&b.ids, &b.logp, k);
            PositionDetail {
                selective: if selective == native {
                    Vec::new()
                } else {
                    selective
                },
                native,
                kl: kl_on_support(&a.logp, &b.logp),
            }
        })
        .collect()
}

/// The larger of two values, NaN if either is (`f64::max` would drop a NaN silently).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

pub fn perplexity(nll_sum: f64, tokens: usize) -> f64 {
    if tokens == 0 {
        f64::NAN
    } else {
        (nll_sum / tokens as f64).exp()
    }
}

/// The verdict of the heuristics on one output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coherence {
    pub coherent: bool,
    /// 0–100: 100 minus penalties.
    pub score: f64,
    /// Why it lost points (empty when clean).
    pub problems: Vec<String>,
}

/// Heuristic coherence of a single output (used only when there is no reference to compare with).
pub fn coherence(text: &str) -> Coherence {
    let mut problems = Vec::new();
    let mut score: f64 = 100.0;
    let mut fatal = false;
    let t = text.trim();
    if t.is_empty() {
        return Coherence {
            coherent: false,
            score: 0.0,
            problems: vec!["empty output".into()],
        };
    }
    let chars: Vec<char> = t.chars().collect();

    let replacement = chars.iter().filter(|&&c| c == '\u{FFFD}').count();
    if replacement > 0 {
        fatal = true;
        score -= 50.0;
        problems.push(format!(
            "{replacement} replacement character(s) (broken UTF-8)"
        ));
    }

    // Longest run of one character (case-insensitive, ignoring spaces between): "rRRrR…".
    let mut longest = 1;
    let mut run = 1;
    let mut prev: Option<char> = None;
    for &c in chars.iter().filter(|c| !c.is_whitespace()) {
        let c = c.to_lowercase().next().unwrap_or(c);
        if Some(c) == prev && c.is_alphanumeric() {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 1;
        }
        prev = Some(c);
    }
    if longest >= 6 {
        fatal = true;
        score -= 40.0;
        problems.push(format!("a character repeated {longest} times in a row"));
    }

    let words: Vec<String> = t
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();

    // The same word many times in a row: "a a a a".
    let mut wrun = 1;
    let mut wlongest = 1;
    for pair in words.windows(2) {
        if pair[0] == pair[1] {
            wrun += 1;
            wlongest = wlongest.max(wrun);
        } else {
            wrun = 1;
        }
    }
    if wlongest >= 4 {
        fatal = true;
        score -= 40.0;
        problems.push(format!("a word repeated {wlongest} times in a row"));
    }

    // Runaway repetition: most word 3-grams already seen earlier in the text.
    if words.len() >= 12 {
        let grams: Vec<(&str, &str, &str)> = words
            .windows(3)
            .map(|w| (w[0].as_str(), w[1].as_str(), w[2].as_str()))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let repeated = grams.iter().filter(|g| !seen.insert(**g)).count();
        let frac = repeated as f64 / grams.len() as f64;
        if frac > 0.5 {
            fatal = true;
            score -= 40.0;
            problems.push(format!(
                "{:.0} % of word trigrams repeat earlier ones",
                frac * 100.0
            ));
        } else if frac > 0.3 {
            score -= 15.0;
            problems.push(format!(
                "{:.0} % of word trigrams repeat (repetitive)",
                frac * 100.0
            ));
        }
    }

    // Character classes: language is mostly letters, digits, spaces and ordinary punctuation.
    let ordinary = chars
        .iter()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || ".,;:!?'\"()-+=*/%&".contains(**c))
        .count();
    let ordinary_frac = ordinary as f64 / chars.len() as f64;
    let alnum = chars.iter().filter(|c| c.is_alphanumeric()).count();
    if ordinary_frac < 0.8 || alnum == 0 {
        fatal = true;
        score -= 40.0;
        problems.push(format!(
            "only {:.0} % ordinary characters (letters, digits, spaces, punctuation)",
            ordinary_frac * 100.0
        ));
    }

    // Case flipping inside words ("rRrRr", "hElLo"): natural words change case at most once.
    let flippy = t
        .split_whitespace()
        .filter(|w| {
            let letters: Vec<bool> = w
                .chars()
                .filter(|c| c.is_alphabetic())
                .map(|c| c.is_uppercase())
                .collect();
            letters.windows(2).filter(|p| p[0] != p[1]).count() >= 3
        })
        .count();
    let nwords = t.split_whitespace().count().max(1);
    if flippy > 0 && flippy * 5 >= nwords {
        fatal = true;
        score -= 30.0;
        problems.push(format!("{flippy} word(s) flip case repeatedly"));
    }

    Coherence {
        coherent: !fatal,
        score: score.max(0.0),
        problems,
    }
}

/// % of outputs that are coherent.
pub fn coherence_pct<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<f64> {
    let v: Vec<bool> = texts.into_iter().map(|t| coherence(t).coherent).collect();
    (!v.is_empty()).then(|| 100.0 * v.iter().filter(|&&c| c).count() as f64 / v.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_correct_answers_are_coherent() {
        for ok in [
            "Paris.",
            "2 + 2 = 4",
            "The capital of France is Paris.",
            "4",
            "Yes.",
            "A cache is a small fast memory that keeps recently used data close to the processor.",
            "x = [1, 2, 3]",
            "Café au lait, s'il vous plaît.",
        ] {
            let c = coherence(ok);
            assert!(c.coherent, "{ok:?} judged incoherent: {:?}", c.problems);
            assert_eq!(c.score, 100.0, "{ok:?}: {:?}", c.problems);
        }
    }

    #[test]
    fn broken_generation_is_not() {
        for bad in [
            "rRRrRrRRrrRRrR",
            "a a a a a a a a",
            "the the the the cat",
            "\u{FFFD}\u{FFFD}lit\u{FFFD}l=\u{FFFD}",
            "",
            "   ",
            "#### ### ## #### ###",
            "hElLoW wOrLd hElLoW",
            "the cat sat on the mat the cat sat on the mat the cat sat on the mat the cat sat on the mat",
            "}{}{}{}{}{}{}{}{",
        ] {
            assert!(!coherence(bad).coherent, "{bad:?} judged coherent");
        }
    }

    #[test]
    fn token_agreement_on_a_part_counts_only_its_positions() {
        // Native reasons over 0..3 and answers over 3..5; selective differs at 1 and stops at 4.
        let native = [1, 2, 3, 4, 5];
        let selective = [1, 9, 3, 4];
        let thinking = token_agreement_on(&native, &selective, |i| i < 3).unwrap();
        assert_eq!(thinking.compared, 3);
        assert!((thinking.identical_pct - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(thinking.first_divergence, Some(1));
        let answer = token_agreement_on(&native, &selective, |i| i >= 3).unwrap();
        assert_eq!((answer.compared, answer.identical_pct), (2, 50.0));
        assert_eq!(answer.first_divergence, Some(4));
        assert_eq!(token_agreement_on(&native, &selective, |_| false), None);
    }

    #[test]
    fn token_agreement_counts() {
        let a = token_agreement(&[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(a.identical_pct, 100.0);
        assert_eq!(a.first_divergence, None);
        let a = token_agreement(&[1, 2, 3, 4], &[1, 9, 3, 4]);
        assert_eq!(a.identical_pct, 75.0);
        assert_eq!(a.first_divergence, Some(1));
        let a = token_agreement(&[1, 2], &[1, 2, 3]);
        assert_eq!(a.first_divergence, Some(2), "length differs");
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|x| x.ln()).collect();
        assert!(kl_on_support(&p, &p).abs() < 1e-9);
        let q: Vec<f32> = [0.1f32, 0.2, 0.7].iter().map(|x| x.ln()).collect();
        let kl = kl_on_support(&p, &q);
        let want = 0.7 * (0.7f64 / 0.1).ln() + 0.1 * (0.1f64 / 0.7).ln();
        assert!((kl - want).abs() < 1e-5, "{kl} vs {want}");
        // Partial support: the rest is lumped (a lower bound).
        let kl_part = kl_on_support(&p[..1], &q[..1]);
        assert!(kl_part > 0.0 && kl_part <= kl + 1e-9);
    }

    #[test]
    fn perplexity_of_uniform_is_vocab() {
        let v = 50.0f64;
        assert!((perplexity(10.0 * v.ln(), 10) - v).abs() < 1e-9);
    }

    #[test]
    fn position_details_rank_top_tokens_and_record_identical_sides_once() {
        let lp = |v: &[f32]| v.iter().map(|p| p.ln()).collect::<Vec<f32>>();
        let row = |ids: &[u32], p: &[f32]| ScoreRow {
            ids: ids.to_vec(),
            logp: lp(p),
            top1: ids[0],
        };
        let native = [
            row(&[4, 9, 2], &[0.2, 0.7, 0.1]),
            row(&[1, 2, 3], &[0.5, 0.3, 0.2]),
        ];
        let mut odd = row(&[4, 9, 2], &[0.6, 0.3, 0.1]);
        odd.logp[2] = f32::NAN;
        let selective = [odd, row(&[1, 2, 3], &[0.5, 0.3, 0.2])];
        let d = position_details(&native, &selective, 2);
        // Ranked by probability, k kept, four decimals.
        let ids = |a: &[Alternative]| a.iter().map(|x| (x.id, x.p)).collect::<Vec<_>>();
        assert_eq!(ids(&d[0].native), [(9, 0.7), (4, 0.2)]);
        // A NaN ranks last instead of scrambling the order.
        assert_eq!(ids(d[0].selective()), [(4, 0.6), (9, 0.3)]);
        assert!(d[0].kl.is_nan(), "a NaN is not agreement");
        // Identical sides: selective's list is left out and read as native's.
        assert!(d[1].selective.is_empty());
        assert_eq!(d[1].selective(), d[1].native.as_slice());
        assert_eq!(d[1].kl, 0.0);
    }

    #[test]
    fn a_nan_is_never_agreement() {
        let good = ScoreRow {
            ids: vec![0, 1],
            logp: vec![0.5f32.ln(), 0.5f32.ln()],
            top1: 0,
        };
        let broken = ScoreRow {
            logp: vec![f32::NAN, 0.5f32.ln()],
            ..good.clone()
        };
        assert!(kl_on_support(&good.logp, &broken.logp).is_nan());
        let a = agreement(&[good.clone(), good.clone()], &[good.clone(), broken], true);
        assert!(a.mean_kl.is_nan() && a.max_kl.is_nan(), "{a:?}");
        assert!(nan_max(0.0, f64::NAN).is_nan() && nan_max(f64::NAN, 1.0).is_nan());
        assert_eq!(nan_max(1.0, 2.0), 2.0);
    }
}
