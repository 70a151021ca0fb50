//! The session layer: events, the pure reducer, recording and replay, derived metrics, quality,
//! verdict and export. It knows no model (candle) and no terminal (ratatui).

pub mod event;
pub mod export;
pub mod metrics;
pub mod prompts;
pub mod quality;
pub mod record;
pub mod state;
pub mod study;
pub mod thinking;
pub mod verdict;

pub use event::{Backend, SessionEvent, Stamped};
pub use state::SessionState;
