//! Thin binary: parse the command line, dispatch, turn errors into a message and an exit code
//! (2 for bad input — a file, flag or field the user can fix; 1 for anything else).

use std::process::ExitCode;

use clap::Parser;
use moescope::cli::{Cli, Command, RunArgs};
use moescope::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<u8> = match &cli.command {
        // `moescope` alone: the dashboard on the bundled model with the standard prompts.
        None => {
            let args = RunArgs::parse_default();
            commands::run::run(&args)
        }
        Some(Command::Run(a)) => commands::run::run(a),
        Some(Command::Worker) => moescope::worker::server::run().map(|_| 0),
        Some(Command::Replay(a)) => commands::session::replay(a).map(|_| 0),
        Some(Command::Watch(a)) => commands::session::watch(a).map(|_| 0),
        Some(Command::Export(a)) => commands::session::export(a).map(|_| 0),
        Some(Command::Themes) => commands::session::themes().map(|_| 0),
        Some(Command::Simulate(a)) => commands::simulate::run(a).map(|_| 0),
        Some(Command::Sweep(a)) => commands::sweep::run(a).map(|_| 0),
        Some(Command::Generate(a)) => commands::generate::generate(a).map(|_| 0),
        Some(Command::Logits(a)) => commands::generate::logits(a).map(|_| 0),
        Some(Command::Extract(a)) => commands::experts::run_extract(a).map(|_| 0),
        Some(Command::Verify(a)) => commands::experts::run_verify(a),
        Some(Command::Bench(c)) => commands::bench::run(c).map(|_| 0),
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
