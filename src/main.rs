//! Thin binary: parse the command line, dispatch, turn errors into a message and an exit code
//! (2 for bad input — a file, flag or field the user can fix; 1 for anything else).

use std::process::ExitCode;

use clap::Parser;
use moescope::cli::{Cli, Command, RunArgs};
use moescope::commands;
use moescope::settings::Settings;

fn main() -> ExitCode {
    pin_thread_count();
    let cli = Cli::parse();
    if matches!(
        &cli.command,
        Some(
            Command::Replay(_)
                | Command::Watch(_)
                | Command::Export(_)
                | Command::Themes
                | Command::Simulate(_)
                | Command::Generate(_)
                | Command::Logits(_)
                | Command::Verify(_)
                | Command::Bench(_)
        )
    ) {
        die_quietly_on_broken_pipe();
    }
    // Read once, here: the library reads no environment, it is handed these.
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let s = &settings;
    let result: anyhow::Result<u8> = match &cli.command {
        // `moescope` alone: the dashboard on the bundled model with the standard prompts.
        None => {
            let args = RunArgs::parse_default();
            commands::run::run(&args, s)
        }
        Some(Command::Run(a)) => commands::run::run(a, s),
        Some(Command::Worker) => moescope::worker::server::run().map(|_| 0),
        Some(Command::ReferenceWorker) => moescope::worker::server::reference::run().map(|_| 0),
        Some(Command::Replay(a)) => commands::session::replay(a).map(|_| 0),
        Some(Command::Watch(a)) => commands::session::watch(a).map(|_| 0),
        Some(Command::Export(a)) => commands::session::export(a).map(|_| 0),
        Some(Command::Themes) => commands::session::themes().map(|_| 0),
        Some(Command::Simulate(a)) => commands::simulate::run(a).map(|_| 0),
        Some(Command::Sweep(a)) => commands::sweep::run(a, s).map(|_| 0),
        Some(Command::Generate(a)) => commands::generate::generate(a, s).map(|_| 0),
        Some(Command::Logits(a)) => commands::generate::logits(a, s).map(|_| 0),
        Some(Command::Extract(a)) => commands::experts::run_extract(a).map(|_| 0),
        Some(Command::Verify(a)) => commands::experts::run_verify(a),
        Some(Command::Bench(c)) => commands::bench::run(c, s).map(|_| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            moescope::ui::terminal::restore_if_active();
            eprintln!("error: {}", moescope::errors::one_line(&e));
            ExitCode::from(moescope::errors::exit_code(&e))
        }
    }
}

/// `moescope simulate … | head` must end like any Unix filter when the reader goes away, not
/// with a panic from `println!` (Rust ignores SIGPIPE by default). Only for commands that write
/// to stdout and own no child pipes: where moescope talks to worker processes, a worker's
/// closed pipe must stay an error it handles (the run goes on without that worker).
fn die_quietly_on_broken_pipe() {
    // SAFETY: restoring the default disposition of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Fixes candle's CPU thread count for the life of the process.
///
/// Why: candle 0.11 asks for its thread count on every CPU matmul, and unless
/// `RAYON_NUM_THREADS` is set that means parsing /proc/cpuinfo each time — on small models more
/// than half of decode time went there (perf, omni fixture). Setting the variable once to the
/// value candle would compute keeps its choice and makes the lookup an environment read. Done
/// first thing, before any thread exists, which is what makes `set_var` sound here; worker
/// processes are this binary too, so they inherit it either way.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: no other thread has been started yet (first statement of main).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
