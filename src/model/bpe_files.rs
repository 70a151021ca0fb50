//! A Qwen tokenizer built from the files a repo ships when it has no `tokenizer.json`:
//! `vocab.json` + `merges.txt`, with the added and special tokens from `tokenizer_config.json`'s
//! `added_tokens_decoder`, `added_tokens.json` and `special_tokens_map.json` (the Omni and VL
//! processor repos look like this).
//!
//! It is the tokenizer transformers' `Qwen2Tokenizer` builds from the same files (its slow → fast
//! conversion): NFC, Qwen's pre-tokenizer split (the GPT-4-style regex, one digit per piece),
//! byte-level BPE without a prefix space, the byte-level decoder. Added tokens keep the ids the
//! files give them; a file that contradicts another about an id is an error naming both, because
//! a shifted id would silently change every prompt.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::error::{ModelError, Result};

/// Qwen2's pre-tokenizer split (from transformers' `Qwen2Converter`; Qwen3 and Qwen3-Omni
/// tokenizers use it unchanged).
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Larger than any real vocabulary file (Qwen's vocab.json is 2.7 MB, merges.txt 1.7 MB); a
/// bigger file is refused before it is read into memory.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// Token attributes as `added_tokens_decoder` writes them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Added {
    pub content: String,
    pub special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub single_word: bool,
}

/// True when `dir` has the files this module builds a tokenizer from.
pub fn present(dir: &Path) -> bool {
    dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file()
}

/// Builds the tokenizer of the repo in `dir` from `vocab.json` + `merges.txt` and its added-token
/// files, and checks every added token ended up with the id the files give it.
pub fn build(dir: &Path) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab = read_vocab(&vocab_path)?;
    let merges = read_merges(&merges_path)?;
    let (mut added, named) = read_added(dir)?;
    mark_named_special(&mut added, &named, &vocab);
    assemble(
        vocab,
        merges,
        added,
        [&vocab_path, &merges_path, dir],
        "vocab.json",
    )
}

/// Qwen2's byte-level BPE tokenizer from a vocabulary, its merges and the added tokens by id
/// (`files`: where the vocabulary, the merges and the whole came from, for errors). Shared
/// with GGUF files, whose metadata carries the same three things.
pub(crate) fn assemble(
    mut vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    added: BTreeMap<u32, Added>,
    files: [&Path; 3],
    vocab_name: &str,
) -> Result<Tokenizer> {
    // Where the vocabulary, the merges and the whole came from (for errors).
    let [vocab_path, merges_path, dir] = files;
    // Byte-level BPE spells every byte of a text as one of 256 characters before it merges
    // anything; a vocabulary without one of them has no id for that byte, and the tokenizer
    // would drop it from prompts without a word (Qwen's vocabularies hold all 256, at ids 0–255).
    let missing: Vec<char> = ByteLevel::alphabet()
        .into_iter()
        .filter(|c| !vocab.contains_key(&c.to_string()))
        .collect();
    if let Some(first) = missing.iter().min() {
        return Err(tok_err(
            vocab_path,
            format!(
                "lacks {} of byte-level BPE's 256 byte characters ({:?} first), so text holding \
                 those bytes could not be tokenized (a token dropped from {vocab_name}?)",
                missing.len(),
                first.to_string()
            ),
        ));
    }
    // Without merges BPE stops at single characters, so every longer token is unreachable and
    // each prompt becomes ids the model never saw in training: an emptied or lost merge list,
    // not a tokenizer anyone ships.
    if merges.is_empty() {
        let longer = vocab.keys().filter(|t| t.chars().nth(1).is_some()).count();
        if longer > 0 {
            return Err(tok_err(
                merges_path,
                format!(
                    "has no merges, but {vocab_name} has {longer} tokens of several characters, \
                     which only merges produce (an emptied or truncated merge list)"
                ),
            ));
        }
    }
    // Added tokens go into the BPE vocabulary at their ids (merges never produce them: they are
    // split off before BPE runs), so ids past vocab.json's and gaps are kept exactly.
    let mut by_id: HashMap<u32, &str> = vocab.iter().map(|(s, &i)| (i, s.as_str())).collect();
    let mut insert = Vec::new();
    for (&id, tok) in &added {
        match vocab.get(&tok.content) {
            Some(&v) if v != id => {
                return Err(tok_err(
                    vocab_path,
                    format!(
                        "gives {:?} id {v}, but the added-token files give it id {id}",
                        tok.content
                    ),
                ));
            }
            Some(_) => {}
            None => {
                if let Some(other) = by_id.get(&id) {
                    return Err(tok_err(
                        vocab_path,
                        format!(
                            "id {id} is {other:?}, but the added-token files give it to {:?}",
                            tok.content
                        ),
                    ));
                }
                by_id.insert(id, &tok.content);
                insert.push((tok.content.clone(), id));
            }
        }
    }
    vocab.extend(insert);

    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .map_err(|e| tok_err(merges_path, format!("does not fit {vocab_name}: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let built = |e: tokenizers::Error| tok_err(dir, format!("building the tokenizer: {e}"));
    tok.with_normalizer(Some(NFC)).map_err(built)?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err(dir, format!("Qwen's split pattern: {e}")))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_post_processor(Some(ByteLevelProcessor::new(false, false, false)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let tokens: Vec<AddedToken> = added
        .values()
        .map(|a| {
            AddedToken::from(a.content.clone(), a.special)
                .lstrip(a.lstrip)
                .rstrip(a.rstrip)
                .normalized(a.normalized)
                .single_word(a.single_word)
        })
        .collect();
    let (special, plain): (Vec<_>, Vec<_>) = tokens.into_iter().partition(|t| t.special);
    tok.add_special_tokens(special).map_err(built)?;
    tok.add_tokens(plain).map_err(built)?;
    for (&id, a) in &added {
        let got = tok.token_to_id(&a.content);
        if got != Some(id) {
            return Err(tok_err(
                dir,
                format!(
                    "added token {:?} should have id {id} but the built tokenizer gives {got:?}",
                    a.content
                ),
            ));
        }
    }
    Ok(tok)
}

/// Special tokens the maps name but no added-token file lists: special at their vocab.json id,
/// or appended after the last id, as transformers adds a special token it does not know.
fn mark_named_special(
    added: &mut BTreeMap<u32, Added>,
    named: &[String],
    vocab: &HashMap<String, u32>,
) {
    for name in named {
        if name.is_empty() || added.values().any(|a| a.content == *name) {
            continue;
        }
        let id = match vocab.get(name) {
            Some(&id) => id,
            None => {
                let last_vocab = vocab.values().copied().max().unwrap_or(0);
                let last_added = added.keys().next_back().copied().unwrap_or(0);
                last_vocab.max(last_added).saturating_add(1)
            }
        };
        // An id another added token holds stays theirs; `build` reports the clash with vocab.json.
        added.entry(id).or_insert(Added {
            content: name.clone(),
            special: true,
            lstrip: false,
            rstrip: false,
            normalized: false,
            single_word: false,
        });
    }
}

fn tok_err(file: &Path, msg: String) -> ModelError {
    ModelError::Tokenizer {
        file: file.to_path_buf(),
        msg,
    }
}

fn read_bounded(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        what: "reading tokenizer file".into(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(tok_err(path, "is not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(tok_err(
            path,
            format!(
                "is {} bytes; a tokenizer file is expected to be under {MAX_FILE_BYTES}",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        what: "reading tokenizer file".into(),
        source: e,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        tok_err(
            path,
            format!("is not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_bounded(path)?)
        .map_err(|e| tok_err(path, format!("not valid JSON: {e}")))
}

fn token_id(v: &Value, path: &Path, what: &str) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            tok_err(
                path,
                format!("{what}: expected a token id (0..2^32), got {v}"),
            )
        })
}

/// `vocab.json`: token → id, every id used once.
fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let v = read_json(path)?;
    let obj = v
        .as_object()
        .ok_or_else(|| tok_err(path, "expected an object of token → id".into()))?;
    let mut vocab = HashMap::with_capacity(obj.len());
    let mut seen: HashMap<u32, &str> = HashMap::with_capacity(obj.len());
    for (tok, id) in obj {
        let id = token_id(id, path, &format!("token {tok:?}"))?;
        if let Some(other) = seen.insert(id, tok) {
            return Err(tok_err(
                path,
                format!("id {id} is given to both {other:?} and {tok:?}"),
            ));
        }
        vocab.insert(tok.clone(), id);
    }
    if vocab.is_empty() {
        return Err(tok_err(path, "has no tokens".into()));
    }
    Ok(vocab)
}

/// `merges.txt` as transformers reads it: an optional `#version` first line, blank lines
/// skipped, then one `left right` pair per line.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = read_bounded(path)?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(tok_err(
                    path,
                    format!(
                        "line {}: expected two tokens separated by a space, got {line:?}",
                        i + 1
                    ),
                ));
            }
        }
    }
    Ok(merges)
}

/// A special-token entry of `special_tokens_map.json` / `tokenizer_config.json`: a string or
/// `{"content": …}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Names of the special tokens the maps declare (bos/eos/unk/pad/… and the additional ones).
fn special_names(map: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let Some(obj) = map.as_object() else {
        return names;
    };
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        if let Some(s) = obj.get(key).and_then(token_content) {
            names.push(s);
        }
    }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(list) = obj.get(key).and_then(Value::as_array) {
            names.extend(list.iter().filter_map(token_content));
        }
    }
    names
}

/// A true/false attribute of an added token (`null` or absent: `default`). Anything else is
/// refused by name: `"lstrip": "x"` is no answer to whether the token strips spaces, and a guess
/// would change how prompts are split.
fn flag(
    o: &serde_json::Map<String, Value>,
    key: &str,
    default: bool,
    path: &Path,
    field: &str,
) -> Result<bool> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(tok_err(
            path,
            format!("field `{field}.{key}` is {other}; expected true or false"),
        )),
    }
}

/// Added tokens by id: `added_tokens_decoder` first (it has every attribute), then
/// `added_tokens.json` (special when a special-token map names it); special tokens named only
/// by the maps come back by name (see [`mark_named_special`]).
fn read_added(dir: &Path) -> Result<(BTreeMap<u32, Added>, Vec<String>)> {
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.is_file() {
        Some(read_json(&cfg_path)?)
    } else {
        None
    };
    let map_path = dir.join("special_tokens_map.json");
    let map = if map_path.is_file() {
        Some(read_json(&map_path)?)
    } else {
        None
    };
    let mut special: Vec<String> = Vec::new();
    for v in [&cfg, &map].into_iter().flatten() {
        special.extend(special_names(v));
    }

    let mut added: BTreeMap<u32, Added> = BTreeMap::new();
    if let Some(dec) = cfg.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
        let obj = dec.as_object().ok_or_else(|| {
            tok_err(
                &cfg_path,
                "field `added_tokens_decoder`: expected an object of id → token".into(),
            )
        })?;
        for (id, entry) in obj {
            let field = format!("added_tokens_decoder.{id}");
            let id: u32 = id.parse().map_err(|_| {
                tok_err(
                    &cfg_path,
                    format!("field `{field}`: the key is not a token id"),
                )
            })?;
            let o = entry.as_object().ok_or_else(|| {
                tok_err(
                    &cfg_path,
                    format!("field `{field}`: expected an object with `content`"),
                )
            })?;
            let content = o
                .get("content")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    tok_err(
                        &cfg_path,
                        format!("field `{field}.content`: expected a non-empty string"),
                    )
                })?
                .to_string();
            let f = |key: &str, default: bool| flag(o, key, default, &cfg_path, &field);
            let is_special = f("special", false)?;
            added.insert(
                id,
                Added {
                    special: is_special,
                    lstrip: f("lstrip", false)?,
                    rstrip: f("rstrip", false)?,
                    normalized: f("normalized", !is_special)?,
                    single_word: f("single_word", false)?,
                    content,
                },
            );
        }
    }

    let file_path = dir.join("added_tokens.json");
    if file_path.is_file() {
        let v = read_json(&file_path)?;
        let obj = v
            .as_object()
            .ok_or_else(|| tok_err(&file_path, "expected an object of token → id".into()))?;
        for (content, id) in obj {
            let id = token_id(id, &file_path, &format!("token {content:?}"))?;
            match added.get(&id) {
                Some(a) if a.content != *content => {
                    return Err(tok_err(
                        &file_path,
                        format!(
                            "gives id {id} to {content:?}, but {} gives it to {:?}",
                            cfg_path.display(),
                            a.content
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    let is_special = special.contains(content);
                    added.insert(
                        id,
                        Added {
                            content: content.clone(),
                            special: is_special,
                            lstrip: false,
                            rstrip: false,
                            normalized: !is_special,
                            single_word: false,
                        },
                    );
                }
            }
        }
    }

    // The same content under two ids cannot be honoured by any tokenizer.
    let mut ids_of: HashMap<&str, u32> = HashMap::new();
    for (&id, a) in &added {
        if let Some(prev) = ids_of.insert(&a.content, id) {
            return Err(tok_err(
                dir,
                format!(
                    "added token {:?} is given two ids, {prev} and {id}",
                    a.content
                ),
            ));
        }
    }
    Ok((added, special))
}
