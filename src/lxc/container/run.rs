//! The proc's own container in the foreground (`vrun run`): vrun stays the parent of
//! `lxc-execute` for the container's whole life, forwards SIGTERM/SIGINT/SIGHUP to the
//! workload as SIGTERM, gives it the grace period, then SIGKILLs it and, should anything
//! still hang, the whole container by cgroup; and it cleans what a crashed run left.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

use super::workload::{kill_workload, stop_with_workload};
use super::{exit_code, lxc_execute, write_proc_config, PROC_SH};
use crate::lxc::{cgroups, io_err, mount, LxcError, LxcProc, LxcTools};

/// Default time between SIGTERM to the app and SIGKILL (`--grace` / `VRUN_GRACE`
/// override). supervisord, which runs `vrun run` on a Velociraptor host, SIGKILLs vrun
/// itself `stopwaitsecs` (default 10 s) after its SIGTERM; then nothing is left to stop
/// the container in order or to report the app's status. 7 s of grace, plus at most
/// [`EXIT_AFTER_KILL`] for `lxc-execute` to report after the SIGKILL (normally tens of
/// milliseconds), keeps vrun's whole stop, cleanup included, inside those 10 s. Rule for
/// operators: grace ≤ stopwaitsecs − 3.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(7);

/// How long `lxc-execute` gets to report after its workload was SIGKILLed before vrun
/// kills the whole container by cgroup (part of the [`DEFAULT_GRACE`] budget).
const EXIT_AFTER_KILL: Duration = Duration::from_secs(2);

fn mount_rootfs(proc: &LxcProc) -> Result<(), LxcError> {
    mount::ensure_mounted(&proc.paths, &proc.state, &proc.spec().host_system_dirs)
}

/// Kill what a previous, crashed `run` left of container `name` and remove its cgroups.
/// The caller holds the proc.yaml lock, so no live `vrun run` owns that container. Returns
/// the killed pids.
pub fn clean_run_leftovers(name: &str) -> Result<Vec<i32>, LxcError> {
    let killed = cgroups::kill_all(name)?;
    if !killed.is_empty() {
        crate::notice::emit(&format!(
            "killed {} leftover process(es) of a previous run of {name} (pids {killed:?})",
            killed.len()
        ));
    }
    if !cgroups::cgroup_dirs(name).is_empty() {
        cgroups::remove(name)?;
        crate::notice::emit(&format!("removed leftover cgroups of {name}"));
    }
    Ok(killed)
}

/// Start the proc in the foreground and return its exit status (signal death → 128+n).
/// SIGTERM, SIGINT or SIGHUP to vrun → SIGTERM to the app, `grace`, then SIGKILL; a second
/// signal kills at once. Must be called with the proc.yaml lock held (see
/// [`clean_run_leftovers`]).
pub async fn run_foreground(proc: &LxcProc, grace: Duration) -> Result<i32, LxcError> {
    let tools = LxcTools::find()?;
    let mut term = signal(SignalKind::terminate()).map_err(io_err("signal handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("signal handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("signal handler"))?;

    mount_rootfs(proc)?;
    clean_run_leftovers(&proc.name)?;
    let config = write_proc_config(proc)?;

    let mut cmd = lxc_execute(
        &tools,
        &proc.lxcpath,
        &proc.name,
        &config,
        &[],
        &[PROC_SH.into(), "run".into()],
    );
    cmd.stdin(Stdio::null()).process_group(0);
    let mut child = cmd.spawn().map_err(|source| LxcError::Spawn {
        program: tools.execute.clone(),
        source,
    })?;
    let lxc_pid = child.id().map(|p| p as i32);

    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let watch = stop_with_workload(&proc.name, lxc_pid);
    tokio::pin!(watch);
    let mut stopped = false;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status.map_err(io_err(&tools.execute))?,
            () = &mut watch, if !stopped => {
                stopped = true;
                continue;
            }
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
            _ = sleep_until(kill_at), if kill_at.is_some() && !killed => {
                let name = &proc.name;
                crate::notice::emit(&format!("{name} did not stop within {grace:?}, killing it"));
                kill_workload(&proc.name, lxc_pid, Signal::SIGKILL);
                killed = true;
                kill_at = Some(tokio::time::Instant::now() + EXIT_AFTER_KILL);
                continue;
            }
            _ = sleep_until(kill_at), if kill_at.is_some() && killed => {
                let name = &proc.name;
                let text = format!("{name} still running after SIGKILL, killing its container");
                crate::notice::emit(&text);
                cgroups::kill_all(&proc.name)?;
                kill_at = None;
                continue;
            }
        };
        if kill_at.is_none() {
            crate::notice::emit(&format!(
                "got {sig}, sending SIGTERM to {} (grace {grace:?})",
                proc.name
            ));
            kill_workload(&proc.name, lxc_pid, Signal::SIGTERM);
            kill_at = Some(tokio::time::Instant::now() + grace);
        } else if !killed {
            crate::notice::emit(&format!("got {sig} again, killing {} now", proc.name));
            kill_at = Some(tokio::time::Instant::now());
        }
    };
    // lxc-execute removes its cgroups when it exits normally; make sure.
    cgroups::kill_all(&proc.name)?;
    cgroups::remove(&proc.name)?;
    Ok(exit_code(status))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
