//! Recordings: `recordings/<UTC time>-<model>.ndjson` — a versioned header line, then one
//! [`Stamped`] event per line, each written with a single `write` and flushed, so a crash or a
//! kill loses at most the line being written and a reader can follow the file while it grows.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::event::Stamped;
use super::prompts::PromptSet;
use crate::cache::settings::CacheSettings;
use crate::cache::trace::MoeShape;
use crate::settings::Settings;

pub const FORMAT: &str = "moescope-recording";
pub const VERSION: u32 = 1;

/// How the two backends share the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Token by token in turn: neither is timed while the other runs; both panes stream.
    #[default]
    Alternate,
    /// One backend at a time (lowest peak memory).
    Sequential,
    /// Both at once (timings marked contended).
    Parallel,
}

impl Schedule {
    pub const ALL: [Schedule; 3] = [
        Schedule::Alternate,
        Schedule::Sequential,
        Schedule::Parallel,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Schedule::Alternate => {
                "Token by token in turn: neither is timed while the other runs; both panes stream"
            }
            Schedule::Sequential => "One backend at a time (lowest peak memory)",
            Schedule::Parallel => "Both at once (timings marked contended)",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Alternate => "alternate",
            Schedule::Sequential => "sequential",
            Schedule::Parallel => "parallel",
        }
    }
}

/// Decoding settings as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub tool_version: String,
    pub created_utc: String,
    pub model: String,
    pub model_type: String,
    pub config_fingerprint: String,
    pub moe: MoeShape,
    pub device: String,
    pub dtype: String,
    /// Cache settings of the selective backend, as given.
    pub cache: CacheSettings,
    /// The same, in words ("48 experts, global scope, lru; shards; warm page cache").
    pub cache_describe: String,
    pub schedule: Schedule,
    pub sampling: Sampling,
    pub prompts: PromptSet,
    /// Decision profile the run was judged with (export can re-judge with another).
    pub profile: String,
    pub host: String,
    /// How the run was set up beyond its flags (absent from the first recordings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
}

/// "2026-11-25T23:40:12Z" from a system time (no calendar crate needed for UTC).
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// `recordings/20261125T234012Z-tiny-moe.ndjson`
pub fn default_path(dir: &Path, model: &str, now: SystemTime) -> PathBuf {
    let stamp: String = utc_timestamp(now)
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let name: String = Path::new(model)
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{stamp}-{name}.ndjson"))
}

/// Where the summary of a recording goes: next to it, `.summary.json`.
pub fn summary_path(recording: &Path) -> PathBuf {
    let stem = recording
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "session".into());
    recording.with_file_name(format!("{stem}.summary.json"))
}

/// Appends events to a recording, one flushed line each.
pub struct Recorder {
    file: File,
    path: PathBuf,
    lines: u64,
}

impl Recorder {
    pub fn create(path: &Path, header: &Header) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut line = serde_json::to_string(header).expect("header serialises");
        line.push('\n');
        file.write_all(line.as_bytes())?;
        file.flush()?;
        Ok(Recorder {
            file,
            path: path.to_path_buf(),
            lines: 1,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn append(&mut self, ev: &Stamped) -> std::io::Result<()> {
        let mut line = serde_json::to_string(ev).expect("event serialises");
        line.push('\n');
        // One write per line: a reader following the file sees whole lines or a torn last one.
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.lines += 1;
        Ok(())
    }

    /// fsync at the end of a run (each line was already handed to the kernel).
    pub fn close(self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

/// A recording read back.
#[derive(Debug, Clone)]
pub struct Recording {
    pub header: Header,
    pub events: Vec<Stamped>,
    /// True when the last line was incomplete (the writer died mid-line) and was skipped.
    pub truncated_tail: bool,
}

pub fn parse_header(line: &str, path: &Path) -> Result<Header, String> {
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("{}: line 1: not a recording header: {e}", path.display()))?;
    match v.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        other => {
            return Err(format!(
                "{}: line 1: field `format` is {:?}, expected \"{FORMAT}\" (not a moescope recording)",
                path.display(),
                other
            ));
        }
    }
    let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
    if version as u32 != VERSION {
        return Err(format!(
            "{}: line 1: recording version {version}, this moescope reads version {VERSION}",
            path.display()
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("{}: line 1: bad header: {e}", path.display()))
}

/// Reads a whole recording. A torn last line is tolerated; a bad line elsewhere is an error
/// naming its line number.
pub fn read(path: &Path) -> Result<Recording, String> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| format!("{}: cannot read recording: {e}", path.display()))?;
    let ends_with_newline = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let Some(first) = lines.first() else {
        return Err(format!(
            "{}: empty file (expected a recording header line)",
            path.display()
        ));
    };
    if lines.len() == 1 && !ends_with_newline {
        // Even the header may be torn if the writer died at once.
        parse_header(first, path)?;
    }
    let header = parse_header(first, path)?;
    let mut events = Vec::with_capacity(lines.len());
    let mut truncated_tail = false;
    for (i, line) in lines.iter().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Stamped>(line) {
            Ok(ev) => events.push(ev),
            Err(_) if i == lines.len() - 1 && !ends_with_newline => truncated_tail = true,
            Err(e) => {
                return Err(format!(
                    "{}: line {}: not a valid event: {e}",
                    path.display(),
                    i + 1
                ));
            }
        }
    }
    Ok(Recording {
        header,
        events,
        truncated_tail,
    })
}

/// Follows a recording that is still being written: returns complete new lines as they arrive.
pub struct Follower {
    reader: BufReader<File>,
    partial: String,
    pos: u64,
}

impl Follower {
    /// Opens the file and returns the header; events come from [`Follower::poll`].
    pub fn open(path: &Path) -> Result<(Header, Self), String> {
        let file = File::open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !first.ends_with('\n') {
            return Err(format!(
                "{}: the header line is not complete yet",
                path.display()
            ));
        }
        let header = parse_header(first.trim_end(), path)?;
        let pos = first.len() as u64;
        Ok((
            header,
            Follower {
                reader,
                partial: String::new(),
                pos,
            },
        ))
    }

    /// Every complete event line written since the last call (never blocks).
    pub fn poll(&mut self) -> Result<Vec<Stamped>, String> {
        let mut out = Vec::new();
        let f = self.reader.get_mut();
        f.seek(SeekFrom::Start(self.pos))
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        f.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        self.pos += buf.len() as u64;
        self.partial.push_str(&buf);
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Stamped>(line) {
                Ok(ev) => out.push(ev),
                Err(e) => return Err(format!("bad event line: {e}")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_650_012);
        assert_eq!(utc_timestamp(t), "2026-11-25T23:40:12Z");
        let p = default_path(Path::new("recordings"), "/m/models/tiny-moe", t);
        assert_eq!(p, Path::new("recordings/20261125T234012Z-tiny-moe.ndjson"));
    }
}
