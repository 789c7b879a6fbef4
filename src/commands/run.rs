//! `vrun run FILE`: hold the lock on FILE for the life of the container.
//! The LXC hand-off replaces the body below when it is merged.

use std::process::ExitCode;

use vrun::paths::Root;

use crate::cli::RunArgs;

pub fn run(_root: &Root, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let _lock = super::lock(&args.proc.file)?;
    let (_config, name) = super::load(&args.proc.file)?;
    anyhow::bail!("run is not implemented in this build (proc {name})")
}
