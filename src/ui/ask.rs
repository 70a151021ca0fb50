//! The "ask your own prompt" line: a one-line editor (cursor, delete, paste, history) whose
//! text, on Enter, runs next on both backends.

/// What a key did to the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskOutcome {
    /// Still editing.
    Editing,
    /// Esc: the line is closed, nothing sent.
    Cancelled,
    /// Enter on a non-empty line: this text runs next.
    Submitted(String),
}

/// The line being edited and the prompts asked before (newest last).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AskLine {
    pub text: Vec<char>,
    /// Cursor position, in characters.
    pub cursor: usize,
    history: Vec<String>,
    /// Position while browsing the history with ↑/↓ (None: the line being typed).
    browsing: Option<usize>,
    /// The open line, when the user is typing.
    pub open: bool,
}

impl AskLine {
    pub fn open(&mut self) {
        self.open = true;
        self.text.clear();
        self.cursor = 0;
        self.browsing = None;
    }

    pub fn text(&self) -> String {
        self.text.iter().collect()
    }

    fn set(&mut self, s: &str) {
        self.text = s.chars().collect();
        self.cursor = self.text.len();
    }

    /// Pasted text goes in at the cursor, line breaks as spaces.
    pub fn paste(&mut self, s: &str) {
        for c in s.chars() {
            let c = if c == '\n' || c == '\r' { ' ' } else { c };
            if !c.is_control() {
                self.text.insert(self.cursor, c);
                self.cursor += 1;
            }
        }
    }

    pub fn key(&mut self, k: crossterm::event::KeyEvent) -> AskOutcome {
        use crossterm::event::{KeyCode, KeyModifiers};
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            KeyCode::Esc => {
                self.open = false;
                return AskOutcome::Cancelled;
            }
            KeyCode::Char('c') if ctrl => {
                self.open = false;
                return AskOutcome::Cancelled;
            }
            KeyCode::Enter => {
                let t = self.text().trim().to_string();
                if t.is_empty() {
                    return AskOutcome::Editing;
                }
                if self.history.last() != Some(&t) {
                    self.history.push(t.clone());
                }
                self.open = false;
                return AskOutcome::Submitted(t);
            }
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::Char('e') if ctrl => self.cursor = self.text.len(),
            KeyCode::Char('u') if ctrl => {
                self.text.drain(..self.cursor);
                self.cursor = 0;
            }
            KeyCode::Char(c) if !ctrl => {
                self.text.insert(self.cursor, c);
                self.cursor += 1;
            }
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                self.text.remove(self.cursor);
            }
            KeyCode::Delete if self.cursor < self.text.len() => {
                self.text.remove(self.cursor);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(self.text.len()),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.text.len(),
            KeyCode::Up if !self.history.is_empty() => {
                let i = match self.browsing {
                    None => self.history.len() - 1,
                    Some(i) => i.saturating_sub(1),
                };
                self.browsing = Some(i);
                let h = self.history[i].clone();
                self.set(&h);
            }
            KeyCode::Down => match self.browsing {
                Some(i) if i + 1 < self.history.len() => {
                    self.browsing = Some(i + 1);
                    let h = self.history[i + 1].clone();
                    self.set(&h);
                }
                Some(_) => {
                    self.browsing = None;
                    self.set("");
                }
                None => {}
            },
            _ => {}
        }
        AskOutcome::Editing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    fn k(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn typed(l: &mut AskLine, s: &str) {
        for c in s.chars() {
            l.key(k(KeyCode::Char(c)));
        }
    }

    #[test]
    fn edits_at_the_cursor_and_submits() {
        let mut l = AskLine::default();
        l.open();
        typed(&mut l, "What is a vlcano?");
        for _ in 0..5 {
            l.key(k(KeyCode::Left));
        }
        l.key(k(KeyCode::Left));
        typed(&mut l, "o");
        assert_eq!(l.text(), "What is a volcano?");
        l.key(k(KeyCode::Home));
        l.key(k(KeyCode::Delete));
        typed(&mut l, "W");
        l.key(k(KeyCode::End));
        l.key(k(KeyCode::Backspace));
        l.paste("!\nthanks");
        assert_eq!(l.text(), "What is a volcano! thanks");
        assert_eq!(
            l.key(k(KeyCode::Enter)),
            AskOutcome::Submitted("What is a volcano! thanks".into())
        );
        assert!(!l.open);
    }

    #[test]
    fn history_esc_and_empty_lines() {
        let mut l = AskLine::default();
        for q in ["first", "second"] {
            l.open();
            typed(&mut l, q);
            l.key(k(KeyCode::Enter));
        }
        l.open();
        // An empty line is not sent.
        assert_eq!(l.key(k(KeyCode::Enter)), AskOutcome::Editing);
        l.key(k(KeyCode::Up));
        assert_eq!(l.text(), "second");
        l.key(k(KeyCode::Up));
        assert_eq!(l.text(), "first");
        l.key(k(KeyCode::Down));
        assert_eq!(l.text(), "second");
        l.key(k(KeyCode::Down));
        assert_eq!(l.text(), "");
        typed(&mut l, "never sent");
        assert_eq!(l.key(k(KeyCode::Esc)), AskOutcome::Cancelled);
        assert!(!l.open);
    }
}
