//! Host plumbing for the harness: target filesystems (loop ext4, tmpfs, a throttled loop
//! ext4), page-cache drops, signal handling, and timing a child process exactly.
//!
//! Why all the guards: the harness runs as root and mounts filesystems, attaches loop
//! devices and installs block-throttle rules in the *root* blkio cgroup. A rule left behind
//! on `7:N` would silently slow down whoever attaches that loop device next, so every
//! resource is owned by a value whose `Drop` undoes it, in reverse order, and SIGINT/
//! SIGTERM/SIGHUP only set a flag: the run stops at the next check and unwinds normally.
//!
//! Why pidfd + `wait4` to time children: `wait4` gives the child's own rusage (peak RSS of
//! it and its reaped descendants — for the baseline that is max(curl, tee, tar, gzip…)),
//! and waiting on a pidfd lets a timeout kill the child without any pid-reuse race.
//! Children are started through a small trampoline (see [`measure`]) so the harness's
//! own memory never shows up in their peak RSS.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag (no `SA_RESTART`, so a blocked wait returns
/// `EINTR` and sees it). Children get default dispositions back at exec.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: plain sigaction with an async-signal-safe handler (one atomic store).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

/// Removes a directory tree when dropped (temporary generation and work dirs).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Is `prog` on PATH?
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Run a command to completion; error with its stderr when it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `syncfs` on the filesystem holding `path`: flush only the target, not the whole host.
pub fn syncfs(path: &Path) -> Result<()> {
    let f = fs_err::File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: valid open fd.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        bail!(
            "syncfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Drop the page cache, dentries and inodes (after flushing the target fs, since only
/// clean pages are dropped). Applied identically before every A and B run.
pub fn drop_caches(target: &Path) -> Result<()> {
    syncfs(target)?;
    fs_err::write("/proc/sys/vm/drop_caches", "3\n")
        .context("dropping caches needs root (echo 3 > /proc/sys/vm/drop_caches)")?;
    Ok(())
}

/// Read the programs of both sides back into the page cache after a drop: the deploy's
/// *data* path stays cold, while the tools are warm, as on a host that deploys regularly.
/// Without this, a cold start of curl (+ OpenSSL), bash, tar and the decompressors costs
/// several hundred ms on a busy VM and would swamp the small-corpus figures.
pub fn warm_tools(vrun: &Path) {
    for (prog, arg) in [
        ("bash", "--version"),
        ("curl", "--version"),
        ("tee", "--version"),
        ("md5sum", "--version"),
        ("mkfifo", "--version"),
        ("sync", "--version"),
        ("tar", "--version"),
        ("gzip", "--version"),
        ("bzip2", "--help"),
        ("xz", "--version"),
        ("zstd", "--version"),
    ] {
        let _ = Command::new(prog)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // vrun is a static-ish Rust binary: reading it is what loading it would do.
    if let Ok(mut f) = std::fs::File::open(vrun) {
        let _ = std::io::copy(&mut f, &mut std::io::sink());
    }
}

/// Outcome of one timed child.
#[derive(Clone, Debug)]
pub struct Measured {
    pub wall_s: f64,
    /// Exit code, or 128+signal.
    pub code: i32,
    pub timed_out: bool,
    /// Peak RSS of the child and its reaped descendants, KiB.
    pub maxrss_kib: u64,
    pub user_s: f64,
    pub sys_s: f64,
}

fn pidfd_open(pid: i32) -> Option<i32> {
    // SAFETY: raw syscall with plain integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// First argument that turns this binary into the measuring trampoline.
pub const TRAMPOLINE_FLAG: &str = "--internal-measure";

/// Spawn `cmd` (program, args and env are taken from it) with the given stdio and wait
/// for it, killing it after `timeout`.
///
/// The child is started through this binary re-executed as a trampoline
/// ([`trampoline_main`]), which forks it and reports its wall time and rusage. Why: a
/// child's `ru_maxrss` includes the memory of the process it was forked from, up to its
/// exec — and the harness holds every archive in memory for the server (over 1 GiB in
/// the big run). The trampoline is a fresh exec, a few MiB, so that is the floor.
pub fn measure(
    cmd: &Command,
    stdout: Stdio,
    stderr: Stdio,
    scratch: &Path,
    timeout: Duration,
) -> Result<Measured> {
    let result = scratch.join(format!("measure-{}", std::process::id()));
    let _ = std::fs::remove_file(&result);
    let mut t = Command::new(std::env::current_exe()?);
    t.arg(TRAMPOLINE_FLAG)
        .arg(&result)
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    t.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // Its own process group, so a timeout or Ctrl-C kills the whole pipeline (curl, tar,
    // gzip…), not just its first process: nothing may keep writing to a target we unmount.
    std::os::unix::process::CommandExt::process_group(&mut t, 0);
    let outer = wait_child(&mut t, timeout)?;
    check_interrupted()?;
    let text = std::fs::read_to_string(&result).unwrap_or_default();
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() != 5 {
        if outer.timed_out || interrupted() {
            return Ok(outer);
        }
        bail!(
            "measuring {cmd:?}: the trampoline reported nothing (exit {})",
            outer.code
        );
    }
    Ok(Measured {
        wall_s: f[0],
        code: f[1] as i32,
        timed_out: outer.timed_out,
        maxrss_kib: f[2] as u64,
        user_s: f[3],
        sys_s: f[4],
    })
}

/// The trampoline: `deploy --internal-measure RESULT -- PROG ARGS…`. Forks PROG (which
/// dies with us: PDEATHSIG), waits, writes `wall_s code maxrss_kib user_s sys_s`.
pub fn trampoline_main(args: &[String]) -> std::process::ExitCode {
    let (Some(result), Some(prog)) = (args.get(2), args.get(4)) else {
        eprintln!("usage: {TRAMPOLINE_FLAG} RESULT -- PROG ARGS...");
        return std::process::ExitCode::from(2);
    };
    let mut cmd = Command::new(prog);
    cmd.args(&args[5..]);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    match wait_child(&mut cmd, Duration::from_secs(u32::MAX as u64)) {
        Ok(m) => {
            let line = format!(
                "{:.6} {} {} {:.6} {:.6}\n",
                m.wall_s, m.code, m.maxrss_kib, m.user_s, m.sys_s
            );
            if let Err(e) = std::fs::write(result, line) {
                eprintln!("ERROR: writing {result}: {e}");
                return std::process::ExitCode::from(2);
            }
            std::process::ExitCode::from(m.code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Spawn and wait; wall time runs from just before `spawn` to the reap.
fn wait_child(cmd: &mut Command, timeout: Duration) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as i32;
    let pidfd = pidfd_open(pid);
    let mut timed_out = false;
    // Wait for exit without reaping, so a kill can never hit a reused pid.
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() || (interrupted() && !timed_out) {
            // SAFETY: the child is not reaped yet, so its pid (and, when it leads one, its
            // process group) is still ours.
            unsafe {
                if libc::getpgid(pid) == pid {
                    libc::kill(-pid, libc::SIGKILL);
                }
                libc::kill(pid, libc::SIGKILL);
            }
            timed_out = !interrupted();
            break;
        }
        match pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut p, 1, ms) };
                if r > 0 {
                    break;
                }
            }
            None => {
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: WNOWAIT leaves the child reapable.
                let r = unsafe {
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                    )
                };
                if r == 0 && unsafe { info.si_pid() } == pid {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            bail!("wait4({pid}): {e}");
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(fd) = pidfd {
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    }
    drop(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        wall_s,
        code,
        timed_out,
        maxrss_kib: ru.ru_maxrss as u64,
        user_s: tv(ru.ru_utime),
        sys_s: tv(ru.ru_stime),
    })
}

/// Which filesystem to extract onto.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FsKind {
    /// A fresh ext4 on a loop device (sparse file in the work dir).
    Ext4,
    /// A fresh tmpfs: no disk at all, the CPU-bound ceiling.
    Tmpfs,
    /// The loop ext4 behind a block-throttle rule (see `SlowDisk`).
    Slow,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Tmpfs => "tmpfs",
            FsKind::Slow => "slow",
        }
    }
}

/// The slow-disk emulation: cgroup-v1 blkio throttle in the root cgroup, on the loop
/// device only, for reads and writes (bandwidth and IOPS). dm-delay would add latency
/// per I/O instead, but this kernel has no device-mapper (`/dev/mapper/control` absent,
/// no modules), and cgroup v2's io controller is not enabled here; blkio v1 is.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SlowDisk {
    pub mib_per_s: u64,
    pub iops: u64,
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A filesystem created for one run set and destroyed (with its throttle rules, loop
/// device and backing file) on Drop.
pub struct TargetFs {
    pub kind: FsKind,
    mnt: PathBuf,
    mounted: bool,
    loopdev: Option<String>,
    /// `MAJ:MIN` with throttle rules installed.
    throttled: Option<String>,
    backing: Option<PathBuf>,
    pub detail: String,
}

impl TargetFs {
    /// Create a fresh filesystem of `size` bytes under `work` (mount point `work/mnt-KIND`).
    pub fn create(kind: FsKind, work: &Path, size: u64, slow: SlowDisk) -> Result<TargetFs> {
        let mnt = work.join(format!("mnt-{}", kind.name()));
        fs_err::create_dir_all(&mnt)?;
        let mut t = TargetFs {
            kind,
            mnt,
            mounted: false,
            loopdev: None,
            throttled: None,
            backing: None,
            detail: String::new(),
        };
        match kind {
            FsKind::Tmpfs => {
                run(Command::new("mount")
                    .args(["-t", "tmpfs", "-o"])
                    .arg(format!("size={size},mode=0755"))
                    .arg("vrun-bench")
                    .arg(&t.mnt))?;
                t.mounted = true;
                t.detail = format!("tmpfs size={}M", size >> 20);
            }
            FsKind::Ext4 | FsKind::Slow => {
                let backing = work.join(format!("{}.img", kind.name()));
                t.backing = Some(backing.clone());
                let f = fs_err::File::create(&backing)?;
                f.set_len(size)?;
                drop(f);
                let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&backing))?
                    .trim()
                    .to_string();
                if !dev.starts_with("/dev/loop") {
                    bail!("losetup printed {dev:?}, expected /dev/loopN");
                }
                t.loopdev = Some(dev.clone());
                // No lazy init: ext4lazyinit would otherwise zero inode tables in the
                // background while we measure.
                run(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                    .arg(&dev))?;
                if kind == FsKind::Slow {
                    let name = dev.trim_start_matches("/dev/");
                    let majmin = fs_err::read_to_string(format!("/sys/block/{name}/dev"))?
                        .trim()
                        .to_string();
                    if !Path::new(BLKIO)
                        .join("blkio.throttle.write_bps_device")
                        .exists()
                    {
                        bail!(
                            "slow disk needs the cgroup-v1 blkio throttle ({BLKIO}/blkio.throttle.*); \
                             not available on this host (and no device-mapper for dm-delay)"
                        );
                    }
                    t.throttled = Some(majmin.clone());
                    let bps = slow.mib_per_s << 20;
                    for (file, v) in [
                        ("blkio.throttle.write_bps_device", bps),
                        ("blkio.throttle.read_bps_device", bps),
                        ("blkio.throttle.write_iops_device", slow.iops),
                        ("blkio.throttle.read_iops_device", slow.iops),
                    ] {
                        fs_err::write(Path::new(BLKIO).join(file), format!("{majmin} {v}\n"))?;
                    }
                    t.detail = format!(
                        "ext4 on {dev} ({}G sparse file), blkio throttle {majmin}: {} MiB/s, {} IOPS read+write",
                        size >> 30,
                        slow.mib_per_s,
                        slow.iops
                    );
                } else {
                    t.detail = format!("ext4 on {dev} ({}G sparse file)", size >> 30);
                }
                run(Command::new("mount").arg(&dev).arg(&t.mnt))?;
                t.mounted = true;
            }
        }
        Ok(t)
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Remove everything on the filesystem (unmounting anything a run left mounted).
    pub fn clear(&self) -> Result<()> {
        unmount_under(&self.mnt);
        for e in fs_err::read_dir(&self.mnt)? {
            let e = e?;
            if e.file_name() == "lost+found" {
                continue;
            }
            let p = e.path();
            if e.file_type()?.is_dir() {
                fs_err::remove_dir_all(&p)?;
            } else {
                fs_err::remove_file(&p)?;
            }
        }
        syncfs(&self.mnt)
    }
}

impl Drop for TargetFs {
    fn drop(&mut self) {
        unmount_under(&self.mnt);
        if self.mounted {
            // A killed pipeline may take a moment to release its files.
            let mut last = None;
            for _ in 0..20 {
                match run(Command::new("umount").arg(&self.mnt)) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(e) = last {
                eprintln!("warning: {e}; detaching lazily");
                let _ = umount_detach(&self.mnt);
            }
        }
        if let Some(majmin) = self.throttled.take() {
            for file in [
                "blkio.throttle.write_bps_device",
                "blkio.throttle.read_bps_device",
                "blkio.throttle.write_iops_device",
                "blkio.throttle.read_iops_device",
            ] {
                if let Err(e) = fs_err::write(Path::new(BLKIO).join(file), format!("{majmin} 0\n"))
                {
                    eprintln!("warning: removing throttle rule {majmin}: {e}");
                }
            }
        }
        if let Some(dev) = self.loopdev.take() {
            if let Err(e) = run(Command::new("losetup").arg("-d").arg(&dev)) {
                eprintln!("warning: {e}");
            }
        }
        if let Some(b) = self.backing.take() {
            let _ = std::fs::remove_file(b);
        }
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

fn umount_detach(p: &Path) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unmount every mount strictly below `dir`, deepest first (a run may leave an overlay).
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = umount_detach(Path::new(&p));
    }
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One-line facts about the machine for the report.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |prog: &str, arg: &str| -> String {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel.trim(),
        "tools": {
            "tar": version("tar", "--version"),
            "gzip": version("gzip", "--version"),
            "bzip2": version("bzip2", "--help"),
            "xz": version("xz", "--version"),
            "zstd": version("zstd", "--version"),
            "curl": version("curl", "--version"),
        }
    })
}

/// The 1-minute load average: other work on the machine skews figures; say so.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}
