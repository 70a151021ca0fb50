//! moescope: run a Mixture-of-Experts model two ways — every weight resident (*native*) or experts
//! loaded on demand through a bounded cache (*selective*) — and compare them honestly.

pub mod bench;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod engine;
pub mod errors;
pub mod experts;
pub mod headless;
pub mod live;
pub mod model;
pub mod prompt_settings;
pub mod report;
pub mod session;
pub mod settings;
pub mod step_path;
pub mod ui;
pub mod util;
pub mod worker;
