//! `moescope extract`: one safetensors file per (layer, expert) plus a manifest, and the
//! `extracted:DIR` source that reads them.
//!
//! Crash safety: every expert file is written to a temporary name, fsynced and renamed into
//! place; after each rename a line is appended (and fsynced) to `manifest.partial.jsonl`. A
//! rerun skips experts that the journal lists and whose file has the journalled size, redoes
//! the rest (rewriting identical bytes), and writes `manifest.json` — sorted, no timestamps —
//! only when every expert is there. So a killed run, resumed, ends byte-identical to a clean one.
//!
//! Nothing in the directory is trusted: every journal line and the manifest carry the source's
//! weights fingerprint (a resume into another model's partial extraction is an error naming both),
//! paths in the manifest must stay inside the directory, lengths must match shapes, and one
//! extractor at a time holds the directory's lock.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::source::{ExpertSource, FileTable, RawExpert, ShardSource};
use crate::model::checkpoint::TensorLocation;
use crate::model::config::{ExpertProj, MoeConfig};
use crate::model::error::{ModelError, Result};
use crate::model::safetensors_file::{OwnedTensor, SafetensorsFile, StDtype, write_atomic};

pub const MANIFEST: &str = "manifest.json";
pub const JOURNAL: &str = "manifest.partial.jsonl";
pub const FORMAT: &str = "moescope-extracted-experts";
pub const VERSION: u32 = 1;
/// Expert files written concurrently by `extract`.
const EXTRACT_WORKERS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the expert's file.
    pub offset: u64,
    pub len: u64,
    /// An FP8 matrix's block scales, stored in the same file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Box<ManifestTensor>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub layer: usize,
    pub expert: usize,
    /// Path relative to the extraction directory.
    pub file: String,
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub blake3: String,
    pub tensors: Vec<ManifestTensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model_type: String,
    pub config_fingerprint: String,
    /// The source checkpoint's weights fingerprint (`Checkpoint::weights_fingerprint`); empty
    /// in manifests written before it was recorded.
    #[serde(default)]
    pub weights_fingerprint: String,
    /// The model directory extracted from, as given (for messages).
    #[serde(default)]
    pub source: String,
    pub num_hidden_layers: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub expert_bytes: u64,
    pub experts: Vec<ManifestEntry>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            what: if dir.join(JOURNAL).exists() {
                "extraction is incomplete (run `moescope extract` again to finish it)".into()
            } else {
                "reading the extraction manifest".into()
            },
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// A manifest from its text (`path` names it in errors), every entry checked.
    pub fn parse(text: &str, path: PathBuf) -> Result<Self> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| ModelError::Config {
            file: path.clone(),
            field: String::new(),
            msg: format!("not a valid extraction manifest: {e}"),
        })?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(ModelError::Config {
                file: path,
                field: "format".into(),
                msg: format!(
                    "\"{}\" version {}, expected \"{FORMAT}\" version {VERSION}",
                    m.format, m.version
                ),
            });
        }
        for (i, e) in m.experts.iter().enumerate() {
            e.check().map_err(|msg| ModelError::Config {
                file: path.clone(),
                field: format!("experts[{i}]"),
                msg,
            })?;
        }
        Ok(m)
    }
}

impl ManifestEntry {
    /// What a manifest or journal entry must be before anything is opened or allocated by it:
    /// a path inside the directory, a BLAKE3 in hex, each tensor a range inside the file whose
    /// length its dtype and shape account for.
    pub fn check(&self) -> std::result::Result<(), String> {
        confined(&self.file)?;
        if self.blake3.len() != 64 || !self.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`blake3` of {}: expected 64 hex digits", self.file));
        }
        for t in &self.tensors {
            let dtype = StDtype::parse(&t.dtype)
                .ok_or_else(|| format!("tensor `{}`: unknown dtype \"{}\"", t.name, t.dtype))?;
            let elems = t
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let bytes = elems.and_then(|n| dtype.bytes_for(n));
            if bytes != Some(t.len) {
                return Err(format!(
                    "tensor `{}`: {} bytes, but {:?} × {} makes {}",
                    t.name,
                    t.len,
                    t.shape,
                    t.dtype,
                    bytes.map_or("more than 2^64".into(), |b| b.to_string())
                ));
            }
            if t.offset
                .checked_add(t.len)
                .is_none_or(|end| end > self.size)
            {
                return Err(format!(
                    "tensor `{}`: bytes {}+{} lie outside the {}-byte file {}",
                    t.name, t.offset, t.len, self.size, self.file
                ));
            }
        }
        Ok(())
    }
}

/// `rel` as a path that stays inside the directory it is relative to: no root, no `..`, no `.`
/// (symbolic links are caught where the file is opened, see [`inside`]).
pub fn confined(rel: &str) -> std::result::Result<&Path, String> {
    use std::path::Component;
    let p = Path::new(rel);
    let plain = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(p)
    } else {
        Err(format!(
            "file \"{rel}\" is not a path inside the extraction directory"
        ))
    }
}

/// `dir/rel`, checked to resolve inside `dir` even through symbolic links.
pub fn inside(dir: &Path, rel: &str) -> std::result::Result<PathBuf, String> {
    let path = dir.join(confined(rel)?);
    let (Ok(real_dir), Ok(real)) = (dir.canonicalize(), path.canonicalize()) else {
        // Missing: callers report it as missing; nothing outside is read.
        return Ok(path);
    };
    if real.starts_with(&real_dir) {
        Ok(path)
    } else {
        Err(format!(
            "{} leads outside the extraction directory (to {})",
            path.display(),
            real.display()
        ))
    }
}

/// A journal line: an expert written, and whose weights it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JournalLine {
    weights: String,
    source: String,
    #[serde(flatten)]
    entry: ManifestEntry,
}

pub fn expert_file(layer: usize, expert: usize) -> String {
    format!("experts/layer_{layer:03}/expert_{expert:03}.safetensors")
}

/// What an extraction did.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    pub experts: usize,
    pub extracted: usize,
    pub resumed: usize,
    pub bytes_written: u64,
    pub elapsed: Duration,
}

impl ExtractReport {
    pub fn throughput_mib_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes_written as f64 / (1 << 20) as f64 / s
        } else {
            0.0
        }
    }
}

/// Testing aids for the crash-safety tests (hidden flags of `moescope extract`).
#[derive(Debug, Clone, Default)]
pub struct ExtractFaults {
    /// Abort the process right after the N-th new expert file is renamed into place, before it
    /// is journalled (the worst moment for a crash).
    pub abort_after: Option<usize>,
    /// Sleep this long after each expert (so a test can kill -9 a run in progress).
    pub delay: Duration,
}

/// Which model an extraction is of: its directory (for messages) and weights fingerprint.
#[derive(Debug, Clone)]
pub struct SourceId {
    pub model: String,
    pub weights: String,
}

/// Extracts every expert of the model in `source` (identified by `id`) into `out`.
pub fn extract(
    source: &ShardSource,
    id: &SourceId,
    config_json: &Path,
    out: &Path,
    show_progress: bool,
    faults: &ExtractFaults,
) -> Result<ExtractReport> {
    let start = Instant::now();
    let cfg = source.config();
    let io = |path: &Path, what: &str, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        what: what.into(),
        source: e,
    };
    let missing: Vec<(usize, usize)> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .filter(|&(l, e)| !source.has(l, e))
        .collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .take(10)
            .map(|(l, e)| format!("L{l}/E{e}"))
            .collect();
        return Err(ModelError::Input(format!(
            "the checkpoint itself lacks {} experts ({}{}); refusing to make an incomplete extraction",
            missing.len(),
            list.join(", "),
            if missing.len() > 10 { ", …" } else { "" }
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, "creating output directory", e))?;
    let _lock = DirLock::take(out)?;
    let other = |what: &str, model: &str, weights: &str| {
        ModelError::Input(format!(
            "{} holds {what} of a different model ({}weights {}); this is {} (weights {}) — \
             extract into another directory, or remove that one",
            out.display(),
            if model.is_empty() {
                String::new()
            } else {
                format!("{model}, ")
            },
            if weights.is_empty() {
                "not recorded: made by an older moescope"
            } else {
                weights
            },
            id.model,
            id.weights
        ))
    };
    let manifest_path = out.join(MANIFEST);
    if manifest_path.exists() {
        let existing = Manifest::read(out)?;
        if existing.weights_fingerprint != id.weights {
            return Err(other(
                "an extraction",
                &existing.source,
                &existing.weights_fingerprint,
            ));
        }
    }
    // A directory that is not an extraction but holds another config.json is someone's model:
    // its config is not written over (the copy below would have replaced it).
    let own_config = out.join("config.json");
    if !manifest_path.exists()
        && !out.join(JOURNAL).exists()
        && own_config.exists()
        && std::fs::read(&own_config).ok() != std::fs::read(config_json).ok()
    {
        return Err(ModelError::Input(format!(
            "{} holds another config.json and no extraction (no {MANIFEST} or {JOURNAL}); \
             moescope does not write over it — extract into a new or empty directory",
            out.display()
        )));
    }
    // A config copy makes the directory self-describing for `verify`; generation_config.json
    // goes with it, since the end-of-sequence ids it carries are part of the config's identity.
    let gen_config = config_json.with_file_name("generation_config.json");
    for (src, name) in [
        (config_json, "config.json"),
        (gen_config.as_path(), "generation_config.json"),
    ] {
        if name != "config.json" && !src.exists() {
            continue;
        }
        let copy = out.join(name);
        let bytes = std::fs::read(src).map_err(|e| io(src, "reading", e))?;
        if std::fs::read(&copy).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&copy, &bytes).map_err(|e| io(&copy, "writing", e))?;
        }
    }

    remove_stale_temporaries(out);
    let journal_path = out.join(JOURNAL);
    let mut done: BTreeMap<(usize, usize), ManifestEntry> = BTreeMap::new();
    if manifest_path.exists() {
        for e in Manifest::read(out)?.experts {
            done.insert((e.layer, e.expert), e);
        }
    }
    for line in read_journal(&journal_path) {
        if line.weights != id.weights {
            return Err(other("a partial extraction", &line.source, &line.weights));
        }
        // A damaged or hostile line is not resumed from: that expert is written again.
        if line.entry.check().is_ok() {
            done.insert((line.entry.layer, line.entry.expert), line.entry);
        }
    }
    // Keep only entries whose file is really there with the journalled size.
    done.retain(|_, e| {
        std::fs::metadata(out.join(&e.file))
            .map(|m| m.len() == e.size)
            .unwrap_or(false)
    });

    let expected: Vec<(usize, usize)> = cfg
        .moe_layers()
        .flat_map(|l| (0..cfg.num_experts).map(move |e| (l, e)))
        .collect();
    let todo: Vec<(usize, usize)> = expected
        .iter()
        .copied()
        .filter(|k| !done.contains_key(k))
        .collect();
    let resumed = expected.len() - todo.len();
    let todo_bytes: u64 = todo.iter().map(|&(l, e)| source.stored_bytes(l, e)).sum();
    let bar = if show_progress {
        let b = indicatif::ProgressBar::new(todo_bytes);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} extracting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut journal = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal_path)
        .map_err(|e| io(&journal_path, "opening the extraction journal", e))?;
    // Several experts are written at once: each file costs a read, a write and an fsync, and
    // the fsyncs' latency (not the bytes) dominates, so overlapping them is most of the speed.
    // The journal is still appended by this thread alone, in completion order; a file renamed
    // but not yet journalled when the process dies is simply redone (byte-identical) on resume.
    let workers = if faults.delay.is_zero() {
        EXTRACT_WORKERS.min(todo.len().max(1))
    } else {
        1 // the kill tests pace a single writer
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut written = 0u64;
    let mut n = 0usize;
    let outcome: Result<()> = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Result<(ManifestEntry, u64)>>();
        for _ in 0..workers {
            let tx = tx.clone();
            let (todo, next, stop) = (&todo, &next, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(layer, expert)) = todo.get(i) else {
                        break;
                    };
                    let one = (|| {
                        let raw = source.read(layer, expert)?;
                        let rel = expert_file(layer, expert);
                        let path = out.join(&rel);
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent)
                                .map_err(|e| io(parent, "creating directory", e))?;
                        }
                        let entry = write_expert(&path, &rel, &raw, cfg)?;
                        Ok((entry, raw.bytes()))
                    })();
                    let failed = one.is_err();
                    if tx.send(one).is_err() || failed {
                        break;
                    }
                    if !faults.delay.is_zero() {
                        std::thread::sleep(faults.delay);
                    }
                }
            });
        }
        drop(tx);
        for one in rx {
            let (entry, read) = match one {
                Ok(x) => x,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            n += 1;
            written += entry.size;
            bar.inc(read);
            bar.set_message(format!("L{} E{}", entry.layer, entry.expert));
            if faults.abort_after == Some(n) {
                std::process::abort();
            }
            let mut line = serde_json::to_string(&JournalLine {
                weights: id.weights.clone(),
                source: id.model.clone(),
                entry: entry.clone(),
            })
            .expect("entry serialises");
            line.push('\n');
            if let Err(e) = journal
                .write_all(line.as_bytes())
                .and_then(|_| journal.sync_data())
            {
                stop.store(true, Ordering::Relaxed);
                return Err(io(&journal_path, "appending to the extraction journal", e));
            }
            done.insert((entry.layer, entry.expert), entry);
        }
        Ok(())
    });
    outcome?;
    bar.finish_and_clear();

    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model_type: cfg.family.model_type().into(),
        config_fingerprint: cfg.fingerprint(),
        weights_fingerprint: id.weights.clone(),
        source: id.model.clone(),
        num_hidden_layers: cfg.num_hidden_layers,
        moe_layers: cfg.moe_layers().collect(),
        num_experts: cfg.num_experts,
        expert_bytes: source.stored_bytes(expected[0].0, expected[0].1),
        experts: done.into_values().collect(),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises") + "\n";
    write_text_atomic(&out.join(MANIFEST), &text)?;
    let _ = std::fs::remove_file(&journal_path);
    Ok(ExtractReport {
        experts: expected.len(),
        extracted: todo.len(),
        resumed,
        bytes_written: written,
        elapsed: start.elapsed(),
    })
}

fn write_expert(path: &Path, rel: &str, raw: &RawExpert, cfg: &MoeConfig) -> Result<ManifestEntry> {
    let tensors: Vec<OwnedTensor<'_>> = raw
        .parts
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p.scale.as_deref()))
        .map(|p| OwnedTensor {
            name: p.name.clone(),
            dtype: p.dtype,
            shape: p.shape.clone(),
            bytes: &p.bytes,
        })
        .collect();
    // One metadata key: safetensors serialises its HashMap in random order, and the files must
    // come out byte-identical run after run.
    let meta = HashMap::from([(
        "moescope".to_string(),
        format!(
            "{{\"layer\":{},\"expert\":{},\"config_fingerprint\":\"{}\"}}",
            raw.layer,
            raw.expert,
            cfg.fingerprint()
        ),
    )]);
    write_atomic(path, &tensors, Some(meta))?;
    let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        what: "reading back".into(),
        source: e,
    })?;
    let file = SafetensorsFile::open(path)?;
    let tensors = ExpertProj::ALL
        .iter()
        .zip(&raw.parts)
        .map(|(&proj, part)| {
            let entry = |name: String| {
                let info = file.info(&name).expect("just written");
                ManifestTensor {
                    name,
                    dtype: info.dtype.name().into(),
                    shape: info.shape.clone(),
                    offset: info.offset,
                    len: info.len,
                    scale: None,
                }
            };
            let mut t = entry(cfg.expert_tensor_name(raw.layer, raw.expert, proj));
            t.scale = part.scale.as_ref().map(|s| Box::new(entry(s.name.clone())));
            t
        })
        .collect();
    Ok(ManifestEntry {
        layer: raw.layer,
        expert: raw.expert,
        file: rel.to_string(),
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
        tensors,
    })
}

/// One extractor at a time: an exclusive lock on `.moescope-extract.lock` in the directory,
/// held while this lives (the kernel drops it with the process, however it ends).
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn take(dir: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let path = dir.join(".moescope-extract.lock");
        let io = |what: &str, e: std::io::Error| ModelError::Io {
            path: path.clone(),
            what: what.into(),
            source: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening the extraction lock", e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ModelError::Input(format!(
                "{} is being written by another `moescope extract`; wait for it to finish",
                dir.display()
            )));
        }
        Ok(DirLock { _file: file })
    }
}

/// A run killed mid-write leaves `.NAME.tmp-PID` files behind; they are never renamed into
/// place, so they can go. Symbolic links are not followed (a link to a directory elsewhere
/// must not have its files removed).
fn remove_stale_temporaries(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_symlink() {
                continue;
            }
            if kind.is_dir() {
                stack.push(p);
            } else if (name.starts_with('.') && name.contains(".tmp-")) || name == "manifest.tmp" {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

pub(crate) fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |what: &str, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        what: what.into(),
        source: e,
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))
}

/// One journal line as `extract` resumes from it: parsed, and its entry checked.
pub fn parse_journal_line(line: &str) -> std::result::Result<(String, ManifestEntry), String> {
    let l: JournalLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
    l.entry.check()?;
    Ok((l.weights, l.entry))
}

/// Journal lines; a torn last line (crash mid-append) is ignored.
fn read_journal(path: &Path) -> Vec<JournalLine> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// Experts read from an extraction directory.
pub struct ExtractedSource {
    cfg: MoeConfig,
    dir: PathBuf,
    entries: HashMap<(usize, usize), [TensorLocation; 3]>,
    files: FileTable,
    cold: AtomicBool,
}

impl ExtractedSource {
    /// The expert's three parts, or the error naming what is missing.
    fn parts_of(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<&[crate::model::checkpoint::TensorLocation; 3]> {
        self.entries
            .get(&(layer, expert))
            .ok_or_else(|| super::source::missing_error(self, layer, expert))
    }

    pub fn open(dir: &Path, cfg: &MoeConfig) -> Result<Self> {
        let m = Manifest::read(dir)?;
        if m.config_fingerprint != cfg.fingerprint() {
            return Err(ModelError::Input(format!(
                "{} was extracted from a different model (config fingerprint {}, this model {})",
                dir.display(),
                m.config_fingerprint,
                cfg.fingerprint()
            )));
        }
        let mut entries = HashMap::new();
        for e in &m.experts {
            let file = inside(dir, &e.file).map_err(|msg| ModelError::Config {
                file: dir.join(MANIFEST),
                field: format!("experts[L{} E{}].file", e.layer, e.expert),
                msg,
            })?;
            let location = |t: &ManifestTensor| -> Result<TensorLocation> {
                let dtype = StDtype::parse(&t.dtype).ok_or_else(|| ModelError::Config {
                    file: dir.join(MANIFEST),
                    field: format!("experts[L{} E{}].dtype", e.layer, e.expert),
                    msg: format!("unknown dtype \"{}\"", t.dtype),
                })?;
                Ok(TensorLocation {
                    name: t.name.clone(),
                    file: file.clone(),
                    dtype,
                    shape: t.shape.clone(),
                    offset: t.offset,
                    len: t.len,
                    scale: None,
                })
            };
            let parts: Vec<TensorLocation> = e
                .tensors
                .iter()
                .map(|t| {
                    let mut loc = location(t)?;
                    if let Some(s) = &t.scale {
                        loc.scale = Some(Box::new(location(s)?));
                    }
                    Ok(loc)
                })
                .collect::<Result<_>>()?;
            let parts: [TensorLocation; 3] = parts.try_into().map_err(|_| ModelError::Config {
                file: dir.join(MANIFEST),
                field: format!("experts[L{} E{}].tensors", e.layer, e.expert),
                msg: "expected exactly 3 tensors (gate, up, down)".into(),
            })?;
            for (p, proj) in parts.iter().zip(ExpertProj::ALL) {
                if p.shape != proj.shape(cfg) {
                    return Err(ModelError::Tensor {
                        file: p.file.clone(),
                        tensor: p.name.clone(),
                        msg: format!("shape {:?}, expected {:?}", p.shape, proj.shape(cfg)),
                    });
                }
            }
            entries.insert((e.layer, e.expert), parts);
        }
        Ok(ExtractedSource {
            cfg: cfg.clone(),
            dir: dir.to_path_buf(),
            entries,
            files: FileTable::default(),
            cold: AtomicBool::new(false),
        })
    }
}

impl ExpertSource for ExtractedSource {
    fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn has(&self, layer: usize, expert: usize) -> bool {
        self.entries.contains_key(&(layer, expert))
    }

    fn read(&self, layer: usize, expert: usize) -> Result<RawExpert> {
        let [g, u, d] = self
            .entries
            .get(&(layer, expert))
            .ok_or_else(|| super::source::missing_error(self, layer, expert))?;
        let cold = self.cold.load(Ordering::Relaxed);
        super::source::read_expert(&self.files, [g, u, d], cold, layer, expert)
    }

    fn stored_bytes(&self, layer: usize, expert: usize) -> u64 {
        self.entries
            .get(&(layer, expert))
            .map(|p| p.iter().map(|t| t.len).sum())
            .unwrap_or_else(|| super::source::default_expert_bytes(&self.cfg))
    }

    fn describe(&self) -> String {
        format!("the extraction in {}", self.dir.display())
    }

    fn set_cold(&self, cold: bool) {
        self.cold.store(cold, Ordering::Relaxed);
    }

    fn is_cold(&self) -> bool {
        self.cold.load(Ordering::Relaxed)
    }

    fn part_locations(
        &self,
        layer: usize,
        expert: usize,
    ) -> Option<[crate::model::checkpoint::TensorLocation; 3]> {
        self.entries.get(&(layer, expert)).cloned()
    }

    fn map_bf16(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<
        Option<(
            crate::model::mapped::MappedBf16,
            crate::model::mapped::MappedBf16,
        )>,
    > {
        if self.is_cold() {
            return Ok(None);
        }
        super::source::map_bf16_parts(&self.files, self.parts_of(layer, expert)?, &self.cfg)
    }

    fn read_into(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
    ) -> Result<[super::source::PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        let keep = super::source::Then::Keep;
        super::source::read_locations_into(&self.files, loc.each_ref(), self.is_cold(), keep, buf)
    }

    fn read_into_for_copy(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
    ) -> Result<[super::source::PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        let demote = super::source::Then::Demote;
        super::source::read_locations_into(&self.files, loc.each_ref(), self.is_cold(), demote, buf)
    }

    fn read_into_for_copy_streamed(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [u8],
        piece: usize,
        ready: &mut super::source::Ready<'_>,
    ) -> Result<[super::source::PartSpan; 3]> {
        let loc = self.parts_of(layer, expert)?;
        let cold = self.is_cold();
        super::source::read_locations_streamed(&self.files, loc.each_ref(), cold, buf, piece, ready)
    }

    fn read_into_uninit(
        &self,
        layer: usize,
        expert: usize,
        buf: &mut [std::mem::MaybeUninit<u8>],
    ) -> Result<Option<[super::source::PartSpan; 3]>> {
        let loc = self.parts_of(layer, expert)?;
        super::source::read_locations_into_uninit(&self.files, loc.each_ref(), self.is_cold(), buf)
            .map(Some)
    }
}
