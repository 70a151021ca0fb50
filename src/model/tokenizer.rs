//! The checkpoint's tokenizer (`tokenizer.json` through the tokenizers crate, or — for repos that
//! ship none — built from `vocab.json` + `merges.txt`, see [`super::bpe_files`]) with its chat
//! template, and streaming detokenisation that never splits a character.

use std::path::{Path, PathBuf};

use super::chat::{ChatMessage, ChatTemplate};
use super::error::{ModelError, Result};

/// The tokenizer + the chat template.
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    chat: ChatTemplate,
    /// The file the tokenizer came from (`tokenizer.json` or `vocab.json`), for errors.
    path: PathBuf,
}

/// A special token the chat template writes into prompts (`bos_token`, `eos_token` of
/// `config`) must be a token of the tokenizer (`tok`, loaded from `tok_file`). Why at load:
/// otherwise every prompt carries the string's pieces where the model was trained on one token
/// — no error, just worse answers. A value the template never writes is not checked.
fn check_specials_written(
    tok: &tokenizers::Tokenizer,
    chat: &ChatTemplate,
    config: &Path,
    tok_file: &Path,
) -> Result<()> {
    for (field, value) in chat.specials_written() {
        if tok.token_to_id(value).is_none() {
            return Err(ModelError::Tokenizer {
                file: config.to_path_buf(),
                msg: format!(
                    "field `{field}` is {value:?}, which the chat template ({}) writes into \
                     prompts, but it is no token of {}: the model would read its pieces instead",
                    chat.source(),
                    tok_file.display()
                ),
            });
        }
    }
    Ok(())
}

impl TextTokenizer {
    /// `tokenizer.json` when the repo has one (it is what transformers loads first), else the
    /// tokenizer built from `vocab.json` + `merges.txt`.
    /// A GGUF file in place of the directory: the tokenizer and template in its metadata.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if super::gguf::is_gguf(dir) {
            let (tok, chat) = super::gguf::GgufFile::open(dir)?.tokenizer()?;
            return Ok(TextTokenizer {
                tok,
                chat,
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join("tokenizer.json");
        let (tok, path) = if path.exists() {
            let tok =
                tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
                    file: path.clone(),
                    msg: format!("cannot be loaded: {e}"),
                })?;
            (tok, path)
        } else if super::bpe_files::present(dir) {
            (super::bpe_files::build(dir)?, dir.join("vocab.json"))
        } else {
            return Err(ModelError::Tokenizer {
                file: path,
                msg: "missing, and no vocab.json + merges.txt beside it (a tokenizer is needed \
                      for text prompts; --token-ids works without one)"
                    .into(),
            });
        };
        let chat = ChatTemplate::from_dir(dir)?;
        check_specials_written(&tok, &chat, &dir.join("tokenizer_config.json"), &path)?;
        Ok(TextTokenizer { tok, chat, path })
    }

    /// Refuses a tokenizer that can produce an id the model has no embedding row for, naming the
    /// token. Why at load: otherwise such a vocabulary runs until a prompt happens to contain the
    /// token (then "token id … is out of range"), and a run that never meets it reports on a
    /// tokenizer that is not the model's. Real checkpoints pad `vocab_size` past the last id
    /// (Qwen3: 151,669 ids, 151,936 rows), which passes.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let largest = self
            .tok
            .get_vocab(true)
            .into_iter()
            .max_by_key(|&(_, id)| id);
        match largest {
            Some((token, id)) if id as usize >= vocab_size => Err(ModelError::Tokenizer {
                file: self.path.clone(),
                msg: format!(
                    "token {token:?} has id {id}, but the model has {vocab_size} token \
                     embeddings (config vocab_size): the tokenizer is not this model's, or its \
                     ids were changed"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The file the tokenizer was loaded from.
    pub fn source_file(&self) -> &Path {
        &self.path
    }

    /// Where the chat template came from.
    pub fn template_source(&self) -> &str {
        self.chat.source()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Special tokens written by the template (<|im_start|> …) are added tokens and are matched
        // as such; add_special_tokens=false keeps the tokenizer from adding BOS/EOS of its own.
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                file: self.path.clone(),
                msg: format!("encoding failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    /// The text of `ids` with special tokens spelled out (some conversions mark `<think>` special).
    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, false).unwrap_or_default()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.tok.token_to_id(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The chat template rendered over `messages` (see [`ChatTemplate::render`]).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String> {
        self.chat
            .render(messages, add_generation_prompt, enable_thinking)
    }

    /// Token ids of a prompt: the chat template applied to one user turn, or the raw text.
    pub fn prompt_ids(&self, prompt: &str, style: PromptStyle) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(ModelError::Input("the prompt is empty".into()));
        }
        let text = if style.raw {
            prompt.to_string()
        } else {
            self.apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: prompt.into(),
                }],
                true,
                style.enable_thinking,
            )?
        };
        self.encode(&text)
    }
}

pub use crate::prompt_settings::PromptStyle;

/// Turns a growing token sequence into text increments that never split a UTF-8 character:
/// a byte-level BPE token can hold half of a multi-byte character, which decodes to U+FFFD
/// until the next token completes it — so we hold text back while it ends in U+FFFD.
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            new
        } else {
            String::new()
        }
    }

    /// Whatever is still held back at the end of generation (may contain U+FFFD if the model
    /// really produced an incomplete character).
    pub fn finish(&mut self, tok: &TextTokenizer) -> String {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.starts_with(&prefix) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }
}

/// Stop ids: the config's eos ids; if it names none, the tokenizer's end-of-turn tokens.
pub fn stop_ids(cfg_eos: &[u32], tok: Option<&TextTokenizer>) -> Vec<u32> {
    if !cfg_eos.is_empty() {
        return cfg_eos.to_vec();
    }
    tok.map(|t| {
        ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|s| t.token_id(s))
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled model's tokenizer beside a `tokenizer_config.json` holding `config`.
    fn dir_with(config: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            "models/tiny-moe/tokenizer.json",
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&config).unwrap(),
        )
        .unwrap();
        dir
    }

    const EOS_AFTER_ANSWERS: &str = "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' \
        + m['content'] }}{%- if m['role'] == 'assistant' %}{{ eos_token }}{%- else %}\
        {{ '<|im_end|>' }}{%- endif %}{{ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}\
        {{ '<|im_start|>assistant\\n' }}{%- endif %}";

    #[test]
    fn a_special_the_template_writes_must_be_a_token() {
        // Written by the template and no token: refused, naming the file, the field and why.
        for eos in [
            serde_json::json!("<|im_endx|>"),
            serde_json::json!({"content": "<|im_endx|>", "special": true}),
        ] {
            let d = dir_with(serde_json::json!({
                "chat_template": EOS_AFTER_ANSWERS,
                "eos_token": eos,
            }));
            let e = TextTokenizer::from_dir(d.path()).err().expect("refused");
            let text = e.to_string();
            assert!(
                text.contains("tokenizer_config.json")
                    && text.contains("`eos_token`")
                    && text.contains("\"<|im_endx|>\"")
                    && text.contains("no token of"),
                "{text}"
            );
        }
        // A token, it passes; and prompts hold it as one id.
        let d = dir_with(serde_json::json!({
            "chat_template": EOS_AFTER_ANSWERS,
            "eos_token": "<|im_end|>",
        }));
        let t = TextTokenizer::from_dir(d.path()).unwrap();
        let id = t.encode("<|im_end|>").unwrap();
        assert_eq!(id.len(), 1);
        // A BOS written at the start, no token: refused by its own field.
        let d = dir_with(serde_json::json!({
            "chat_template": format!("{{{{ bos_token }}}}{EOS_AFTER_ANSWERS}"),
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
        }));
        let text = TextTokenizer::from_dir(d.path()).err().unwrap().to_string();
        assert!(
            text.contains("`bos_token`") && text.contains("\"<s>\""),
            "{text}"
        );
    }

    #[test]
    fn a_special_the_template_never_writes_is_not_checked() {
        // The bundled template (Qwen's style) writes `<|im_end|>` itself, never `eos_token`:
        // a value that is no token changes nothing a prompt holds, so it loads (as before).
        let bundled: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string("models/tiny-moe/tokenizer_config.json").unwrap(),
        )
        .unwrap();
        let mut config = bundled.clone();
        config["eos_token"] = serde_json::json!("<|im_endx|>");
        config["bos_token"] = serde_json::json!("<s>");
        assert!(TextTokenizer::from_dir(dir_with(config).path()).is_ok());
        // Unset or empty: the template writes nothing for them.
        for v in [serde_json::Value::Null, serde_json::json!("")] {
            let d = dir_with(serde_json::json!({
                "chat_template": EOS_AFTER_ANSWERS,
                "eos_token": v,
            }));
            assert!(TextTokenizer::from_dir(d.path()).is_ok());
        }
    }
}
