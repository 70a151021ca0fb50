//! `tokenizer_config.json` and its chat template, rendered (bounded by fuel).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            moescope::model::chat::ChatTemplate::from_config_text(text, "tokenizer_config.json");
    }
});
