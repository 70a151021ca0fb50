//! Routing traces as files (`moescope export --format trace`), read back by
//! `cache::trace::parse`.

use crate::cache::trace::{TRACE_FORMAT, TRACE_VERSION, TraceHeader, TraceInput};

/// Writes a trace file (header + one line per step).
pub fn write_trace(input: &TraceInput, source: &str) -> String {
    let mut pt: Vec<(usize, usize)> = input.prompt_tokens.iter().map(|(a, b)| (*a, *b)).collect();
    pt.sort_unstable();
    let header = TraceHeader {
        format: TRACE_FORMAT.into(),
        version: TRACE_VERSION,
        moe: input.moe.clone(),
        prompt_tokens: pt,
        costs: input.costs,
        source: source.into(),
    };
    let mut out = serde_json::to_string(&header).expect("header serialises");
    out.push('\n');
    for s in &input.steps {
        out.push_str(&serde_json::to_string(s).expect("step serialises"));
        out.push('\n');
    }
    out
}
