//! A safetensors file's bytes: the header length, the JSON header, every entry's bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moescope::model::safetensors_file::parse_header(
        data,
        std::path::Path::new("f.safetensors"),
    );
});
