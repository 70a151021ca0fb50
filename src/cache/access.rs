//! The request stream a routing trace makes: per forward pass (the whole prompt at once, then
//! one token at a time), per MoE layer in order, each selected expert once, in ascending id —
//! the MoE block's own order, so a replay asks the cache core exactly what the live run asked.
//! With prefetch replayed, each layer's guesses come just before its requests.

use std::collections::HashMap;

use super::stats::PrefetchStats;
use super::trace::TraceStep;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
