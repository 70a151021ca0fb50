//! Shared helpers for integration tests: fixture paths and golden outputs.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const FAMILIES: [&str; 2] = ["qwen3-moe-tiny", "qwen3-omni-tiny"];

#[derive(Debug, Deserialize)]
pub struct Greedy {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    pub margins: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub sequences: Vec<Vec<u32>>,
    pub logits_f32: Vec<Vec<f32>>,
    pub all_logits_f32: Vec<Vec<f32>>,
    pub logits_bf16: Vec<Vec<f32>>,
    pub greedy: Vec<Greedy>,
    pub routing: std::collections::BTreeMap<String, Vec<Vec<u32>>>,
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies a fixture directory into a temp dir so a test can damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Path of the moescope binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moescope"))
}
