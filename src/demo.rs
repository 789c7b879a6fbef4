//! `vrun demo`: a whole deploy of an embedded sample app on this machine, in one command.
//!
//! An operator evaluating vrun should see every step Velociraptor drives — setup (fetch,
//! verify, unpack), run, uptest, teardown — and the time each took, without internet and
//! without writing a proc.yaml first. So the demo builds the sample app and a busybox
//! image in memory ([`crate::sample`]), serves them from its own plain loopback file
//! server (`demo/server.rs`), writes a proc.yaml into a fresh temp dir, and then drives **the
//! vrun binary itself** as child processes, exactly as Velociraptor would: `setup
//! --timings FILE`, `run FILE` in the background, `uptest FILE`, `teardown FILE`. Driving
//! the real commands (rather than calling the library) is the point: what the demo shows
//! working is what a deploy script gets, flags, exit codes and stdout contract included.
//!
//! Why it is shaped so:
//! - **Nothing is left behind, whatever fails.** A `Deployment` guard owns the temp dir,
//!   the background `run` and the set-up proc; on any error (or Ctrl-C, SIGTERM, SIGHUP)
//!   its Drop stops `run` (SIGTERM, bounded wait, then SIGKILL), calls `vrun teardown`,
//!   unmounts anything of ours that teardown left, and removes the temp dir without
//!   crossing a mount. Then the demo checks that no mount under the root and no
//!   `lxc.payload.<name>*` cgroup survived, and says so if one did.
//! - **Children run in their own process groups**, so a Ctrl-C reaches only the demo,
//!   which then tears down in order; a second Ctrl-C cannot cut the teardown short.
//!   With `--keep`, `run` gets its own session too, so it outlives the demo's terminal.
//! - **Humans read stderr; stdout stays empty.** Every step prints its title, what it saw
//!   and its duration. The children's stderr is relayed line by line, indented under the
//!   step (so their progress shows as it happens), and the text of a child's `ERROR:` line
//!   becomes part of the demo's own single `ERROR:` line. The machine output of
//!   `setup --timings` and `uptest` is captured, checked and shown formatted; `run`'s
//!   output goes to `run.log`, shown when the app fails to come up and after it stops.
//! - **Prerequisites are checked first**: without root or `lxc-execute` the demo says
//!   exactly what to install before touching anything.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;

use crate::config::{ConfigError, ProcConfig};
use crate::envfiles;
use crate::mounts;
use crate::sample::{self, ImageMode, SampleError};
use crate::units::short_size;
use server::Server;

mod server;

/// What to install when the demo's prerequisites are missing (Debian 12 package names).
pub const INSTALL_HINT: &str = "apt-get install -y lxc busybox-static";

/// The LXC tool vrun hands the container to; its presence means LXC is installed.
pub const LXC_EXECUTE: &str = "lxc-execute";

/// proc.yaml's `app_name`: the container name, and so its cgroups, start with it.
pub const APP_NAME: &str = "demo";

/// How long the app may take to accept connections after `vrun run` starts. A busybox
/// httpd listens within ~50 ms; the bound only turns a hang into a clear error.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `vrun run` may take to exit after SIGTERM: its default grace period for the
/// app (7 s, [`crate::lxc::DEFAULT_GRACE`]) plus its cleanup and a margin; after that it is
/// killed and teardown cleans the orphan.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Connect/read timeout of the demo's own GET to the app.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// How often waits look at the child and at the interrupt flag.
const POLL: Duration = Duration::from_millis(25);

/// Lines of `vrun run`'s output shown when the app fails to come up.
const LOG_TAIL_LINES: usize = 20;

/// Served paths of the two tarballs.
const BUILD_PATH: &str = "/builds/demo-app.tar.gz";
const IMAGE_PATH: &str = "/images/busybox-demo.tar.gz";
const IMAGE_NAME: &str = "busybox-demo";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("vrun demo needs {missing}; as root, install what it uses with: {INSTALL_HINT}")]
    Prerequisites { missing: String },
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the demo's file server on 127.0.0.1: {0}")]
    Serve(io::Error),
    #[error("the demo's own proc.yaml is not valid")]
    ProcYaml(#[source] ConfigError),
    #[error("cannot pick a free port on 127.0.0.1: {0}")]
    Port(io::Error),
    #[error("cannot start `{command}`")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {error}")]
    Failed {
        command: String,
        status: String,
        error: String,
    },
    #[error("`{command}` printed {what} on stdout, expected {expected}: {output:?}")]
    BadOutput {
        command: String,
        what: &'static str,
        expected: &'static str,
        output: String,
    },
    #[error("`vrun run` exited ({status}) before the app answered on 127.0.0.1:{port}; the end of its output is above")]
    RunExited { status: String, port: u16 },
    #[error("the app did not answer on 127.0.0.1:{port} within {} s; the end of the output of `vrun run` is above", .timeout.as_secs())]
    NotListening { port: u16, timeout: Duration },
    #[error("{failed} of {total} uptests failed: {names}")]
    UptestsFailed {
        failed: usize,
        total: usize,
        names: String,
    },
    #[error("GET {url}: {reason}")]
    Get { url: String, reason: String },
    #[error("`vrun run` did not exit within {} s of SIGTERM; killed it", .0.as_secs())]
    StopTimeout(Duration),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    #[error("left behind after teardown: {0}")]
    Leftovers(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::Io { what, path, source }
}

/// What `vrun demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The vrun binary the steps run (the demo's own executable).
    pub vrun: PathBuf,
    /// `VR_ROOT` for the demo; `None` = a fresh temp dir, removed at the end.
    pub root: Option<PathBuf>,
    /// Leave the proc running and print how to inspect and stop it.
    pub keep: bool,
    /// Deploy without an image even when busybox-static is installed.
    pub host_rootfs: bool,
}

/// Whether this process can run the demo: root, and LXC's `lxc-execute` on PATH.
pub fn check_prerequisites() -> Result<(), DemoError> {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (LXC containers and overlay mounts need it; run it with sudo)");
    }
    if find_on_path(LXC_EXECUTE).is_none() {
        missing.push("LXC (lxc-execute is not on PATH)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Prerequisites {
            missing: missing.join(" and "),
        })
    }
}

/// The first executable `name` in `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Cgroups named `lxc.payload.<prefix>*` or `lxc.monitor.<prefix>*` at the top of any
/// mounted cgroup hierarchy (LXC creates them there; their names are global).
pub fn leftover_cgroups(prefix: &str) -> Vec<PathBuf> {
    let Ok(all) = mounts::mounts() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for m in all
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
    {
        let Ok(dir) = std::fs::read_dir(&m.mount_point) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ours = ["lxc.payload.", "lxc.monitor."]
                .iter()
                .any(|kind| name.starts_with(&format!("{kind}{prefix}")));
            if ours && entry.path().is_dir() {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Run the whole demo, narrating on stderr. With `keep`, the proc is left running.
pub fn run(opts: &DemoOptions) -> Result<(), DemoError> {
    check_prerequisites()?;
    interrupt::install();
    let started = Instant::now();
    let mut steps = Steps::default();

    let mode = if opts.host_rootfs {
        ImageMode::HostRootfs
    } else {
        ImageMode::detect()
    };
    match mode {
        ImageMode::Busybox => say(&format!(
            "image mode: a busybox image built from the host's {} (the app runs as uid {})",
            sample::BUSYBOX,
            sample::APP_UID
        )),
        ImageMode::HostRootfs if opts.host_rootfs => say(
            "host-rootfs mode (--host-rootfs): no image; the app runs on this host's \
             /bin /usr /lib read-only, as nobody",
        ),
        ImageMode::HostRootfs => say(&format!(
            "host-rootfs mode: {} is missing (busybox-static is not installed), so there is \
             no image and the app runs on this host's /bin /usr /lib read-only, as nobody; \
             `{INSTALL_HINT}` gives the image mode",
            sample::BUSYBOX
        )),
    }

    let artifacts = steps.step("build the sample app and image tarballs in memory", || {
        Artifacts::build(mode)
    })?;
    let server = steps.step("serve them from 127.0.0.1", || {
        artifacts.serve().map_err(DemoError::Serve)
    })?;
    let mut deploy = Deployment::create(opts)?;
    steps.step("write proc.yaml into a fresh temp dir", || {
        deploy.write_proc_yaml(&artifacts, &server)
    })?;
    let port = deploy.port;

    steps.step("vrun setup --timings: fetch, verify, unpack", || {
        deploy.setup()
    })?;
    steps.step("vrun run, in the background", || deploy.start_run())?;
    steps.step(
        &format!("wait until the app answers on 127.0.0.1:{port}"),
        || deploy.wait_listening(port),
    )?;
    let results = steps.step("vrun uptest", || deploy.uptest())?;
    steps.step(&format!("GET http://127.0.0.1:{port}/"), || get_page(port))?;

    if opts.keep {
        let pid = deploy.keep();
        steps.summary(started.elapsed());
        print_keep_help(opts, &deploy, pid, port);
        say(&format!(
            "success: {} is deployed, {results} and still running (--keep)",
            deploy.name.as_deref().unwrap_or(APP_NAME)
        ));
        return Ok(());
    }

    steps.step("stop vrun run (SIGTERM) and vrun teardown", || {
        deploy.finish()
    })?;
    steps.summary(started.elapsed());
    say(&format!(
        "success: deployed, ran, uptested ({results}) and tore down the demo proc in {:.1} s; \
         nothing is left mounted or running",
        started.elapsed().as_secs_f64()
    ));
    drop(server);
    Ok(())
}

/// The two tarballs and their md5s.
struct Artifacts {
    build: Vec<u8>,
    build_md5: String,
    image: Option<(Vec<u8>, String)>,
}

impl Artifacts {
    fn build(mode: ImageMode) -> Result<Artifacts, DemoError> {
        let build = sample::app_build_tar_gz()?;
        let build_md5 = sample::md5_hex(&build);
        detail(&format!(
            "app build: {} (Procfile, www/, 2 uptests), md5 {build_md5}",
            short_size(build.len() as u64)
        ));
        let image = match mode {
            ImageMode::Busybox => {
                let image = sample::busybox_image_tar_gz()?;
                let md5 = sample::md5_hex(&image);
                detail(&format!(
                    "busybox image: {} ({} applets, app user {}), md5 {md5}",
                    short_size(image.len() as u64),
                    sample::APPLETS.len(),
                    sample::APP_UID
                ));
                Some((image, md5))
            }
            ImageMode::HostRootfs => None,
        };
        Ok(Artifacts {
            build,
            build_md5,
            image,
        })
    }

    fn serve(&self) -> io::Result<Server> {
        let mut files = vec![(BUILD_PATH, self.build.clone())];
        if let Some((image, _)) = &self.image {
            files.push((IMAGE_PATH, image.clone()));
        }
        let server = Server::start(files)?;
        detail(&format!("serving on {}", server.base_url()));
        Ok(server)
    }

    /// `release_hash`: the build's md5, shortened like a git hash.
    fn release_hash(&self) -> &str {
        &self.build_md5[..8]
    }
}

/// The demo's proc.yaml: every key the runner contract has, with the demo's values.
fn proc_yaml(artifacts: &Artifacts, server: &Server, port: u16) -> String {
    use crate::yaml::quote;
    let mut y =
        String::from("# Written by `vrun demo`: the embedded sample app, served from 127.0.0.1.\n");
    let _ = writeln!(y, "app_name: {APP_NAME}");
    y.push_str("version: v1\nconfig_name: sample\n");
    let _ = writeln!(y, "release_hash: {}", quote(artifacts.release_hash()));
    let _ = writeln!(y, "proc_name: {}", sample::PROC_NAME);
    let _ = writeln!(y, "port: {port}");
    y.push_str("host: 127.0.0.1\n");
    match &artifacts.image {
        Some((_, md5)) => {
            let _ = writeln!(y, "user: \"{}\"", sample::APP_UID);
            let _ = writeln!(y, "group: \"{}\"", sample::APP_GID);
            let _ = writeln!(y, "image_name: {IMAGE_NAME}");
            let _ = writeln!(y, "image_url: {}", quote(&server.url(IMAGE_PATH)));
            let _ = writeln!(y, "image_md5: {}", quote(md5));
        }
        None => y.push_str("user: nobody\n"),
    }
    let _ = writeln!(y, "build_url: {}", quote(&server.url(BUILD_PATH)));
    let _ = writeln!(y, "build_md5: {}", quote(&artifacts.build_md5));
    y.push_str(
        "env:\n  BIND_ADDR: 127.0.0.1\n  GREETING: \"hello from proc.yaml\"\n\
         settings:\n  greeting: \"yes\"\n  workers: 2\n",
    );
    y
}

/// A port nobody listens on right now (the kernel's pick for an ephemeral bind).
fn free_port() -> Result<u16, DemoError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(DemoError::Port)?;
    Ok(listener.local_addr().map_err(DemoError::Port)?.port())
}

/// GET / from the app; prints the status line and the first line of the page.
fn get_page(port: u16) -> Result<(), DemoError> {
    let url = format!("http://127.0.0.1:{port}/");
    let fail = |reason: String| DemoError::Get {
        url: url.clone(),
        reason,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, GET_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    stream
        .set_read_timeout(Some(GET_TIMEOUT))
        .map_err(|e| fail(e.to_string()))?;
    write!(
        stream,
        "GET / HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: vrun-demo\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").trim();
    detail(status);
    detail(body.lines().next().unwrap_or("(empty body)"));
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(fail(format!("expected status 200, got {status:?}")));
    }
    if !body.contains(sample::PAGE_MARKER) {
        return Err(fail(format!(
            "the page does not say {:?}",
            sample::PAGE_MARKER
        )));
    }
    Ok(())
}

/// The demo's workspace and everything it started; Drop undoes whatever is still done.
struct Deployment {
    vrun: PathBuf,
    /// Temp dir holding proc.yaml, run.log and (without `--root`) the root itself.
    work: PathBuf,
    root: PathBuf,
    file: PathBuf,
    log: PathBuf,
    /// Container name, once proc.yaml is written.
    name: Option<String>,
    /// The app's port (0 until proc.yaml is written).
    port: u16,
    /// Whether `vrun setup` was started (so teardown is due).
    set_up: bool,
    run: Option<Child>,
    /// `--keep`: `run` is started in its own session and left running.
    keep: bool,
    /// Disarmed: --keep, or already cleaned up.
    done: bool,
}

impl Deployment {
    fn create(opts: &DemoOptions) -> Result<Deployment, DemoError> {
        let tmp = std::env::temp_dir();
        let work = tmp.join(format!("vrun-demo-{:08x}", rand::random::<u32>()));
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&work)
            .map_err(io_err("create", &work))?;
        // 0755 whatever the umask: whoever inspects a --keep demo can read run.log.
        let _ = std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755));
        let root = opts.root.clone().unwrap_or_else(|| work.join("root"));
        let deploy = Deployment {
            vrun: opts.vrun.clone(),
            file: work.join("proc.yaml"),
            log: work.join("run.log"),
            root,
            work,
            name: None,
            port: 0,
            set_up: false,
            run: None,
            keep: opts.keep,
            done: false,
        };
        std::fs::create_dir_all(&deploy.root).map_err(io_err("create", &deploy.root))?;
        Ok(deploy)
    }

    /// Pick a free port, write proc.yaml, and learn the container name the way every vrun
    /// command will: by loading it.
    fn write_proc_yaml(&mut self, artifacts: &Artifacts, server: &Server) -> Result<(), DemoError> {
        self.port = free_port()?;
        let text = proc_yaml(artifacts, server, self.port);
        std::fs::write(&self.file, &text).map_err(io_err("write", &self.file))?;
        let name = ProcConfig::load(&self.file)
            .and_then(|config| config.container_name())
            .map_err(DemoError::ProcYaml)?;
        detail(&format!("workspace: {}", self.work.display()));
        detail(&format!("root: {}", self.root.display()));
        detail(&format!("container: {name}"));
        detail(&format!("proc.yaml: {}", self.file.display()));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            detail(&format!("  {line}"));
        }
        self.name = Some(name);
        Ok(())
    }

    /// `vrun --root ROOT ARGS… FILE`, in its own process group (see the module note).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.detached_command(args);
        cmd.process_group(0);
        cmd
    }

    /// `vrun --root ROOT ARGS… FILE` with no process-group setting of its own.
    fn detached_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vrun);
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .arg(&self.file)
            .stdin(Stdio::null());
        cmd
    }

    fn shown(&self, args: &[&str]) -> String {
        let mut words = vec![OsString::from("vrun")];
        words.extend(args.iter().map(OsString::from));
        words.push(self.file.clone().into_os_string());
        words
            .iter()
            .map(|w| shell_word(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run a vrun command to completion, relaying its stderr indented; returns its stdout.
    /// An interrupt is forwarded to it as SIGTERM and ends the demo.
    fn capture(&self, args: &[&str]) -> Result<String, DemoError> {
        let shown = self.shown(args);
        let spawn_err = |source| DemoError::Spawn {
            command: shown.clone(),
            source,
        };
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.read_to_end(&mut out);
            out
        });
        let relay = relay_stderr(child.stderr.take().expect("stderr is piped"));
        let status = loop {
            if let Some(status) = child.try_wait().map_err(spawn_err)? {
                break status;
            }
            if let Some(sig) = interrupt::received() {
                let _ = signal::kill(child_pid(&child), Signal::SIGTERM);
                let _ = child.wait();
                return Err(DemoError::Interrupted(sig));
            }
            std::thread::sleep(POLL);
        };
        let out = reader.join().unwrap_or_default();
        let error = relay.join().unwrap_or_default();
        if !status.success() {
            return Err(DemoError::Failed {
                command: shown,
                status: describe(status),
                error: error.unwrap_or_else(|| "(it printed no ERROR line)".into()),
            });
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn setup(&mut self) -> Result<(), DemoError> {
        self.set_up = true;
        let args = ["setup", "--timings"];
        let out = self.capture(&args)?;
        let timings: serde_json::Value =
            serde_json::from_str(out.trim()).map_err(|_| DemoError::BadOutput {
                command: self.shown(&args),
                what: "something else",
                expected: "one JSON object",
                output: out.clone(),
            })?;
        for line in format_timings(&timings) {
            detail(&line);
        }
        Ok(())
    }

    fn start_run(&mut self) -> Result<(), DemoError> {
        let log = std::fs::File::create(&self.log).map_err(io_err("create", &self.log))?;
        let log2 = log.try_clone().map_err(io_err("open", &self.log))?;
        let mut cmd = if self.keep {
            // Its own session: no terminal, no SIGHUP when the demo's terminal closes.
            let mut cmd = self.detached_command(&["run"]);
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
            }
            cmd
        } else {
            self.command(&["run"])
        };
        cmd.stdout(log).stderr(log2);
        let child = cmd.spawn().map_err(|source| DemoError::Spawn {
            command: self.shown(&["run"]),
            source,
        })?;
        detail(&format!(
            "pid {}, output to {}",
            child.id(),
            self.log.display()
        ));
        self.run = Some(child);
        Ok(())
    }

    fn wait_listening(&mut self, port: u16) -> Result<(), DemoError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok(());
            }
            if let Some(sig) = interrupt::received() {
                return Err(DemoError::Interrupted(sig));
            }
            let run = self.run.as_mut().expect("run was started");
            if let Ok(Some(status)) = run.try_wait() {
                self.run = None;
                self.show_log();
                return Err(DemoError::RunExited {
                    status: describe(status),
                    port,
                });
            }
            if Instant::now() >= deadline {
                self.show_log();
                return Err(DemoError::NotListening {
                    port,
                    timeout: STARTUP_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Print the last lines of `vrun run`'s output (the app's own, mostly).
    fn show_log(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        if tail.is_empty() {
            detail("vrun run printed nothing");
        }
        for line in tail {
            detail(&format!("run | {line}"));
        }
    }

    /// Run the uptests; print their JSON; fail unless every one passed.
    fn uptest(&mut self) -> Result<String, DemoError> {
        let args = ["uptest"];
        let out = self.capture(&args)?;
        let bad = |what| DemoError::BadOutput {
            command: self.shown(&args),
            what,
            expected: "one JSON array of {Name, Output, Passed}",
            output: out.clone(),
        };
        let results: Vec<UptestResult> =
            serde_json::from_str(out.trim()).map_err(|_| bad("something else"))?;
        if results.is_empty() {
            return Err(bad("an empty array"));
        }
        detail(&format!("stdout: {}", out.trim()));
        for r in &results {
            if r.passed {
                let first = r.output.lines().next().unwrap_or("");
                detail(&format!("PASS {}: {first}", r.name));
            } else {
                detail(&format!("FAIL {}:", r.name));
                for line in r.output.lines() {
                    detail(&format!("  {line}"));
                }
            }
        }
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.as_str())
            .collect();
        if !failed.is_empty() {
            return Err(DemoError::UptestsFailed {
                failed: failed.len(),
                total: results.len(),
                names: failed.join(", "),
            });
        }
        Ok(format!(
            "{} of {} uptests passed",
            results.len(),
            results.len()
        ))
    }

    /// --keep: detach and forget the run; returns its pid.
    fn keep(&mut self) -> u32 {
        self.done = true;
        self.run.take().map_or(0, |c| c.id())
    }

    /// Stop run, teardown, verify, remove the temp dir; the first problem is the error.
    fn finish(&mut self) -> Result<(), DemoError> {
        self.done = true;
        let mut problems = self.cleanup(true);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.remove(0))
        }
    }

    /// Undo everything, in order, carrying on past failures; returns what went wrong.
    fn cleanup(&mut self, narrate: bool) -> Vec<DemoError> {
        let mut problems = Vec::new();
        if let Some(mut run) = self.run.take() {
            if let Err(e) = stop(&mut run, narrate) {
                problems.push(e);
            }
            if narrate {
                detail("the output of vrun run (the app's stderr):");
                self.show_log();
            }
        }
        if self.set_up {
            let args = ["teardown"];
            let shown = self.shown(&args);
            let child = self
                .command(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn();
            match child {
                Ok(mut child) => {
                    let relay = relay_stderr(child.stderr.take().expect("stderr is piped"));
                    let status = child.wait();
                    let error = relay.join().unwrap_or_default();
                    match status {
                        Ok(s) if s.success() => {}
                        Ok(s) => problems.push(DemoError::Failed {
                            command: shown,
                            status: describe(s),
                            error: error.unwrap_or_else(|| "(it printed no ERROR line)".into()),
                        }),
                        Err(source) => problems.push(DemoError::Spawn {
                            command: shown,
                            source,
                        }),
                    }
                }
                Err(source) => problems.push(DemoError::Spawn {
                    command: shown,
                    source,
                }),
            }
        }
        // Whatever teardown left mounted under our proc dir or our temp dir is ours.
        let mut ours = vec![self.work.clone()];
        if let Some(name) = &self.name {
            ours.push(crate::paths::Root::new(&self.root).proc(name).dir);
        }
        let mut stuck = Vec::new();
        for dir in &ours {
            let mut below = mounts::mounts_below(dir).unwrap_or_default();
            below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
            for mount in below {
                // The cache's own mounts of its EROFS layers stay after a teardown (other
                // procs share them); the demo's temp root goes, so they go with it.
                let layer = vrun_cache::LayerKey::from_root(&mount).is_some();
                if mounts::unmount(&mount).is_err() {
                    stuck.push(mount.display().to_string());
                } else if narrate && !layer {
                    detail(&format!("unmounted {} (teardown left it)", mount.display()));
                }
            }
        }
        let cgroups = self
            .name
            .as_deref()
            .map(leftover_cgroups)
            .unwrap_or_default();
        if !stuck.is_empty() || !cgroups.is_empty() {
            let mut left: Vec<String> = stuck.iter().map(|m| format!("mount {m}")).collect();
            left.extend(cgroups.iter().map(|c| format!("cgroup {}", c.display())));
            problems.push(DemoError::Leftovers(left.join(", ")));
        }
        if stuck.is_empty() {
            if let Err(e) = mounts::remove_dir_on_one_fs(&self.work) {
                problems.push(DemoError::Leftovers(crate::errors::chain(&e)));
            } else if narrate {
                detail(&format!(
                    "removed {}; nothing mounted under it, no lxc.payload.{}* cgroup",
                    self.work.display(),
                    self.name.as_deref().unwrap_or(APP_NAME)
                ));
            }
        }
        problems
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let mut actions = Vec::new();
        if self.run.is_some() {
            actions.push("stopping vrun run".to_string());
        }
        if self.set_up {
            actions.push("vrun teardown".to_string());
        }
        actions.push(format!("removing {}", self.work.display()));
        say(&format!("cleaning up: {}", actions.join(", ")));
        for problem in self.cleanup(false) {
            say(&format!("cleanup: {problem}"));
        }
    }
}

/// SIGTERM to `vrun run` (which gives the app its grace period), wait, else SIGKILL.
fn stop(run: &mut Child, narrate: bool) -> Result<(), DemoError> {
    if let Ok(Some(_)) = run.try_wait() {
        return Ok(());
    }
    let _ = signal::kill(child_pid(run), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = run.try_wait() {
            if narrate {
                let why = match status.code() {
                    Some(143) => " (128 + SIGTERM: the app stopped on the SIGTERM)",
                    _ => "",
                };
                detail(&format!("vrun run exited: {}{why}", describe(status)));
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = run.kill();
            let _ = run.wait();
            return Err(DemoError::StopTimeout(STOP_TIMEOUT));
        }
        std::thread::sleep(POLL);
    }
}

/// Copy a child's stderr to ours, indented under the current step, as it arrives; the
/// thread returns the text of its last `ERROR: ` line, for the demo's own error.
fn relay_stderr(stderr: std::process::ChildStderr) -> std::thread::JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let mut last_error = None;
        for line in io::BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            // Progress redraws end in \r; show only the last state of the line.
            let line = line
                .rsplit('\r')
                .find(|s| !s.trim().is_empty())
                .unwrap_or("");
            eprintln!("      | {line}");
            if let Some(e) = line.strip_prefix("ERROR: ") {
                last_error = Some(e.to_string());
            }
        }
        last_error
    })
}

fn child_pid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32)
}

/// "exit 0", "exit 3", "killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit {code}");
    }
    match status.signal().map(Signal::try_from) {
        Some(Ok(sig)) => format!("killed by {sig}"),
        Some(Err(_)) | None => status.to_string(),
    }
}

/// One element of uptest's JSON (the original uptester's field names).
#[derive(Debug, serde::Deserialize)]
struct UptestResult {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Output")]
    output: String,
    #[serde(rename = "Passed")]
    passed: bool,
}

/// setup's `--timings` JSON as a few readable lines; fields it lacks are left out.
pub fn format_timings(t: &serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    for artifact in ["build", "image"] {
        let Some(a) = t.get(artifact) else { continue };
        let num = |k: &str| a.get(k).and_then(serde_json::Value::as_f64);
        let text = |k: &str| a.get(k).and_then(serde_json::Value::as_str);
        let mut line = format!("{artifact}: cache {}", text("cache").unwrap_or("?"));
        if let Some(format) = text("format") {
            let _ = write!(line, ", {format}");
        }
        if let (Some(c), Some(b)) = (num("compressed_bytes"), num("bytes")) {
            if text("format").is_none() {
                line.push(',');
            }
            let _ = write!(line, " {} → {}", short_size(c as u64), short_size(b as u64));
        }
        if let Some(f) = num("files") {
            let _ = write!(line, " in {f} files");
        }
        let stages: Vec<String> = [
            ("ttfb_s", "first byte"),
            ("first_file_s", "first file"),
            ("download_s", "downloaded"),
            ("wall_s", "done"),
        ]
        .iter()
        .filter_map(|(key, label)| num(key).map(|s| format!("{label} {s:.3} s")))
        .collect();
        if !stages.is_empty() {
            let _ = write!(line, "; {}", stages.join(", "));
        }
        lines.push(line);
    }
    match t.get("total_s").and_then(serde_json::Value::as_f64) {
        Some(total) => lines.push(format!("setup total: {total:.3} s")),
        None => lines.push(format!("timings: {t}")),
    }
    lines.push(format!("--timings JSON: {t}"));
    lines
}

/// A word as a POSIX shell reads it, for the commands the demo prints: left bare when
/// it is plain (a path, a flag), else quoted by [`envfiles::shell_quote`], the one quoting
/// vrun has (env.sh and proc.sh use it too).
fn shell_word(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b));
    if plain {
        s.into_owned()
    } else {
        String::from_utf8(envfiles::shell_quote(s.as_bytes())).expect("quoting keeps UTF-8")
    }
}

fn print_keep_help(opts: &DemoOptions, deploy: &Deployment, pid: u32, port: u16) {
    let vrun = shell_word(opts.vrun.as_os_str());
    let root = shell_word(deploy.root.as_os_str());
    let file = shell_word(deploy.file.as_os_str());
    let base = format!("{vrun} --root {root}");
    say("the demo proc is still running. Inspect it with:");
    for (what, command) in [
        ("the app's page", format!("curl http://127.0.0.1:{port}/")),
        ("a shell beside the app", format!("{base} shell {file}")),
        (
            "one command in its container",
            format!("{base} shell {file} -- id"),
        ),
        ("its uptests", format!("{base} uptest {file}")),
        (
            "the app's output",
            format!("cat {}", shell_word(deploy.log.as_os_str())),
        ),
        (
            "stop it: vrun run passes SIGTERM to the app",
            format!("kill -TERM {pid}"),
        ),
        ("then tear it down", format!("{base} teardown {file}")),
        (
            "and remove the demo's files",
            format!("rm -r {}", shell_word(deploy.work.as_os_str())),
        ),
    ] {
        eprintln!("    # {what}");
        eprintln!("    {command}");
    }
}

/// A top-level line of the narrative.
fn say(text: &str) {
    eprintln!("vrun demo: {text}");
}

/// An indented detail under the current step.
fn detail(text: &str) {
    eprintln!("      {text}");
}

/// Numbered steps with their durations, and a summary table at the end.
#[derive(Default)]
struct Steps {
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn step<T>(
        &mut self,
        title: &str,
        f: impl FnOnce() -> Result<T, DemoError>,
    ) -> Result<T, DemoError> {
        if let Some(sig) = interrupt::received() {
            return Err(DemoError::Interrupted(sig));
        }
        eprintln!("==> [{}] {title}", self.done.len() + 1);
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        match &result {
            Ok(_) => eprintln!("      ok ({:.2} s)", took.as_secs_f64()),
            Err(_) => eprintln!("      FAILED after {:.2} s", took.as_secs_f64()),
        }
        self.done.push((title.to_string(), took));
        result
    }

    fn summary(&self, total: Duration) {
        say("step durations:");
        for (i, (title, took)) in self.done.iter().enumerate() {
            eprintln!("    {:>7.2} s  [{}] {title}", took.as_secs_f64(), i + 1);
        }
        eprintln!("    {:>7.2} s  total", total.as_secs_f64());
    }
}

/// Ctrl-C, SIGTERM and SIGHUP set a flag the demo's waits look at, so it can tear down
/// before exiting instead of dying with a container running.
mod interrupt {
    use super::*;

    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(signo: libc::c_int) {
        RECEIVED.store(signo, Ordering::SeqCst);
    }

    pub fn install() {
        let action = signal::SigAction::new(
            SigHandler::Handler(on_signal),
            signal::SaFlags::SA_RESTART,
            signal::SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let _ = unsafe { signal::sigaction(sig, &action) };
        }
    }

    /// The name of the first signal received, if any.
    pub fn received() -> Option<&'static str> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Signal::try_from(n).map_or("a signal", Signal::as_str)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_readable() {
        let t: serde_json::Value = serde_json::from_str(
            r#"{"total_s":0.25,"build":{"url":"u","cache":"miss","compressed_bytes":2048,
            "bytes":10240,"files":7,"ttfb_s":0.001,"wall_s":0.02}}"#,
        )
        .unwrap();
        let lines = format_timings(&t);
        assert_eq!(
            lines[0],
            "build: cache miss, 2.0 KiB → 10.0 KiB in 7 files; first byte 0.001 s, done 0.020 s"
        );
        let t: serde_json::Value = serde_json::from_str(
            r#"{"total_s":1,"image":{"cache":"layer","format":"gzip","compressed_bytes":1024,
            "bytes":2048,"files":0,"first_file_s":0.5,"wall_s":0.75}}"#,
        )
        .unwrap();
        assert_eq!(
            format_timings(&t)[0],
            "image: cache layer, gzip 1.0 KiB → 2.0 KiB in 0 files; first file 0.500 s, done 0.750 s"
        );
        assert_eq!(lines[1], "setup total: 0.250 s");
    }

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(shell_word(OsStr::new("/tmp/a.yaml")), "/tmp/a.yaml");
        assert_eq!(shell_word(OsStr::new("/tmp/vr root")), "'/tmp/vr root'");
        assert_eq!(shell_word(OsStr::new("it's")), "'it'\\''s'");
    }

    #[test]
    fn proc_yaml_parses_and_names_the_container() {
        let artifacts = Artifacts {
            build: vec![1, 2, 3],
            build_md5: "5289df737df57326fcdd22597afb1fac".into(),
            image: Some((vec![4], "08d6c05a21512a79a1dfeb9d2a8f262f".into())),
        };
        let server = Server::start(Vec::new()).unwrap();
        let text = proc_yaml(&artifacts, &server, 4242);
        let dir = std::env::temp_dir().join(format!("vrun-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("proc.yaml");
        std::fs::write(&file, &text).unwrap();
        let config = crate::config::ProcConfig::load(&file).unwrap();
        assert_eq!(
            config.container_name().unwrap(),
            "demo-v1-sample-5289df73-web-4242"
        );
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert_eq!(config.port, "4242");
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(
            config.build_md5.as_deref(),
            Some("5289df737df57326fcdd22597afb1fac")
        );
        assert!(config.image_url.unwrap().ends_with(IMAGE_PATH));

        let host_rootfs = Artifacts {
            image: None,
            ..artifacts
        };
        std::fs::write(&file, proc_yaml(&host_rootfs, &server, 4242)).unwrap();
        let config = crate::config::ProcConfig::load(&file).unwrap();
        assert_eq!(config.user.as_deref(), Some("nobody"));
        assert_eq!(config.image_url, None);
        assert_eq!(config.image_name, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
