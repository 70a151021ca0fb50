//! Reasoning and answer in a generated output. Qwen3 and Qwen3-Omni "Thinking" checkpoints write
//! `<think>…</think>` before the answer; the newer ones' chat templates open the block in the
//! prompt (the generation prompt ends with `<think>\n`), so the output holds only the closing tag.
//! Qwen's own parsing rule covers both: everything up to the end of the first `</think>` is
//! reasoning. Split on text, not token ids, so tokenizers that spell the tags in several tokens
//! (vocabularies without them as added tokens) are split the same way.

use serde::{Deserialize, Serialize};

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// Which part of the output a generated token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Inside the reasoning block, its tags included.
    Thinking,
    Answer,
}

/// The parts of each token of one output, in order. `opens_thinking`: the prompt ended inside an
/// open `<think>` block. While the block is still open (no `</think>` yet), the tokens after its
/// start are reasoning; with no tag at all and a prompt that did not open one, all are answer.
pub fn split<'a>(texts: impl IntoIterator<Item = &'a str>, opens_thinking: bool) -> Vec<Part> {
    let mut ends = Vec::new();
    let mut all = String::new();
    for t in texts {
        all.push_str(t);
        ends.push(all.len());
    }
    let open = all.find(OPEN);
    let close = all.find(CLOSE);
    // Byte range of the reasoning, tags included.
    let range = match (open, close) {
        // `</think>` closes the block opened before it — by a tag in the output, or else by the
        // prompt or, as Qwen parses it, at the start.
        (Some(o), Some(c)) if o < c => Some(o..c + CLOSE.len()),
        (_, Some(c)) => Some(0..c + CLOSE.len()),
        (Some(o), None) => Some(if opens_thinking { 0 } else { o }..usize::MAX),
        (None, None) if opens_thinking => Some(0..usize::MAX),
        (None, None) => None,
    };
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let (s, e) = (start, end);
            start = end;
            match &range {
                // A token overlapping the range (or an empty token inside it) is reasoning.
                Some(r) if (s < r.end && e > r.start) || (s == e && r.contains(&s)) => {
                    Part::Thinking
                }
                _ => Part::Answer,
            }
        })
        .collect()
}

/// Reasoning tokens, and the answer's text with the reasoning cut out (what a reader of the
/// answer sees, and what the coherence checks judge).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Thinking {
    pub thinking_tokens: usize,
    pub answer_tokens: usize,
    /// The reasoning's text without its tags.
    pub thinking_text: String,
    pub answer_text: String,
}

impl Thinking {
    /// The parts of `texts` summed up; None when the output has no reasoning at all.
    pub fn of(texts: &[&str], opens_thinking: bool) -> Option<Thinking> {
        let parts = split(texts.iter().copied(), opens_thinking);
        if !parts.contains(&Part::Thinking) {
            return None;
        }
        let mut t = Thinking::default();
        for (text, part) in texts.iter().zip(&parts) {
            match part {
                Part::Thinking => {
                    t.thinking_tokens += 1;
                    t.thinking_text.push_str(text);
                }
                Part::Answer => {
                    t.answer_tokens += 1;
                    t.answer_text.push_str(text);
                }
            }
        }
        t.thinking_text = t
            .thinking_text
            .replacen(OPEN, "", 1)
            .replacen(CLOSE, "", 1)
            .trim()
            .to_string();
        t.answer_text = t.answer_text.trim_start().to_string();
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Part::{Answer as A, Thinking as T};

    #[test]
    fn a_block_in_the_output_is_reasoning_tags_included() {
        let toks = [
            "<think>", "\n", "Paris", " is", "</think>", "\n\n", "Paris", ".",
        ];
        assert_eq!(split(toks, false), [T, T, T, T, T, A, A, A]);
        let t = Thinking::of(&toks, false).unwrap();
        assert_eq!((t.thinking_tokens, t.answer_tokens), (5, 3));
        assert_eq!(t.thinking_text, "Paris is");
        assert_eq!(t.answer_text, "Paris.");
    }

    #[test]
    fn a_block_the_prompt_opened_ends_at_the_closing_tag() {
        let toks = ["Let", " me", " think", "</think>", "\n\n", "Yes"];
        assert_eq!(split(toks, true), [T, T, T, T, A, A]);
        // Qwen's rule: a closing tag alone means everything before it was reasoning.
        assert_eq!(split(toks, false), [T, T, T, T, A, A]);
    }

    #[test]
    fn an_open_block_runs_to_the_end_while_generating() {
        assert_eq!(split(["Hi", "<think>", "hmm"], false), [A, T, T]);
        assert_eq!(split(["hmm", "so"], true), [T, T]);
    }

    #[test]
    fn no_tag_and_no_open_block_is_all_answer() {
        assert_eq!(split(["The", " sea"], false), [A, A]);
        assert_eq!(Thinking::of(&["The", " sea"], false), None);
        assert_eq!(split([], true), Vec::<Part>::new());
    }

    #[test]
    fn tags_spelled_in_several_tokens_split_the_same_way() {
        let toks = ["<", "think", ">", "a", "</", "think", ">", "b"];
        assert_eq!(split(toks, false), [T, T, T, T, T, T, T, A]);
        // A token that straddles the end of the closing tag belongs to the reasoning.
        assert_eq!(split(["<think>x</thi", "nk>\nb", "c"], false), [T, T, A]);
    }

    #[test]
    fn an_empty_block_is_reasoning_of_its_tags_only() {
        // What Qwen3 writes with enable_thinking=false when the template does not add it.
        let toks = ["<think>", "\n\n", "</think>", "\n\n", "Hello"];
        let t = Thinking::of(&toks, false).unwrap();
        assert_eq!((t.thinking_tokens, t.answer_tokens), (3, 2));
        assert_eq!(t.thinking_text, "");
        assert_eq!(t.answer_text, "Hello");
    }
}
