//! Expert sources, the cache and its policies, extraction. No UI.

pub mod provider;
pub mod source;
