//! Temporary containers (`vrun shell`, each uptest): `NAME-TMP<8 hex>` on the proc's
//! mounted rootfs, registered by a scratch dir with an owner file under the mount lock,
//! cleaned up when their guard drops; and the sweep of what the temporary containers of
//! a vrun that died left behind.

use std::ffi::OsString;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncReadExt;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};

use super::workload::wait_container;
use super::{exit_code, lxc_execute, write_atomic, PROC_SH};
use crate::lxc::{cgroups, check_value, io_err, mount, render_config, LxcError, LxcProc, LxcTools};
use crate::paths::ProcPaths;

/// Length of the random id of temporary containers (hex digits).
const TMP_ID_LEN: usize = 8;

/// Name of the file in a temporary container's scratch dir that holds vrun's pid.
const OWNER_FILE: &str = "owner";

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
pub(super) fn live_tmp_containers(paths: &ProcPaths, name: &str) -> Vec<String> {
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
        crate::notice::emit(&format!("removed leftovers of {tmp} (its vrun is gone)"));
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

    /// Wait until the container ends (it ends with its workload; see
    /// [`super::workload::stop_with_workload`]).
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
    use super::super::workload::ppid;
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
