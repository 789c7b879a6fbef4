//! `vrun`: parse the command line, run one command, print at most one `ERROR:` line.

use std::process::ExitCode;

mod cli;
mod commands;

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ERROR: {}", commands::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
