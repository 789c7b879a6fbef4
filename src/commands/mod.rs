//! One module per command; each is a few lines over the library.
//!
//! Commands own the order of operations (lock, load, validate, then touch the disk) and
//! the talk to humans on stderr; the work itself lives in library modules so tests and
//! later commands reuse it. Errors bubble up as `anyhow::Error` and `main` prints one
//! line: [`one_line`] joins the whole cause chain with `": "` and flattens newlines.
//!
//! That join is only right because of the convention every error type keeps (uv's, see
//! `vrun::errors` and ARCHITECTURE.md "Errors"): a `Display` says what failed at its own
//! level and never embeds its source; the source is reachable through `source()`. So
//! each cause is printed exactly once, with no guessing by substring, and a warning or
//! notice that shows an error shows the chain too (`vrun::errors::chain`), never a bare
//! `Display`, which now lacks the cause.

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
    // The library's notes go to stderr, except during `vrun uptest` without -v (its
    // stderr must stay empty; see `vrun::notice`).
    match &cli.command {
        Command::Uptest(args) if !args.verbose => vrun::notice::uninstall(),
        _ => notices_to_stderr(),
    }
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

/// Print the library's notes (`vrun::notice::emit`) on stderr, one `vrun: ` line each.
fn notices_to_stderr() {
    vrun::notice::install(Box::new(|text| eprintln!("vrun: {text}")));
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

/// The whole error chain on one line: every cause, outermost first, joined with `": "`.
pub fn one_line(err: &anyhow::Error) -> String {
    let causes: Vec<String> = err.chain().map(ToString::to_string).collect();
    causes.join(": ").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use anyhow::Context;

    use super::*;

    /// Every link of the chain says only its own part: no message embeds its source's
    /// (the convention `one_line` relies on), so no cause is printed twice.
    fn assert_each_cause_once(err: &anyhow::Error) {
        let causes: Vec<String> = err.chain().map(ToString::to_string).collect();
        for pair in causes.windows(2) {
            assert!(
                !pair[0].contains(&pair[1]),
                "{:?} embeds its source {:?}; the line repeats it: {}",
                pair[0],
                pair[1],
                one_line(err)
            );
        }
    }

    /// A proc whose state.json is not JSON makes gc refuse (three links: references,
    /// state, serde_json).
    #[test]
    fn gc_refusal_names_each_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let state = root.proc("p").state();
        std::fs::create_dir_all(state.parent().unwrap()).unwrap();
        std::fs::write(&state, "not json").unwrap();
        let err = vrun::references::references(&root, &root.cache_dir(), true).unwrap_err();
        let err = anyhow::Error::from(err);
        assert_each_cause_once(&err);
        assert_eq!(err.chain().count(), 3, "{}", one_line(&err));
        assert_eq!(
            one_line(&err),
            format!(
                "cannot tell which layers proc p uses, so gc removes nothing: \
                 proc state {} is not valid: expected ident at line 1 column 2",
                state.display()
            )
        );
    }

    /// A corrupt gzip body as a command sees it: context, the io error carrying the
    /// decoder's error, and the inflater's own error.
    #[test]
    fn corrupt_download_names_each_cause_once() {
        let mut body = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        body.extend_from_slice(&[0xff; 64]);
        let mut out = Vec::new();
        let err = vrun::decode::decoder(vrun::decode::Format::Gzip, &body[..])
            .read_to_end(&mut out)
            .context("http://h/build.tar.gz")
            .unwrap_err();
        assert_each_cause_once(&err);
        let line = one_line(&err);
        assert!(
            line.starts_with("http://h/build.tar.gz: gzip stream is corrupt in member 1"),
            "{line}"
        );
        assert!(
            err.chain().count() >= 3,
            "the inflater's cause is lost: {line}"
        );
    }
}
