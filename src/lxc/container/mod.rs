//! Starting, watching and stopping containers.
//!
//! Two kinds, both through `lxc-execute -n NAME -P <procs dir> -f CONFIG -- …`:
//!
//! - **The proc** ([`run_foreground`], `run.rs`): container `NAME` runs `/proc.sh run`.
//!   vrun stays its parent for the container's whole life (the supervisor watches vrun)
//!   and exits with the app's status. `lxc-execute` runs in its own process group so a
//!   terminal's Ctrl-C reaches vrun only: `lxc-execute`'s init answers SIGTERM by killing
//!   everything one second later, which is no grace period at all. Instead vrun sends
//!   SIGTERM to the workload itself (the child of the container's init), waits the grace
//!   period, then SIGKILLs the workload (so the status reads 137 = 128+9, as the
//!   supervisor expects of a kill) and, should anything still hang, the whole container.
//! - **Temporary containers** ([`TmpContainer`], `tmp.rs`): `shell` and each uptest get
//!   `NAME-TMP<8 hex>` on the same mounted rootfs, with the same config, and a scratch dir
//!   `<proc>/tmp-<id>/` holding their config and an `owner` file (vrun's pid). The owner
//!   file closes the window between "vrun decided to start a shell" and "LXC created the
//!   cgroups": teardown sees the shell as soon as the dir exists. Dropping the guard kills
//!   the container if it still runs and removes its cgroups and dir.
//!
//! Measured here, and the reason for `workload::stop_with_workload` (`workload.rs`):
//! LXC's init (`lxc-execute`'s pid 1) keeps the container alive while *any* process in it
//! lives, not just the workload; it only cleans up (TERM to all, KILL one second later)
//! when it is itself signalled, and then prints a `pids.max` error into the container's
//! output. So vrun watches the workload through a pidfd and, when it ends, stops what it
//! left behind itself (TERM, one second, KILL): the container stops with its process, as
//! the runner contract says, and `lxc-execute` still reports the workload's status
//! (`exit 42` after a trap → 42).
//!
//! Every `lxc-execute` gets `PR_SET_PDEATHSIG = SIGTERM`: if vrun is SIGKILLed, LXC stops
//! the container instead of leaving it orphaned. (The death signal fires when the spawning
//! *thread* exits, so spawn from the main future or a runtime worker, never from a
//! short-lived blocking thread.) What still escapes — `lxc-execute` itself SIGKILLed — is
//! found by cgroup and cleaned by the next `run`, or by teardown ([`teardown_containers`],
//! `teardown.rs`).
//!
//! One file per seam: `run.rs` the foreground run (signals, grace, kill), `tmp.rs` the
//! temporary containers and the sweep of what dead ones left, `teardown.rs` what runs on
//! a proc and taking it down, `workload.rs` watching a container's workload (shared by
//! the first two). This file holds what every container start shares: `lxc-execute`
//! with its parent-death signal, `/proc.sh`, the proc's config, exit statuses.

mod run;
mod teardown;
mod tmp;
mod workload;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use tokio::process::Command;

use super::{io_err, render_config, LxcError, LxcProc, LxcTools};

pub use run::{clean_run_leftovers, run_foreground, DEFAULT_GRACE};
pub use teardown::{
    is_running, remove_cgroups, teardown, teardown_containers, unmount_if_layers_changed, Occupancy,
};
pub use tmp::{
    exec_tmp, is_tmp_of, read_capped, shell, TmpCommand, TmpContainer, TmpIo, TmpOutput,
};

/// The command inside every container: the proc's environment, then `$@` (or, with
/// `run`, the proc's command). Written by setup into upper/.
pub const PROC_SH: &str = "/proc.sh";

/// Exit status the way a shell reports it: the code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// `lxc-execute` for container `name` with `config`, running `argv`.
fn lxc_execute(
    tools: &LxcTools,
    lxcpath: &Path,
    name: &str,
    config: &Path,
    settings: &[&str],
    argv: &[OsString],
) -> Command {
    let mut cmd = Command::new(&tools.execute);
    cmd.arg("-n")
        .arg(name)
        .arg("-P")
        .arg(lxcpath)
        .arg("-f")
        .arg(config);
    for s in settings {
        cmd.arg("-s").arg(s);
    }
    cmd.arg("--").args(argv);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // vrun died between fork and prctl: do not start an orphan. (No allocation
            // after fork: a raw OS error, not a message.)
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// Write `text` to `path` atomically ([`vrun_cache::write_atomic`]).
fn write_atomic(path: &Path, text: &str) -> Result<(), LxcError> {
    vrun_cache::write_atomic(path, text.as_bytes(), 0o644, None).map_err(io_err(path))
}

/// Render and write the proc's own `proc.lxc` (setup calls this too).
pub fn write_proc_config(proc: &LxcProc) -> Result<PathBuf, LxcError> {
    let path = proc.paths.lxc_config();
    write_atomic(&path, &render_config(&proc.spec())?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_read_like_a_shell() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }
}
