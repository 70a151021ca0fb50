//! A session summary as JSON (`moescope export`, the `.summary.json` beside a recording): the
//! serde form of `session::export::Summary`, described by [`SCHEMA`] (checked by a test).

use crate::session::export::Summary;

/// The JSON schema of the summary.
pub const SCHEMA: &str = include_str!("summary.schema.json");

/// The summary as pretty JSON, newline-terminated.
pub fn summary(sum: &Summary) -> String {
    serde_json::to_string_pretty(sum).expect("a summary serialises") + "\n"
}
