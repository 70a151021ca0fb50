//! Chat templates as transformers applies them: the template from `tokenizer_config.json`
//! (a string, or the list of named templates) or `chat_template.jinja`, rendered with minijinja
//! and Python's string methods, ChatML when the checkpoint ships none.

use std::path::{Path, PathBuf};

use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ModelError, Result};

/// Qwen's ChatML, used when the checkpoint ships no chat template.
pub const CHATML_FALLBACK: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n\
{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Steps a chat template may take to render (minijinja's fuel); a template that needs more is
/// an error naming its file, not a hang.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// A checkpoint's chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    template: String,
    /// Where the template came from (a file, or "built-in ChatML"), for errors.
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`. It is rendered once here, so a template that
    /// does not parse is an error naming its file at load, not at the first prompt.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let mut found = None;
        let (mut bos_token, mut eos_token) = (None, None);
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io {
                path: cfg_path.clone(),
                what: "reading tokenizer config".into(),
                source: e,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
                file: cfg_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            found = template_from_config(&v).map(|t| (t, cfg_path.display().to_string()));
            bos_token = token_string(v.get("bos_token"));
            eos_token = token_string(v.get("eos_token"));
        }
        // transformers ≥ 4.43 may also put the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if found.is_none() && jinja.exists() {
            found = std::fs::read_to_string(&jinja)
                .ok()
                .map(|t| (t, jinja.display().to_string()));
        }
        let (template, source) =
            found.unwrap_or_else(|| (CHATML_FALLBACK.to_string(), "built-in ChatML".to_string()));
        let me = ChatTemplate {
            template,
            source,
            bos_token,
            eos_token,
        };
        me.render(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )?;
        Ok(me)
    }

    /// The template a `tokenizer_config.json`'s text names (`origin` names the file), checked
    /// by one render; `None` when it names none.
    pub fn from_config_text(text: &str, origin: &str) -> Result<Option<Self>> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Tokenizer {
            file: PathBuf::from(origin),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Some(template) = template_from_config(&v) else {
            return Ok(None);
        };
        let me = ChatTemplate {
            template,
            source: origin.to_string(),
            bos_token: token_string(v.get("bos_token")),
            eos_token: token_string(v.get("eos_token")),
        };
        me.render(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )?;
        Ok(Some(me))
    }

    /// Where the template came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template (HF semantics: `messages`, `add_generation_prompt`, special tokens
    /// as variables, `enable_thinking = false` so short answers are not spent thinking).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        // A template is code from the checkpoint's directory: bounded like one. Rendering a
        // real chat template takes a few thousand steps.
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let terr = |e: minijinja::Error| ModelError::Tokenizer {
            file: PathBuf::from(&self.source),
            msg: format!("chat template: {e:#}"),
        };
        env.add_template("chat", &self.template).map_err(terr)?;
        let tmpl = env.get_template("chat").map_err(terr)?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            enable_thinking => false,
            tools => minijinja::Value::from(()),
        })
        .map_err(terr)
    }
}

fn template_from_config(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        Value::Array(items) => items.iter().find_map(|t| {
            (t.get("name")?.as_str()? == "default")
                .then(|| t.get("template")?.as_str().map(String::from))
                .flatten()
        }),
        _ => None,
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::TextTokenizer;
    use super::*;

    /// A template in the style of Qwen3's (namespace, reversed slices, loop.index0, string
    /// methods, `is defined` tests, tojson, enable_thinking), written for this test.
    const QWEN3_STYLE: &str = r#"{%- if tools %}{{- '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == "user" and not message.content.startswith('<tool_response>') %}{%- set ns.last_user = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- set content = message.content.strip() %}
{%- if message.role == "assistant" and '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"#;

    #[test]
    fn qwen3_style_chat_template_renders() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-moe");
        std::fs::copy(
            src.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let cfg = serde_json::json!({"chat_template": QWEN3_STYLE, "eos_token": "<|im_end|>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = TextTokenizer::from_dir(dir.path()).unwrap();
        let msgs = vec![
            ChatMessage {
                role: "user".into(),
                content: " hi ".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "<think>x</think>\nhello".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "What is a cache?".into(),
            },
        ];
        let out = t.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nWhat is a cache?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        // A template that does not parse is an error naming the file, at load time.
        let bad = serde_json::json!({"chat_template": "{% for m in messages %}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), bad.to_string()).unwrap();
        let e = TextTokenizer::from_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("chat template"),
            "{e}"
        );
        // A template that would run for ever runs out of fuel, naming its file.
        let endless = serde_json::json!({"chat_template":
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"});
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            endless.to_string(),
        )
        .unwrap();
        let start = std::time::Instant::now();
        let e = TextTokenizer::from_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        assert!(
            e.contains("tokenizer_config.json") && e.contains("fuel"),
            "{e}"
        );
    }
}
