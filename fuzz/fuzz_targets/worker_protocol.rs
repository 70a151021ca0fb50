//! Lines on the worker protocol, both ways.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moescope::worker::protocol::{Command, WorkerEvent};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let _ = serde_json::from_str::<Command>(line);
        if let Ok(WorkerEvent::Session(ev)) = serde_json::from_str::<WorkerEvent>(line) {
            let _ = WorkerEvent::may_carry(&ev);
            let _ = ev.for_backend(moescope::session::Backend::Native);
        }
    }
});
