//! The TOML files a user writes: prompt sets, decision profiles, themes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = moescope::session::prompts::PromptSet::parse(text);
    let _ = moescope::session::verdict::Profile::parse(text, "profile.toml");
    for depth in [
        moescope::ui::theme::Depth::TrueColor,
        moescope::ui::theme::Depth::Ansi16,
    ] {
        let _ = moescope::ui::theme::Theme::parse(text, "theme.toml", depth);
    }
});
