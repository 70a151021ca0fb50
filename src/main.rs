//! Thin binary: parse the command line, dispatch, turn errors into a message and an exit code
//! (2 for bad input — a file, flag or field the user can fix; 1 for anything else).

use std::process::ExitCode;

use clap::Parser;
use moescope::cli::{Cli, Command};
use moescope::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Generate(a)) => commands::generate::generate(a),
        Some(Command::Logits(a)) => commands::generate::logits(a),
        Some(Command::Extract(a)) => commands::experts::run_extract(a),
        Some(Command::Bench(c)) => commands::bench::run(c),
        Some(Command::Verify(a)) => match commands::experts::run_verify(a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        None => {
            eprintln!("moescope: the dashboard is not built yet; try `moescope generate --help`");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", moescope::errors::one_line(&e));
            ExitCode::from(moescope::errors::exit_code(&e))
        }
    }
}
