//! Helpers shared by the integration tests: a temp dir holding a fresh `VR_ROOT` and the
//! test's own files, a builder that runs the real `vrun` binary, and guards that undo
//! mounts even when a test fails.

#![allow(dead_code)]

pub mod fstree;
pub mod image;
pub mod lxc_proc;
pub mod twin;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `VR_ROOT` dir's name: a space, so mount points under it appear `\040`-escaped in
/// /proc/self/mountinfo and every test exercises paths that need quoting.
const ROOT_NAME: &str = "vr root";

/// A temp dir with `vr root/` (the `VR_ROOT` under test) and room for proc.yaml files.
/// Dropping it unmounts whatever is mounted below it (setup leaves each proc's overlay
/// mounted) before deleting it, and keeps it rather than delete through a mount.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if unmount_all_below(dir.path()) {
            drop(dir);
        } else {
            eprintln!("cleanup: leaving {} (still mounted)", dir.path().display());
            let _ = dir.keep();
        }
    }
}

/// Unmount (lazily) every mount below `dir`, deepest first; true when none is left.
pub fn unmount_all_below(dir: &Path) -> bool {
    for _ in 0..4 {
        let mut below = vrun::mounts::mounts_below(dir).unwrap_or_default();
        if below.is_empty() {
            return true;
        }
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in below {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    vrun::mounts::mounts_below(dir)
        .unwrap_or_default()
        .is_empty()
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("vrun-test-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join(ROOT_NAME)).unwrap();
        TestDir { dir: Some(dir) }
    }

    /// The scratch dir (proc.yaml files live here).
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("not dropped").path()
    }

    /// The `VR_ROOT` given to vrun.
    pub fn root(&self) -> PathBuf {
        self.path().join(ROOT_NAME)
    }

    /// Write a file in the scratch dir and return its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Everything under `VR_ROOT`, for "nothing was created" checks.
    pub fn root_entries(&self) -> Vec<PathBuf> {
        testkit::walk(&self.root())
            .into_iter()
            .map(|f| f.path)
            .collect()
    }

    pub fn proc_dir(&self, name: &str) -> PathBuf {
        self.root().join("procs").join(name)
    }

    /// `vrun ARGS...` with `VR_ROOT` set to this dir's root, run from the scratch dir.
    pub fn vrun<I, S>(&self, args: I) -> Vrun
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vrun"));
        cmd.args(args)
            .env("VR_ROOT", self.root())
            .current_dir(self.path())
            .stdin(Stdio::null());
        Vrun { cmd }
    }
}

/// A `vrun` invocation being built.
pub struct Vrun {
    pub cmd: Command,
}

impl Vrun {
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Vrun {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Vrun {
        self.cmd.env_remove(key);
        self
    }

    /// Start it without waiting: its own process group, stdout and stderr captured.
    pub fn spawn(mut self) -> Running {
        use std::os::unix::process::CommandExt;
        let child = self
            .cmd
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vrun starts");
        Running { child: Some(child) }
    }

    pub fn run(mut self) -> Run {
        let out: Output = self.cmd.output().expect("vrun starts");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A `vrun` started with [`Vrun::spawn`]. Dropping it SIGKILLs its process group and
/// reaps it, so a failing test leaves no process behind.
pub struct Running {
    child: Option<std::process::Child>,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("not yet waited for").id()
    }

    /// Whether it is still running (reaps nothing: `try_wait` keeps the status).
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not yet waited for");
        matches!(child.try_wait(), Ok(None))
    }

    /// `kill -9` the process itself (not its group).
    pub fn kill9(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 vrun");
    }

    /// Wait for it to end and collect what it printed.
    pub fn finish(mut self) -> Run {
        let out = self
            .child
            .take()
            .expect("not yet waited for")
            .wait_with_output()
            .expect("wait for vrun");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Poll `cond` every few milliseconds until it holds; panic naming `what` after `limit`.
/// A deadline against hangs, not a timed assertion: `limit` is far above the expected wait.
pub fn wait_until(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// What a finished `vrun` did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "vrun failed: {self:#?}");
        self
    }

    /// Failed with exactly one stderr line `ERROR: ...` containing each of `needles`.
    pub fn assert_error(&self, needles: &[&str]) -> &Run {
        assert_ne!(self.code, Some(0), "vrun should have failed: {self:#?}");
        assert!(self.code.is_some(), "vrun was killed: {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "want one stderr line: {self:#?}");
        assert!(lines[0].starts_with("ERROR: "), "{self:#?}");
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "{needle:?} not in {:?}",
                lines[0]
            );
        }
        self
    }
}

/// Unmounts (lazily, ignoring errors) on drop, so a failing test leaves no mount behind.
pub struct MountGuard(pub PathBuf);

impl MountGuard {
    /// Mount a fresh tmpfs on `target`.
    pub fn tmpfs(target: &Path) -> MountGuard {
        MountGuard::tmpfs_sized(target, "1m")
    }

    /// Mount a fresh tmpfs of `size` (as `mount -o size=`, e.g. `2m`) on `target`.
    pub fn tmpfs_sized(target: &Path, size: &str) -> MountGuard {
        std::fs::create_dir_all(target).unwrap();
        nix::mount::mount(
            Some("vrun-test"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount tmpfs (tests run as root)");
        MountGuard(target.to_owned())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        while vrun::mounts::is_mount_point(&self.0).unwrap_or(false) {
            if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

pub use testkit::ChildGuard;

/// The name libtest knows a test by (`fetch::child_env_stall`), for re-running it alone in
/// a child process with `--exact`: `module` is the test's `module_path!()`.
pub fn test_name(module: &str, name: &str) -> String {
    let module = module.split_once("::").map_or("", |(_crate, rest)| rest);
    if module.is_empty() {
        name.to_owned()
    } else {
        format!("{module}::{name}")
    }
}

/// Which LXC suite runs now, and how many of its tests.
struct SuiteState {
    suite: Option<&'static str>,
    holders: usize,
}

static LXC_SUITE: std::sync::Mutex<SuiteState> = std::sync::Mutex::new(SuiteState {
    suite: None,
    holders: 0,
});
static LXC_SUITE_FREE: std::sync::Condvar = std::sync::Condvar::new();

/// Held by every test of an LXC suite (`lxc_suite(module_path!())`) for its whole run.
///
/// The suites were separate test binaries, which cargo runs one after another: the tests
/// of one suite ran in parallel with each other and with nothing else. In one binary this
/// keeps that for LXC: tests of the same suite share the guard, a test of another LXC
/// suite waits until the last of them has dropped it. Tests that use no LXC take nothing
/// and run beside them.
pub struct LxcSuite(());

pub fn lxc_suite(suite: &'static str) -> LxcSuite {
    let mut state = LXC_SUITE.lock().unwrap_or_else(|p| p.into_inner());
    while state.suite.is_some_and(|s| s != suite) {
        state = LXC_SUITE_FREE
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
    state.suite = Some(suite);
    state.holders += 1;
    LxcSuite(())
}

impl Drop for LxcSuite {
    fn drop(&mut self) {
        let mut state = LXC_SUITE.lock().unwrap_or_else(|p| p.into_inner());
        state.holders -= 1;
        if state.holders == 0 {
            state.suite = None;
            LXC_SUITE_FREE.notify_all();
        }
    }
}

/// How the vrun under test stores layers: as `VRUN_LAYERS` says (the test process's
/// environment reaches every vrun it starts, so `VRUN_LAYERS=dir cargo test` runs a
/// suite on directory layers), else what auto picks on the hosts CI runs on: EROFS.
pub fn layer_storage() -> vrun_cache::LayerStorage {
    match std::env::var(vrun::layers::LAYERS_ENV).as_deref() {
        Ok("dir") => vrun_cache::LayerStorage::Dir,
        _ => vrun_cache::LayerStorage::Erofs,
    }
}

/// The store bucket holding this run's layers (`layers-v1` or `layers-erofs-v1`).
pub fn layers_bucket() -> &'static str {
    match layer_storage() {
        vrun_cache::LayerStorage::Dir => "layers-v1",
        vrun_cache::LayerStorage::Erofs => "layers-erofs-v1",
    }
}

/// A layer's name in this run's storage: `base` (`<kind>-<sha256>-<uid>-<gid>`), with
/// `.erofs` for an EROFS layer.
pub fn layer_name(base: &str) -> String {
    match layer_storage() {
        vrun_cache::LayerStorage::Dir => base.to_string(),
        vrun_cache::LayerStorage::Erofs => format!("{base}.erofs"),
    }
}
