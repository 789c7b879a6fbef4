//! `vrun shell FILE [-- CMD ARGS...]`: never locks (it runs beside `run`).
//! The LXC hand-off replaces the body below when it is merged.

use std::process::ExitCode;

use vrun::paths::Root;

use crate::cli::ShellArgs;

pub fn shell(_root: &Root, args: &ShellArgs) -> anyhow::Result<ExitCode> {
    let (_config, name) = super::load(&args.proc.file)?;
    anyhow::bail!("shell is not implemented in this build (proc {name})")
}
