//! The knobs that change how moescope runs but are not command-line flags: measurement switches
//! and escape hatches. Read once at start-up (their source is the `MOESCOPE_*` environment
//! variables below), passed down explicitly — to the model, the cache, and to every worker in
//! its load command — and written into the recording's header, so a run says how it ran.
//!
//! | variable | field | meaning |
//! |---|---|---|
//! | `MOESCOPE_CUDA_GRAPHS=0` | `cuda_graphs` | GPU decode steps never replay a captured CUDA graph |
//! | `MOESCOPE_MOE_KERNEL=candle` | `moe_kernel` | candle's fused MoE GEMM instead of moescope's decode kernels and a prompt's grouped products (bf16; FP8 and GGUF decode keeps moescope's) |
//! | `MOESCOPE_ATTN_KERNEL=candle` | `attn_kernel` | candle's ops for decode attention instead of moescope's kernels |
//! | `MOESCOPE_SPECULATE=gate\|last\|0` | `speculate` | when a selective GPU step guesses that nothing will miss |
//! | `MOESCOPE_FILL=0` | `gpu_fill` | a slot pool holding every expert does not fill its own slots |
//! | `MOESCOPE_H2D=auto\|direct\|staged` | `h2d` | how GPU misses reach the device |
//! | `MOESCOPE_COPY_STREAM=1` | `copy_stream` | direct copies on a second stream |
//! | `MOESCOPE_GATES=0\|pieces\|whole` | `gated_pieces`, `gated_whole` | how a piecewise GPU step (selective, routing read back at every MoE layer) runs: `0` launches each layer's graphs once the host has its routing; `pieces` queues the layers' graphs a few layers ahead behind gate kernels (`model::gates`); `whole` (the default) replays the whole step, gates inside, as one graph |
//! | `MOESCOPE_TABLES=copy` | `table_kernel` | a gated step's residency tables kept by copying each changed table whole (a fresh tensor, a pageable copy) instead of one kernel writing the changed entries |
//! | `MOESCOPE_STAGED_PIECE=whole\|SIZE` | `staged_piece` | a staged GPU miss read whole and then copied, or in pieces of SIZE (a multiple of 4 KiB; default 256KiB) with each run copied as soon as it is read |
//! | `MOESCOPE_PIN_BUDGET=SIZE` | `pin_budget` | host memory the direct path may page-lock (default: half the available memory) |
//! | `MOESCOPE_TEST_CORES=N` | `cores` | the core count `--prefetch auto` decides by (a test hook) |

use serde::{Deserialize, Serialize};

use crate::cache::speculation::Rule;

/// Which kernels run a MoE block on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MoeKernel {
    /// moescope's decode kernels (`model/kernels/moe_decode.cu`) for one token, cuBLAS grouped
    /// products (`model/moe_grouped.rs`) for a prompt.
    #[default]
    Moescope,
    /// candle's fused MoE GEMM, for comparisons.
    Candle,
}

/// Which kernels run a one-token attention on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttnKernel {
    /// moescope's decode kernels (`model/kernels/attn_decode.cu`).
    #[default]
    Moescope,
    /// candle's ops (projections, norms, RoPE, masked softmax attention), for comparisons.
    Candle,
}

/// How a GPU cache miss reaches the device (see `experts::direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum H2dChoice {
    /// Decided from the facts: direct on a discrete GPU when the expert files fit, else staged.
    #[default]
    Auto,
    /// DMA straight from the registered expert files.
    Direct,
    /// Read by the CPU into page-locked buffers, then copied.
    Staged,
}

impl H2dChoice {
    pub fn name(self) -> &'static str {
        match self {
            H2dChoice::Auto => "auto",
            H2dChoice::Direct => "direct",
            H2dChoice::Staged => "staged",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub cuda_graphs: bool,
    pub moe_kernel: MoeKernel,
    pub attn_kernel: AttnKernel,
    pub speculate: Rule,
    pub gpu_fill: bool,
    pub h2d: H2dChoice,
    pub copy_stream: bool,
    /// A piecewise GPU step is queued ahead of the host, each MoE layer behind a gate kernel
    /// that waits for the host only when an expert is missing (`model::gates`); off: launched
    /// layer by layer.
    pub gated_pieces: bool,
    /// With `gated_pieces`: the gated step replays as one graph (the gate kernels inside it)
    /// rather than as each layer's graphs queued a few layers ahead.
    pub gated_whole: bool,
    /// The residency tables' changed entries written by one small kernel carrying them in its
    /// arguments (`model::gates::WordScatter`); off: each changed table copied whole.
    pub table_kernel: bool,
    /// A staged GPU miss is read in pieces of this many bytes, each run copied as soon as it
    /// is read, so that only the last run's copy follows the read (`experts::upload`); None
    /// (written as null): read whole, then copied.
    pub staged_piece: Option<usize>,
    /// Host memory the direct path may page-lock, bytes (`None`: half the available memory;
    /// see `experts::direct`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_budget: Option<u64>,
    /// Cores available to the process when the run started (0 in a header that did not say).
    #[serde(default)]
    pub cores: usize,
    /// The cores each worker ran on, native's then selective's, when a CPU run split them
    /// (see `worker::cpus`); empty when the workers shared every core.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_cpus: Vec<Vec<usize>>,
}

/// Streamed staged reads' piece: `source::MIN_PIECE`'s size, the smallest piece worth a read
/// call of its own; a 9.4 MB expert is then 36 pieces, about two rounds of an H200 host's 16
/// threads.
pub const DEFAULT_STAGED_PIECE: usize = 256 << 10;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cuda_graphs: true,
            moe_kernel: MoeKernel::Moescope,
            attn_kernel: AttnKernel::Moescope,
            speculate: Rule::Gate,
            gpu_fill: true,
            h2d: H2dChoice::Auto,
            copy_stream: false,
            gated_pieces: true,
            gated_whole: true,
            table_kernel: true,
            staged_piece: Some(DEFAULT_STAGED_PIECE),
            pin_budget: None,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            worker_cpus: Vec::new(),
        }
    }
}

impl Settings {
    /// The settings this process runs with: the defaults, changed by the `MOESCOPE_*`
    /// variables. A value the variable cannot take is an error naming it.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut s = Settings::default();
        let bad = |k: &str, v: &str, want: &str| format!("{k} is {v:?}; expected {want}");
        if let Some(v) = var("MOESCOPE_CUDA_GRAPHS") {
            s.cuda_graphs = v != "0";
        }
        if let Some(v) = var("MOESCOPE_MOE_KERNEL") {
            s.moe_kernel = match v.as_str() {
                "candle" => MoeKernel::Candle,
                "" | "moescope" => MoeKernel::Moescope,
                _ => return Err(bad("MOESCOPE_MOE_KERNEL", &v, "moescope or candle")),
            };
        }
        if let Some(v) = var("MOESCOPE_ATTN_KERNEL") {
            s.attn_kernel = match v.as_str() {
                "candle" => AttnKernel::Candle,
                "" | "moescope" => AttnKernel::Moescope,
                _ => return Err(bad("MOESCOPE_ATTN_KERNEL", &v, "moescope or candle")),
            };
        }
        if let Some(v) = var("MOESCOPE_SPECULATE") {
            s.speculate = match v.as_str() {
                "0" => Rule::Never,
                "last" => Rule::AfterCleanStep,
                "" | "gate" => Rule::Gate,
                _ => return Err(bad("MOESCOPE_SPECULATE", &v, "gate, last or 0")),
            };
        }
        if let Some(v) = var("MOESCOPE_FILL") {
            s.gpu_fill = v != "0";
        }
        if let Some(v) = var("MOESCOPE_H2D") {
            s.h2d = match v.as_str() {
                "" | "auto" => H2dChoice::Auto,
                "direct" => H2dChoice::Direct,
                "staged" => H2dChoice::Staged,
                _ => return Err(bad("MOESCOPE_H2D", &v, "direct, staged or auto")),
            };
        }
        if let Some(v) = var("MOESCOPE_COPY_STREAM") {
            s.copy_stream = v == "1";
        }
        if let Some(v) = var("MOESCOPE_GATES") {
            (s.gated_pieces, s.gated_whole) = match v.as_str() {
                "0" => (false, false),
                "pieces" => (true, false),
                "" | "1" | "whole" => (true, true),
                _ => return Err(bad("MOESCOPE_GATES", &v, "0, pieces or whole")),
            };
        }
        if let Some(v) = var("MOESCOPE_TABLES") {
            s.table_kernel = match v.as_str() {
                "copy" => false,
                "" | "kernel" => true,
                _ => return Err(bad("MOESCOPE_TABLES", &v, "kernel or copy")),
            };
        }
        if let Some(v) = var("MOESCOPE_STAGED_PIECE") {
            s.staged_piece = match v.as_str() {
                "whole" => None,
                "" => Some(DEFAULT_STAGED_PIECE),
                _ => match crate::util::parse_bytes(&v) {
                    Ok(n) if n >= 4096 && n % 4096 == 0 && n <= 1 << 30 => Some(n as usize),
                    _ => {
                        return Err(bad(
                            "MOESCOPE_STAGED_PIECE",
                            &v,
                            "whole, or a size from 4KiB to 1GiB in whole KiB multiples of 4",
                        ));
                    }
                },
            };
        }
        if let Some(v) = var("MOESCOPE_PIN_BUDGET") {
            s.pin_budget = Some(crate::util::parse_bytes(&v).map_err(|e| {
                format!("MOESCOPE_PIN_BUDGET is {v:?}; expected a size such as 16GiB ({e})")
            })?);
        }
        if let Some(v) = var("MOESCOPE_TEST_CORES") {
            s.cores = v
                .parse()
                .map_err(|_| bad("MOESCOPE_TEST_CORES", &v, "a number of cores"))?;
        }
        Ok(s)
    }

    /// The settings that differ from the defaults, in words ("" when none do), for headers and
    /// summaries. The core count is a fact of the machine, not a choice: left out.
    pub fn describe_changes(&self) -> String {
        let d = Settings::default();
        let mut out = Vec::new();
        if self.cuda_graphs != d.cuda_graphs {
            out.push("CUDA graphs off".to_string());
        }
        if self.moe_kernel != d.moe_kernel {
            out.push("candle's MoE kernel".into());
        }
        if self.attn_kernel != d.attn_kernel {
            out.push("candle's attention ops".into());
        }
        if self.speculate != d.speculate {
            out.push(format!("speculation {}", self.speculate.name()));
        }
        if self.gpu_fill != d.gpu_fill {
            out.push("GPU self-fill off".into());
        }
        if self.h2d != d.h2d {
            out.push(format!("{} copies forced", self.h2d.name()));
        }
        if self.copy_stream != d.copy_stream {
            out.push("second copy stream".into());
        }
        if !self.gated_pieces {
            out.push("piecewise steps launched layer by layer".into());
        } else if self.gated_whole != d.gated_whole {
            out.push("gated steps queued layer by layer, not as one graph".into());
        }
        if self.table_kernel != d.table_kernel {
            out.push("residency tables copied whole".into());
        }
        if self.staged_piece != d.staged_piece {
            out.push(match self.staged_piece {
                None => "staged misses read whole, then copied".into(),
                Some(n) => format!(
                    "staged misses read in pieces of {}",
                    crate::util::fmt_bytes(n as u64)
                ),
            });
        }
        if let Some(b) = self.pin_budget {
            out.push(format!("pin budget {}", crate::util::fmt_bytes(b)));
        }
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn every_variable_sets_its_field_and_nothing_else() {
        let d = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!(d, Settings::default());
        assert_eq!(d.describe_changes(), "");
        let s = Settings::from_vars(vars(&[
            ("MOESCOPE_CUDA_GRAPHS", "0"),
            ("MOESCOPE_MOE_KERNEL", "candle"),
            ("MOESCOPE_ATTN_KERNEL", "candle"),
            ("MOESCOPE_SPECULATE", "last"),
            ("MOESCOPE_FILL", "0"),
            ("MOESCOPE_H2D", "staged"),
            ("MOESCOPE_COPY_STREAM", "1"),
            ("MOESCOPE_GATES", "0"),
            ("MOESCOPE_TABLES", "copy"),
            ("MOESCOPE_STAGED_PIECE", "whole"),
            ("MOESCOPE_PIN_BUDGET", "16GiB"),
            ("MOESCOPE_TEST_CORES", "7"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            Settings {
                cuda_graphs: false,
                moe_kernel: MoeKernel::Candle,
                attn_kernel: AttnKernel::Candle,
                speculate: Rule::AfterCleanStep,
                gpu_fill: false,
                h2d: H2dChoice::Staged,
                copy_stream: true,
                gated_pieces: false,
                gated_whole: false,
                table_kernel: false,
                staged_piece: None,
                pin_budget: Some(16 << 30),
                cores: 7,
                worker_cpus: Vec::new(),
            }
        );
        assert_eq!(
            s.describe_changes(),
            "CUDA graphs off, candle's MoE kernel, candle's attention ops, speculation last, GPU \
             self-fill off, staged copies forced, second copy stream, piecewise steps launched \
             layer by layer, residency tables copied whole, staged misses read whole, then copied, pin \
             budget 16.0 GiB"
        );
        assert_eq!(
            Settings::from_vars(vars(&[("MOESCOPE_SPECULATE", "0")]))
                .unwrap()
                .speculate,
            Rule::Never
        );
    }

    #[test]
    fn gates_take_three_forms() {
        let gates = |v: &str| {
            let s = Settings::from_vars(vars(&[("MOESCOPE_GATES", v)])).unwrap();
            (s.gated_pieces, s.gated_whole, s.describe_changes())
        };
        assert_eq!(gates("whole"), (true, true, String::new()));
        assert_eq!(gates("1"), (true, true, String::new()));
        assert_eq!(
            gates("pieces"),
            (
                true,
                false,
                "gated steps queued layer by layer, not as one graph".into()
            )
        );
        assert_eq!(
            gates("0"),
            (
                false,
                false,
                "piecewise steps launched layer by layer".into()
            )
        );
    }

    #[test]
    fn a_bad_value_names_the_variable_and_what_it_takes() {
        let e = Settings::from_vars(vars(&[("MOESCOPE_H2D", "dma")])).unwrap_err();
        assert!(
            e.contains("MOESCOPE_H2D") && e.contains("direct, staged or auto"),
            "{e}"
        );
        let e = Settings::from_vars(vars(&[("MOESCOPE_ATTN_KERNEL", "flash")])).unwrap_err();
        assert!(
            e.contains("MOESCOPE_ATTN_KERNEL") && e.contains("moescope or candle"),
            "{e}"
        );
        let e = Settings::from_vars(vars(&[("MOESCOPE_PIN_BUDGET", "lots")])).unwrap_err();
        assert!(
            e.contains("MOESCOPE_PIN_BUDGET") && e.contains("a size such as 16GiB"),
            "{e}"
        );
        let e = Settings::from_vars(vars(&[("MOESCOPE_GATES", "off")])).unwrap_err();
        assert!(
            e.contains("MOESCOPE_GATES") && e.contains("0, pieces or whole"),
            "{e}"
        );
        let e = Settings::from_vars(vars(&[("MOESCOPE_TABLES", "dma")])).unwrap_err();
        assert!(
            e.contains("MOESCOPE_TABLES") && e.contains("kernel or copy"),
            "{e}"
        );
        for v in ["1000", "3KiB", "2GiB", "fast"] {
            let e = Settings::from_vars(vars(&[("MOESCOPE_STAGED_PIECE", v)])).unwrap_err();
            assert!(
                e.contains("MOESCOPE_STAGED_PIECE") && e.contains("whole, or a size"),
                "{v}: {e}"
            );
        }
        let s = Settings::from_vars(vars(&[("MOESCOPE_STAGED_PIECE", "128KiB")])).unwrap();
        assert_eq!(s.staged_piece, Some(128 << 10));
        assert_eq!(
            s.describe_changes(),
            "staged misses read in pieces of 128 KiB"
        );
        let e = Settings::from_vars(vars(&[("MOESCOPE_TEST_CORES", "many")])).unwrap_err();
        assert!(e.contains("MOESCOPE_TEST_CORES"), "{e}");
    }

    #[test]
    fn settings_missing_from_a_header_read_as_the_defaults() {
        let s: Settings = serde_json::from_str("{}").unwrap();
        assert_eq!(
            Settings {
                cores: 0,
                ..Settings::default()
            },
            s
        );
        let s: Settings = serde_json::from_str(r#"{"speculate":"never","cores":3}"#).unwrap();
        assert_eq!((s.speculate, s.cores), (Rule::Never, 3));
    }
}
