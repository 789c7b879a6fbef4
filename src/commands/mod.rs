//! One module per command; each is a few lines over the library.
//!
//! Commands own the order of operations (lock, load, validate, then touch the disk) and
//! the talk to humans on stderr; the work itself lives in library modules so tests and
//! later commands reuse it. Errors bubble up as `anyhow::Error` and `main` prints one
//! line: [`one_line`] joins the cause chain, skipping causes a message already quotes
//! (our `thiserror` messages embed their source), and flattens newlines.

use std::path::Path;
use std::process::ExitCode;

use vrun::config::ProcConfig;
use vrun::lock::FileLock;
use vrun::paths::Root;

use crate::cli::{Cli, Command};

mod autogc;
pub mod cache;
mod demo;
mod progress;
mod run;
mod setup;
mod shell;
mod teardown;
mod uptest;

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = Root::new(cli.root);
    match cli.command {
        Command::Setup(args) => setup::setup(&root, &args),
        Command::Run(args) => run::run(&root, &args),
        Command::Uptest(args) => uptest::uptest(&root, &args),
        Command::Teardown(args) => teardown::teardown(&root, &args.file),
        Command::Shell(args) => shell::shell(&root, &args),
        Command::Cache { command } => cache::dispatch(&root, &command).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::demo(cli.root_given.then_some(root), &args),
    }
}

/// The runner contract's lock on FILE, named as the user typed it.
pub fn lock(file: &Path) -> anyhow::Result<FileLock> {
    Ok(FileLock::try_exclusive(file, &file.display().to_string())?)
}

/// Load proc.yaml and compute its container name (every command needs both).
pub fn load(file: &Path) -> anyhow::Result<(ProcConfig, String)> {
    let config = ProcConfig::load(file)?;
    let name = config.container_name()?;
    Ok((config, name))
}

/// The whole error chain on one line.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message.replace('\n', "\\n")
}
