//! `vrun shell FILE [-- CMD ARGS…]`: a container identical to the proc's, beside it.
//!
//! Without a command: an interactive `bash` (or `sh` when the image has none — busybox
//! images have no bash) on a real pty from LXC's console, so job control works. With one:
//! the command runs non-interactively with vrun's stdio and its exit status is returned,
//! which is what scripts and tests need. Both go through `/proc.sh`, so the environment is
//! the proc's. No lock: a shell next to a running proc is the point.

use std::ffi::OsString;

use crate::lxc::{shell as lxc_shell, LxcProc, TmpCommand, TmpIo};

/// Picks bash when the container has it; decided inside the container, where `$PATH`
/// and the image's layout are the truth.
const INTERACTIVE_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi";

/// Run the shell (or `command`); returns the exit code.
pub async fn shell(proc: &LxcProc, command: &[OsString]) -> anyhow::Result<i32> {
    let cmd = if command.is_empty() {
        TmpCommand::through_proc_sh(["/bin/sh", "-c", INTERACTIVE_SHELL], TmpIo::Interactive)
    } else {
        TmpCommand::through_proc_sh(command.iter().cloned(), TmpIo::Inherit)
    };
    Ok(lxc_shell(proc, &cmd).await?)
}
