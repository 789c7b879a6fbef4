//! A set-up proc for LXC tests, and a way to run vrun commands as separate processes.
//!
//! [`TestProc`] builds what `vrun setup` leaves behind — layers, `upper/{env.sh,proc.sh,
//! settings.yaml}`, `state.json` — in a fresh temp `VR_ROOT`, under a container name no
//! other test uses (LXC names are global). Its `Drop` kills every container of that name,
//! removes their cgroups, unmounts the rootfs and only then deletes the temp dir (never
//! through a mount), so a failing test leaves nothing behind.
//!
//! Signals, `kill -9` and a pty need vrun as its own process. Until `main.rs` wires the
//! commands, the test binary re-executes itself: the `vrun_child` test of each test file
//! runs [`child_main`] when `VRUN_TEST_CHILD` holds a [`ChildSpec`], calling the same
//! `vrun::commands::*` functions the binary will, and exits with their code.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vrun::lxc::{LxcProc, ProcUser, Volume};
use vrun::paths::Root;
use vrun::state::{ProcState, STATE_VERSION};

use super::image;

pub const CHILD_ENV: &str = "VRUN_TEST_CHILD";
pub const CHILD_STDOUT_ENV: &str = "VRUN_TEST_STDOUT";

/// A unique container name: LXC names are global across lxcpaths.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "vrt-{tag}-{}-{}-{:04x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        rand::random::<u16>()
    )
}

/// A free TCP port on 127.0.0.1 (bind :0, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` until it returns Some or `limit` passes (readiness, not a timing assertion).
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /` on 127.0.0.1:port; the body on a 200.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// How to set up the test proc.
#[derive(Debug, Clone)]
pub struct ProcOpts {
    /// The proc's command (`cmd` in proc.yaml). Default: the Procfile's web line.
    pub cmd: String,
    pub port: u16,
    pub env: Vec<(String, String)>,
    /// settings.yaml text.
    pub settings: String,
    /// Extra entries of the app build (uptests, …).
    pub app_files: Vec<image::Entry>,
    pub with_image: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub volumes: Vec<(PathBuf, String)>,
    pub mem_limit: Option<u64>,
}

impl Default for ProcOpts {
    fn default() -> Self {
        Self {
            cmd: "busybox httpd -f -p $PORT -h /app/www".into(),
            port: free_port(),
            env: vec![("FOO".into(), "bar from env.sh".into())],
            settings: "greeting: hello settings\n".into(),
            app_files: Vec::new(),
            with_image: true,
            uid: 1000,
            gid: 1000,
            groups: vec![2000],
            volumes: Vec::new(),
            mem_limit: None,
        }
    }
}

fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A set-up proc in its own VR_ROOT.
pub struct TestProc {
    pub tmp: Option<tempfile::TempDir>,
    pub root: Root,
    pub name: String,
    pub opts: ProcOpts,
    pub proc: LxcProc,
    children: Vec<Child>,
}

impl TestProc {
    pub fn new(tag: &str, opts: ProcOpts) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-lxc-")
            .tempdir()
            .unwrap();
        let root = Root::new(tmp.path().join("root"));
        let name = unique_name(tag);
        let layers = tmp.path().join("layers");

        let build = layers.join("build");
        image::gnu_untar(&image::app_build(&opts.app_files), &build.join("app"));
        let chown = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", opts.uid, opts.gid))
            .arg(build.join("app"))
            .status()
            .unwrap();
        assert!(chown.success());
        let image_layer = if opts.with_image {
            let dir = layers.join("image");
            image::gnu_untar(&image::busybox_image(), &dir);
            Some(dir)
        } else {
            None
        };

        let paths = root.proc(&name);
        for d in [paths.upper(), paths.work(), paths.rootfs()] {
            std::fs::create_dir_all(d).unwrap();
        }
        let upper = paths.upper();
        let env: String = opts
            .env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", sq(v)))
            .collect();
        std::fs::write(upper.join("env.sh"), env).unwrap();
        std::fs::write(upper.join("settings.yaml"), &opts.settings).unwrap();
        let proc_sh = format!(
            "#!/bin/sh\n\
             export TMPDIR=/tmp HOME=/app\n\
             if [ -d \"$HOME/.profile.d\" ]; then for f in \"$HOME\"/.profile.d/*; do [ -f \"$f\" ] && . \"$f\"; done; fi\n\
             . /env.sh\n\
             export APP_SETTINGS_YAML=/settings.yaml\n\
             export PORT={}\n\
             if [ \"$1\" = run ]; then exec /bin/sh -c {}; fi\n\
             exec \"$@\"\n",
            opts.port,
            sq(&opts.cmd)
        );
        std::fs::write(upper.join("proc.sh"), proc_sh).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            upper.join("proc.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        ProcState {
            version: STATE_VERSION,
            build_layer: Some(build),
            image_layer,
            uid: opts.uid,
            gid: opts.gid,
        }
        .save(&paths.state())
        .unwrap();

        let proc = LxcProc::load(
            &root,
            &name,
            user_of(&opts),
            volumes_of(&opts),
            opts.mem_limit,
            None,
        )
        .unwrap();
        Self {
            tmp: Some(tmp),
            root,
            name,
            opts,
            proc,
            children: Vec::new(),
        }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.proc.paths.rootfs()
    }

    /// The spec for a child vrun running `command` on this proc.
    pub fn child_spec(&self, command: ChildCommand) -> ChildSpec {
        ChildSpec {
            root: self.root.dir().to_owned(),
            name: self.name.clone(),
            uid: self.opts.uid,
            gid: self.opts.gid,
            groups: self.opts.groups.clone(),
            volumes: self
                .opts
                .volumes
                .iter()
                .map(|(h, c)| (h.clone(), c.clone()))
                .collect(),
            mem_limit: self.opts.mem_limit,
            command,
            stdout_file: None,
        }
    }

    /// Start a child vrun; its stdout/stderr go to files in the temp dir, returned with it.
    pub fn spawn(&mut self, spec: &ChildSpec) -> (u32, PathBuf, PathBuf) {
        self.spawn_with_env(spec, &[])
    }

    /// [`Self::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        &mut self,
        spec: &ChildSpec,
        env: &[(&str, &str)],
    ) -> (u32, PathBuf, PathBuf) {
        let n = self.children.len();
        let dir = self.tmp.as_ref().unwrap().path();
        let (out, err) = (
            dir.join(format!("child{n}.out")),
            dir.join(format!("child{n}.err")),
        );
        let libtest_out = dir.join(format!("child{n}.libtest"));
        let spec = ChildSpec {
            stdout_file: Some(out.clone()),
            ..spec.clone()
        };
        let child = child_command(&spec)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&libtest_out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        (pid, out, err)
    }

    /// Run a child vrun with `input` on its stdin: (exit code, stdout, stderr).
    pub fn run_child_with_stdin(
        &mut self,
        spec: &ChildSpec,
        input: &[u8],
    ) -> (i32, String, String) {
        use std::io::Write;
        let dir = self.tmp.as_ref().unwrap().path();
        let (out, err) = (dir.join("stdin-child.out"), dir.join("stdin-child.err"));
        let spec = ChildSpec {
            stdout_file: Some(out.clone()),
            ..spec.clone()
        };
        let mut child = child_command(&spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let code = child.wait().unwrap().code().unwrap_or(-1);
        (
            code,
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(err).unwrap(),
        )
    }

    /// Wait for a spawned child vrun (by pid) and return its exit code.
    pub fn wait_child(&mut self, pid: u32) -> i32 {
        let i = self.children.iter().position(|c| c.id() == pid).unwrap();
        let mut c = self.children.remove(i);
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        st.code().unwrap_or_else(|| 128 + st.signal().unwrap())
    }

    /// Run a child vrun to completion: (exit code, stdout, stderr).
    pub fn run_child(&mut self, spec: &ChildSpec) -> (i32, String, String) {
        let (pid, out, err) = self.spawn(spec);
        let code = self.wait_child(pid);
        (
            code,
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(err).unwrap(),
        )
    }

    /// `vrun shell FILE -- argv…` as a child: (exit code, stdout, stderr).
    pub fn shell(&mut self, argv: &[&str]) -> (i32, String, String) {
        let spec = self.child_spec(ChildCommand::Shell {
            argv: argv.iter().map(|s| s.to_string()).collect(),
        });
        self.run_child(&spec)
    }

    /// Pids in the proc's own payload cgroup.
    pub fn payload_pids(&self) -> Vec<i32> {
        vrun::lxc::cgroups::payload_pids(&self.name)
    }

    /// Every cgroup dir of this proc and its TMP containers, in every hierarchy.
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in vrun::lxc::cgroups::hierarchies() {
            for e in std::fs::read_dir(&h).into_iter().flatten().flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.contains(&self.name) {
                    out.push(e.path());
                }
            }
        }
        out
    }
}

impl Drop for TestProc {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = vrun::lxc::remove_cgroups(&self.name) {
            eprintln!("cleanup: {e}");
        }
        if let Err(e) = vrun::lxc::unmount(&self.rootfs()) {
            eprintln!("cleanup: {e}");
        }
        // The lock dir LXC made for our lxcpath: /run/lxc/lock/<procs dir>.
        let mut lock = PathBuf::from("/run/lxc/lock");
        lock.push(self.root.procs_dir().strip_prefix("/").unwrap());
        while lock.starts_with("/run/lxc/lock/") && std::fs::remove_dir(&lock).is_ok() {
            lock.pop();
        }
        let tmp = self.tmp.take().unwrap();
        let still_mounted = vrun::lxc::mount::mounts_under(tmp.path()).unwrap_or_default();
        if still_mounted.is_empty() {
            drop(tmp);
        } else {
            eprintln!(
                "cleanup: leaving {} (mounted: {still_mounted:?})",
                tmp.path().display()
            );
            let _ = tmp.keep();
        }
    }
}

fn user_of(opts: &ProcOpts) -> ProcUser {
    ProcUser {
        uid: opts.uid,
        gid: opts.gid,
        groups: opts.groups.clone(),
        is_root: opts.uid == 0,
    }
}

fn volumes_of(opts: &ProcOpts) -> Vec<Volume> {
    opts.volumes
        .iter()
        .map(|(h, c)| Volume::new(h.clone(), c.clone()))
        .collect()
}

/// What a child vrun does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ChildCommand {
    Run {
        grace_ms: u64,
    },
    Shell {
        argv: Vec<String>,
    },
    Uptest {
        proc_name: String,
        host: String,
        port: String,
        jobs: usize,
        timeout_ms: u64,
    },
}

/// Everything a child vrun needs (what main.rs will get from proc.yaml + flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub root: PathBuf,
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub volumes: Vec<(PathBuf, String)>,
    pub mem_limit: Option<u64>,
    pub command: ChildCommand,
    /// Where the command's stdout goes (libtest writes its own header to the real stdout
    /// first; this keeps the command's stdout exact).
    pub stdout_file: Option<PathBuf>,
}

/// The command line that re-executes this test binary as a child vrun.
pub fn child_command(spec: &ChildSpec) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "vrun_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::to_string(spec).unwrap());
    c
}

/// The same command line as one shell-quoted string (for `script -c`; pass the
/// [`CHILD_ENV`] variable through the environment).
pub fn child_command_line() -> String {
    format!(
        "{} --exact vrun_child --nocapture --test-threads=1",
        sq(&std::env::current_exe().unwrap().to_string_lossy())
    )
}

/// Body of the `vrun_child` pseudo-test: nothing unless `VRUN_TEST_CHILD` is set.
pub fn child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec).unwrap();
    if let Some(out) = &spec.stdout_file {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::create(out).unwrap();
        // SAFETY: plain dup2 onto fd 1.
        assert!(unsafe { libc::dup2(f.as_raw_fd(), 1) } == 1);
    }
    let opts = ProcOpts {
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        volumes: spec.volumes.clone(),
        mem_limit: spec.mem_limit,
        ..ProcOpts::default()
    };
    let code = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let proc = LxcProc::load(
            &Root::new(&spec.root),
            &spec.name,
            user_of(&opts),
            volumes_of(&opts),
            spec.mem_limit,
            None,
        )?;
        match &spec.command {
            ChildCommand::Run { grace_ms } => {
                vrun::commands::run::run(&proc, Duration::from_millis(*grace_ms)).await
            }
            ChildCommand::Shell { argv } => {
                let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
                vrun::commands::shell::shell(&proc, &argv).await
            }
            ChildCommand::Uptest {
                proc_name,
                host,
                port,
                jobs,
                timeout_ms,
            } => {
                let opts = vrun::uptest::UptestOptions {
                    proc_name: proc_name.clone(),
                    host: host.clone(),
                    port: port.clone(),
                    jobs: *jobs,
                    timeout: Duration::from_millis(*timeout_ms),
                };
                vrun::commands::uptest::uptest(&proc, &opts).await
            }
        }
    });
    let code = code.unwrap_or_else(|e| {
        eprintln!("ERROR: {e:#}");
        1
    });
    std::process::exit(code);
}

/// Is `path` below a mount point? (for "no mount left" checks)
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    vrun::lxc::mount::mounts_under(dir).unwrap_or_default()
}
