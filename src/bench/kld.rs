//! moescope against llama.cpp on the same GGUF file, position by position: reads the logits
//! file `llama-perplexity --kl-divergence-base FILE` writes (llama.cpp's own log-probabilities
//! for every chunk of a text), runs the same token chunks through moescope, and reports what
//! `llama-perplexity --kl-divergence` would: mean and max KL(llama.cpp ‖ moescope) and how often
//! the most likely token is the same.
//!
//! The file (tools/perplexity/perplexity.cpp): `_logits_`, n_ctx, n_vocab, n_chunk (i32 each),
//! the n_chunk × n_ctx tokens (i32), then per chunk and per scored position (the second half of
//! the chunk but its last) `2·⌈n_vocab/2⌉ + 4` u16: two f32 (scale, min_log_prob) and each
//! token's log-probability quantised to 16 bits above min_log_prob.

use std::path::Path;

use crate::bench::decode::Reference;
use crate::engine::Engine;
use crate::model::error::{ModelError, Result};
use crate::model::ports::NoObserver;
use crate::model::qwen3_moe::Logits;

/// What the file holds.
#[derive(Debug, Clone)]
pub struct BaseLogits {
    pub n_ctx: usize,
    pub n_vocab: usize,
    /// Token chunks, each n_ctx long.
    pub chunks: Vec<Vec<u32>>,
    /// Per chunk, per scored position: the reference's log-probabilities.
    records: Records,
}

#[derive(Debug, Clone)]
enum Records {
    /// As llama-perplexity writes them: 16-bit quantised above a minimum, with a scale.
    Llama(Vec<Vec<u16>>),
    /// Computed here by another model (f32, the scored positions' vocab-long rows).
    Exact(Vec<Vec<f32>>),
}

impl BaseLogits {
    /// The position a chunk's scoring starts at (llama-perplexity scores the second half).
    pub fn first(&self) -> usize {
        self.n_ctx / 2
    }

    fn scored(&self) -> usize {
        self.n_ctx - 1 - self.first()
    }

    fn stride(&self) -> usize {
        2 * self.n_vocab.div_ceil(2) + 4
    }

    /// The reference's log-probabilities at scored position `i` of chunk `c`.
    pub fn log_probs(&self, c: usize, i: usize) -> Vec<f32> {
        let records = match &self.records {
            Records::Exact(rows) => {
                let v = self.n_vocab;
                return rows[c][i * v..(i + 1) * v].to_vec();
            }
            Records::Llama(records) => records,
        };
        let r = &records[c][i * self.stride()..(i + 1) * self.stride()];
        let f = |k: usize| f32::from_le_bytes(bytemuck_pair(r[2 * k], r[2 * k + 1]));
        let (scale, min_log_prob) = (f(0), f(1));
        r[4..4 + self.n_vocab]
            .iter()
            .map(|&q| min_log_prob + scale * q as f32)
            .collect()
    }

    pub fn read(path: &Path) -> Result<Self> {
        let err = |msg: String| ModelError::Checkpoint {
            file: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            what: "reading the llama.cpp logits file".into(),
            source: e,
        })?;
        if bytes.len() < 20 || &bytes[..8] != b"_logits_" {
            return Err(err(
                "not a llama-perplexity logits file (expected `_logits_` and three counts)".into(),
            ));
        }
        let i32_at = |at: usize| i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let (n_ctx, n_vocab, n_chunk) = (i32_at(8), i32_at(12), i32_at(16));
        if n_ctx < 4 || n_vocab < 1 || n_chunk < 1 {
            return Err(err(format!(
                "n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}: expected n_ctx ≥ 4 and \
                 at least one token and one chunk"
            )));
        }
        let (n_ctx, n_vocab, n_chunk) = (n_ctx as usize, n_vocab as usize, n_chunk as usize);
        let mut me = BaseLogits {
            n_ctx,
            n_vocab,
            chunks: Vec::new(),
            records: Records::Llama(Vec::new()),
        };
        let mut records = Vec::new();
        let tokens_end = (n_chunk as u64 * n_ctx as u64)
            .checked_mul(4)
            .and_then(|t| t.checked_add(20))
            .filter(|&e| e <= bytes.len() as u64)
            .ok_or_else(|| {
                err(format!(
                    "{n_chunk} chunks of {n_ctx} tokens do not fit the file"
                ))
            })? as usize;
        let per_chunk = (me.scored() as u64) * me.stride() as u64 * 2;
        let need = tokens_end as u64 + per_chunk * n_chunk as u64;
        if need != bytes.len() as u64 {
            return Err(err(format!(
                "{} bytes, but {n_chunk} chunks of {n_ctx} tokens over {n_vocab} tokens make {need}",
                bytes.len()
            )));
        }
        for c in 0..n_chunk {
            let chunk: Vec<u32> = (0..n_ctx)
                .map(|k| i32_at(20 + 4 * (c * n_ctx + k)))
                .map(|t| u32::try_from(t).map_err(|_| err(format!("token id {t} in chunk {c}"))))
                .collect::<Result<_>>()?;
            me.chunks.push(chunk);
            let at = tokens_end + c * per_chunk as usize;
            let rec = bytes[at..at + per_chunk as usize]
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            records.push(rec);
        }
        me.records = Records::Llama(records);
        Ok(me)
    }

    /// The reference computed by moescope itself on another model (say a quantized file's own
    /// bf16 weights): `tokens` cut into chunks of `n_ctx` (the tail that fills no chunk is left
    /// out), each run from an empty KV cache, the second half of each chunk scored — the
    /// positions llama-perplexity scores.
    pub fn from_engine(engine: &Engine, tokens: &[u32], n_ctx: usize) -> Result<Self> {
        let v = engine.cfg.vocab_size;
        Self::from_scored_rows(tokens, n_ctx, v, |chunk, first| {
            let all = chunk_logits(engine, chunk)?;
            Ok((first..chunk.len() - 1)
                .map(|pos| all[pos * v..(pos + 1) * v].to_vec())
                .collect())
        })
    }

    /// The reference computed by candle-transformers' own model of the same file
    /// (`qwen3_moe` over safetensors, `quantized_qwen3_moe` over GGUF): each chunk from an
    /// empty KV cache, its first half as one prompt (whose last position is the first scored),
    /// then one token at a time — candle's models return the last position's logits only.
    pub fn from_candle(
        reference: &mut Reference,
        tokens: &[u32],
        n_ctx: usize,
        n_vocab: usize,
    ) -> Result<Self> {
        Self::from_scored_rows(tokens, n_ctx, n_vocab, |chunk, first| {
            reference.scored_logits(chunk, first)
        })
    }

    /// Chunks of `tokens` and, per chunk, the log-probabilities of the rows `scored_logits`
    /// gives for its scored positions (`first .. n_ctx - 1`).
    fn from_scored_rows(
        tokens: &[u32],
        n_ctx: usize,
        n_vocab: usize,
        mut scored_logits: impl FnMut(&[u32], usize) -> Result<Vec<Vec<f32>>>,
    ) -> Result<Self> {
        if n_ctx < 4 || tokens.len() < n_ctx {
            return Err(ModelError::Input(format!(
                "{} tokens cannot make a chunk of {n_ctx} (need n_ctx ≥ 4 and at least one chunk)",
                tokens.len()
            )));
        }
        let mut me = BaseLogits {
            n_ctx,
            n_vocab,
            chunks: tokens.chunks_exact(n_ctx).map(<[u32]>::to_vec).collect(),
            records: Records::Exact(Vec::new()),
        };
        let mut rows = Vec::with_capacity(me.chunks.len());
        for chunk in &me.chunks {
            let logits = scored_logits(chunk, me.first())?;
            if logits.len() != me.scored() || logits.iter().any(|r| r.len() != n_vocab) {
                return Err(ModelError::Input(format!(
                    "the reference gave {} rows for {} scored positions over {n_vocab} tokens",
                    logits.len(),
                    me.scored()
                )));
            }
            let mut row = Vec::with_capacity(me.scored() * n_vocab);
            for r in &logits {
                row.extend(log_softmax(r).iter().map(|&x| x as f32));
            }
            rows.push(row);
        }
        me.records = Records::Exact(rows);
        Ok(me)
    }
}

/// Every position's logits of one chunk, from an empty KV cache.
fn chunk_logits(engine: &Engine, chunk: &[u32]) -> Result<Vec<f32>> {
    let mut cache = engine.model.new_cache();
    let logits = engine.model.forward(
        chunk,
        &mut cache,
        engine.provider.as_ref(),
        &mut NoObserver,
        Logits::All,
    )?;
    Ok(logits.flatten_all()?.to_vec1()?)
}

fn bytemuck_pair(lo: u16, hi: u16) -> [u8; 4] {
    let (a, b) = (lo.to_le_bytes(), hi.to_le_bytes());
    [a[0], a[1], b[0], b[1]]
}

/// The comparison's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Kld {
    pub positions: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    /// KL's 99th percentile.
    pub p99_kl: f64,
    pub top1_agreement_pct: f64,
    /// The largest |Δ log p| over the tokens the reference gives at least
    /// [`LIKELY`](Self::LIKELY) — how close the two are where it matters, in nats.
    pub max_likely_log_prob_diff: f64,
}

impl Kld {
    pub const LIKELY: f64 = 1e-3;
}

/// Runs every chunk through `engine` (a fresh KV cache each, as llama-perplexity does) and
/// compares its distributions with llama.cpp's at the scored positions.
pub fn compare(engine: &Engine, base: &BaseLogits) -> Result<Kld> {
    if base.n_vocab != engine.cfg.vocab_size {
        return Err(ModelError::Input(format!(
            "the logits file is over {} tokens, the model's vocabulary has {}",
            base.n_vocab, engine.cfg.vocab_size
        )));
    }
    let mut kls = Vec::new();
    let mut same = 0usize;
    let mut max_diff = 0f64;
    let likely = Kld::LIKELY.ln();
    for (c, chunk) in base.chunks.iter().enumerate() {
        let all = chunk_logits(engine, chunk)?;
        let v = base.n_vocab;
        for i in 0..base.scored() {
            let pos = base.first() + i;
            let ours = log_softmax(&all[pos * v..(pos + 1) * v]);
            let theirs = base.log_probs(c, i);
            let kl: f64 = theirs
                .iter()
                .zip(&ours)
                .map(|(&t, &o)| {
                    let p = (t as f64).exp();
                    p * (t as f64 - o)
                })
                .sum();
            kls.push(kl);
            for (&t, &o) in theirs.iter().zip(&ours) {
                if t as f64 >= likely {
                    max_diff = crate::session::quality::nan_max(max_diff, (t as f64 - o).abs());
                }
            }
            if argmax(&theirs) == argmax_f64(&ours) {
                same += 1;
            }
        }
    }
    let n = kls.len();
    let mut sorted = kls.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Kld {
        positions: n,
        mean_kl: kls.iter().sum::<f64>() / n.max(1) as f64,
        max_kl: kls.iter().fold(f64::NEG_INFINITY, |m, &k| {
            crate::session::quality::nan_max(m, k)
        }),
        p99_kl: sorted
            .get(((n as f64) * 0.99).ceil() as usize)
            .or(sorted.last())
            .copied()
            .unwrap_or(f64::NAN),
        top1_agreement_pct: 100.0 * same as f64 / n.max(1) as f64,
        max_likely_log_prob_diff: max_diff,
    })
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len())
        .max_by(|&i, &j| x[i].total_cmp(&x[j]))
        .unwrap_or(0)
}

fn argmax_f64(x: &[f64]) -> usize {
    (0..x.len())
        .max_by(|&i, &j| x[i].total_cmp(&x[j]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file as llama-perplexity writes it, for one chunk of 4 tokens over 3 tokens.
    fn file(scale: f32, min: f32, qs: &[[u16; 3]]) -> Vec<u8> {
        let mut b = b"_logits_".to_vec();
        for v in [4i32, 3, 1, 5, 6, 7, 8] {
            b.extend(v.to_le_bytes());
        }
        for q in qs {
            b.extend(scale.to_le_bytes());
            b.extend(min.to_le_bytes());
            for x in q {
                b.extend(x.to_le_bytes());
            }
            b.extend(0u16.to_le_bytes()); // padding to an even count
        }
        b
    }

    #[test]
    fn reads_llama_perplexity_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.bin");
        // n_ctx 4: scored positions 2 only (first = 2, the last is not scored).
        std::fs::write(&p, file(0.5, -3.0, &[[0, 4, 6]])).unwrap();
        let b = BaseLogits::read(&p).unwrap();
        assert_eq!(b.chunks, vec![vec![5, 6, 7, 8]]);
        assert_eq!(b.log_probs(0, 0), vec![-3.0, -1.0, 0.0]);
    }

    #[test]
    fn damaged_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.bin");
        let mut f = file(0.5, -3.0, &[[0, 4, 6]]);
        f.pop();
        std::fs::write(&p, &f).unwrap();
        let e = BaseLogits::read(&p).unwrap_err().to_string();
        assert!(e.contains("base.bin") && e.contains("make"), "{e}");
        std::fs::write(&p, b"_logits_\xff\xff\xff\x7f\x01\0\0\0\xff\xff\xff\x7f").unwrap();
        let e = BaseLogits::read(&p).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        std::fs::write(&p, b"GGUF").unwrap();
        assert!(BaseLogits::read(&p).is_err());
    }
}
