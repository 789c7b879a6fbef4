//! `vrun demo` and the sample tarballs it deploys.
//!
//! The tarballs are checked with GNU tar (an independent reader) and by actually serving
//! the app from the extracted image in a chroot as the image's `app` user, running its
//! uptests against it — so a broken sample shows up here, not as a failed demo. The
//! end-to-end tests run the real `vrun demo` (real LXC, real loopback server) and then
//! check, from outside, that nothing is left mounted, running or on disk.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ChildGuard, TestDir};
use vrun::sample;

/// `tar -tv…` of a tarball written to `dir`: one line per member.
fn gnu_list(dir: &Path, name: &str, bytes: &[u8]) -> Vec<String> {
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "GNU tar rejects {name}: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The listing line of one member (`path` exactly, directories with their slash).
fn member<'a>(listing: &'a [String], path: &str) -> &'a str {
    listing
        .iter()
        .find(|l| {
            let name = l.split_whitespace().nth(5).unwrap_or("");
            name == path
        })
        .unwrap_or_else(|| panic!("{path} not in {listing:#?}"))
}

fn gnu_extract(bytes: &[u8], into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "-xzf", "-", "-C"])
        .arg(into)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    tar.stdin.take().unwrap().write_all(bytes).unwrap();
    assert!(tar.wait().unwrap().success());
}

#[test]
fn the_sample_build_is_a_valid_tarball_with_procfile_and_executable_uptests() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let bytes = sample::app_build_tar_gz().unwrap();
    let listing = gnu_list(t.path(), "build.tar.gz", &bytes);
    assert!(member(&listing, "Procfile").starts_with("-rw-r--r-- 0/0"));
    assert!(member(&listing, "bin/serve").starts_with("-rwxr-xr-x"));
    for uptest in ["uptests/web/01_http_ok", "uptests/web/02_health"] {
        assert!(
            member(&listing, uptest).starts_with("-rwxr-xr-x"),
            "{listing:#?}"
        );
    }
    assert!(member(&listing, "uptests/web/").starts_with("drwxr-xr-x"));

    let out = t.path().join("build");
    gnu_extract(&bytes, &out);
    let procfile = std::fs::read_to_string(out.join("Procfile")).unwrap();
    assert_eq!(procfile, "web: exec /app/bin/serve\n");
    let page = std::fs::read_to_string(out.join("www/index.html")).unwrap();
    assert!(page.contains(sample::PAGE_MARKER), "{page}");
    assert_eq!(
        std::fs::read_to_string(out.join("www/health")).unwrap(),
        "ok\n"
    );
    let mode = std::fs::metadata(out.join("uptests/web/01_http_ok"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // Reproducible: the md5 in the demo's proc.yaml is the same on every run.
    assert_eq!(bytes, sample::app_build_tar_gz().unwrap());
}

#[test]
fn the_busybox_image_holds_the_hosts_busybox_applets_and_an_app_user() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let bytes = sample::busybox_image_tar_gz().unwrap();
    let listing = gnu_list(t.path(), "image.tar.gz", &bytes);
    assert!(member(&listing, "bin/busybox").starts_with("-rwxr-xr-x 0/0"));
    assert!(member(&listing, "bin/sh").starts_with("lrwxrwxrwx"));
    assert!(member(&listing, "bin/sh").ends_with("bin/sh -> busybox"));
    assert!(member(&listing, "bin/httpd").ends_with("-> busybox"));
    assert!(member(&listing, "tmp/").starts_with("drwxrwxrwt 0/0"));
    assert!(member(&listing, "home/app/").starts_with("drwxr-xr-x 1000/1000"));
    for placeholder in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        assert!(member(&listing, placeholder).starts_with("-rw-r--r--"));
    }

    let out = t.path().join("image");
    gnu_extract(&bytes, &out);
    assert_eq!(
        std::fs::read(out.join("bin/busybox")).unwrap(),
        std::fs::read(sample::BUSYBOX).unwrap()
    );
    let passwd = std::fs::read_to_string(out.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains("app:x:1000:1000:app:/home/app:/bin/sh"),
        "{passwd}"
    );
    // The applet links work: the image's own sh runs.
    let echo = Command::new(out.join("bin/sh"))
        .args(["-c", "echo applets ok"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&echo.stdout), "applets ok\n");
}

/// A port nobody listens on.
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, server: &mut ChildGuard) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_err() {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("the app exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the app never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `chroot --userspec=1000:1000 ROOT ARGS…` (the image's app user, host network).
fn in_chroot(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.arg("--userspec=1000:1000")
        .arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/bin:/usr/bin")
        .stdin(Stdio::null());
    cmd
}

/// The sample app, as the demo deploys it (image + build under /app, run as the app
/// user), but in a plain chroot: this pins the sample itself, independent of vrun.
#[test]
fn the_sample_app_serves_on_port_and_passes_its_own_uptests() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let root = t.path().join("rootfs");
    gnu_extract(&sample::busybox_image_tar_gz().unwrap(), &root);
    gnu_extract(&sample::app_build_tar_gz().unwrap(), &root.join("app"));
    let chown = Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(root.join("app"))
        .status()
        .unwrap();
    assert!(chown.success());
    // LXC's autodev makes /dev/null in a container; a chroot needs it made.
    let null = Command::new("mknod")
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(null.success());
    std::fs::set_permissions(root.join("dev/null"), PermissionsExt::from_mode(0o666)).unwrap();

    let port = free_port();
    let mut server = ChildGuard(
        in_chroot(&root, &["/bin/sh", "-c", "cd /app && exec /app/bin/serve"])
            .env("PORT", port.to_string())
            .env("BIND_ADDR", "127.0.0.1")
            .env("GREETING", "hi")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    wait_listening(port, &mut server);

    let mut page = String::new();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET / HTTP/1.0\r\n\r\n").unwrap();
    stream.read_to_string(&mut page).unwrap();
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 "),
        "{page}"
    );
    assert!(page.contains(sample::PAGE_MARKER), "{page}");

    let port_arg = port.to_string();
    for (uptest, says) in [
        ("/app/uptests/web/01_http_ok", "deployed by vrun"),
        ("/app/uptests/web/02_health", ": ok"),
    ] {
        let out = in_chroot(&root, &[uptest, "127.0.0.1", &port_arg])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{uptest} failed: {out:?}");
        assert!(text.contains(says), "{uptest}: {text}");
    }
    // And they can fail: nothing listens on a fresh port.
    let wrong = free_port().to_string();
    let out = in_chroot(&root, &["/app/uptests/web/01_http_ok", "127.0.0.1", &wrong])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"));

    drop(server);
}

/// The value after `label: ` on the demo's stderr.
fn reported(stderr: &str, label: &str) -> String {
    let prefix = format!("{label}: ");
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stderr}"))
        .to_string()
}

/// No mount at or below `dir` but the cache's own mounts of its EROFS layers (which
/// outlive a teardown by design: the next proc of the layer shares them), no cgroup of
/// `container` in any hierarchy.
fn assert_nothing_left(dir: &Path, container: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let escaped = dir.to_string_lossy().replace(' ', "\\040");
    let layer_mount = |l: &str| {
        l.split(' ').nth(4).is_some_and(|p| {
            vrun_cache::LayerKey::from_root(Path::new(&p.replace("\\040", " "))).is_some()
        })
    };
    assert!(
        !mountinfo
            .lines()
            .any(|l| l.contains(&escaped) && !layer_mount(l)),
        "still mounted under {}:\n{mountinfo}",
        dir.display()
    );
    let cgroups = vrun::demo::leftover_cgroups(container);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

/// The README's first command, minus the install: a whole deploy in a temp root.
#[test]
fn demo_deploys_uptests_and_tears_down_leaving_nothing() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let run = t.vrun(["demo"]).env_remove("VR_ROOT").run();
    assert_eq!(run.code, Some(0), "vrun demo failed:\n{}", run.stderr);
    let workspace = PathBuf::from(reported(&run.stderr, "workspace"));
    let root = PathBuf::from(reported(&run.stderr, "root"));
    let container = reported(&run.stderr, "container");
    assert!(root.starts_with(&workspace), "{run:#?}");
    assert!(container.starts_with("demo-v1-sample-"), "{container}");

    // Both uptests passed, and their JSON was shown.
    let json = reported(&run.stderr, "stdout");
    let results: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["Passed"], true, "{r}");
            r["Name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, ["01_http_ok", "02_health"]);
    assert!(run.stderr.contains("HTTP/1.0 200 OK") || run.stderr.contains(" 200 "));
    assert!(run.stderr.contains(sample::PAGE_MARKER));
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    let last = run.stderr.lines().last().unwrap();
    assert!(last.starts_with("vrun demo: success"), "{last}");

    assert!(
        !workspace.exists(),
        "{} was not removed",
        workspace.display()
    );
    assert_nothing_left(&workspace, &container);
}

/// The README's promise for `--root`: the cache stays, and the sample tarballs are
/// reproducible, so a second demo on the same root downloads and unpacks nothing (the
/// server's port, hence the URLs, differ; the md5s do not).
#[test]
fn a_second_demo_on_the_same_root_reuses_the_cached_layers() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let first = t.vrun(["demo"]).run();
    assert_eq!(first.code, Some(0), "first demo failed:\n{}", first.stderr);
    let second = t.vrun(["demo"]).run();
    assert_eq!(
        second.code,
        Some(0),
        "second demo failed:\n{}",
        second.stderr
    );
    for artifact in ["build", "image"] {
        let line = reported(&second.stderr, artifact);
        assert!(
            line.starts_with("cache layer"),
            "second demo's {artifact} should come from the layer cache: {line}\n{}",
            second.stderr
        );
    }
    assert_nothing_left(&t.root(), &reported(&second.stderr, "container"));
}

/// Without an image (what a host without busybox-static gets): the app runs as nobody on
/// the host's system directories, read-only, and the demo still passes and cleans up.
#[test]
fn demo_in_host_rootfs_mode_deploys_and_leaves_nothing() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let run = t.vrun(["demo", "--host-rootfs"]).run();
    assert_eq!(run.code, Some(0), "vrun demo failed:\n{}", run.stderr);
    assert!(run.stderr.contains("host-rootfs mode"), "{}", run.stderr);
    assert!(!run.stderr.contains("image_url"), "{}", run.stderr);
    assert!(
        run.stderr.contains("2 of 2 uptests passed"),
        "{}",
        run.stderr
    );
    let workspace = PathBuf::from(reported(&run.stderr, "workspace"));
    let container = reported(&run.stderr, "container");
    assert!(!workspace.exists());
    assert!(
        !t.proc_dir(&container).exists(),
        "the proc dir is torn down"
    );
    assert_nothing_left(&t.root(), &container);
}

/// Tears a `--keep` demo down even when the test fails half-way.
struct KeptDemo {
    t: TestDir,
    pid: Option<i32>,
    file: Option<PathBuf>,
    workspace: Option<PathBuf>,
}

impl Drop for KeptDemo {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            stop_pid(pid);
        }
        if let Some(file) = self.file.take() {
            let _ = self.t.vrun([Path::new("teardown"), &file]).run();
        }
        if let Some(ws) = self.workspace.take() {
            let _ = vrun::mounts::remove_dir_on_one_fs(&ws);
        }
    }
}

/// SIGTERM and wait (bounded) for a process that is not our child.
fn stop_pid(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn demo_keep_leaves_the_proc_running_and_prints_how_to_stop_it() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut kept = KeptDemo {
        t: TestDir::new(),
        pid: None,
        file: None,
        workspace: None,
    };
    let run = kept.t.vrun(["demo", "--keep"]).run();
    let workspace = PathBuf::from(reported(&run.stderr, "workspace"));
    kept.workspace = Some(workspace.clone());
    let file = PathBuf::from(reported(&run.stderr, "proc.yaml"));
    kept.file = Some(file.clone());
    assert_eq!(
        run.code,
        Some(0),
        "vrun demo --keep failed:\n{}",
        run.stderr
    );
    let pid: i32 = run
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("kill -TERM "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no kill -TERM line:\n{}", run.stderr));
    kept.pid = Some(pid);
    let container = reported(&run.stderr, "container");
    let port: u16 = container.rsplit('-').next().unwrap().parse().unwrap();
    assert_eq!(
        PathBuf::from(reported(&run.stderr, "root")),
        kept.t.root(),
        "--root / VR_ROOT is used as the root"
    );

    // Still serving after the demo exited; the printed commands work.
    let mut page = String::new();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET /health HTTP/1.0\r\n\r\n").unwrap();
    stream.read_to_string(&mut page).unwrap();
    assert!(page.ends_with("ok\n"), "{page}");
    for needle in ["shell ", "uptest ", "teardown "] {
        assert!(
            run.stderr.contains(needle),
            "{needle} missing:\n{}",
            run.stderr
        );
    }
    let uptest = kept.t.vrun([Path::new("uptest"), &file]).run();
    uptest.assert_ok();
    assert!(uptest.stdout.contains("\"Passed\":true"), "{uptest:#?}");
    let id = kept
        .t
        .vrun([
            Path::new("shell"),
            &file,
            Path::new("--"),
            Path::new("id"),
            Path::new("-u"),
        ])
        .run();
    id.assert_ok();
    assert_eq!(id.stdout.trim(), "1000", "{id:#?}");

    // Teardown refuses while it runs, then works once run is stopped.
    let refused = kept.t.vrun([Path::new("teardown"), &file]).run();
    assert_ne!(refused.code, Some(0), "{refused:#?}");
    stop_pid(kept.pid.take().unwrap());
    kept.t
        .vrun([Path::new("teardown"), &file])
        .run()
        .assert_ok();
    kept.file = None;
    assert_nothing_left(&kept.t.root(), &container);
}

#[test]
fn demo_without_lxc_says_what_to_install_and_touches_nothing() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let t = TestDir::new();
    let empty = t.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let run = t.vrun(["demo"]).env("PATH", &empty).run();
    run.assert_error(&["lxc-execute", "apt-get install -y lxc busybox-static"]);
    assert!(t.root_entries().is_empty(), "{:?}", t.root_entries());
}

#[test]
fn demo_as_non_root_says_it_needs_root() {
    let _lxc = crate::common::lxc_suite(module_path!());
    // A copy of vrun that nobody can reach (a clone under /root is not), started in /.
    let dir = tempfile::Builder::new()
        .prefix("vrun-nonroot-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let vrun = dir.path().join("vrun");
    std::fs::copy(env!("CARGO_BIN_EXE_vrun"), &vrun).unwrap();
    let out = Command::new(&vrun)
        .arg("demo")
        .env_remove("VR_ROOT")
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("ERROR: vrun demo needs root"),
        "{stderr}"
    );
    assert!(stderr.contains("apt-get install -y lxc busybox-static"));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
