//! Benchmarks run by `moescope bench …` (never timed tests): results go to BENCHMARKS.md.

pub mod decode;
pub mod kld;
pub mod random;
