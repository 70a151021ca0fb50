//! How prompts are turned into tokens and how the checkpoint recommends sampling: plain serde
//! types of their own because three layers speak of them — the model reads and applies them,
//! the worker protocol carries them, and the session's recording header stores them (it must
//! not reach into the model for that).

/// How a text prompt becomes tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptStyle {
    /// The text as is, without the chat template.
    pub raw: bool,
    /// The template's `enable_thinking` (Qwen3): on, the model may reason in `<think>…</think>`
    /// before answering.
    pub enable_thinking: bool,
}

/// `generation_config.json`'s sampling fields, each as the file gives it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecommendedSampling {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
}

impl RecommendedSampling {
    /// "temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.do_sample == Some(false) {
            parts.push("greedy (do_sample false)".to_string());
        }
        if let Some(t) = self.temperature {
            parts.push(format!("temperature {t}"));
        }
        if let Some(p) = self.top_p {
            parts.push(format!("top_p {p}"));
        }
        if let Some(k) = self.top_k {
            parts.push(format!("top_k {k}"));
        }
        if let Some(r) = self.repetition_penalty {
            parts.push(format!("repetition_penalty {r}"));
        }
        parts.join(", ")
    }
}
