//! An extraction's `manifest.json`, and its journal's lines.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = moescope::experts::extract::Manifest::parse(text, "manifest.json".into());
    for line in text.lines() {
        let _ = moescope::experts::extract::parse_journal_line(line);
    }
    for line in text.lines() {
        let _ = moescope::experts::extract::confined(line);
    }
});
