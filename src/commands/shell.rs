//! `vrun shell FILE [-- CMD ARGS…]`: a container identical to the proc's, beside it.
//!
//! Without a command: an interactive `bash` (or `sh` when the image has none — busybox
//! images have no bash) on a real pty from LXC's console, so job control works. With one:
//! the command runs non-interactively with vrun's stdio and its exit status is returned,
//! which is what scripts and tests need. Both go through `/proc.sh`, so the environment is
//! the proc's. No lock: a shell next to a running proc is the point.

use std::process::ExitCode;

use vrun::lxc::{shell as lxc_shell, LxcProc, TmpCommand, TmpIo};
use vrun::paths::Root;

use super::run::{block_on, exit_code};
use crate::cli::ShellArgs;

/// Picks bash when the container has it; decided inside the container, where `$PATH`
/// and the image's layout are the truth.
const INTERACTIVE_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi";

pub fn shell(root: &Root, args: &ShellArgs) -> anyhow::Result<ExitCode> {
    let (config, name) = super::load(&args.proc.file)?;
    let proc = LxcProc::from_config(root, &name, &config, &config.owner()?)?;
    let cmd = if args.cmd.is_empty() {
        TmpCommand::through_proc_sh(["/bin/sh", "-c", INTERACTIVE_SHELL], TmpIo::Interactive)
    } else {
        TmpCommand::through_proc_sh(args.cmd.iter(), TmpIo::Inherit)
    };
    let code = block_on(lxc_shell(&proc, &cmd))??;
    Ok(exit_code(code))
}
