//! What LXC leaves in the cgroup trees, and how to clean it up.
//!
//! LXC 5 puts a container `NAME` in two cgroups at the root of every hierarchy:
//! `lxc.monitor.NAME` (the `lxc-execute` process itself) and `lxc.payload.NAME` (the
//! container's init and everything under it). Names are global across lxcpaths. When
//! `lxc-execute` exits normally it removes both; when it is SIGKILLed the payload keeps
//! running and both cgroups stay. They are then the only reliable inventory of what is
//! left, which is why orphan cleanup and "is anything of this proc running" read them.
//!
//! Two details measured on this kind of host:
//! - cgroupfs files report `st_size == 0`, so "is it empty" must read `cgroup.procs`,
//!   never stat it;
//! - on a hybrid host the same container appears in every v1 hierarchy and in the unified
//!   one; all are scanned (a pure cgroup2 host has one hierarchy, same code).
//!
//! A cgroup can only be removed (`rmdir`) once it has no processes and no child cgroups,
//! so removal is depth-first and comes after the kill has been observed to complete.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::LxcError;

/// How long a SIGKILLed container may take to disappear from its cgroups (processes in
/// uninterruptible sleep finish their I/O first) before vrun reports them as unkillable.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Poll interval while waiting for cgroups to empty.
const POLL: Duration = Duration::from_millis(20);

const PAYLOAD: &str = "lxc.payload.";
const MONITOR: &str = "lxc.monitor.";

/// Mount points of every cgroup (v1) and cgroup2 hierarchy, from /proc/self/mountinfo.
pub fn hierarchies() -> Vec<PathBuf> {
    let mut out: BTreeSet<PathBuf> = BTreeSet::new();
    for m in crate::mounts::mounts().unwrap_or_default() {
        if m.fs_type == "cgroup" || m.fs_type == "cgroup2" {
            out.insert(m.mount_point);
        }
    }
    out.into_iter().collect()
}

/// Every cgroup dir of container `name` (payload and monitor, every hierarchy).
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    hierarchies()
        .iter()
        .flat_map(|h| {
            [
                h.join(format!("{PAYLOAD}{name}")),
                h.join(format!("{MONITOR}{name}")),
            ]
        })
        .filter(|d| d.is_dir())
        .collect()
}

/// Names of containers that have any cgroup and satisfy `wanted` (e.g. "this proc or one of
/// its TMP containers").
pub fn containers_matching(wanted: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for h in hierarchies() {
        let Ok(dir) = fs::read_dir(&h) else { continue };
        for entry in dir.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            let name = file
                .strip_prefix(PAYLOAD)
                .or_else(|| file.strip_prefix(MONITOR));
            if let Some(name) = name {
                if wanted(name) {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    out
}

/// Pids in the container's payload cgroups (init and everything under it), deduplicated.
pub fn payload_pids(name: &str) -> Vec<i32> {
    pids_in(name, PAYLOAD)
}

/// Pids in the container's monitor cgroups: a live `lxc-execute`.
pub fn monitor_pids(name: &str) -> Vec<i32> {
    pids_in(name, MONITOR)
}

fn pids_in(name: &str, kind: &str) -> Vec<i32> {
    let mut pids = BTreeSet::new();
    for h in hierarchies() {
        collect_procs(&h.join(format!("{kind}{name}")), &mut pids);
    }
    pids.into_iter().collect()
}

/// Read `cgroup.procs` of `dir` and of every child cgroup. Reading, not stat'ing: cgroupfs
/// files have size 0.
fn collect_procs(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_procs(&e.path(), pids);
            }
        }
    }
}

/// SIGKILL everything of container `name` — its `lxc-execute` first (so nothing restarts
/// or reports), then the payload — and wait until the cgroups are empty. Returns the pids
/// that were killed (empty: nothing was there).
pub fn kill_all(name: &str) -> Result<Vec<i32>, LxcError> {
    let mut killed = BTreeSet::new();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let monitors = monitor_pids(name);
        let payload = payload_pids(name);
        if monitors.is_empty() && payload.is_empty() {
            return Ok(killed.into_iter().collect());
        }
        if Instant::now() > deadline {
            let mut pids = monitors;
            pids.extend(payload);
            return Err(LxcError::Unkillable {
                name: name.to_owned(),
                pids,
            });
        }
        for pid in monitors.iter().chain(&payload) {
            // ESRCH: it died meanwhile, which is what we want.
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            killed.insert(*pid);
        }
        std::thread::sleep(POLL);
    }
}

/// Remove container `name`'s cgroups in every hierarchy, children first. Missing ones are
/// fine; a cgroup that still has processes is an error (kill first).
pub fn remove(name: &str) -> Result<(), LxcError> {
    for dir in cgroup_dirs(name) {
        remove_tree(&dir)?;
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<(), LxcError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    // A just-killed process can linger in the cgroup for a moment after its exit was
    // reported; retry EBUSY briefly.
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(POLL)
            }
            Err(source) => {
                return Err(LxcError::Cgroup {
                    path: dir.to_owned(),
                    source,
                })
            }
        }
    }
}
