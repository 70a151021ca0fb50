//! The bundled model (models/tiny-moe): it loads, its config is what its card says, its tokenizer
//! round-trips, greedy generation is deterministic, and it answers the standard prompts in
//! readable English.

mod common;

use std::path::PathBuf;

use common::*;
use moescope::model::config::{FfnKind, MoeConfig};
use moescope::model::tokenizer::{StreamDecoder, TextTokenizer};

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe")
}

#[test]
fn config_is_a_real_moe() {
    let c = MoeConfig::from_dir(&bundled()).unwrap();
    assert_eq!(c.family.model_type(), "qwen3_moe");
    assert_eq!(c.num_hidden_layers, 6);
    assert_eq!(c.layer_kinds, vec![FfnKind::Moe; 6], "every layer routed");
    assert_eq!((c.num_experts, c.num_experts_per_tok), (32, 4));
    assert!(c.tie_word_embeddings);
    assert!(
        !c.eos_token_ids.is_empty(),
        "generation_config.json gives eos"
    );
    // The fields transformers' save_pretrained writes, which converters (llama.cpp's
    // convert_hf_to_gguf.py among them) dispatch on.
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        raw["architectures"],
        serde_json::json!(["Qwen3MoeForCausalLM"])
    );
    assert_eq!(raw["dtype"], "bfloat16");
    let (rc, out, _) = run(&["verify", bundled().to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("COMPLETE: all 192 experts"));
    let size = std::fs::metadata(bundled().join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size < 20_000_000, "small enough to travel: {size}");
}

#[test]
fn tokenizer_round_trips_and_streams_whole_characters() {
    let tok = TextTokenizer::from_dir(&bundled()).unwrap();
    for text in [
        "The capital of France is Paris.",
        "2 + 2 = 4",
        "café ☕ naïve — ünïcödé",
        "def f(x):\n    return x * 2",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text, "round trip");
        let mut d = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            let piece = d.push(&tok, id);
            assert!(
                !piece.contains('\u{FFFD}'),
                "{text:?}: a piece split a character: {piece:?}"
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&d.finish(&tok));
        assert_eq!(streamed, text);
    }
    let chat = tok
        .prompt_ids("What is a volcano?", Default::default())
        .unwrap();
    let text = tok.decode(&chat);
    assert!(text.contains("What is a volcano?"));
    assert_eq!(
        tok.token_id("<|im_start|>").map(|id| chat.contains(&id)),
        Some(true),
        "chat template applied"
    );
}

#[test]
fn greedy_generation_is_deterministic_and_readable() {
    let prompts = moescope::session::prompts::PromptSet::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("prompts/standard.toml"),
    )
    .unwrap();
    // A small English word list: most words of each answer should be real words.
    let words = include_str!("fixtures/common_words.txt");
    let known: std::collections::HashSet<&str> = words.split_whitespace().collect();
    for p in &prompts.prompts {
        let args = [
            "generate",
            "--prompt",
            p.text.as_str(),
            "--max-new-tokens",
            "40",
            "--json",
        ];
        let (rc, a, err) = run(&args);
        assert_eq!(rc, 0, "{err}");
        let (_, b, _) = run(&args);
        let va: serde_json::Value = serde_json::from_str(&a).unwrap();
        let vb: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            va["generated_token_ids"], vb["generated_token_ids"],
            "greedy is deterministic"
        );
        let text = va["text"].as_str().unwrap();
        assert!(
            moescope::session::quality::coherence(text).coherent,
            "{:?} -> {text:?}",
            p.text
        );
        let toks: Vec<String> = text
            .split(|c: char| !c.is_alphabetic())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect();
        assert!(toks.len() >= 3, "{:?} -> {text:?}", p.text);
        let real = toks.iter().filter(|w| known.contains(w.as_str())).count();
        assert!(
            real * 10 >= toks.len() * 6,
            "{:?} -> {text:?}: only {real} of {} words are common English",
            p.text,
            toks.len()
        );
    }
}

/// `bench kernels` (what `run` does first on a GPU, so the driver's one-off kernel compile is in
/// neither backend's load time) loads both backends on a tiny random checkpoint and decodes;
/// on the CPU it exercises the same path.
#[test]
fn preparing_kernels_runs_both_backends() {
    let (rc, out, err) = common::run(&["bench", "kernels", "--device", "cpu", "--dtype", "f32"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.starts_with("kernels ready on cpu (f32) in "), "{out}");
    let (rc, _, err) = common::run(&["bench", "kernels", "--device", "gpu"]);
    assert_eq!(rc, 2, "a bad device is an input error: {err}");
}
