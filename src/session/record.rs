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
use crate::prompt_settings::{PromptStyle, RecommendedSampling};
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
    /// The profile itself, so the recording is judged the same anywhere without reading a file
    /// it names (absent from the first recordings: their built-in name stands for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_definition: Option<crate::session::verdict::Profile>,
    pub host: String,
    /// How prompt texts became tokens (absent from the first recordings: chat template,
    /// thinking off).
    #[serde(default)]
    pub prompt_style: PromptStyle,
    /// The sampling the checkpoint's generation_config.json recommends (shown beside the
    /// run's own, which stays greedy unless asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_sampling: Option<RecommendedSampling>,
    /// How the run was set up beyond its flags (absent from the first recordings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
    /// The reference implementation asked for (`--reference-impl`), which runs after both
    /// backends: named here so the dashboard shows its column from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
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

/// Appends events to a recording, one line each, written whole or not at all.
///
/// Why this care: a write that fails part-way (disk full, a file size limit) leaves a torn
/// fragment, and a later successful append would glue the next line onto it — one bad line in
/// the middle, and a reader rejects the whole recording. So a failed append cuts the file back
/// to its last whole line and the recorder refuses every append after it: the file holds every
/// event up to the failure, readable. [`sync`](Self::sync) makes what is written durable and
/// notices a recording deleted or replaced under the run.
pub struct Recorder {
    file: File,
    path: PathBuf,
    lines: u64,
    /// Bytes of whole lines written.
    good_len: u64,
    /// (device, inode) of the file created, to tell whether the path still names it.
    identity: (u64, u64),
    failed: Option<String>,
}

fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

impl Recorder {
    pub fn create(path: &Path, header: &Header) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut r = Recorder {
            identity: identity(&file.metadata()?),
            file,
            path: path.to_path_buf(),
            lines: 0,
            good_len: 0,
            failed: None,
        };
        r.write_line(serde_json::to_string(header).expect("header serialises"))?;
        r.sync()?;
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Appends one event. After a failure (this append's or an earlier one's) nothing more is
    /// written and the error says what failed first.
    pub fn append(&mut self, ev: &Stamped) -> std::io::Result<()> {
        self.write_line(serde_json::to_string(ev).expect("event serialises"))
    }

    fn write_line(&mut self, mut line: String) -> std::io::Result<()> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(format!("recording stopped: {e}")));
        }
        line.push('\n');
        // One write per line: a reader following the file sees whole lines or a torn last one.
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.good_len += line.len() as u64;
                self.lines += 1;
                Ok(())
            }
            Err(e) => {
                // Cut a partial line off, so the file ends with the last whole event.
                let _ = self.file.set_len(self.good_len);
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Makes everything written so far durable (fsync), and checks that the path still names
    /// this file: a recording deleted or replaced under a run would otherwise take every later
    /// event with it, silently. Called at each prompt's end and at close.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(format!("recording stopped: {e}")));
        }
        let checked = self
            .file
            .sync_data()
            .and_then(|()| match std::fs::metadata(&self.path) {
                Ok(m) if identity(&m) == self.identity => Ok(()),
                Ok(_) => Err(std::io::Error::other(
                    "the recording was replaced by another file",
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(std::io::Error::other("the recording was deleted"))
                }
                Err(e) => Err(e),
            });
        if let Err(e) = &checked {
            self.failed = Some(e.to_string());
        }
        checked
    }

    /// The final fsync at the end of a run.
    pub fn close(mut self) -> std::io::Result<()> {
        if self.failed.is_some() {
            return Ok(());
        }
        self.sync()?;
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
    let header: Header = serde_json::from_value(v)
        .map_err(|e| format!("{}: line 1: bad header: {e}", path.display()))?;
    // Checked before a state is sized by it (per-layer, per-expert tables).
    header
        .moe
        .check()
        .map_err(|e| format!("{}: line 1: {e}", path.display()))?;
    Ok(header)
}

/// Reads a whole recording. A torn last line is tolerated (even one cut inside a multi-byte
/// character); a bad line elsewhere is an error naming its line number.
pub fn read(path: &Path) -> Result<Recording, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("{}: cannot read recording: {e}", path.display()))?;
    parse(&bytes, path)
}

/// A recording from its bytes (`path` names it in errors), as [`read`] reads it.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Recording, String> {
    let ends_with_newline = bytes.ends_with(b"\n");
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let text = |i: usize| {
        std::str::from_utf8(lines[i])
            .map_err(|e| format!("{}: line {}: not UTF-8 text ({e})", path.display(), i + 1))
    };
    if bytes.is_empty() {
        return Err(format!(
            "{}: empty file (expected a recording header line)",
            path.display()
        ));
    }
    // Even the header may be torn if the writer died at once: then it fails to parse, as it
    // should (there is no recording yet).
    let header = parse_header(text(0)?, path)?;
    let last = lines.len() - 1;
    let mut events = Vec::with_capacity(lines.len());
    let mut truncated_tail = false;
    for i in 1..lines.len() {
        let torn_tail = i == last && !ends_with_newline;
        let line = match text(i) {
            Ok(l) => l,
            Err(_) if torn_tail => {
                truncated_tail = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Stamped>(line) {
            Ok(ev) => events.push(ev),
            Err(_) if torn_tail => truncated_tail = true,
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

/// Follows a recording that is still being written: returns complete new lines as they arrive
/// (a line still being written, even one cut inside a character, waits for its end).
pub struct Follower {
    reader: BufReader<File>,
    partial: Vec<u8>,
    pos: u64,
    path: PathBuf,
    line: usize,
}

impl Follower {
    /// Opens the file and returns the header; events come from [`Follower::poll`].
    pub fn open(path: &Path) -> Result<(Header, Self), String> {
        let file = File::open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut first = Vec::new();
        reader
            .read_until(b'\n', &mut first)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !first.ends_with(b"\n") {
            return Err(format!(
                "{}: the header line is not complete yet",
                path.display()
            ));
        }
        let text = std::str::from_utf8(&first)
            .map_err(|e| format!("{}: line 1: not UTF-8 text ({e})", path.display()))?;
        let header = parse_header(text.trim_end(), path)?;
        let pos = first.len() as u64;
        Ok((
            header,
            Follower {
                reader,
                partial: Vec::new(),
                pos,
                path: path.to_path_buf(),
                line: 1,
            },
        ))
    }

    /// Every complete event line written since the last call (never blocks).
    pub fn poll(&mut self) -> Result<Vec<Stamped>, String> {
        let mut out = Vec::new();
        let f = self.reader.get_mut();
        f.seek(SeekFrom::Start(self.pos))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        self.pos += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            self.line += 1;
            let at = |msg: String| format!("{}: line {}: {msg}", self.path.display(), self.line);
            let line =
                std::str::from_utf8(&line).map_err(|e| at(format!("not UTF-8 text ({e})")))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Stamped>(line) {
                Ok(ev) => out.push(ev),
                Err(e) => return Err(at(format!("not a valid event: {e}"))),
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

    /// The demo recording's header and first events, to write recordings of our own.
    fn demo() -> Recording {
        read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recordings/demo-tiny-moe.ndjson"))
            .unwrap()
    }

    #[test]
    fn a_tail_cut_inside_a_character_is_a_torn_line_not_a_broken_recording() {
        let d = demo();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.ndjson");
        let mut r = Recorder::create(&path, &d.header).unwrap();
        for ev in &d.events[..20] {
            r.append(ev).unwrap();
        }
        r.close().unwrap();
        // A torn last line ending in the first byte of "é" (0xC3 0xA9).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"t\":1.0,\"type\":\"warning\",\"message\":\"caf\xC3")
            .unwrap();
        let back = read(&path).unwrap();
        assert!(back.truncated_tail);
        assert_eq!(back.events, d.events[..20]);
        // The same bytes in the middle are an error naming the line.
        f.write_all(b"\n{}\n").unwrap();
        let e = read(&path).unwrap_err();
        assert!(e.contains("line 22") && e.contains("UTF-8"), "{e}");
        // A follower waits for the rest of a line cut inside a character.
        let path = dir.path().join("follow.ndjson");
        let r = Recorder::create(&path, &d.header).unwrap();
        drop(r);
        let (_, mut follow) = Follower::open(&path).unwrap();
        let line = serde_json::to_string(&d.events[0]).unwrap() + "\n";
        let (a, b) = line.as_bytes().split_at(line.len() - 3);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(a).unwrap();
        assert!(follow.poll().unwrap().is_empty());
        f.write_all(b).unwrap();
        assert_eq!(follow.poll().unwrap(), d.events[..1]);
    }

    #[test]
    fn a_deleted_or_replaced_recording_is_noticed_and_recording_stops() {
        let d = demo();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.ndjson");
        let mut r = Recorder::create(&path, &d.header).unwrap();
        r.append(&d.events[0]).unwrap();
        r.sync().unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = r.sync().unwrap_err().to_string();
        assert!(e.contains("deleted"), "{e}");
        let e = r.append(&d.events[1]).unwrap_err().to_string();
        assert!(e.contains("recording stopped"), "{e}");
        // Replaced by another file of the same name.
        let mut r = Recorder::create(&path, &d.header).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        assert!(r.sync().unwrap_err().to_string().contains("replaced"));
    }
}
