//! How errors leave the program: one line, and an exit code that says whose fault it was.

use crate::model::error::ModelError;

/// Exit code for an error: 2 when the user's input is at fault (a file, a field, a flag), 1 when
/// something else failed.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(m) = cause.downcast_ref::<ModelError>() {
            return if m.is_input_error() { 2 } else { 1 };
        }
        if cause.downcast_ref::<InputError>().is_some() {
            return 2;
        }
    }
    1
}

/// The error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// A bad-input error raised outside the model layer (prompt files, recordings, flags).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Shorthand: `bail_input!("{path}: …")`.
#[macro_export]
macro_rules! bail_input {
    ($($t:tt)*) => {
        return Err(anyhow::Error::new($crate::errors::InputError(format!($($t)*))))
    };
}
