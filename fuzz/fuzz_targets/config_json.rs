//! `config.json` (both families, every spelling), then what is sized by it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) =
        moescope::model::config::MoeConfig::from_json_str(text, Path::new("config.json"))
    {
        let _ = cfg.non_expert_params();
        let _ = cfg.fingerprint();
        let _ = moescope::model::checkpoint::Checkpoint::required_tensors(&cfg);
    }
});
