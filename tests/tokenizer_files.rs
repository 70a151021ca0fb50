//! Repos without `tokenizer.json`: the tokenizer moescope builds from `vocab.json` +
//! `merges.txt` gives the ids and text transformers gives (fixture made by
//! scripts/make_tokenizer_fixture.py), and the ids and text of the bundled model's own
//! `tokenizer.json` when that is split into the same files.

use std::path::{Path, PathBuf};

use moescope::model::bpe_files;
use moescope::model::tokenizer::TextTokenizer;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/tokenizer-vocab")
}

/// Texts with Unicode, digits, code, whitespace runs and every special token of the bundled
/// model.
const TEXTS: &[&str] = &[
    "Hello world! The capital of France is Paris.",
    "café ☕ naïve — ünïcödé, 東京タワー, ١٢٣, emoji 🙂👍🏽 e\u{301} (combining)",
    "Numbers 12345, 3.14159 and 1,000,000; dates 2026-11-30.",
    "fn main() {\n    let x = vec![1, 2, 3]; // sum\n\tprintln!(\"{}\", x.iter().sum::<i32>());\r\n}\n\n\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<|im_end|>",
    "   leading, trailing   \u{a0}nbsp\u{200b}zero-width",
    "I'm sure they'll say it's WE'RE and you've",
    "",
];

#[test]
fn fixture_matches_transformers_slow_to_fast_conversion() {
    let dir = fixture();
    assert!(!dir.join("tokenizer.json").exists());
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tok = bpe_files::build(&dir).unwrap();
    let text_tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(text_tok.source_file(), dir.join("vocab.json"));
    assert_eq!(
        tok.get_vocab_size(true) as u64,
        expected["vocab_size"].as_u64().unwrap()
    );
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = text_tok.encode(text).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        assert_eq!(
            text_tok.decode(&got),
            case["decoded"].as_str().unwrap(),
            "decoded (special tokens skipped) of {text:?}"
        );
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded_with_special"].as_str().unwrap(),
            "decoded with special tokens of {text:?}"
        );
    }
}

/// Writes `tokenizer.json`'s BPE model as vocab.json + merges.txt and its added tokens as
/// `added_tokens_decoder`, the way a repo without tokenizer.json ships them.
fn split_tokenizer_json(src: &Path, dst: &Path) {
    let t: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let model = &t["model"];
    std::fs::write(dst.join("vocab.json"), model["vocab"].to_string()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for m in model["merges"].as_array().unwrap() {
        match m {
            Value::String(s) => merges.push_str(s),
            Value::Array(pair) => {
                merges.push_str(pair[0].as_str().unwrap());
                merges.push(' ');
                merges.push_str(pair[1].as_str().unwrap());
            }
            other => panic!("merge {other}"),
        }
        merges.push('\n');
    }
    std::fs::write(dst.join("merges.txt"), merges).unwrap();
    let mut decoder = serde_json::Map::new();
    for a in t["added_tokens"].as_array().unwrap() {
        decoder.insert(
            a["id"].to_string(),
            json!({"content": a["content"], "special": a["special"], "lstrip": a["lstrip"],
                   "rstrip": a["rstrip"], "normalized": a["normalized"],
                   "single_word": a["single_word"]}),
        );
    }
    std::fs::write(
        dst.join("tokenizer_config.json"),
        json!({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
               "added_tokens_decoder": decoder})
        .to_string(),
    )
    .unwrap();
}

#[test]
fn bundled_model_vocab_and_merges_match_its_tokenizer_json() {
    let model = root().join("models/tiny-moe");
    let dir = tempfile::tempdir().unwrap();
    split_tokenizer_json(&model.join("tokenizer.json"), dir.path());
    let from_json = TextTokenizer::from_dir(&model).unwrap();
    let from_files = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(from_files.source_file(), dir.path().join("vocab.json"));
    assert_eq!(from_json.vocab_size(), from_files.vocab_size());
    let raw_json = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let raw_files = bpe_files::build(dir.path()).unwrap();
    for text in TEXTS {
        let a = from_json.encode(text).unwrap();
        let b = from_files.encode(text).unwrap();
        assert_eq!(a, b, "ids of {text:?}");
        assert_eq!(
            from_json.decode(&a),
            from_files.decode(&b),
            "text of {text:?}"
        );
        assert_eq!(
            raw_json.decode(&a, false).unwrap(),
            raw_files.decode(&b, false).unwrap(),
            "text with special tokens of {text:?}"
        );
    }
    // Every token decodes alike, one at a time (the streaming path decodes short runs).
    for id in 0..from_json.vocab_size() as u32 {
        assert_eq!(
            raw_json.decode(&[id], false).unwrap(),
            raw_files.decode(&[id], false).unwrap(),
            "token {id}"
        );
    }
}

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Older saves have no `added_tokens_decoder`: ids come from added_tokens.json and special-ness
/// from special_tokens_map.json — the tokenizer must come out the same.
#[test]
fn older_layout_without_added_tokens_decoder_builds_the_same_tokenizer() {
    let dir = copy_fixture();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v.as_object_mut().unwrap().remove("added_tokens_decoder");
    });
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(serde_json::to_value(&ids).unwrap(), case["ids"], "{text:?}");
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap());
    }
}

fn build_err(dir: &Path) -> String {
    match TextTokenizer::from_dir(dir) {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn contradicting_or_broken_files_are_refused_with_the_file_named() {
    // added_tokens.json moves <think> to another id than added_tokens_decoder gives it.
    let dir = copy_fixture();
    edit_json(&dir.path().join("added_tokens.json"), |v| {
        v["<think>"] = json!(4097);
    });
    let e = build_err(dir.path());
    assert!(e.contains("added_tokens.json") && e.contains("4097"), "{e}");

    // The decoder gives a vocab.json token another id (added_tokens.json, which would object
    // first, removed).
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("added_tokens.json")).unwrap();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["added_tokens_decoder"]["4099"]["content"] = json!("is");
    });
    let e = build_err(dir.path());
    assert!(e.contains("vocab.json") && e.contains("\"is\""), "{e}");

    // Two tokens with one id in vocab.json.
    let dir = copy_fixture();
    edit_json(&dir.path().join("vocab.json"), |v| {
        v["zzz-duplicate"] = json!(5);
    });
    let e = build_err(dir.path());
    assert!(e.contains("vocab.json") && e.contains("id 5"), "{e}");

    // A merge line with three parts, and a merge of tokens vocab.json lacks.
    let dir = copy_fixture();
    let merges = dir.path().join("merges.txt");
    let text = std::fs::read_to_string(&merges).unwrap();
    std::fs::write(&merges, format!("{text}a b c\n")).unwrap();
    let e = build_err(dir.path());
    assert!(e.contains("merges.txt") && e.contains("line"), "{e}");
    std::fs::write(&merges, format!("{text}ZZZ QQQ\n")).unwrap();
    let e = build_err(dir.path());
    assert!(e.contains("merges.txt"), "{e}");
    // One of the 256 byte characters dropped from vocab.json: that byte has no id.
    let dir2 = copy_fixture();
    edit_json(&dir2.path().join("vocab.json"), |v| {
        v.as_object_mut().unwrap().remove("D").unwrap();
    });
    let e = build_err(dir2.path());
    assert!(e.contains("vocab.json") && e.contains("\"D\""), "{e}");
    // No merges at all (the header alone, or nothing): every token longer than a character
    // would be unreachable.
    for empty in ["#version: 0.2\n", ""] {
        std::fs::write(&merges, empty).unwrap();
        let e = build_err(dir.path());
        assert!(e.contains("merges.txt") && e.contains("no merges"), "{e}");
    }

    // Not JSON, a negative id, and a decoder entry without content.
    let dir = copy_fixture();
    std::fs::write(dir.path().join("vocab.json"), "{\"a\": 1,").unwrap();
    let e = build_err(dir.path());
    assert!(e.contains("vocab.json") && e.contains("JSON"), "{e}");
    let dir = copy_fixture();
    edit_json(&dir.path().join("vocab.json"), |v| v["a"] = json!(-1));
    assert!(build_err(dir.path()).contains("token id"));
    let dir = copy_fixture();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["added_tokens_decoder"]["4096"] = json!({"special": true});
    });
    let e = build_err(dir.path());
    assert!(e.contains("added_tokens_decoder.4096.content"), "{e}");

    // An added token's flag that is not true or false (null is the default, as HF writes it).
    for bad in [json!("x"), json!(1), json!({})] {
        let dir = copy_fixture();
        edit_json(&dir.path().join("tokenizer_config.json"), |v| {
            v["added_tokens_decoder"]["4096"]["lstrip"] = bad.clone();
        });
        let e = build_err(dir.path());
        assert!(
            e.contains("tokenizer_config.json")
                && e.contains("added_tokens_decoder.4096.lstrip")
                && e.contains("expected true or false"),
            "{e}"
        );
    }
    let dir = copy_fixture();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["added_tokens_decoder"]["4096"]["lstrip"] = Value::Null;
    });
    TextTokenizer::from_dir(dir.path()).unwrap();

    // Neither tokenizer.json nor vocab.json + merges.txt.
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
    let e = build_err(dir.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("merges.txt"),
        "{e}"
    );
}

/// A tokenizer whose ids go past the model's embeddings is refused when the model is loaded,
/// naming the file and the token — not when a prompt happens to contain that token.
#[test]
fn ids_past_the_models_embeddings_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let src = root().join("tests/fixtures/qwen3-moe-tiny");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "golden.json" {
            std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
        }
    }
    split_tokenizer_json(&model.join("tokenizer.json"), &model);
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let cli = |extra: &[&str]| {
        let mut args = vec![extra[0], "--model", model.to_str().unwrap()];
        args.extend_from_slice(&extra[1..]);
        std::process::Command::new(env!("CARGO_BIN_EXE_moescope"))
            .args(&args)
            .output()
            .unwrap()
    };
    // The split layout runs as it is.
    let ok = cli(&[
        "generate",
        "--prompt",
        "hello there",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A token the prompt never uses moved past vocab_size (384): refused all the same, for text
    // prompts, for id prompts (which print the tokenizer's text) and by `run` before it starts
    // its workers.
    edit_json(&model.join("vocab.json"), |v| v["ex"] = json!(1u64 << 30));
    for extra in [
        &[
            "generate",
            "--prompt",
            "hello there",
            "--max-new-tokens",
            "2",
        ][..],
        &["generate", "--token-ids", "1", "2", "--max-new-tokens", "2"][..],
        &[
            "run",
            "--no-tui",
            "--prompt",
            "hello there",
            "--max-new-tokens",
            "2",
        ][..],
    ] {
        let out = cli(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("vocab.json") && err.contains("\"ex\"") && err.contains("384"),
            "{err}"
        );
    }
}
