//! Keys → actions. Kept apart from the app so the real-terminal test and the help overlay agree.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::Action;

pub fn action(k: KeyEvent) -> Option<Action> {
    if k.kind == KeyEventKind::Release {
        return None;
    }
    if k.modifiers.contains(KeyModifiers::CONTROL) {
        return match k.code {
            KeyCode::Char('c') | KeyCode::Char('d') => Some(Action::Quit),
            _ => None,
        };
    }
    Some(match k.code {
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Char('n') | KeyCode::Right => Action::NextPrompt,
        KeyCode::Char('p') | KeyCode::Left => Action::PrevPrompt,
        KeyCode::Char(' ') => Action::TogglePause,
        KeyCode::Char('.') => Action::Step,
        KeyCode::Char('r') => Action::Rerun,
        KeyCode::Char('e') => Action::Export,
        KeyCode::Char('t') => Action::CycleTheme,
        KeyCode::Tab => Action::FocusNext,
        KeyCode::BackTab => Action::FocusPrev,
        KeyCode::Char('z') => Action::ToggleZoom,
        KeyCode::Char('?') | KeyCode::Char('h') => Action::ToggleHelp,
        KeyCode::Char('v') => Action::ToggleVerdict,
        KeyCode::Char('s') => Action::ToggleStepMode,
        KeyCode::Char('a') => Action::Ask,
        KeyCode::Char('l') => Action::ToggleList,
        KeyCode::Char('i') => Action::Inspect,
        KeyCode::Enter => Action::Continue,
        KeyCode::Up | KeyCode::Char('k') => Action::ScrollUp,
        KeyCode::Down | KeyCode::Char('j') => Action::ScrollDown,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_key_maps() {
        let k = |c| KeyEvent::new(c, KeyModifiers::NONE);
        for (code, a) in [
            (KeyCode::Char('n'), Action::NextPrompt),
            (KeyCode::Char('p'), Action::PrevPrompt),
            (KeyCode::Char(' '), Action::TogglePause),
            (KeyCode::Char('.'), Action::Step),
            (KeyCode::Char('r'), Action::Rerun),
            (KeyCode::Char('e'), Action::Export),
            (KeyCode::Char('t'), Action::CycleTheme),
            (KeyCode::Tab, Action::FocusNext),
            (KeyCode::Char('z'), Action::ToggleZoom),
            (KeyCode::Char('?'), Action::ToggleHelp),
            (KeyCode::Char('q'), Action::Quit),
            (KeyCode::Char('s'), Action::ToggleStepMode),
            (KeyCode::Char('a'), Action::Ask),
            (KeyCode::Char('l'), Action::ToggleList),
            (KeyCode::Char('i'), Action::Inspect),
            (KeyCode::Enter, Action::Continue),
        ] {
            assert_eq!(action(k(code)), Some(a));
        }
        assert_eq!(
            action(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Action::Quit)
        );
    }
}
