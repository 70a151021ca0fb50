//! `moescope extract` and `moescope verify`.

use std::time::Duration;

use anyhow::Result;

use crate::cli::{ExtractArgs, VerifyArgs};
use crate::engine::{ModelFiles, default_model_dir};
use crate::experts::extract::{ExtractFaults, SourceId, extract};
use crate::experts::source::ShardSource;
use crate::experts::verify::verify;
use crate::util::fmt_bytes;

pub fn run_extract(args: &ExtractArgs) -> Result<()> {
    let model = args.model.clone().unwrap_or_else(default_model_dir);
    let files = ModelFiles::open(&model)?;
    if files.ckpt.gguf().is_some() {
        // Each expert of a GGUF file already is one contiguous byte range per matrix, which
        // selective reads in place; an extraction would copy the file for nothing.
        anyhow::bail!(
            "{}: extract splits safetensors checkpoints into one file per expert; a GGUF \
             file's experts are read from the file itself (--model {} --expert-source shards)",
            model.display(),
            model.display()
        );
    }
    let source = ShardSource::new(&files.ckpt, &files.cfg)?;
    let faults = ExtractFaults {
        abort_after: args.abort_after,
        delay: Duration::from_millis(args.delay_ms),
    };
    let show = !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let id = SourceId {
        model: model.display().to_string(),
        weights: files.ckpt.weights_fingerprint(&files.cfg)?,
    };
    let r = extract(
        &source,
        &id,
        &model.join("config.json"),
        &args.out,
        show,
        &faults,
    )?;
    println!(
        "extracted {} of {} experts ({} already done) to {}: {} in {:.2} s = {:.1} MiB/s",
        r.extracted,
        r.experts,
        r.resumed,
        args.out.display(),
        fmt_bytes(r.bytes_written),
        r.elapsed.as_secs_f64(),
        r.throughput_mib_s()
    );
    Ok(())
}

/// Returns the process exit code: 0 only when the directory is complete.
pub fn run_verify(args: &VerifyArgs) -> Result<u8> {
    let report = verify(&args.dir, args.model.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::report::verify::verify_table(&report));
    }
    Ok(if report.complete() { 0 } else { 1 })
}
