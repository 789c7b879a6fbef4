//! Starting, watching and stopping containers.
//!
//! Two kinds, both through `lxc-execute -n NAME -P <procs dir> -f CONFIG -- …`:
//!
//! - **The proc** ([`run_foreground`]): container `NAME` runs `/proc.sh run`. vrun stays
//!   its parent for the container's whole life (the supervisor watches vrun) and exits with
//!   the app's status. `lxc-execute` runs in its own process group so a terminal's Ctrl-C
//!   reaches vrun only: `lxc-execute`'s init answers SIGTERM by killing everything one
//!   second later, which is no grace period at all. Instead vrun sends SIGTERM to the
//!   workload itself (the child of the container's init), waits the grace period, then
//!   SIGKILLs the workload (so the status reads 137 = 128+9, as the supervisor expects of a
//!   kill) and, should anything still hang, the whole container.
//! - **Temporary containers** ([`TmpContainer`]): `shell` and each uptest get
//!   `NAME-TMP<8 hex>` on the same mounted rootfs, with the same config, and a scratch dir
//!   `<proc>/tmp-<id>/` holding their config and an `owner` file (vrun's pid). The owner
//!   file closes the window between "vrun decided to start a shell" and "LXC created the
//!   cgroups": teardown sees the shell as soon as the dir exists. Dropping the guard kills
//!   the container if it still runs and removes its cgroups and dir.
//!
//! Measured here, and the reason for [`stop_with_workload`]: LXC's init (`lxc-execute`'s
//! pid 1) keeps the container alive while *any* process in it lives, not just the
//! workload; it only cleans up (TERM to all, KILL one second later) when it is itself
//! signalled, and then prints a `pids.max` error into the container's output. So vrun
//! watches the workload through a pidfd and, when it ends, stops what it left behind
//! itself (TERM, one second, KILL): the container stops with its process, as the runner
//! contract says, and `lxc-execute` still reports the workload's status (`exit 42` after a
//! trap → 42).
//!
//! Every `lxc-execute` gets `PR_SET_PDEATHSIG = SIGTERM`: if vrun is SIGKILLed, LXC stops
//! the container instead of leaving it orphaned. (The death signal fires when the spawning
//! *thread* exits, so spawn from the main future or a runtime worker, never from a
//! short-lived blocking thread.) What still escapes — `lxc-execute` itself SIGKILLed — is
//! found by cgroup and cleaned by the next `run`, or by teardown ([`teardown_containers`]).

use std::ffi::OsString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use super::mount::{self, MountLock};
use super::{cgroups, check_value, io_err, render_config, LxcError, LxcProc, LxcTools};
use crate::paths::ProcPaths;
use crate::state::ProcState;

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

/// Length of the random id of temporary containers (hex digits).
const TMP_ID_LEN: usize = 8;

/// Name of the file in a temporary container's scratch dir that holds vrun's pid.
const OWNER_FILE: &str = "owner";

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

/// Setup's half of mounting, under the proc's mount lock and before the new state is
/// saved: when the overlay is mounted on other layers than `proc.state` names (setup
/// again after the build, image or owner changed; `previous` is the state on disk), it
/// is unmounted — refused while any container of the proc runs on it, which leaves the
/// proc as it was. Then save the state and call [`mount::ensure_mounted_locked`]; the
/// overlay stays mounted after setup (see [`mount`]).
pub fn unmount_if_layers_changed(
    _lock: &MountLock,
    proc: &LxcProc,
    previous: Option<&ProcState>,
) -> Result<(), LxcError> {
    let rootfs = proc.paths.rootfs();
    let changed =
        previous.is_some_and(|p| p.build != proc.state.build || p.image != proc.state.image);
    if changed && mount::is_mount_point(&rootfs)?.is_some() {
        let occupancy = is_running(&proc.paths, &proc.lxcpath, &proc.name);
        if occupancy.any() {
            let mut containers = occupancy.tmp;
            if occupancy.run {
                containers.insert(0, proc.name.clone());
            }
            return Err(LxcError::Busy {
                name: proc.name.clone(),
                containers,
            });
        }
        crate::mounts::unmount(&rootfs)?;
    }
    Ok(())
}

fn mount_rootfs(proc: &LxcProc) -> Result<(), LxcError> {
    mount::ensure_mounted(&proc.paths, &proc.state, &proc.spec().host_system_dirs)
}

/// Kill what a previous, crashed `run` left of container `name` and remove its cgroups.
/// The caller holds the proc.yaml lock, so no live `vrun run` owns that container. Returns
/// the killed pids.
pub fn clean_run_leftovers(name: &str) -> Result<Vec<i32>, LxcError> {
    let killed = cgroups::kill_all(name)?;
    if !killed.is_empty() {
        crate::notice!(
            "vrun: killed {} leftover process(es) of a previous run of {name} (pids {killed:?})",
            killed.len()
        );
    }
    if !cgroups::cgroup_dirs(name).is_empty() {
        cgroups::remove(name)?;
        crate::notice!("vrun: removed leftover cgroups of {name}");
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
                crate::notice!("vrun: {} did not stop within {grace:?}, killing it", proc.name);
                kill_workload(&proc.name, lxc_pid, Signal::SIGKILL);
                killed = true;
                kill_at = Some(tokio::time::Instant::now() + EXIT_AFTER_KILL);
                continue;
            }
            _ = sleep_until(kill_at), if kill_at.is_some() && killed => {
                crate::notice!("vrun: {} still running after SIGKILL, killing its container", proc.name);
                cgroups::kill_all(&proc.name)?;
                kill_at = None;
                continue;
            }
        };
        if kill_at.is_none() {
            crate::notice!(
                "vrun: got {sig}, sending SIGTERM to {} (grace {grace:?})",
                proc.name
            );
            kill_workload(&proc.name, lxc_pid, Signal::SIGTERM);
            kill_at = Some(tokio::time::Instant::now() + grace);
        } else if !killed {
            crate::notice!("vrun: got {sig} again, killing {} now", proc.name);
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

/// Parent pid of `pid`, from /proc/PID/stat (the field after the parenthesised command,
/// which may itself contain spaces and parentheses).
fn ppid(pid: i32) -> Option<i32> {
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
fn kill_workload(name: &str, lxc_pid: Option<i32>, sig: Signal) {
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
async fn stop_with_workload(name: &str, lxc_pid: Option<i32>) {
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
async fn wait_container(child: &mut Child, name: &str) -> std::io::Result<ExitStatus> {
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

/// Is `candidate` a temporary container (`NAME-TMP<8 hex>`) of proc `name`?
pub fn is_tmp_of(candidate: &str, name: &str) -> bool {
    candidate
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix("-TMP"))
        .is_some_and(|id| {
            id.len() == TMP_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// Temporary containers of proc `name` that are live: their `lxc-execute` runs, or their
/// scratch dir's owner (a vrun shell/uptest) is alive.
fn live_tmp_containers(paths: &ProcPaths, name: &str) -> Vec<String> {
    let mut live: Vec<String> = cgroups::containers_matching(|c| is_tmp_of(c, name))
        .into_iter()
        .filter(|c| !cgroups::monitor_pids(c).is_empty())
        .collect();
    for (tmp, dir) in scratch_dirs(paths, name) {
        if owner_alive(&dir) && !live.contains(&tmp) {
            live.push(tmp);
        }
    }
    live.sort();
    live
}

/// `(container name, scratch dir)` of every `tmp-<id>` dir of the proc.
fn scratch_dirs(paths: &ProcPaths, name: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(&paths.dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let id = file.to_str()?.strip_prefix("tmp-")?;
            let tmp = format!("{name}-TMP{id}");
            is_tmp_of(&tmp, name).then(|| (tmp, e.path()))
        })
        .collect()
}

/// This process as the owner of a scratch dir: pid and start time (so a recycled pid is
/// not mistaken for a live vrun).
fn owner_token() -> String {
    let pid = std::process::id() as i32;
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // The fields after the command start with field 3 (state); starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Is the vrun that wrote the scratch dir's owner file still running?
fn owner_alive(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<i32>().ok()),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    start_time(pid) == Some(start)
}

/// Remove what shell/uptest containers of a vrun that died (SIGKILL, OOM) left: their
/// scratch dirs, orphaned processes and cgroups. Called under the mount lock, where a
/// scratch dir without a live owner cannot be one being set up right now.
fn sweep_stale_tmp(paths: &ProcPaths, name: &str) -> Result<(), LxcError> {
    for (tmp, dir) in scratch_dirs(paths, name) {
        if owner_alive(&dir) || !cgroups::monitor_pids(&tmp).is_empty() {
            continue;
        }
        cgroups::kill_all(&tmp)?;
        cgroups::remove(&tmp)?;
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        crate::notice!("vrun: removed leftovers of {tmp} (its vrun is gone)");
    }
    Ok(())
}

/// What of proc `name` is running right now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Occupancy {
    /// The proc's own container has a live `lxc-execute` (lxc-info: RUNNING).
    pub run: bool,
    /// Live shell/uptest containers.
    pub tmp: Vec<String>,
}

impl Occupancy {
    pub fn any(&self) -> bool {
        self.run || !self.tmp.is_empty()
    }
}

/// Is any container of proc `name` running: the proc itself (lxc-info, then its monitor
/// cgroup) or a shell/uptest container.
pub fn is_running(paths: &ProcPaths, lxcpath: &Path, name: &str) -> Occupancy {
    let run = lxc_info_running(lxcpath, name) || !cgroups::monitor_pids(name).is_empty();
    Occupancy {
        run,
        tmp: live_tmp_containers(paths, name),
    }
}

fn lxc_info_running(lxcpath: &Path, name: &str) -> bool {
    let Ok(tools) = LxcTools::find() else {
        return false;
    };
    std::process::Command::new(&tools.info)
        .args(["-s", "-H", "-n", name, "-P"])
        .arg(lxcpath)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "RUNNING")
}

/// Teardown's part of the LXC work, called with the proc.yaml lock held (so no `vrun run`
/// is live): refuse while a shell/uptest container runs; else kill what a crashed run or
/// shell left behind and remove every cgroup of the proc. Unmounting and deleting the proc
/// dir come after, in the command.
///
/// Returns the proc's mount lock: hold it until the proc dir is gone, so no shell or
/// uptest can start on the proc meanwhile.
pub fn teardown_containers(paths: &ProcPaths, name: &str) -> Result<MountLock, LxcError> {
    let lock = mount::lock_mount(paths)?;
    let live = live_tmp_containers(paths, name);
    if !live.is_empty() {
        return Err(LxcError::Busy {
            name: name.to_owned(),
            containers: live,
        });
    }
    clean_run_leftovers(name)?;
    remove_cgroups(name)?;
    Ok(lock)
}

/// All of `vrun teardown` below the proc.yaml lock (which the caller holds): refuse while
/// a shell/uptest container runs, kill leftovers, remove cgroups, unmount the rootfs
/// (lazily if a dying container still holds it) and verify, then delete the proc dir
/// without crossing into another filesystem. Cached layers are never touched: they are
/// only ever the overlay's read-only lower dirs.
pub fn teardown(paths: &ProcPaths, name: &str) -> Result<(), LxcError> {
    let _lock = teardown_containers(paths, name)?;
    crate::mounts::unmount(&paths.rootfs())?;
    crate::mounts::remove_dir_on_one_fs(&paths.dir)?;
    Ok(())
}

/// Kill and remove every cgroup of proc `name` and of its temporary containers.
pub fn remove_cgroups(name: &str) -> Result<(), LxcError> {
    for c in cgroups::containers_matching(|c| c == name || is_tmp_of(c, name)) {
        cgroups::kill_all(&c)?;
        cgroups::remove(&c)?;
    }
    Ok(())
}

/// How a temporary container's stdio is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmpIo {
    /// stdin/stdout/stderr of vrun (`shell FILE -- CMD`).
    Inherit,
    /// A real pty from LXC's console (`lxc.console.path` empty) on vrun's terminal: job
    /// control works (`vrun shell FILE`).
    Interactive,
    /// stdin from /dev/null, stdout and stderr into one pipe (uptests).
    Capture,
}

/// What to run in a temporary container.
#[derive(Debug, Clone)]
pub struct TmpCommand {
    pub argv: Vec<OsString>,
    pub io: TmpIo,
}

impl TmpCommand {
    /// `argv` run through `/proc.sh`, i.e. with the proc's environment.
    pub fn through_proc_sh(argv: impl IntoIterator<Item = impl Into<OsString>>, io: TmpIo) -> Self {
        let mut all: Vec<OsString> = vec![PROC_SH.into()];
        all.extend(argv.into_iter().map(Into::into));
        Self { argv: all, io }
    }
}

/// Combined stdout+stderr of a [`TmpIo::Capture`] container.
pub type TmpOutput = tokio::net::unix::pipe::Receiver;

/// A running shell/uptest container; cleaned up (killed, cgroups and scratch dir removed)
/// when dropped.
pub struct TmpContainer {
    pub name: String,
    dir: PathBuf,
    child: Child,
    output: Option<TmpOutput>,
    reaped: bool,
}

/// Start a temporary container `<name>-TMP<id>` of `proc` running `cmd`.
pub fn exec_tmp(proc: &LxcProc, cmd: &TmpCommand) -> Result<TmpContainer, LxcError> {
    let tools = LxcTools::find()?;
    // Mounted, and registered (scratch dir + owner file) under the mount lock: teardown
    // either sees this container or has already finished.
    let lock = mount::lock_mount(&proc.paths)?;
    mount::ensure_mounted_locked(
        &lock,
        &proc.paths,
        &proc.state,
        &proc.spec().host_system_dirs,
    )?;
    sweep_stale_tmp(&proc.paths, &proc.name)?;
    let (id, dir) = loop {
        let id = format!("{:08x}", rand::random::<u32>());
        let dir = proc.paths.tmp_dir(&id);
        match fs::create_dir(&dir) {
            Ok(()) => break (id, dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        }
    };
    let name = format!("{}-TMP{id}", proc.name);
    // From here on the guard cleans up on any error.
    let guard_dir = DirGuard(Some(dir.clone()));
    fs::write(dir.join(OWNER_FILE), owner_token()).map_err(io_err(dir.join(OWNER_FILE)))?;
    drop(lock);

    let mut config_text = render_config(&proc.spec())?;
    let mut settings: Vec<&str> = Vec::new();
    if cmd.io == TmpIo::Interactive {
        settings.push("lxc.console.path=");
        // The terminal type, so full-screen programs work; a TERM that could not be one
        // config line is left out rather than refused (it is not the proc's config).
        if let Ok(term) = std::env::var("TERM") {
            if check_value("TERM", &term).is_ok() {
                config_text.push_str(&format!("lxc.environment = TERM={term}\n"));
            }
        }
    }
    let config = dir.join("proc.lxc");
    write_atomic(&config, &config_text)?;

    let mut command = lxc_execute(&tools, &proc.lxcpath, &name, &config, &settings, &cmd.argv);
    let mut output = None;
    match cmd.io {
        TmpIo::Inherit | TmpIo::Interactive => {}
        TmpIo::Capture => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| io_err("pipe")(e.into()))?;
            let write2: OwnedFd = write.try_clone().map_err(io_err("pipe"))?;
            command
                .stdin(Stdio::null())
                .stdout(Stdio::from(write))
                .stderr(Stdio::from(write2));
            output = Some(TmpOutput::from_owned_fd(read).map_err(io_err("pipe"))?);
        }
    }
    let child = command.spawn().map_err(|source| LxcError::Spawn {
        program: tools.execute.clone(),
        source,
    })?;
    // The command holds the pipe's write ends: drop it so EOF comes when the container ends.
    drop(command);
    let mut guard_dir = guard_dir;
    guard_dir.0 = None;
    Ok(TmpContainer {
        name,
        dir,
        child,
        output,
        reaped: false,
    })
}

/// Removes a scratch dir unless disarmed (error paths of [`exec_tmp`]).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

impl TmpContainer {
    /// The combined output pipe ([`TmpIo::Capture`] only; once).
    pub fn take_output(&mut self) -> Option<TmpOutput> {
        self.output.take()
    }

    /// Wait until the container ends (it ends with its workload; see [`stop_with_workload`]).
    pub async fn wait(&mut self) -> Result<ExitStatus, LxcError> {
        let status = wait_container(&mut self.child, &self.name)
            .await
            .map_err(io_err("lxc-execute"))?;
        self.reaped = true;
        Ok(status)
    }

    /// SIGKILL the whole container (its `lxc-execute` and everything inside) and reap it.
    pub async fn kill(&mut self) -> Result<ExitStatus, LxcError> {
        cgroups::kill_all(&self.name)?;
        let _ = self.child.start_kill();
        let status = self.child.wait().await.map_err(io_err("lxc-execute"))?;
        self.reaped = true;
        Ok(status)
    }

    /// Wait, ignoring SIGINT/SIGQUIT (they belong to the program in the container, which
    /// shares the terminal); SIGTERM/SIGHUP to vrun kill the container and return 128+n.
    pub async fn wait_interactive(&mut self) -> Result<i32, LxcError> {
        let mut term = signal(SignalKind::terminate()).map_err(io_err("signal handler"))?;
        let mut hup = signal(SignalKind::hangup()).map_err(io_err("signal handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io_err("signal handler"))?;
        let mut quit = signal(SignalKind::quit()).map_err(io_err("signal handler"))?;
        loop {
            let sig = tokio::select! {
                status = self.wait() => return Ok(exit_code(status?)),
                _ = term.recv() => libc::SIGTERM,
                _ = hup.recv() => libc::SIGHUP,
                _ = int.recv() => continue,
                _ = quit.recv() => continue,
            };
            self.kill().await?;
            return Ok(128 + sig);
        }
    }
}

impl Drop for TmpContainer {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = cgroups::kill_all(&self.name);
            let _ = self.child.start_kill();
            let _ = self.child.try_wait();
        }
        let _ = cgroups::remove(&self.name);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Run `cmd` in a temporary container and return its exit status (`shell`).
pub async fn shell(proc: &LxcProc, cmd: &TmpCommand) -> Result<i32, LxcError> {
    let mut c = exec_tmp(proc, cmd)?;
    c.wait_interactive().await
}

/// Read a pipe to its end, keeping at most `cap` bytes (the rest is drained so the writer
/// never blocks). Returns the kept bytes and whether anything was dropped.
pub async fn read_capped(mut pipe: TmpOutput, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut dropped = false;
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, dropped),
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                dropped |= n > room;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_are_exactly_name_tmp_and_eight_lowercase_hex() {
        assert!(is_tmp_of(
            "a-1-c-h-web-5000-TMP0123abcd",
            "a-1-c-h-web-5000"
        ));
        assert!(!is_tmp_of("a-1-c-h-web-5000", "a-1-c-h-web-5000"));
        assert!(!is_tmp_of(
            "a-1-c-h-web-5000-TMP0123ABCD",
            "a-1-c-h-web-5000"
        ));
        assert!(!is_tmp_of(
            "a-1-c-h-web-5000-TMP0123abc",
            "a-1-c-h-web-5000"
        ));
        assert!(!is_tmp_of(
            "a-1-c-h-web-5000-TMP0123abcde",
            "a-1-c-h-web-5000"
        ));
        assert!(!is_tmp_of(
            "a-1-c-h-web-50000-TMP0123abcd",
            "a-1-c-h-web-5000"
        ));
    }

    #[test]
    fn ns_pid_of_a_host_process_is_its_own_pid() {
        let me = std::process::id() as i32;
        // std reports the pid in the process's own (innermost) namespace, as NSpid's last.
        assert_eq!(ns_pid(me), Some(me));
    }

    #[test]
    fn exit_codes_read_like_a_shell() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn ppid_and_start_time_of_this_process() {
        let me = std::process::id() as i32;
        assert_eq!(ppid(me), Some(nix::unistd::getppid().as_raw()));
        assert!(start_time(me).is_some());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(OWNER_FILE), owner_token()).unwrap();
        assert!(owner_alive(dir.path()));
        fs::write(dir.path().join(OWNER_FILE), format!("{me} 1")).unwrap();
        assert!(!owner_alive(dir.path()), "same pid, other start time");
    }
}
