//! `vrun uptest FILE`: never locks (it runs beside `run`).
//! The uptest runner replaces the body below when it is merged.

use std::process::ExitCode;

use vrun::paths::Root;

use crate::cli::UptestArgs;

pub fn uptest(_root: &Root, args: &UptestArgs) -> anyhow::Result<ExitCode> {
    let (_config, name) = super::load(&args.proc.file)?;
    anyhow::bail!("uptest is not implemented in this build (proc {name})")
}
