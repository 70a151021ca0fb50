//! A GGUF file's header from arbitrary bytes: parsed, every tensor's extent checked, then the
//! config, the tokenizer + chat template and every expert's location derived from it — all of
//! what `--model file.gguf` does before it reads a weight. Errors are fine; panics, hangs and
//! huge allocations are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moescope::model::gguf::GgufFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(data, Path::new("fuzz.gguf")) else {
        return;
    };
    let _ = g.expert_types();
    let _ = g.tokenizer();
    if let Ok(cfg) = g.config() {
        for layer in cfg.moe_layers().take(4) {
            for e in 0..cfg.num_experts.min(4) {
                let _ = g.expert_location(&cfg, layer, e);
            }
        }
    }
});
