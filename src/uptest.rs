//! Uptests: the gate Velociraptor uses before routing traffic to a new proc.
//!
//! Every non-hidden entry of `/app/uptests/<proc_name>/` (sorted by name) runs as
//! `SCRIPT HOST PORT` in its own temporary container (`<name>-TMP<id>`) on the proc's
//! mounted rootfs, through `/proc.sh` — so with the proc's environment, settings and user,
//! as the spec demands ("an environment identical to the proc being tested").
//!
//! The original ran them one after another from a Go binary copied into the container,
//! without a timeout: one hanging uptest hung the deploy. Here they run in parallel with a
//! bound ([`DEFAULT_JOBS`]; each is a whole container, and a deploy of many procs runs many
//! uptest commands at once) and each has a timeout after which its container is killed and
//! the result says so.
//!
//! The output contract is the original uptester's, byte for byte in shape: stdout carries
//! one JSON array `[{"Name":…,"Output":…,"Passed":…}]` in name order and nothing else
//! (Velociraptor parses it). Output is the script's stdout and stderr combined, as lossy
//! UTF-8; a script that failed and printed nothing gets Go's `exit status 3` /
//! `signal: killed`, as the Go uptester's `err.Error()` gave. A script that cannot start
//! (not executable, not a file, container failure) is a failed result whose Output says
//! why — never a missing entry. Progress notes go through [`crate::notice::emit`], which
//! `vrun uptest` sends to stderr only with `-v`: vr.server merges stderr into the output
//! it parses.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::lxc::container::{exit_code, read_capped};
use crate::lxc::{exec_tmp, LxcError, LxcProc, LxcTools, TmpCommand, TmpIo};

/// Default parallelism: enough to finish a typical suite in one round, few enough that a
/// host deploying several procs at once does not start hundreds of containers.
pub const DEFAULT_JOBS: usize = 8;

/// Default per-uptest timeout; the original had none (a hang blocked the deploy forever).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Output kept per uptest. Velociraptor stores the JSON; a runaway script printing
/// gigabytes must not make the runner do the same. Beyond it output is drained and dropped.
pub const MAX_OUTPUT: usize = 1 << 20;

/// One uptest's result, with the original uptester's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UptestResult {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Output")]
    pub output: String,
    #[serde(rename = "Passed")]
    pub passed: bool,
}

/// What to test and how.
#[derive(Debug, Clone)]
pub struct UptestOptions {
    pub proc_name: String,
    /// From proc.yaml (`host`, default `localhost`).
    pub host: String,
    /// From proc.yaml (`port`), as its text ([`crate::config::ProcConfig::port`]).
    pub port: String,
    pub jobs: usize,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UptestError {
    #[error(transparent)]
    Lxc(#[from] LxcError),
    #[error("invalid proc_name {0:?} for uptests")]
    ProcName(String),
    #[error("cannot list uptests in {}", path.display())]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One entry of the uptests dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UptestEntry {
    pub name: String,
    pub file: OsString,
    /// Why it cannot run, decided on the host before starting a container.
    pub unrunnable: Option<String>,
}

/// The uptests of `proc_name` in a mounted `rootfs`, hidden ones skipped, sorted by name.
/// A missing dir is no uptests.
pub fn list_uptests(rootfs: &Path, proc_name: &str) -> Result<Vec<UptestEntry>, UptestError> {
    let dir = rootfs.join("app/uptests").join(proc_name);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(UptestError::List { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| UptestError::List {
            path: dir.clone(),
            source,
        })?;
        let file = entry.file_name();
        if file.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        // A symlink is resolved inside the container, not here.
        let unrunnable = match entry.path().symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => None,
            Ok(m) if !m.is_file() => Some("not a regular file".to_owned()),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => Some(format!(
                "not executable (mode {:04o})",
                m.permissions().mode() & 0o7777
            )),
            Ok(_) => None,
            Err(e) => Some(format!("cannot stat: {e}")),
        };
        out.push(UptestEntry {
            name: file.to_string_lossy().into_owned(),
            file,
            unrunnable,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// Run all uptests of the proc; results in name order.
pub async fn run_uptests(
    proc: &LxcProc,
    opts: &UptestOptions,
) -> Result<Vec<UptestResult>, UptestError> {
    if opts.proc_name.is_empty()
        || opts.proc_name.contains('/')
        || opts.proc_name == ".."
        || opts.proc_name == "."
    {
        return Err(UptestError::ProcName(opts.proc_name.clone()));
    }
    LxcTools::find()?;
    // A config that cannot be rendered fails every uptest the same way: say so once,
    // as an error, rather than as N failed results (or none, with no uptests).
    crate::lxc::render_config(&proc.spec())?;
    crate::lxc::ensure_mounted(&proc.paths, &proc.state, &proc.spec().host_system_dirs)?;
    let uptests = list_uptests(&proc.paths.rootfs(), &opts.proc_name)?;
    crate::notice::emit(&format!(
        "running {} uptest(s) of {} ({} at a time, timeout {:?})",
        uptests.len(),
        opts.proc_name,
        opts.jobs.max(1),
        opts.timeout
    ));
    // Unordered: a slow uptest must not hold a slot after the ones behind it finished
    // (ordered buffering would); the name order is restored afterwards.
    let mut results: Vec<(usize, UptestResult)> =
        futures::stream::iter(uptests.into_iter().enumerate())
            .map(|(i, u)| async move { (i, run_one(proc, opts, u).await) })
            .buffer_unordered(opts.jobs.max(1))
            .collect()
            .await;
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

async fn run_one(proc: &LxcProc, opts: &UptestOptions, u: UptestEntry) -> UptestResult {
    let started = Instant::now();
    let (passed, output) = match &u.unrunnable {
        Some(why) => (false, format!("vrun: cannot run uptest {}: {why}", u.name)),
        None => run_in_container(proc, opts, &u).await,
    };
    crate::notice::emit(&format!(
        "uptest {} {} ({:.1}s)",
        u.name,
        if passed { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    ));
    UptestResult {
        name: u.name,
        output,
        passed,
    }
}

async fn run_in_container(proc: &LxcProc, opts: &UptestOptions, u: &UptestEntry) -> (bool, String) {
    let mut script = OsString::from(format!("/app/uptests/{}/", opts.proc_name));
    script.push(&u.file);
    let cmd = TmpCommand::through_proc_sh(
        [script, opts.host.clone().into(), opts.port.clone().into()],
        TmpIo::Capture,
    );
    let mut container = match exec_tmp(proc, &cmd) {
        Ok(c) => c,
        Err(e) => {
            let e = crate::errors::chain(&e);
            return (false, format!("vrun: cannot start uptest {}: {e}", u.name));
        }
    };
    let pipe = container.take_output().expect("capture has an output pipe");
    let reader = tokio::spawn(read_capped(pipe, MAX_OUTPUT));
    let outcome = tokio::time::timeout(opts.timeout, container.wait()).await;
    let timed_out = outcome.is_err();
    let status = match outcome {
        Ok(status) => status,
        Err(_) => container.kill().await,
    };
    // The container is gone, so every writer of the pipe is gone: this ends.
    let (bytes, truncated) = reader.await.unwrap_or_default();
    drop(container);
    let mut output = String::from_utf8_lossy(&bytes).into_owned();
    if truncated {
        output.push_str(&format!("\n[vrun: output truncated to {MAX_OUTPUT} bytes]"));
    }
    if timed_out {
        output.push_str(&format!(
            "\n[vrun: uptest timed out after {:?}; its container was killed]",
            opts.timeout
        ));
        return (false, output);
    }
    match status {
        Ok(s) if s.success() => (true, output),
        Ok(s) => {
            // The Go uptester's rule: a failed script's Output is what it printed, or,
            // when it printed nothing, Go's description of how it ended.
            if output.is_empty() {
                output = go_exit_text(exit_code(s));
            }
            (false, output)
        }
        Err(e) => {
            output.push_str(&format!("\n[vrun: {}]", crate::errors::chain(&e)));
            (false, output)
        }
    }
}

/// How Go's `exec.ExitError` describes a status, which is what the original uptester put
/// in Output for a script that failed silently: `exit status 3`, `signal: killed`.
/// `lxc-execute` reports a workload killed by signal N as 128+N, so that is read back as
/// the signal (a script that itself exits 137 is described as killed, too).
pub fn go_exit_text(code: i32) -> String {
    /// Go's `syscall.Signal.String()` names for Linux signals 1–31.
    const NAMES: [&str; 31] = [
        "hangup",
        "interrupt",
        "quit",
        "illegal instruction",
        "trace/breakpoint trap",
        "aborted",
        "bus error",
        "floating point exception",
        "killed",
        "user defined signal 1",
        "segmentation fault",
        "user defined signal 2",
        "broken pipe",
        "alarm clock",
        "terminated",
        "stack fault",
        "child exited",
        "continued",
        "stopped (signal)",
        "stopped",
        "stopped (tty input)",
        "stopped (tty output)",
        "urgent I/O condition",
        "CPU time limit exceeded",
        "file size limit exceeded",
        "virtual timer expired",
        "profiling timer expired",
        "window changed",
        "I/O possible",
        "power failure",
        "bad system call",
    ];
    match usize::try_from(code - 129).ok().and_then(|i| NAMES.get(i)) {
        Some(name) => format!("signal: {name}"),
        None => format!("exit status {code}"),
    }
}

/// The stdout line: one JSON array and a newline.
pub fn to_json_line(results: &[UptestResult]) -> String {
    let mut s = serde_json::to_string(results).expect("uptest results serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_failures_read_like_gos_exit_error() {
        // The Go uptester's Output for a script that printed nothing: err.Error().
        assert_eq!(go_exit_text(3), "exit status 3");
        assert_eq!(go_exit_text(128), "exit status 128");
        assert_eq!(go_exit_text(137), "signal: killed");
        assert_eq!(go_exit_text(143), "signal: terminated");
        assert_eq!(go_exit_text(139), "signal: segmentation fault");
        assert_eq!(go_exit_text(160), "exit status 160");
    }
}
