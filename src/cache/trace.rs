//! Routing traces: which experts each MoE layer picked for each token, the input of every cache
//! study. A trace file (`moescope export --format trace`, written by `report::trace`) is a header
//! line, then one [`TraceStep`] per line; a recording carries the same steps in its `routing`
//! events (`session::study` reads those).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::policy::PolicyKind;
use super::settings::Scope;
use super::stats::Costs;

pub const TRACE_FORMAT: &str = "moescope-trace";
pub const TRACE_VERSION: u32 = 1;

/// The MoE shape of a model: what a heatmap, a trace and the expected memory are sized by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeShape {
    pub num_layers: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
}

impl MoeShape {
    pub fn total_experts(&self) -> usize {
        self.moe_layers.len() * self.num_experts
    }

    /// Rejects a shape no model has, before anything is sized by it: more layers or experts
    /// than a cache key can tell apart, a MoE layer beyond the layer count, top-k above the
    /// expert count.
    pub fn check(&self) -> Result<(), String> {
        use super::pool::{MAX_EXPERTS, MAX_LAYERS};
        if self.num_layers > MAX_LAYERS || self.num_experts > MAX_EXPERTS {
            return Err(format!(
                "`moe`: {} layers of {} experts, more than moescope handles ({MAX_LAYERS} layers, \
                 {MAX_EXPERTS} experts)",
                self.num_layers, self.num_experts
            ));
        }
        if let Some(l) = self.moe_layers.iter().find(|&&l| l >= self.num_layers) {
            return Err(format!(
                "`moe`: MoE layer {l} of a model with {} layers",
                self.num_layers
            ));
        }
        if self.top_k > self.num_experts {
            return Err(format!(
                "`moe`: top-k {} above the {} experts per layer",
                self.top_k, self.num_experts
            ));
        }
        Ok(())
    }
}

/// One step of a routing trace: which experts each MoE layer picked for one token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceStep {
    pub prompt: usize,
    pub position: usize,
    pub experts: Vec<Vec<u16>>,
    /// Per MoE layer, the next-layer guess made for it (see `SessionEvent::Routing`); empty
    /// when the trace has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guesses: Vec<Vec<u16>>,
}

/// A trace file's first line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub format: String,
    pub version: u32,
    pub moe: MoeShape,
    /// Prompt lengths (positions below were one prefill pass), by prompt index.
    pub prompt_tokens: Vec<(usize, usize)>,
    /// Measured costs of the run the trace came from, when known.
    pub costs: Option<Costs>,
    pub source: String,
}

/// Everything a study needs from a run.
#[derive(Debug, Clone)]
pub struct TraceInput {
    pub moe: MoeShape,
    pub steps: Vec<TraceStep>,
    pub prompt_tokens: HashMap<usize, usize>,
    pub costs: Option<Costs>,
    /// The live cache's settings and result, when the source is a recording with a selective run.
    pub live: Option<LiveCache>,
}

/// What the live cache of a recorded run was set to, and what it counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveCache {
    pub capacity: usize,
    pub scope: Scope,
    pub policy: PolicyKind,
    /// Whether the run prefetched (`--prefetch next-layer`).
    #[serde(default)]
    pub prefetch: bool,
    pub hits: u64,
    pub misses: u64,
}

/// Whether a file's first line is a trace header (rather than, say, a recording's).
pub fn is_trace_header(first_line: &serde_json::Value) -> bool {
    first_line.get("format").and_then(|f| f.as_str()) == Some(TRACE_FORMAT)
}

/// Checks a step against the shape it claims to belong to: a row with more layers than the
/// model, or an expert beyond its count, would index past every table a study builds.
pub fn check_step(step: &TraceStep, moe: &MoeShape) -> Result<(), String> {
    let layers = moe.moe_layers.len();
    for (what, rows) in [("experts", &step.experts), ("guesses", &step.guesses)] {
        if rows.len() > layers {
            return Err(format!(
                "`{what}` has {} layers, the trace's model has {layers} MoE layers",
                rows.len()
            ));
        }
        if let Some(&e) = rows
            .iter()
            .flatten()
            .find(|&&e| e as usize >= moe.num_experts)
        {
            return Err(format!(
                "`{what}` names expert {e}, the model has {} per layer",
                moe.num_experts
            ));
        }
    }
    Ok(())
}

/// Parses a trace file's text. A torn last line (a writer cut off) is skipped; any other bad
/// line is an error naming the file and line.
pub fn parse(text: &str, path: &Path) -> Result<TraceInput, String> {
    let at = |line: usize, msg: String| format!("{}: line {line}: {msg}", path.display());
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.first().copied().unwrap_or("");
    let h: TraceHeader =
        serde_json::from_str(first).map_err(|e| at(1, format!("bad trace header: {e}")))?;
    if h.format != TRACE_FORMAT {
        return Err(at(
            1,
            format!("format is {:?}, expected \"{TRACE_FORMAT}\"", h.format),
        ));
    }
    if h.version != TRACE_VERSION {
        return Err(at(
            1,
            format!("trace version {}, expected {TRACE_VERSION}", h.version),
        ));
    }
    h.moe.check().map_err(|e| at(1, e))?;
    let mut steps = Vec::new();
    for (i, l) in lines.iter().enumerate().skip(1) {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<TraceStep>(l) {
            Ok(s) => {
                check_step(&s, &h.moe).map_err(|e| at(i + 1, e))?;
                steps.push(s);
            }
            Err(_) if i == lines.len() - 1 && !text.ends_with('\n') => {}
            Err(e) => return Err(at(i + 1, format!("bad trace step: {e}"))),
        }
    }
    Ok(TraceInput {
        moe: h.moe,
        steps,
        prompt_tokens: h.prompt_tokens.into_iter().collect(),
        costs: h.costs,
        live: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(layers: usize, experts: usize) -> String {
        serde_json::to_string(&TraceHeader {
            format: TRACE_FORMAT.into(),
            version: TRACE_VERSION,
            moe: MoeShape {
                num_layers: layers,
                moe_layers: (0..layers).collect(),
                num_experts: experts,
                top_k: 1,
            },
            prompt_tokens: vec![(0, 1)],
            costs: None,
            source: "test".into(),
        })
        .unwrap()
    }

    #[test]
    fn a_trace_reads_back_and_a_torn_last_line_is_skipped() {
        let text = format!(
            "{}\n{}\n{{\"prompt\":0,\"posi",
            header(2, 4),
            r#"{"prompt":0,"position":0,"experts":[[1],[3]]}"#
        );
        let t = parse(&text, Path::new("t.ndjson")).unwrap();
        assert_eq!(t.steps.len(), 1);
        assert_eq!(t.prompt_tokens[&0], 1);
    }

    #[test]
    fn malformed_traces_name_the_file_and_line() {
        let p = Path::new("t.ndjson");
        let wide = format!(
            "{}\n{}\n",
            header(2, 4),
            r#"{"prompt":0,"position":0,"experts":[[1],[3],[0]]}"#
        );
        let e = parse(&wide, p).unwrap_err();
        assert!(
            e.starts_with("t.ndjson: line 2:") && e.contains("3 layers"),
            "{e}"
        );
        let big = format!(
            "{}\n{}\n",
            header(2, 4),
            r#"{"prompt":0,"position":0,"experts":[[1],[4]]}"#
        );
        assert!(parse(&big, p).unwrap_err().contains("expert 4"));
        let bad = format!("{}\nnot json\n{{}}\n", header(2, 4));
        assert!(parse(&bad, p).unwrap_err().starts_with("t.ndjson: line 2:"));
        assert!(parse("", p).unwrap_err().starts_with("t.ndjson: line 1:"));
        let v2 = header(2, 4).replace("\"version\":1", "\"version\":2");
        assert!(parse(&v2, p).unwrap_err().contains("version 2"));
    }
}
