//! The cache core: everything about an expert cache that is not weights — which experts are
//! resident and where, the policies, the speculation gate, statistics, settings, routing traces
//! and the simulator that replays them. No candle and no clap: the live cache
//! (`experts::cache`) and the simulator run the same code, so they agree by construction.

pub mod access;
pub mod policy;
pub mod pool;
pub mod settings;
pub mod sim;
pub mod speculation;
pub mod stats;
pub mod study;
pub mod trace;
