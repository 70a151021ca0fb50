//! A Qwen repo's tokenizer files without `tokenizer.json` (`model::bpe_files::build`):
//! `vocab.json`, `merges.txt`, `tokenizer_config.json`, `added_tokens.json` and
//! `special_tokens_map.json`, cut from the input at 0xFF bytes (never in UTF-8 text; a part
//! left out is a file the repo does not have). A tokenizer that builds then encodes and decodes
//! a chat turn.
#![no_main]
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
];

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("moescope-fuzz-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, part) in FILES.iter().zip(data.split(|&b| b == 0xFF)) {
        std::fs::write(dir.join(name), part).unwrap();
    }
    if let Ok(tok) = moescope::model::bpe_files::build(&dir) {
        let text = "<|im_start|>user\nHello, wörld! 12345 \u{1F600}\r\n<|im_end|>";
        if let Ok(enc) = tok.encode(text, false) {
            let _ = tok.decode(enc.get_ids(), false);
        }
    }
});
