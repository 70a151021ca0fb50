//! Prompt sets (`prompts/*.toml`): versioned, each prompt with an id, a category and its text.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub category: String,
    pub text: String,
    /// Overrides the set's max_new_tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub version: u32,
    pub name: String,
    pub max_new_tokens: usize,
    #[serde(rename = "prompt")]
    pub prompts: Vec<Prompt>,
}

pub const PROMPTS_VERSION: u32 = 1;

impl PromptSet {
    /// The list `n` times over; later passes get ids `<id>#2`, `<id>#3`, … so every run stays
    /// addressable in recordings and exports.
    pub fn repeat(&mut self, n: usize) {
        let first = self.prompts.clone();
        for pass in 2..=n {
            self.prompts.extend(first.iter().map(|p| Prompt {
                id: format!("{}#{pass}", p.id),
                ..p.clone()
            }));
        }
    }

    pub fn max_new_tokens_of(&self, i: usize) -> usize {
        self.prompts[i]
            .max_new_tokens
            .unwrap_or(self.max_new_tokens)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read prompt file: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let set: PromptSet = toml::from_str(text).map_err(|e| {
            format!(
                "not a valid prompt set ({}); expected version, name, max_new_tokens and [[prompt]] tables with id, category, text",
                e.to_string().trim().replace('\n', " ")
            )
        })?;
        if set.version != PROMPTS_VERSION {
            return Err(format!(
                "field `version`: {} is not supported (expected {PROMPTS_VERSION})",
                set.version
            ));
        }
        if set.prompts.is_empty() {
            return Err("no [[prompt]] entries".into());
        }
        if set.max_new_tokens == 0 {
            return Err("field `max_new_tokens`: must be at least 1".into());
        }
        let mut ids = std::collections::HashSet::new();
        for (i, p) in set.prompts.iter().enumerate() {
            if p.text.trim().is_empty() {
                return Err(format!(
                    "prompt {} (`{}`): field `text` is empty",
                    i + 1,
                    p.id
                ));
            }
            if p.id.trim().is_empty() {
                return Err(format!("prompt {}: field `id` is empty", i + 1));
            }
            if !ids.insert(p.id.clone()) {
                return Err(format!("prompt {}: id `{}` is used twice", i + 1, p.id));
            }
            if p.max_new_tokens == Some(0) {
                return Err(format!(
                    "prompt `{}`: field `max_new_tokens` must be at least 1",
                    p.id
                ));
            }
        }
        Ok(set)
    }

    /// A one-off set with a single prompt (for `run --prompt`).
    pub fn single(text: &str, max_new_tokens: usize) -> Self {
        PromptSet {
            version: PROMPTS_VERSION,
            name: "ad hoc".into(),
            max_new_tokens,
            prompts: vec![Prompt {
                id: "prompt".into(),
                category: "ad hoc".into(),
                text: text.into(),
                max_new_tokens: None,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_appends_passes_with_distinct_ids() {
        let mut set = PromptSet::single("hi", 5);
        set.repeat(3);
        let ids: Vec<&str> = set.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(
            &ids[1..],
            &[&format!("{}#2", ids[0])[..], &format!("{}#3", ids[0])[..]]
        );
        assert!(set.prompts.iter().all(|p| p.text == "hi"));
    }

    #[test]
    fn shipped_prompt_sets_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let std = PromptSet::load(&root.join("standard.toml")).unwrap();
        assert_eq!(std.prompts.len(), 6);
        let cats: Vec<&str> = std.prompts.iter().map(|p| p.category.as_str()).collect();
        for c in ["factual", "creative", "technical"] {
            assert_eq!(
                cats.iter().filter(|&&x| x == c).count(),
                2,
                "two {c} prompts"
            );
        }
        assert_eq!(std.max_new_tokens, 50);
        let long = PromptSet::load(&root.join("long.toml")).unwrap();
        assert!((0..long.prompts.len()).all(|i| (100..=200).contains(&long.max_new_tokens_of(i))));
    }

    #[test]
    fn bad_sets_are_explained() {
        assert!(
            PromptSet::parse("version = 1")
                .unwrap_err()
                .contains("prompt")
        );
        let e = PromptSet::parse(
            "version = 2\nname='x'\nmax_new_tokens=5\n[[prompt]]\nid='a'\ncategory='c'\ntext='t'",
        )
        .unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = PromptSet::parse(
            "version = 1\nname='x'\nmax_new_tokens=5\n[[prompt]]\nid='a'\ncategory='c'\ntext=' '",
        )
        .unwrap_err();
        assert!(e.contains("text"), "{e}");
        let e = PromptSet::parse(
            "version = 1\nname='x'\nmax_new_tokens=5\n[[prompt]]\nid='a'\ncategory='c'\ntext='t'\n[[prompt]]\nid='a'\ncategory='c'\ntext='u'",
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(PromptSet::parse("not toml [").is_err());
    }
}
