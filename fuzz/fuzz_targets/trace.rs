//! A routing trace file, then a small study of it (what `simulate` runs).
#![no_main]
use libfuzzer_sys::fuzz_target;
use moescope::cache::{access, settings::Scope, sim::SimPolicy, study, trace};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = trace::parse(text, std::path::Path::new("t.ndjson")) else {
        return;
    };
    let acc = access::accesses_prefetched(&t.steps, &t.prompt_tokens);
    let total = t.moe.total_experts();
    let layers = t.moe.moe_layers.len();
    for scope in [Scope::Global, Scope::Layer] {
        let _ = study::study(
            &acc,
            total,
            layers,
            &[1, 3],
            &SimPolicy::all(),
            scope,
            t.costs,
        );
    }
});
