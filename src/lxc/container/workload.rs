//! Watching a container's workload: finding it among the payload cgroup's processes,
//! signalling it, and stopping what it left behind once it exits (LXC's init would keep
//! the container alive for them; see the module note of [`super`]). Shared by the
//! foreground run and the temporary containers.

use std::fs;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::lxc::cgroups;

/// Parent pid of `pid`, from /proc/PID/stat (the field after the parenthesised command,
/// which may itself contain spaces and parentheses).
pub(super) fn ppid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The workload's pid inside the container: LXC's init is 1 and forks it first.
const WORKLOAD_NS_PID: i32 = 2;

/// The pid of host process `pid` in its own (innermost) pid namespace, from the last
/// field of `NSpid:` in /proc/PID/status.
fn ns_pid(pid: i32) -> Option<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The container's init (the payload process whose parent is `lxc-execute`) and its
/// children: the workload, plus any orphans of the workload that init adopted.
fn find_workload(name: &str, lxc_pid: Option<i32>) -> Option<(i32, Vec<i32>)> {
    let lxc_pid = lxc_pid?;
    let payload = cgroups::payload_pids(name);
    let init = payload
        .iter()
        .copied()
        .find(|p| ppid(*p) == Some(lxc_pid))?;
    let children: Vec<i32> = payload
        .iter()
        .copied()
        .filter(|p| ppid(*p) == Some(init))
        .collect();
    Some((init, children))
}

/// Signal the workload of container `name`. If the container is not up yet, the signal
/// goes to `lxc-execute`, which forwards it to its init.
pub(super) fn kill_workload(name: &str, lxc_pid: Option<i32>, sig: Signal) {
    let targets = match find_workload(name, lxc_pid) {
        Some((_, children)) if !children.is_empty() => children,
        _ => lxc_pid.into_iter().collect(),
    };
    for pid in targets {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Poll interval while looking for a just-started container's workload.
const WORKLOAD_POLL: Duration = Duration::from_millis(20);

/// How long processes the workload left behind get between SIGTERM and SIGKILL once the
/// workload has exited (what LXC's own init allows on shutdown).
const LEFTOVER_GRACE: Duration = Duration::from_secs(1);

/// Resolves once the container's workload has exited and whatever it left running has
/// been stopped (SIGTERM, [`LEFTOVER_GRACE`], SIGKILL).
///
/// LXC's init keeps the container alive while *any* process in it lives: an app that
/// leaves a background child behind would keep `lxc-execute` (and vrun) waiting forever,
/// although the runner contract says the container stops with the process. Init itself
/// is never signalled: when it is, it tries to write a `pids.max` its view of the cgroup
/// tree does not have and prints `Failed to open ".../pids.max"` to the container's
/// stderr — which is an uptest's Output. With its other children gone, init exits on its
/// own and `lxc-execute` reports the workload's status.
pub(super) async fn stop_with_workload(name: &str, lxc_pid: Option<i32>) {
    let init = loop {
        if let Some((init, children)) = find_workload(name, lxc_pid) {
            // The workload is the first process init forked: pid 2 in the container's pid
            // namespace. Gone already (a fast app) while init has other children: those
            // are its orphans, adopted by init.
            match children
                .iter()
                .copied()
                .find(|p| ns_pid(*p) == Some(WORKLOAD_NS_PID))
            {
                Some(workload) => {
                    process_exit(workload).await;
                    break init;
                }
                None if !children.is_empty() => break init,
                None => {}
            }
        }
        tokio::time::sleep(WORKLOAD_POLL).await;
    };
    let leftovers = || -> Vec<i32> {
        cgroups::payload_pids(name)
            .into_iter()
            .filter(|p| *p != init && is_alive(*p))
            .collect()
    };
    let left = leftovers();
    if left.is_empty() {
        return;
    }
    for pid in left {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + LEFTOVER_GRACE;
    while tokio::time::Instant::now() < deadline {
        if leftovers().is_empty() {
            return;
        }
        tokio::time::sleep(WORKLOAD_POLL).await;
    }
    for pid in leftovers() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Resolves when process `pid` has exited (a pidfd becomes readable), or polls
/// /proc where pidfds are unavailable.
async fn process_exit(pid: i32) {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: the fd was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until drop.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        if let Ok(afd) = registered {
            let _ = afd.readable().await;
            return;
        }
    }
    while is_alive(pid) {
        tokio::time::sleep(WORKLOAD_POLL * 5).await;
    }
}

/// Alive = exists and is not a zombie.
fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|i| !stat[i + 1..].trim_start().starts_with('Z'))
    })
}

/// Wait for `lxc-execute` to exit, stopping the container once its workload exited (see
/// [`stop_with_workload`]).
pub(super) async fn wait_container(child: &mut Child, name: &str) -> std::io::Result<ExitStatus> {
    let lxc_pid = child.id().map(|p| p as i32);
    let watch = stop_with_workload(name, lxc_pid);
    tokio::pin!(watch);
    let mut stopped = false;
    loop {
        tokio::select! {
            status = child.wait() => return status,
            () = &mut watch, if !stopped => stopped = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_pid_of_a_host_process_is_its_own_pid() {
        let me = std::process::id() as i32;
        // std reports the pid in the process's own (innermost) namespace, as NSpid's last.
        assert_eq!(ns_pid(me), Some(me));
    }
}
