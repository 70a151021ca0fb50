//! Colour themes from `themes/*.toml` (versioned, semantic slots, a heat gradient), and colour
//! depth: truecolor → 256 → 16 → none, detected from the environment (COLORTERM, TERM, NO_COLOR)
//! or forced with `--color`.

use std::path::{Path, PathBuf};

use ratatui::style::{Color, Modifier, Style};
use serde::Deserialize;

/// The themes shipped in the binary (the same files as in `themes/`).
pub const BUILTIN: [(&str, &str); 4] = [
    ("default", include_str!("../../themes/default.toml")),
    ("light", include_str!("../../themes/light.toml")),
    ("ansi16", include_str!("../../themes/ansi16.toml")),
    (
        "high-contrast",
        include_str!("../../themes/high-contrast.toml"),
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    TrueColor,
    Ansi256,
    Ansi16,
    None,
}

impl Depth {
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        Ok(match s {
            "auto" => None,
            "truecolor" | "24bit" => Some(Depth::TrueColor),
            "256" => Some(Depth::Ansi256),
            "16" => Some(Depth::Ansi16),
            "none" | "no" | "mono" => Some(Depth::None),
            other => {
                return Err(format!(
                    "--color {other}: expected auto, truecolor, 256, 16 or none"
                ));
            }
        })
    }

    /// From the environment: NO_COLOR (any value) → none; COLORTERM truecolor/24bit →
    /// truecolor; TERM *256color* → 256; otherwise 16.
    pub fn detect(get: impl Fn(&str) -> Option<String>) -> Self {
        if get("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            return Depth::None;
        }
        let colorterm = get("COLORTERM").unwrap_or_default().to_lowercase();
        if colorterm.contains("truecolor") || colorterm.contains("24bit") {
            return Depth::TrueColor;
        }
        let term = get("TERM").unwrap_or_default();
        if term.contains("256color") {
            return Depth::Ansi256;
        }
        if term == "dumb" {
            return Depth::None;
        }
        Depth::Ansi16
    }
}

#[derive(Debug, Clone, Deserialize)]
struct ThemeFile {
    version: u32,
    name: String,
    description: String,
    colors: Colors,
}

#[derive(Debug, Clone, Deserialize)]
struct Colors {
    text: String,
    muted: String,
    title: String,
    border: String,
    focus: String,
    native: String,
    selective: String,
    good: String,
    bad: String,
    warn: String,
    divergence: String,
    rss_anon: String,
    rss_file: String,
    gpu: String,
    peak: String,
    expected: String,
    heat: Vec<String>,
}

/// A theme resolved for a colour depth.
#[derive(Debug, Clone)]
pub struct Theme {
    pub name: String,
    pub description: String,
    pub depth: Depth,
    pub text: Style,
    pub muted: Style,
    pub title: Style,
    pub border: Style,
    pub focus: Style,
    pub native: Style,
    pub selective: Style,
    pub good: Style,
    pub bad: Style,
    pub warn: Style,
    pub divergence: Style,
    pub rss_anon: Style,
    pub rss_file: Style,
    pub gpu: Style,
    pub peak: Style,
    pub expected: Style,
    pub heat: Vec<Style>,
}

fn parse_color(s: &str) -> Result<Color, String> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix('#') {
        if hex.len() == 6 {
            let v = u32::from_str_radix(hex, 16).map_err(|_| format!("bad colour \"{s}\""))?;
            return Ok(Color::Rgb((v >> 16) as u8, (v >> 8) as u8, v as u8));
        }
        return Err(format!("bad colour \"{s}\": expected #rrggbb"));
    }
    s.parse::<Color>().map_err(|_| {
        format!("bad colour \"{s}\": expected #rrggbb, a name (red, lightblue, …), an index 0–255 or reset")
    })
}

/// The 16 ANSI colours, as xterm renders them, for nearest-colour mapping.
const ANSI16: [(Color, (u8, u8, u8)); 16] = [
    (Color::Black, (0, 0, 0)),
    (Color::Red, (205, 0, 0)),
    (Color::Green, (0, 205, 0)),
    (Color::Yellow, (205, 205, 0)),
    (Color::Blue, (0, 0, 238)),
    (Color::Magenta, (205, 0, 205)),
    (Color::Cyan, (0, 205, 205)),
    (Color::Gray, (229, 229, 229)),
    (Color::DarkGray, (127, 127, 127)),
    (Color::LightRed, (255, 0, 0)),
    (Color::LightGreen, (0, 255, 0)),
    (Color::LightYellow, (255, 255, 0)),
    (Color::LightBlue, (92, 92, 255)),
    (Color::LightMagenta, (255, 0, 255)),
    (Color::LightCyan, (0, 255, 255)),
    (Color::White, (255, 255, 255)),
];

fn dist(a: (u8, u8, u8), b: (u8, u8, u8)) -> u32 {
    let d = |x: u8, y: u8| (x as i32 - y as i32).pow(2) as u32;
    d(a.0, b.0) + d(a.1, b.1) + d(a.2, b.2)
}

/// xterm-256 cube index nearest to an RGB colour.
fn to_256(r: u8, g: u8, b: u8) -> u8 {
    let level = |v: u8| -> u8 {
        if v < 48 {
            0
        } else if v < 115 {
            1
        } else {
            (v - 35) / 40
        }
    };
    let (ri, gi, bi) = (level(r), level(g), level(b));
    let cube = 16 + 36 * ri + 6 * gi + bi;
    let val = |i: u8| if i == 0 { 0 } else { 55 + 40 * i };
    let cube_rgb = (val(ri), val(gi), val(bi));
    let gray_i = ((r as u32 + g as u32 + b as u32) / 3).saturating_sub(8) / 10;
    let gray_i = gray_i.min(23) as u8;
    let gv = 8 + 10 * gray_i;
    if dist((r, g, b), (gv, gv, gv)) < dist((r, g, b), cube_rgb) {
        232 + gray_i
    } else {
        cube
    }
}

fn to_16(r: u8, g: u8, b: u8) -> Color {
    ANSI16
        .iter()
        .min_by_key(|(_, rgb)| dist(*rgb, (r, g, b)))
        .map(|(c, _)| *c)
        .unwrap_or(Color::Reset)
}

/// Maps a colour down to what the terminal can show.
pub fn degrade(c: Color, depth: Depth) -> Option<Color> {
    match (depth, c) {
        (Depth::None, _) => None,
        (Depth::TrueColor, c) => Some(c),
        (Depth::Ansi256, Color::Rgb(r, g, b)) => Some(Color::Indexed(to_256(r, g, b))),
        (Depth::Ansi16, Color::Rgb(r, g, b)) => Some(to_16(r, g, b)),
        (Depth::Ansi16, Color::Indexed(i)) if i >= 16 => {
            // Approximate an indexed colour through its RGB value.
            let (r, g, b) = indexed_rgb(i);
            Some(to_16(r, g, b))
        }
        (_, c) => Some(c),
    }
}

fn indexed_rgb(i: u8) -> (u8, u8, u8) {
    if i >= 232 {
        let v = 8 + 10 * (i - 232);
        return (v, v, v);
    }
    let i = i - 16;
    let val = |x: u8| if x == 0 { 0 } else { 55 + 40 * x };
    (val(i / 36), val((i / 6) % 6), val(i % 6))
}

impl Theme {
    pub fn parse(text: &str, origin: &str, depth: Depth) -> Result<Self, String> {
        let f: ThemeFile = toml::from_str(text).map_err(|e| {
            format!(
                "{origin}: not a valid theme: {}",
                e.to_string().trim().replace('\n', " ")
            )
        })?;
        if f.version != 1 {
            return Err(format!(
                "{origin}: field `version`: {} is not supported (expected 1)",
                f.version
            ));
        }
        if f.colors.heat.len() < 2 {
            return Err(format!(
                "{origin}: field `colors.heat`: needs at least 2 colours"
            ));
        }
        let style = |field: &str, s: &str| -> Result<Style, String> {
            let c = parse_color(s).map_err(|e| format!("{origin}: field `colors.{field}`: {e}"))?;
            Ok(match degrade(c, depth) {
                Some(c) => Style::new().fg(c),
                None => Style::new(),
            })
        };
        let c = &f.colors;
        let mut t = Theme {
            name: f.name.clone(),
            description: f.description.clone(),
            depth,
            text: style("text", &c.text)?,
            muted: style("muted", &c.muted)?,
            title: style("title", &c.title)?.add_modifier(Modifier::BOLD),
            border: style("border", &c.border)?,
            focus: style("focus", &c.focus)?.add_modifier(Modifier::BOLD),
            native: style("native", &c.native)?,
            selective: style("selective", &c.selective)?,
            good: style("good", &c.good)?,
            bad: style("bad", &c.bad)?.add_modifier(Modifier::BOLD),
            warn: style("warn", &c.warn)?,
            divergence: style("divergence", &c.divergence)?,
            rss_anon: style("rss_anon", &c.rss_anon)?,
            rss_file: style("rss_file", &c.rss_file)?,
            gpu: style("gpu", &c.gpu)?,
            peak: style("peak", &c.peak)?,
            expected: style("expected", &c.expected)?,
            heat: c
                .heat
                .iter()
                .map(|h| style("heat", h))
                .collect::<Result<_, _>>()?,
        };
        if depth == Depth::None {
            // Without colour, meaning must survive in modifiers.
            t.divergence = Style::new().add_modifier(Modifier::REVERSED);
            t.bad = Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED);
            t.focus = Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED);
            t.muted = Style::new().add_modifier(Modifier::DIM);
        }
        Ok(t)
    }

    /// A built-in theme by name, or a theme file (`themes/NAME.toml` next to the working
    /// directory, or a path).
    pub fn load(name: &str, depth: Depth) -> Result<Self, String> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
            return Self::parse(text, &format!("built-in theme {name}"), depth);
        }
        let candidates = [
            PathBuf::from(name),
            Path::new("themes").join(format!("{name}.toml")),
        ];
        for p in candidates {
            if p.is_file() {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                return Self::parse(&text, &p.display().to_string(), depth);
            }
        }
        Err(format!(
            "theme \"{name}\": not built in ({}) and no such file",
            BUILTIN.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
        ))
    }

    /// The heat colour for a value in 0..=1.
    pub fn heat(&self, v: f64) -> Style {
        let n = self.heat.len();
        let i = ((v.clamp(0.0, 1.0) * (n - 1) as f64).round() as usize).min(n - 1);
        self.heat[i]
    }

    pub fn backend(&self, b: crate::session::Backend) -> Style {
        match b {
            crate::session::Backend::Native => self.native,
            crate::session::Backend::Selective => self.selective,
        }
    }
}

/// Names and descriptions of every theme: built-ins, then files in `themes/` not built in.
pub fn list() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = BUILTIN
        .iter()
        .filter_map(|(n, t)| {
            Theme::parse(t, n, Depth::TrueColor)
                .ok()
                .map(|th| (n.to_string(), th.description))
        })
        .collect();
    if let Ok(rd) = std::fs::read_dir("themes") {
        let mut extra: Vec<(String, String)> = rd
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let name = p.file_stem()?.to_string_lossy().to_string();
                if p.extension()? != "toml" || BUILTIN.iter().any(|b| b.0 == name) {
                    return None;
                }
                let text = std::fs::read_to_string(&p).ok()?;
                let desc = match Theme::parse(&text, &name, Depth::TrueColor) {
                    Ok(t) => t.description,
                    Err(e) => format!("(invalid: {e})"),
                };
                Some((name, desc))
            })
            .collect();
        extra.sort();
        out.extend(extra);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_theme_parses_at_every_depth() {
        for (name, text) in BUILTIN {
            for d in [Depth::TrueColor, Depth::Ansi256, Depth::Ansi16, Depth::None] {
                let t = Theme::parse(text, name, d).unwrap();
                assert!(t.heat.len() >= 4, "{name}: heat gradient");
                if d == Depth::Ansi16 {
                    for s in [t.text, t.native, t.selective, t.bad, t.good] {
                        assert!(
                            !matches!(s.fg, Some(Color::Rgb(..)) | Some(Color::Indexed(_))),
                            "{name}: 16-colour"
                        );
                    }
                }
                if d == Depth::None {
                    assert!(
                        t.native.fg.is_none() && t.text.fg.is_none(),
                        "{name}: no colour at all"
                    );
                }
            }
        }
    }

    #[test]
    fn depth_detection_honours_no_color_and_term() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            Depth::detect(env(&[("NO_COLOR", "1"), ("COLORTERM", "truecolor")])),
            Depth::None
        );
        assert_eq!(
            Depth::detect(env(&[("COLORTERM", "truecolor")])),
            Depth::TrueColor
        );
        assert_eq!(
            Depth::detect(env(&[("TERM", "xterm-256color")])),
            Depth::Ansi256
        );
        assert_eq!(Depth::detect(env(&[("TERM", "xterm")])), Depth::Ansi16);
        assert_eq!(Depth::parse("16").unwrap(), Some(Depth::Ansi16));
        assert!(Depth::parse("lots").is_err());
    }

    #[test]
    fn colour_mapping() {
        assert_eq!(to_256(255, 0, 0), 196);
        assert_eq!(to_16(250, 10, 10), Color::LightRed);
        assert!(parse_color("#zzzzzz").is_err());
        assert_eq!(parse_color("red").unwrap(), Color::Red);
    }

    #[test]
    fn bad_theme_file_names_the_field() {
        let text = BUILTIN[0].1.replace("native = ", "native = \"#12\" #");
        let e = Theme::parse(&text, "x.toml", Depth::TrueColor).unwrap_err();
        assert!(e.contains("colors.native"), "{e}");
    }
}
