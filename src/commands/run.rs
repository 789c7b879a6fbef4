//! `vrun run FILE [--grace SECS]`: the proc in the foreground; vrun's exit code is the
//! app's (signal death → 128+n).
//!
//! The lock on FILE is held for the container's whole life (the spec: "run locks the
//! proc.yaml while running"); that is what lets [`vrun::lxc::run_foreground`] treat any
//! leftover container of this name as an orphan of a crashed run and clean it.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use vrun::lxc::{run_foreground, LxcProc};
use vrun::paths::Root;

use crate::cli::RunArgs;

pub fn run(root: &Root, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let _lock = super::lock(&args.proc.file)?;
    let (config, name) = super::load(&args.proc.file)?;
    let proc = LxcProc::from_config(root, &name, &config, &config.owner()?)?;
    let code = block_on(run_foreground(&proc, Duration::from_secs(args.grace)))??;
    Ok(exit_code(code))
}

/// Run `f` on a single-threaded runtime on this thread. One thread on purpose: every
/// `lxc-execute` is spawned with a parent-death signal, which fires when the *spawning
/// thread* exits, so it must be the thread that lives as long as vrun.
pub(super) fn block_on<F: Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// A shell-style status (0–255) as the process exit code.
pub(super) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
