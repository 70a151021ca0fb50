//! `moescope replay`, `watch`, `export` and `themes`: everything that works from a recording,
//! with no model.

use std::io::Write;

use anyhow::{Context, Result};

use crate::cli::{ExportArgs, ExportFormat, ReplayArgs, WatchArgs};
use crate::errors::InputError;
use crate::report;
use crate::session::export;
use crate::session::record::{self, Follower};
use crate::session::state::SessionState;
use crate::session::verdict::{METRICS, Profile};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn replay(a: &ReplayArgs) -> Result<()> {
    if a.speed.is_nan() || a.speed < 0.0 {
        crate::bail_input!("--speed {} must be >= 0", a.speed);
    }
    if a.follow {
        return watch(&WatchArgs {
            file: a.file.clone(),
            profile: a.profile.clone(),
            ui: a.ui.clone(),
        });
    }
    let rec = record::read(&a.file).map_err(InputError)?;
    let profile =
        Profile::for_recording(&rec.header, a.profile.as_deref(), &a.file).map_err(InputError)?;
    if a.no_tui || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let state = SessionState::replayed(&rec);
        let sum = export::summarize(&state, &profile);
        if rec.truncated_tail {
            eprintln!(
                "note: {}: the last line was incomplete and was skipped",
                a.file.display()
            );
        }
        print!("{}", report::table::final_report(&sum));
        return Ok(());
    }
    runtime()?.block_on(crate::ui::replay(
        &a.file,
        rec,
        a.speed,
        profile,
        &super::ui_options(&a.ui),
        None,
    ))
}

pub fn watch(a: &WatchArgs) -> Result<()> {
    // Wait (briefly) for a run that has only just started to write its header.
    let mut tries = 0;
    let (header, follower) = loop {
        match Follower::open(&a.file) {
            Ok(x) => break x,
            Err(e) if tries < 50 && e.contains("not complete yet") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(InputError(e).into()),
        }
    };
    let profile =
        Profile::for_recording(&header, a.profile.as_deref(), &a.file).map_err(InputError)?;
    let rec = record::Recording {
        header,
        events: Vec::new(),
        truncated_tail: false,
    };
    runtime()?.block_on(crate::ui::replay(
        &a.file,
        rec,
        0.0,
        profile,
        &super::ui_options(&a.ui),
        Some(follower),
    ))
}

pub fn export(a: &ExportArgs) -> Result<()> {
    if a.schema {
        print!("{}", report::json::SCHEMA);
        return Ok(());
    }
    if a.list_metrics {
        for (m, d) in METRICS {
            println!("{m:<26} {d}");
        }
        return Ok(());
    }
    let Some(file) = &a.file else {
        crate::bail_input!("export needs a recording file (or --schema / --list-metrics)");
    };
    let rec = record::read(file).map_err(InputError)?;
    let state = SessionState::replayed(&rec);
    // A summary is judged; a trace is not (it needs no profile).
    let summary = || -> Result<export::Summary> {
        let profile =
            Profile::for_recording(&rec.header, a.profile.as_deref(), file).map_err(InputError)?;
        Ok(export::summarize(&state, &profile))
    };
    let text = match a.format {
        ExportFormat::Json => report::json::summary(&summary()?),
        ExportFormat::Markdown => report::markdown::markdown(&summary()?),
        ExportFormat::Html => {
            let study = crate::session::study::run_study(&state);
            report::html::html(&rec, &state, &summary()?, study.as_ref())
        }
        ExportFormat::Trace => {
            let input = crate::session::study::from_state(&state);
            if input.steps.is_empty() {
                crate::bail_input!("{}: the recording has no routing trace", file.display());
            }
            crate::report::trace::write_trace(&input, &file.display().to_string())
        }
    };
    match &a.output {
        Some(p) => super::write_output(p, &text)?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    if rec.truncated_tail {
        eprintln!(
            "note: {}: the last line was incomplete and was skipped",
            file.display()
        );
    }
    Ok(())
}

pub fn themes() -> Result<()> {
    for (name, desc) in crate::ui::list_themes() {
        println!("{name:<16} {desc}");
    }
    Ok(())
}
