//! A recording's bytes, then everything a replay computes from it: the reducer, the summary
//! and verdict, the cache study's trace.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moescope::session::{export, record, state::SessionState, study, verdict::Profile};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    let Ok(rec) = record::parse(data, std::path::Path::new("r.ndjson")) else {
        return;
    };
    static PROFILE: OnceLock<Profile> = OnceLock::new();
    let profile = PROFILE.get_or_init(|| Profile::load("relative").unwrap());
    let state = SessionState::replayed(&rec);
    let _ = export::summarize(&state, profile);
    let _ = study::from_state(&state);
});
