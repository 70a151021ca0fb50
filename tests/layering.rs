//! The architecture, checked rather than hoped for: every top-level module of `src/` sits on a
//! layer and may use only the layers below it; the cache core and the session layer know no
//! candle, clap or terminal; only the dashboard knows ratatui and crossterm, only the command
//! line knows clap; the model knows nothing of who implements its ports; and the `MOESCOPE_*`
//! knobs are read in one place. Reads the source as text (comments and strings left out).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layers, lowest first. A module may use modules of lower layers only (its own aside).
const LAYERS: &[&[&str]] = &[
    &["util", "step_path", "prompt_settings"],
    &["cache"],
    &["settings"],
    &["model"],
    &["experts"],
    &["engine", "session"],
    &["worker"],
    &["report", "bench"],
    &["errors", "live"],
    &["ui", "headless", "cli"],
    &["commands"],
    &["main", "lib"],
];

/// Pairs a lower-layer rule would allow but the design does not: the model owns its ports and
/// reads no settings (the engine hands it its options); the cache core is the bottom; the
/// session layer is plain serde types, never the model or the engine behind them.
const NEVER: &[(&str, &str)] = &[
    ("model", "cache"),
    ("model", "settings"),
    ("session", "model"),
    ("session", "engine"),
];

/// Outside crates a module may not name.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "cache",
        &[
            "candle_core",
            "candle_nn",
            "candle_transformers",
            "clap",
            "ratatui",
            "crossterm",
        ],
    ),
    (
        "session",
        &[
            "candle_core",
            "candle_nn",
            "candle_transformers",
            "clap",
            "ratatui",
            "crossterm",
        ],
    ),
    ("settings", &["candle_core", "clap", "ratatui", "crossterm"]),
    (
        "step_path",
        &["candle_core", "clap", "ratatui", "crossterm"],
    ),
    (
        "prompt_settings",
        &["candle_core", "clap", "ratatui", "crossterm"],
    ),
    ("report", &["candle_core", "clap", "ratatui", "crossterm"]),
    ("live", &["candle_core", "clap", "ratatui", "crossterm"]),
    ("model", &["clap", "ratatui", "crossterm"]),
    ("experts", &["clap", "ratatui", "crossterm"]),
    ("engine", &["clap", "ratatui", "crossterm"]),
    ("worker", &["clap", "ratatui", "crossterm"]),
    ("headless", &["clap", "ratatui", "crossterm"]),
    ("bench", &["ratatui", "crossterm"]),
    ("commands", &["ratatui", "crossterm"]),
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without comments and without the contents of string and char literals.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i] as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Names following `prefix` (`crate::` → the modules a file reaches into).
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

/// Every file's code, keyed by path, with its top-level module.
fn sources() -> Vec<(PathBuf, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let m = module_of(&src, &f);
            let code = code_only(&std::fs::read_to_string(&f).unwrap());
            (f, m, code)
        })
        .collect()
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, m, code) in sources() {
        let me =
            rank(&m).unwrap_or_else(|| panic!("{}: module `{m}` has no layer", file.display()));
        for used in names_after(&code, "crate::") {
            // `crate::bail_input!` is exported by `errors`.
            let used = if used == "bail_input" {
                "errors".to_string()
            } else {
                used
            };
            if used == m {
                continue;
            }
            let Some(r) = rank(&used) else {
                panic!(
                    "{}: uses `crate::{used}`, which has no layer",
                    file.display()
                );
            };
            if r >= me || NEVER.contains(&(m.as_str(), used.as_str())) {
                wrong
                    .entry(file.display().to_string())
                    .or_default()
                    .push(used);
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering: {wrong:#?}");
}

#[test]
fn outside_crates_stay_where_they_belong() {
    let mut wrong = Vec::new();
    for (file, m, code) in sources() {
        let mut forbidden: Vec<&str> = FORBIDDEN
            .iter()
            .filter(|(x, _)| *x == m)
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        // Only the dashboard draws, only the command line parses flags.
        if m != "ui" {
            forbidden.extend(["ratatui", "crossterm"]);
        }
        if !matches!(m.as_str(), "cli" | "main") {
            forbidden.push("clap");
        }
        for c in forbidden {
            if code.contains(&format!("{c}::")) || code.contains(&format!("use {c}")) {
                wrong.push(format!("{}: {c}", file.display()));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "outside crates where they do not belong: {wrong:#?}"
    );
}

#[test]
fn the_model_imports_nothing_of_who_implements_its_ports() {
    for (file, m, code) in sources() {
        if m == "model" {
            for used in names_after(&code, "crate::") {
                assert!(
                    !matches!(used.as_str(), "experts" | "engine" | "worker" | "session"),
                    "{} uses crate::{used}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn moescope_variables_are_read_in_settings_alone() {
    // A variable name on its own in a string literal is one being read (messages that mention
    // a variable say more); the test hooks (MOESCOPE_TEST_*), which the worker reads for fault
    // tests, aside.
    for (file, m, _) in sources() {
        let text = std::fs::read_to_string(&file).unwrap();
        for name in names_after(&text, "\"MOESCOPE_") {
            let literal = format!("\"MOESCOPE_{name}\"");
            if text.contains(&literal) && !name.starts_with("TEST") {
                assert_eq!(
                    m,
                    "settings",
                    "{}: reads MOESCOPE_{name} (settings.rs reads them once)",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_checks_see_what_they_look_for() {
    // The reader itself: comments and strings hide nothing, code is seen.
    let code = code_only(
        "use crate::model::x; // crate::ui\n/* crate::cli */ let s = \"crate::report\"; \
         let r = r#\"crate::live\"#; crate::session::f();",
    );
    assert_eq!(names_after(&code, "crate::"), ["model", "session"]);
    assert_eq!(rank("cache"), Some(1));
    assert!(rank("session") > rank("cache") && rank("ui") > rank("worker"));
}
