//! `model.safetensors.index.json`: the weight map (no shard is opened).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = moescope::model::checkpoint::Checkpoint::from_index_text(
            Path::new("/nonexistent-model"),
            Path::new("model.safetensors.index.json"),
            text,
        );
    }
});
