//! Errors of the model layer. Every variant that comes from a user's input names the file and the
//! field or tensor it is about, and says what was expected — so `main` can print one line and exit
//! with code 2 (bad input) instead of 1 (a failure of ours).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {}{msg}", file.display(), if field.is_empty() { String::new() } else { format!("field `{field}`: ") })]
    Config {
        file: PathBuf,
        field: String,
        msg: String,
    },

    #[error("{}: {msg}", file.display())]
    Checkpoint { file: PathBuf, msg: String },

    #[error("{}: tensor `{tensor}`: {msg}", file.display())]
    Tensor {
        file: PathBuf,
        tensor: String,
        msg: String,
    },

    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {msg}", file.display())]
    Tokenizer { file: PathBuf, msg: String },

    /// Bad request arguments (token ids out of range, empty prompt, …).
    #[error("{0}")]
    Input(String),

    /// An expert the routing selected is not available (missing from its source).
    #[error("layer {layer}, expert {expert}: {msg}")]
    Expert {
        layer: usize,
        expert: usize,
        msg: String,
    },

    /// The model's outputs are not numbers (NaN or infinite): its weights, or the arithmetic
    /// on them, are broken. The message says "not finite", which the worker treats as fatal.
    #[error("{0}")]
    NotFinite(String),

    #[error("tensor computation failed: {}", candle_msg(.0))]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// True when the error is about the user's input (files, flags), not a bug or resource failure.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, ModelError::Candle(_))
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// A candle error's message without the backtraces candle attaches when RUST_BACKTRACE is set
/// (a one-line error, not a page of frames), its context kept.
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_msg(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_msg(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `RUST_BACKTRACE=1` makes of a candle error: its message, a frame list after it.
    #[test]
    fn candle_errors_print_without_backtraces() {
        let bt = |e: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = bt(candle_core::Error::Msg(
            "moe_gemm only accepts f16/bf16 inputs".into(),
        ));
        assert!(
            e.to_string().lines().count() > 1,
            "the frames are there to strip"
        );
        let e = ModelError::from(bt(bt(e).context("layer 3")));
        assert_eq!(
            e.to_string(),
            "tensor computation failed: layer 3: moe_gemm only accepts f16/bf16 inputs"
        );
    }
}
