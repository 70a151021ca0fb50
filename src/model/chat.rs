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
        let (mut bos_token, mut eos_token) = (None, None);
        let mut from_config = None;
        if cfg_path.exists() {
            let v = read_json(&cfg_path)?;
            from_config = template_from_config(&v).map(|t| (t, cfg_path.display().to_string()));
            bos_token = token_string(v.get("bos_token"));
            eos_token = token_string(v.get("eos_token"));
        }
        // The order transformers reads them in: `chat_template.jinja` (≥ 4.43) overrides the
        // tokenizer config's; processors (Omni, VL) save theirs as `chat_template.json`.
        let jinja = dir.join("chat_template.jinja");
        let processor = dir.join("chat_template.json");
        let found = if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| ModelError::Io {
                path: jinja.clone(),
                what: "reading the chat template".into(),
                source: e,
            })?;
            Some((text, jinja.display().to_string()))
        } else if from_config.is_some() {
            from_config
        } else if processor.exists() {
            let v = read_json(&processor)?;
            let t = template_from_config(&v).ok_or_else(|| ModelError::Tokenizer {
                file: processor.clone(),
                msg: "field `chat_template`: expected a template string (or a list of named \
                      templates with a \"default\")"
                    .into(),
            })?;
            Some((t, processor.display().to_string()))
        } else {
            None
        };
        let (template, source) = match found {
            Some((t, s)) => (Some(t), s),
            None => (None, String::new()),
        };
        Self::from_text(template, &source, bos_token, eos_token)
    }

    /// A template given as text (a GGUF file's `tokenizer.chat_template`), checked by one
    /// render; `source` names where it came from. None: the built-in ChatML.
    pub fn from_text(
        template: Option<String>,
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let (template, source) = match template {
            Some(t) => (t, source.to_string()),
            None => (CHATML_FALLBACK.to_string(), "built-in ChatML".to_string()),
        };
        let me = ChatTemplate {
            template,
            source,
            bos_token,
            eos_token,
        };
        me.check()?;
        Ok(me)
    }

    /// One render at load, so a template that does not parse (or needs a variable we do not
    /// give) is an error naming its file before the first prompt — with thinking on and off,
    /// as either may be asked for.
    fn check(&self) -> Result<()> {
        let hi = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        self.render(&hi, true, false)?;
        self.render(&hi, true, true)?;
        Ok(())
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
        me.check()?;
        Ok(Some(me))
    }

    /// Where the template came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens (`bos_token`, `eos_token`: field and value) this template writes into
    /// a conversation's prompt — found by rendering a user, assistant, user exchange with a
    /// marker in place of each and looking for the marker. Unset or empty ones are left out
    /// (the template writes nothing for them), and so are all when that render fails (a
    /// template may refuse such an exchange; the load's own render has passed).
    pub fn specials_written(&self) -> Vec<(&'static str, &str)> {
        const BOS: &str = "\u{e000}moescope:bos_token\u{e000}";
        const EOS: &str = "\u{e000}moescope:eos_token\u{e000}";
        let marked = ChatTemplate {
            bos_token: Some(BOS.into()),
            eos_token: Some(EOS.into()),
            ..self.clone()
        };
        let turns =
            [("user", "hi"), ("assistant", "hello"), ("user", "hi")].map(|(r, c)| ChatMessage {
                role: r.into(),
                content: c.into(),
            });
        let Ok(text) = marked.render(&turns, true, false) else {
            return Vec::new();
        };
        [
            ("bos_token", BOS, &self.bos_token),
            ("eos_token", EOS, &self.eos_token),
        ]
        .into_iter()
        .filter_map(|(field, marker, value)| {
            let v = value.as_deref().filter(|v| !v.is_empty())?;
            text.contains(marker).then_some((field, v))
        })
        .collect()
    }

    /// Renders the template (HF semantics: `messages`, `add_generation_prompt`, special tokens
    /// as variables, no tools). `enable_thinking` is Qwen3's switch: moescope passes `false`
    /// unless asked (`--enable-thinking`), so short comparisons are not spent thinking; a
    /// "Thinking" checkpoint's template ignores it and always thinks.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String> {
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
            enable_thinking => enable_thinking,
            tools => minijinja::Value::from(()),
        })
        .map_err(terr)
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        what: "reading tokenizer config".into(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
        file: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
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
    #[test]
    fn template_files_are_read_in_transformers_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |name: &str, text: String| std::fs::write(d.join(name), text).unwrap();
        assert_eq!(
            ChatTemplate::from_dir(d).unwrap().source(),
            "built-in ChatML"
        );
        // A processor's chat_template.json, as the Omni and VL repos ship it.
        write(
            "chat_template.json",
            serde_json::json!({"chat_template": "P{{ messages[0].content }}"}).to_string(),
        );
        let t = ChatTemplate::from_dir(d).unwrap();
        assert!(t.source().ends_with("chat_template.json"));
        let hi = [ChatMessage {
            role: "user".into(),
            content: "x".into(),
        }];
        assert_eq!(t.render(&hi, true, false).unwrap(), "Px");
        // The tokenizer config's own template (here the list-of-named-templates form) wins.
        write(
            "tokenizer_config.json",
            serde_json::json!({"chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D{{ messages[0].content }}"}]})
            .to_string(),
        );
        let t = ChatTemplate::from_dir(d).unwrap();
        assert_eq!(t.render(&hi, true, false).unwrap(), "Dx");
        // chat_template.jinja overrides both.
        write("chat_template.jinja", "J{{ messages[0].content }}".into());
        let t = ChatTemplate::from_dir(d).unwrap();
        assert!(t.source().ends_with("chat_template.jinja"));
        assert_eq!(t.render(&hi, true, false).unwrap(), "Jx");
        // A chat_template.json without a template is an error naming the file and field.
        std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
        std::fs::remove_file(d.join("tokenizer_config.json")).unwrap();
        write("chat_template.json", "{\"template\": 1}".into());
        let e = ChatTemplate::from_dir(d).unwrap_err().to_string();
        assert!(
            e.contains("chat_template.json") && e.contains("chat_template"),
            "{e}"
        );
    }

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
        let out = t.apply_chat_template(&msgs, true, false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nWhat is a cache?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        // Thinking on: the template leaves the reasoning to the model (no empty think block),
        // and the prompt's ids end before it.
        let thinking = t.apply_chat_template(&msgs[2..], true, true).unwrap();
        assert_eq!(
            thinking,
            "<|im_start|>user\nWhat is a cache?<|im_end|>\n<|im_start|>assistant\n"
        );
        use super::super::tokenizer::PromptStyle;
        let off = t
            .prompt_ids("What is a cache?", PromptStyle::default())
            .unwrap();
        let on = t
            .prompt_ids(
                "What is a cache?",
                PromptStyle {
                    raw: false,
                    enable_thinking: true,
                },
            )
            .unwrap();
        assert!(off.len() > on.len() && off.starts_with(&on));
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
