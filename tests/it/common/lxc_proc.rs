//! A set-up proc for LXC tests, driven through the real `vrun` binary.
//!
//! [`TestProc::new`] serves a busybox image tarball and an app build tarball (both built
//! by the test, see `image.rs`) from `testkit::serve` on 127.0.0.1, writes a proc.yaml (as
//! JSON, which is YAML) pointing at them, and runs the real `vrun setup` in a fresh temp
//! `VR_ROOT` (named with a space, so every LXC path needs quoting): download, verify,
//! extract into the cache, Procfile resolution, env files — exactly what a deploy does.
//! Container names are unique per test (LXC names are global). `Drop` kills every
//! container of the proc, removes their cgroups, unmounts the rootfs and only then deletes
//! the temp dir (never through a mount), so a failing test leaves nothing behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vrun::lxc::LxcProc;
use vrun::paths::Root;
use vrun::state::ProcState;

use super::image;

/// A unique tag for the proc's `version` (hence its container name).
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}x{:04x}",
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
    use std::io::{Read, Write};
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

/// Shell single quotes.
pub fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How to set up the test proc.
#[derive(Debug, Clone)]
pub struct ProcOpts {
    /// `cmd` in proc.yaml; `None`: the Procfile's `web` line (busybox httpd on $PORT).
    pub cmd: Option<String>,
    pub port: u16,
    /// Extra entries of the app build (uptests, …).
    pub app_files: Vec<image::Entry>,
    pub with_image: bool,
    /// `user`/`group` in proc.yaml (numeric: uid 1000 need not be named `app` here).
    pub user: u32,
    pub group: u32,
    pub volumes: Vec<(PathBuf, String)>,
    pub mem_limit: Option<u64>,
}

impl Default for ProcOpts {
    fn default() -> Self {
        Self {
            cmd: None,
            port: free_port(),
            app_files: Vec::new(),
            with_image: true,
            user: 1000,
            group: 1000,
            volumes: Vec::new(),
            mem_limit: None,
        }
    }
}

impl ProcOpts {
    /// Default options with `cmd` set.
    pub fn cmd(cmd: &str) -> Self {
        Self {
            cmd: Some(cmd.into()),
            ..Self::default()
        }
    }
}

/// Output of a finished `vrun` child.
#[derive(Debug)]
pub struct Finished {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The loopback server with the test's tarballs.
pub struct Tarballs {
    pub server: testkit::serve::Server,
    pub image_url: String,
    pub build_url: String,
}

impl Tarballs {
    pub fn serve(app_files: &[image::Entry]) -> Self {
        let server = testkit::serve::Server::start(
            [
                ("/images/busybox.tar.gz".to_string(), image::busybox_image()),
                (
                    "/builds/app.tar.gz".to_string(),
                    image::app_build(app_files),
                ),
            ],
            testkit::serve::ServerOptions::default(),
        )
        .unwrap();
        Self {
            image_url: server.url("/images/busybox.tar.gz"),
            build_url: server.url("/builds/app.tar.gz"),
            server,
        }
    }
}

/// A set-up proc in its own VR_ROOT.
pub struct TestProc {
    tmp: Option<tempfile::TempDir>,
    pub root: Root,
    pub file: PathBuf,
    pub name: String,
    pub opts: ProcOpts,
    pub proc: LxcProc,
    pub tarballs: Tarballs,
    children: Vec<Child>,
    n_outputs: u32,
}

impl TestProc {
    pub fn new(tag: &str, opts: ProcOpts) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-lxc-")
            .tempdir()
            .unwrap();
        let root = Root::new(tmp.path().join("vr root"));
        let tarballs = Tarballs::serve(&opts.app_files);
        let file = tmp.path().join("proc.yaml");
        write_proc_yaml(&file, &unique(tag), &opts, &tarballs);
        let mut this = Self {
            tmp: Some(tmp),
            root: root.clone(),
            file: file.clone(),
            name: String::new(),
            opts: opts.clone(),
            proc: placeholder_proc(&root),
            tarballs,
            children: Vec::new(),
            n_outputs: 0,
        };
        let setup = this.vrun(["setup"]);
        assert_eq!(setup.code, 0, "vrun setup: {}", setup.stderr);

        let config = vrun::config::ProcConfig::load(&file).unwrap();
        this.name = config.container_name().unwrap();
        this.proc =
            LxcProc::from_config(&root, &this.name, &config, &config.owner().unwrap()).unwrap();
        this
    }

    /// Write the proc.yaml of `opts` in a fresh temp dir and run `vrun setup` on it,
    /// expecting it to fail; its output, and what it left under the VR_ROOT's `procs/`.
    pub fn setup_fails(tag: &str, opts: ProcOpts) -> (Finished, Vec<PathBuf>) {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-lxc-")
            .tempdir()
            .unwrap();
        let root = tmp.path().join("vr root");
        let tarballs = Tarballs::serve(&opts.app_files);
        let file = tmp.path().join("proc.yaml");
        write_proc_yaml(&file, &unique(tag), &opts, &tarballs);
        let out = Command::new(env!("CARGO_BIN_EXE_vrun"))
            .arg("setup")
            .arg(&file)
            .env("VR_ROOT", &root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            mounts_under(tmp.path()).is_empty(),
            "a failed setup mounted"
        );
        let left = std::fs::read_dir(root.join("procs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let finished = Finished {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        (finished, left)
    }

    /// Another proc.yaml (another version, same build and image) in this VR_ROOT.
    pub fn sibling_file(&self, tag: &str) -> PathBuf {
        let file = self.dir().join(format!("{tag}.yaml"));
        write_proc_yaml(&file, &unique(tag), &self.opts, &self.tarballs);
        file
    }

    /// [`TestProc::sibling_file`] listening on `port` (so both can run at once).
    pub fn sibling_file_on_port(&self, tag: &str, port: u16) -> PathBuf {
        let file = self.dir().join(format!("{tag}.yaml"));
        let opts = ProcOpts {
            port,
            ..self.opts.clone()
        };
        write_proc_yaml(&file, &unique(tag), &opts, &self.tarballs);
        file
    }

    /// The test's temp dir (proc.yaml, layers, child outputs).
    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().unwrap().path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.proc.paths.rootfs()
    }

    /// `vrun CMD FILE ARGS…` with this VR_ROOT.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = S>) -> Command {
        let mut args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        // The command first, then FILE, then the rest.
        args.insert(1, self.file.clone().into_os_string());
        let mut c = Command::new(env!("CARGO_BIN_EXE_vrun"));
        c.args(args).env("VR_ROOT", self.root.dir());
        c
    }

    /// Start `vrun …` in the background; stdout/stderr go to files, returned with its pid.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, &str)],
    ) -> (u32, PathBuf, PathBuf) {
        self.n_outputs += 1;
        let n = self.n_outputs;
        let (out, err) = (
            self.dir().join(format!("{n}.out")),
            self.dir().join(format!("{n}.err")),
        );
        let child = self
            .command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        (pid, out, err)
    }

    /// Wait for a spawned `vrun` (by pid); its exit code (128+n for a signal).
    pub fn wait_child(&mut self, pid: u32) -> i32 {
        let i = self.children.iter().position(|c| c.id() == pid).unwrap();
        let mut c = self.children.remove(i);
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        st.code().unwrap_or_else(|| 128 + st.signal().unwrap())
    }

    /// Run `vrun …` to completion.
    pub fn vrun<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        args: impl IntoIterator<Item = S>,
    ) -> Finished {
        self.vrun_env(args, &[])
    }

    /// Run `vrun …` to completion with extra environment variables.
    pub fn vrun_env<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, &str)],
    ) -> Finished {
        let (pid, out, err) = self.spawn(args, env);
        let code = self.wait_child(pid);
        Finished {
            code,
            stdout: std::fs::read_to_string(out).unwrap(),
            stderr: std::fs::read_to_string(err).unwrap(),
        }
    }

    /// `vrun shell FILE -- argv…`.
    pub fn shell(&mut self, argv: &[&str]) -> Finished {
        let mut args = vec!["shell", "--"];
        args.extend_from_slice(argv);
        self.vrun(args)
    }

    /// `vrun run FILE --grace SECS` in the background.
    pub fn spawn_run(&mut self, grace_secs: u64) -> (u32, PathBuf, PathBuf) {
        let grace = grace_secs.to_string();
        self.spawn(["run", "--grace", grace.as_str()], &[])
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
                if e.file_name().to_string_lossy().contains(&self.name) {
                    out.push(e.path());
                }
            }
        }
        out
    }

    /// `tmp-*` scratch dirs of shell/uptest containers left in the proc dir.
    pub fn leftover_scratch_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.proc.paths.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// proc.yaml for `opts`, version `version`, fetching from `tarballs`.
fn write_proc_yaml(file: &Path, version: &str, opts: &ProcOpts, tarballs: &Tarballs) {
    let mut yaml = serde_json::json!({
        "app_name": "vrt",
        "version": version,
        "config_name": "cfg",
        "release_hash": "abc123",
        "proc_name": "web",
        "port": opts.port,
        "user": opts.user.to_string(),
        "group": opts.group.to_string(),
        "env": {"FOO": "bar from env.sh"},
        "settings": {"greeting": "hello settings"},
        "build_url": tarballs.build_url,
        "volumes": opts.volumes.iter()
            .map(|(h, c)| vec![h.to_string_lossy().into_owned(), c.clone()])
            .collect::<Vec<_>>(),
    });
    if let Some(cmd) = &opts.cmd {
        yaml["cmd"] = cmd.clone().into();
    }
    if opts.with_image {
        yaml["image_name"] = "busybox-test".into();
        yaml["image_url"] = tarballs.image_url.clone().into();
    }
    if let Some(m) = opts.mem_limit {
        yaml["mem_limit"] = m.into();
    }
    std::fs::write(file, serde_json::to_string_pretty(&yaml).unwrap()).unwrap();
}

/// Stand-in until setup has run and the container name is known.
fn placeholder_proc(root: &Root) -> LxcProc {
    LxcProc {
        name: String::new(),
        lxcpath: root.procs_dir(),
        paths: root.proc("placeholder"),
        state: ProcState::new(&root.cache_dir(), None, None, 0, 0),
        user: vrun::lxc::ProcUser {
            uid: 0,
            gid: 0,
            groups: vec![],
            is_root: true,
        },
        volumes: vec![],
        mem_limit: None,
        memsw_limit: None,
    }
}

impl Drop for TestProc {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.name.is_empty() {
            if let Err(e) = vrun::lxc::remove_cgroups(&self.name) {
                eprintln!("cleanup: {e}");
            }
            if let Err(e) = vrun::mounts::unmount(&self.rootfs()) {
                eprintln!("cleanup: {e}");
            }
        }
        // The lock dir LXC made for our lxcpath: /run/lxc/lock/<procs dir>.
        let mut lock = PathBuf::from("/run/lxc/lock");
        lock.push(self.root.procs_dir().strip_prefix("/").unwrap());
        while lock.starts_with("/run/lxc/lock/") && std::fs::remove_dir(&lock).is_ok() {
            lock.pop();
        }
        let tmp = self.tmp.take().unwrap();
        // The cache's EROFS layer mounts outlive teardown by design; they are ours here.
        let mut below = mounts_under(tmp.path());
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in below {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let still_mounted = mounts_under(tmp.path());
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

/// Mount points below `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    vrun::mounts::mounts_below(dir).unwrap_or_default()
}

/// [`mounts_under`] but the cache's own mounts of its EROFS layers, which outlive a
/// teardown by design (the next proc of the layer shares them; gc takes them off).
pub fn proc_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v = mounts_under(dir);
    v.retain(|m| vrun_cache::LayerKey::from_root(m).is_none());
    v
}
