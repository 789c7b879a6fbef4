//! The LXC hand-off against real LXC 5 (root): run, signals, limits, volumes, shell, and
//! the cleanup of what crashed runs leave behind.
//!
//! Each test builds its own busybox image and app build, in its own temp VR_ROOT, under a
//! container name nobody else uses; `TestProc`'s Drop kills containers, removes cgroups
//! and unmounts even when an assertion fails.

use crate::common::image;
use crate::common::lxc_proc;

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lxc_proc::{wait_for, ProcOpts, TestProc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Readiness limit for containers starting on a loaded 2-core machine.
const READY: Duration = Duration::from_secs(30);

/// The app's main process on the host (child of the container's init), once it is up.
fn workload_pid(p: &TestProc) -> Option<i32> {
    let pids = p.payload_pids();
    pids.iter().copied().find(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: i32 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        pids.contains(&ppid)
    })
}

#[test]
fn run_serves_http_and_shell_shares_env_user_and_rootfs() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("http", ProcOpts::default());
    let port = p.opts.port;
    let (pid, _out, err) = p.spawn_run(5);
    let page = wait_for(READY, || lxc_proc::http_get(port));
    assert_eq!(
        page.as_deref(),
        Some(image::APP_PAGE),
        "stderr: {}",
        std::fs::read_to_string(&err).unwrap()
    );

    let r = p.shell(&["id", "-u"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "1000\n"), "{}", r.stderr);
    // Supplementary groups come from the host's group database for uid 1000.
    let host_groups = std::process::Command::new("id")
        .args(["-G", "1000"])
        .output()
        .unwrap();
    let r = p.shell(&["id", "-G"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut want: Vec<&str> = std::str::from_utf8(&host_groups.stdout)
        .unwrap()
        .split_whitespace()
        .collect();
    let mut got: Vec<&str> = r.stdout.split_whitespace().collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let r = p.shell(&["sh", "-c", "echo $FOO; pwd; cat $APP_SETTINGS_YAML"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("bar from env.sh\n/app\n"),
        "{}",
        r.stdout
    );
    // settings.yaml as setup wrote it (its exact YAML is the foundation's business).
    assert!(
        r.stdout.contains("greeting") && r.stdout.contains("hello settings"),
        "{}",
        r.stdout
    );

    // A file the shell writes is visible in the running app's own root (its mount ns).
    let r = p.shell(&["sh", "-c", "echo note-from-shell > /tmp/shell-note"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let app = workload_pid(&p).expect("app process");
    let seen = std::fs::read_to_string(format!("/proc/{app}/root/tmp/shell-note")).unwrap();
    assert_eq!(seen, "note-from-shell\n");

    // Shell containers leave nothing: no scratch dir, no cgroups, no <lxcpath>/<name> dir.
    let procs: Vec<String> = std::fs::read_dir(p.root.procs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(procs, vec![p.name.clone()]);
    assert!(p.leftover_scratch_dirs().is_empty());
    assert!(p
        .leftover_cgroups()
        .iter()
        .all(|c| !c.to_string_lossy().contains("-TMP")));

    // SIGTERM: httpd dies of it, vrun reports 128+15, everything is gone.
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 143);
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
    assert!(lxc_proc::http_get(port).is_none());
}

#[test]
fn sigterm_reaches_the_app_and_its_status_is_vruns() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some(
            "trap 'echo got-term > /tmp/term-note; exit 42' TERM; \
              echo up > /tmp/started; sleep 1000 & wait"
                .into(),
        ),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("trap", opts);
    let started = p.proc.paths.upper().join("tmp/started");
    let (pid, _, err) = p.spawn_run(60);
    assert!(
        wait_for(READY, || started.exists().then_some(())).is_some(),
        "{}",
        std::fs::read_to_string(&err).unwrap()
    );
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 42);
    let note = std::fs::read_to_string(p.proc.paths.upper().join("tmp/term-note")).unwrap();
    assert_eq!(note, "got-term\n");
    let err = std::fs::read_to_string(err).unwrap();
    assert!(err.contains("got SIGTERM"), "{err}");
    assert!(!err.contains("killing"), "{err}");
    assert!(p.leftover_cgroups().is_empty());
}

#[test]
fn app_ignoring_term_is_killed_after_the_grace_period() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some("trap '' TERM; echo up > /tmp/started; while :; do sleep 1; done".into()),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("ignore", opts);
    let started = p.proc.paths.upper().join("tmp/started");
    let (pid, _, err) = p.spawn_run(1);
    assert!(wait_for(READY, || started.exists().then_some(())).is_some());
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 137);
    let err = std::fs::read_to_string(err).unwrap();
    assert!(err.contains("did not stop within"), "{err}");
    assert!(p.payload_pids().is_empty());
    assert!(p.leftover_cgroups().is_empty());
}

#[test]
fn exit_status_of_the_app_is_vruns() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some("exit 7".into()),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("exit7", opts);
    let r = p.vrun(["run"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    // The same through shell.
    let r = p.shell(&["sh", "-c", "exit 9"]);
    assert_eq!(r.code, 9, "{}", r.stderr);
    // A background process left behind does not keep the container (or vrun) alive, and
    // stopping it adds nothing to the output.
    let r = p.shell(&["sh", "-c", "sleep 1000 & echo left-one; exit 4"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (4, "left-one\n"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("pids.max"), "{}", r.stderr);
    assert!(p.leftover_cgroups().is_empty());
}

#[test]
fn orphans_of_a_killed_run_are_cleaned_by_the_next_run() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some(
            "if [ -f /tmp/second ]; then exit 5; fi; touch /tmp/second; exec sleep 1000".into(),
        ),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("orphan", opts);
    let second = p.proc.paths.upper().join("tmp/second");
    let (pid, _, _) = p.spawn_run(1);
    assert!(wait_for(READY, || second.exists().then_some(())).is_some());
    // vrun and lxc-execute die at once (an OOM kill, `kill -9 -PGID`): the payload is orphaned.
    // vrun is stopped first: a live vrun that sees lxc-execute die cleans the container up
    // itself, and under a loaded test run the two kills can be milliseconds apart.
    let monitors = vrun::lxc::cgroups::monitor_pids(&p.name);
    assert_eq!(monitors.len(), 1, "one lxc-execute: {monitors:?}");
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(monitors[0]), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert_eq!(p.wait_child(pid), 137);
    let orphans = p.payload_pids();
    assert!(!orphans.is_empty(), "the orphaned app still runs");

    let r = p.vrun(["run"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("leftover process"), "{}", r.stderr);
    for o in orphans {
        // Dead: gone, or a zombie waiting for the host's init to reap it.
        let stat = std::fs::read_to_string(format!("/proc/{o}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().chars().next());
        assert!(
            matches!(state, None | Some(Some('Z'))),
            "orphan {o} survived: {stat}"
        );
    }
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
}

#[test]
fn kill_9_of_vrun_alone_stops_the_container() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some("echo up > /tmp/started; exec sleep 1000".into()),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("pdeath", opts);
    let started = p.proc.paths.upper().join("tmp/started");
    let (pid, _, _) = p.spawn_run(1);
    assert!(wait_for(READY, || started.exists().then_some(())).is_some());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    p.wait_child(pid);
    // The parent-death signal makes lxc-execute stop the container (TERM, then its 1 s kill).
    let gone = wait_for(READY, || {
        (p.payload_pids().is_empty() && p.leftover_cgroups().is_empty()).then_some(())
    });
    assert!(gone.is_some(), "left: {:?}", p.leftover_cgroups());
}

#[test]
fn mem_limit_kills_an_app_that_allocates_more() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        // The shell itself holds 200 MB in a variable.
        cmd: Some("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}".into()),
        mem_limit: Some(64 << 20),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("oom", opts);
    let r = p.vrun(["run"]);
    assert!(!r.stdout.contains("survived"), "{r:?}");
    assert_eq!(r.code, 137, "{}", r.stderr);
    let config = std::fs::read_to_string(p.proc.paths.lxc_config()).unwrap();
    assert!(config.contains("lxc.cgroup.memory.limit_in_bytes = 67108864"));

    // Without the limit the same app survives (the test can fail).
    let mut q = TestProc::new(
        "nooom",
        ProcOpts {
            mem_limit: None,
            ..p.opts.clone()
        },
    );
    let r = q.vrun(["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("survived 200000000"), "{}", r.stdout);
}

#[test]
fn volume_is_writable_by_the_app_and_lands_on_the_host() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let host = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(host.path(), Some(1000), Some(1000)).unwrap();
    let opts = ProcOpts {
        cmd: Some("echo from-app > /data/out.txt".into()),
        volumes: vec![(host.path().to_owned(), "/data".into())],
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("vol", opts);
    let r = p.vrun(["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(host.path().join("out.txt")).unwrap(),
        "from-app\n"
    );
    let r = p.shell(&["cat", "/data/out.txt"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "from-app\n"));
}

#[test]
fn proc_without_image_runs_on_the_hosts_system_dirs_read_only() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some("cat /app/www/index.html; id -u; touch /usr/vrun-write-test 2>/dev/null && echo WROTE; true"
            .into()),
        with_image: false,
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("noimg", opts);
    let r = p.vrun(["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(image::APP_PAGE), "{}", r.stdout);
    assert!(r.stdout.contains("\n1000\n"), "{}", r.stdout);
    assert!(!r.stdout.contains("WROTE"), "{}", r.stdout);
    assert!(!std::path::Path::new("/usr/vrun-write-test").exists());
}

#[test]
fn missing_lxc_is_a_clear_error() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("nolxc", ProcOpts::default());
    let missing = [("VRUN_LXC_EXECUTE", "/nonexistent/lxc-execute")];
    for args in [vec!["run"], vec!["shell", "--", "true"]] {
        let r = p.vrun_env(args, &missing);
        assert_eq!(r.code, 1);
        assert_eq!(
            r.stderr,
            "ERROR: LXC is not installed: /nonexistent/lxc-execute not found (apt-get install lxc)\n"
        );
    }
}

#[test]
fn teardown_refuses_while_a_shell_runs_then_cleans_everything() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("busy", ProcOpts::default());
    let (pid, _, _) = p.spawn(
        [
            "shell",
            "--",
            "sh",
            "-c",
            "echo up > /tmp/shell-up; exec sleep 1000",
        ],
        &[],
    );
    let up = p.proc.paths.upper().join("tmp/shell-up");
    assert!(wait_for(READY, || up.exists().then_some(())).is_some());

    let busy = vrun::lxc::is_running(&p.proc.paths, &p.proc.lxcpath, &p.name);
    assert!(!busy.run && busy.tmp.len() == 1, "{busy:?}");
    let e = vrun::lxc::teardown_containers(&p.proc.paths, &p.name).unwrap_err();
    assert!(e.to_string().contains("in use by"), "{e}");
    assert!(vrun::lxc::is_mount_point(&p.rootfs()).unwrap().is_some());

    // SIGTERM to `vrun shell` kills its container and cleans up.
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 143);
    assert!(!vrun::lxc::is_running(&p.proc.paths, &p.proc.lxcpath, &p.name).any());
    let lock = vrun::lxc::teardown_containers(&p.proc.paths, &p.name).unwrap();
    // A shell started now waits for the lock, then finds the proc gone.
    let (late_pid, _, late_err) = p.spawn(["shell", "--", "true"], &[]);
    vrun::mounts::unmount(&p.rootfs()).unwrap();
    assert!(lxc_proc::proc_mounts_under(p.root.dir()).is_empty());
    vrun::mounts::remove_dir_on_one_fs(&p.proc.paths.dir).unwrap();
    drop(lock);
    assert_eq!(p.wait_child(late_pid), 1);
    let late_err = std::fs::read_to_string(late_err).unwrap();
    assert!(late_err.contains("proc is not set up"), "{late_err}");
    assert!(
        !p.proc.paths.dir.exists(),
        "the late shell recreated the proc dir"
    );
    assert!(p.leftover_cgroups().is_empty());
}

#[test]
fn shell_without_a_terminal_reads_commands_from_stdin() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let p = TestProc::new("stdin", ProcOpts::default());
    let mut child = p
        .command(["shell"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo hi-$((1+1)) $FOO\nexit 3\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi-2 bar from env.sh\n"
    );
}

/// Spawn `script` around a child `vrun shell` (interactive) and collect its output.
struct PtySession {
    child: std::process::Child,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PtySession {
    fn start(p: &TestProc) -> Self {
        let line = format!(
            "{} shell {}",
            lxc_proc::sq(env!("CARGO_BIN_EXE_vrun")),
            lxc_proc::sq(&p.file.to_string_lossy())
        );
        let mut child = std::process::Command::new("script")
            .args(["-qefc", &line, "/dev/null"])
            .env("VR_ROOT", p.root.dir())
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            output,
            reader: Some(reader),
        }
    }

    fn send(&mut self, s: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_text(&self, needle: &str) -> bool {
        wait_for(READY, || self.text().contains(needle).then_some(())).is_some()
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[test]
fn interactive_shell_has_a_real_pty_and_job_control() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let p = TestProc::new("pty", ProcOpts::default());
    let mut s = PtySession::start(&p);
    // LXC's console flushes input typed before it is up: wait for the prompt.
    assert!(s.wait_text("/app $"), "{}", s.text());
    s.send("tty; echo FOO=$FOO; set -o | grep monitor\n");
    assert!(s.wait_text("/dev/pts/"), "{}", s.text());
    assert!(s.wait_text("FOO=bar from env.sh"), "{}", s.text());
    assert!(s.wait_text("monitor"), "{}", s.text());

    // Job control: ^Z stops the foreground job, `jobs` lists it as stopped.
    s.send("sleep 1000\n");
    let sleeping = wait_for(READY, || {
        vrun::lxc::cgroups::containers_matching(|c| c.starts_with(&format!("{}-TMP", p.name)))
            .into_iter()
            .flat_map(|c| vrun::lxc::cgroups::payload_pids(&c))
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep\0"))
            })
    });
    assert!(sleeping.is_some(), "{}", s.text());
    s.send("\x1a");
    s.send("jobs\n");
    assert!(s.wait_text("Stopped"), "{}", s.text());
    s.send("kill -9 %1; wait %1; echo done-$((6*7))\n");
    assert!(s.wait_text("done-42"), "{}", s.text());
    s.send("exit 5\n");
    // ash refuses the first exit while it still lists the killed job as stopped.
    let status = wait_for(READY, || {
        if s.text().ends_with("You have stopped jobs.\r\n") || s.text().contains("Killed") {
            if let Ok(None) = s.child.try_wait() {
                let _ = s.child.stdin.as_mut().unwrap().write_all(b"exit 5\n");
            }
        }
        s.child.try_wait().unwrap()
    });
    assert_eq!(status.and_then(|st| st.code()), Some(5), "{}", s.text());
    drop(s);
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
}

#[test]
fn a_killed_shell_is_stopped_and_its_leftovers_swept_by_the_next() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("shkill", ProcOpts::default());
    let (pid, _, _) = p.spawn(
        [
            "shell",
            "--",
            "sh",
            "-c",
            "echo up > /tmp/shell-up; exec sleep 1000",
        ],
        &[],
    );
    let up = p.proc.paths.upper().join("tmp/shell-up");
    assert!(wait_for(READY, || up.exists().then_some(())).is_some());
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert_eq!(p.wait_child(pid), 137);
    // The parent-death signal stops the container; the scratch dir stays behind…
    let stopped = wait_for(READY, || p.leftover_cgroups().is_empty().then_some(()));
    assert!(stopped.is_some(), "{:?}", p.leftover_cgroups());
    assert_eq!(p.leftover_scratch_dirs().len(), 1);
    assert!(!vrun::lxc::is_running(&p.proc.paths, &p.proc.lxcpath, &p.name).any());
    // …until the next shell (or uptest) sweeps it.
    let r = p.shell(&["true"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("removed leftovers"), "{}", r.stderr);
    assert!(p.leftover_scratch_dirs().is_empty());
}

#[test]
fn teardown_cleans_a_killed_runs_orphan_and_keeps_the_layers() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        cmd: Some("echo up > /tmp/started; exec sleep 1000".into()),
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("tdorphan", opts);
    let started = p.proc.paths.upper().join("tmp/started");
    let (pid, _, _) = p.spawn_run(1);
    assert!(wait_for(READY, || started.exists().then_some(())).is_some());
    // `vrun run` is stopped first: left running, it sees its lxc-execute die and stops the
    // payload itself before its own SIGKILL lands (seen under load, 1 run in 15), leaving
    // no orphan to test. Stopped, it cannot react; then the monitor dies, then vrun.
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let monitors = vrun::lxc::cgroups::monitor_pids(&p.name);
    for m in monitors {
        kill(Pid::from_raw(m), Signal::SIGKILL).unwrap();
    }
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    p.wait_child(pid);
    assert!(!p.payload_pids().is_empty(), "no orphan to clean");

    vrun::lxc::teardown(&p.proc.paths, &p.name).unwrap();
    assert!(p.payload_pids().is_empty());
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
    assert!(lxc_proc::proc_mounts_under(p.root.dir()).is_empty());
    assert!(!p.proc.paths.dir.exists());
    // The cached layers were lower dirs only: untouched.
    let build = p.proc.state.build_layer.clone().unwrap();
    let image = p.proc.state.image_layer.clone().unwrap();
    assert_eq!(
        std::fs::read_to_string(build.join("app/www/index.html")).unwrap(),
        image::APP_PAGE
    );
    assert!(image.join("bin/busybox").is_file());
    assert!(!image.join("tmp/started").exists());
}

#[test]
fn vrun_teardown_refuses_while_running_then_removes_all_but_the_cache() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("teardown", ProcOpts::default());
    let port = p.opts.port;
    let (pid, _, err) = p.spawn_run(2);
    assert!(
        wait_for(READY, || lxc_proc::http_get(port)).is_some(),
        "{}",
        std::fs::read_to_string(err).unwrap()
    );
    let busy = vrun::lxc::is_running(&p.proc.paths, &p.proc.lxcpath, &p.name);
    assert!(busy.run && busy.tmp.is_empty(), "{busy:?}");
    // `run` holds the proc.yaml lock: teardown is refused and removes nothing.
    let r = p.vrun(["teardown"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is locked by another process"),
        "{}",
        r.stderr
    );
    assert!(lxc_proc::http_get(port).is_some());
    assert!(p.proc.paths.state().exists());

    // A shell beside it: after `run` stops, teardown is still refused while the shell lives.
    let (shell, _, _) = p.spawn(
        [
            "shell",
            "--",
            "sh",
            "-c",
            "echo up > /tmp/shell-up; exec sleep 1000",
        ],
        &[],
    );
    let up = p.proc.paths.upper().join("tmp/shell-up");
    assert!(wait_for(READY, || up.exists().then_some(())).is_some());
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 143);
    let r = p.vrun(["teardown"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("in use by"), "{}", r.stderr);
    assert!(p.proc.paths.state().exists());
    kill(Pid::from_raw(shell as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(shell), 143);

    let cache = p.root.cache_dir();
    let build = p.proc.state.build_layer.clone().unwrap();
    let r = p.vrun(["teardown"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!p.proc.paths.dir.exists());
    assert!(lxc_proc::proc_mounts_under(p.root.dir()).is_empty());
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
    assert!(build.starts_with(&cache));
    assert_eq!(
        std::fs::read_to_string(build.join("app/www/index.html")).unwrap(),
        image::APP_PAGE
    );
}

#[test]
fn second_proc_of_the_same_build_and_image_reuses_the_layers() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("first", ProcOpts::default());
    let second = p.sibling_file("second");
    let r = p.shell(&["true"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let root = p.root.dir().to_owned();
    let vrun = move |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vrun"))
            .arg(args[0])
            .arg(&second)
            .args(&args[1..])
            .env("VR_ROOT", &root)
            .output()
            .unwrap()
    };
    /// Tears the second proc down even when an assertion fails.
    struct Teardown<F: Fn(&[&str]) -> std::process::Output>(F);
    impl<F: Fn(&[&str]) -> std::process::Output> Drop for Teardown<F> {
        fn drop(&mut self) {
            (self.0)(&["teardown"]);
        }
    }
    let guard = Teardown(vrun);
    let vrun = &guard.0;

    let started = std::time::Instant::now();
    let out = vrun(&["setup", "--timings"]);
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(timings["build"]["cache"], "layer", "{timings}");
    assert_eq!(timings["image"]["cache"], "layer", "{timings}");
    eprintln!(
        "second proc setup: total_s {} (wall incl. process start {:.3} s)",
        timings["total_s"],
        wall.as_secs_f64()
    );
    // It runs: a shell in the second proc sees the app.
    let shell = vrun(&["shell", "--", "cat", "/app/www/index.html"]);
    assert!(
        shell.status.success(),
        "{}",
        String::from_utf8_lossy(&shell.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&shell.stdout), image::APP_PAGE);
    let config = vrun::config::ProcConfig::load(&p.dir().join("second.yaml")).unwrap();
    let name = config.container_name().unwrap();
    assert!(vrun(&["teardown"]).status.success());
    assert!(!p.root.proc(&name).dir.exists());
    // The first proc still runs on the shared layers.
    let r = p.shell(&["cat", "/app/www/index.html"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, image::APP_PAGE));
}

#[test]
fn setup_again_on_another_build_remounts_but_not_under_a_running_shell() {
    let _lxc = crate::common::lxc_suite(module_path!());
    // Setup leaves the root mounted; the same container name set up again with another
    // build must show that build, and must not pull the root from under a live shell.
    let mut p = TestProc::new("rebuild", ProcOpts::cmd("exit 0"));
    let other = testkit::serve::Server::start(
        [(
            "/b.tar.gz",
            image::app_build(&[image::Entry::file("second-build", "2", 0o644)]),
        )],
        testkit::serve::ServerOptions::default(),
    )
    .unwrap();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p.file).unwrap()).unwrap();
    doc["build_url"] = other.url("/b.tar.gz").into();
    std::fs::write(&p.file, doc.to_string()).unwrap();
    let state_before = std::fs::read(p.proc.paths.state()).unwrap();

    let (shell, _, _) = p.spawn(["shell", "--", "sleep", "60"], &[]);
    let up = wait_for(READY, || {
        (!p.leftover_scratch_dirs().is_empty()).then_some(())
    });
    assert!(up.is_some(), "the shell never registered");
    let r = p.vrun(["setup"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("ERROR: ") && r.stderr.contains("is in use by"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(p.proc.paths.state()).unwrap(), state_before);
    assert!(!p.rootfs().join("app/second-build").exists());
    kill(Pid::from_raw(shell as i32), Signal::SIGTERM).unwrap();
    p.wait_child(shell);

    let r = p.vrun(["setup"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(p.rootfs().join("app/second-build").is_file());
    assert!(p.rootfs().join("env.sh").is_file());

    // After a reboot nothing is mounted; `rootfs/app` is still a directory and teardown
    // needs no mount to work on.
    vrun::mounts::unmount(&p.rootfs()).unwrap();
    assert!(p.rootfs().join("app").is_dir());
    let r = p.vrun(["teardown"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!p.proc.paths.dir.exists());
}

#[test]
fn volumes_that_cannot_be_one_mount_entry_are_refused_by_setup_before_anything_exists() {
    let _lxc = crate::common::lxc_suite(module_path!());
    // Newlines are already refused by the proc.yaml parser; whitespace would split the
    // fstab-style mount entry (the original's proc.lxc broke the same way, at start), so
    // setup, which now writes proc.lxc, refuses it naming the key and creates nothing.
    let host = tempfile::tempdir().unwrap();
    let opts = ProcOpts {
        cmd: Some("exit 0".into()),
        volumes: vec![(host.path().to_owned(), "/da ta".into())],
        ..ProcOpts::default()
    };
    let (r, left) = TestProc::setup_fails("badvol", opts);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("ERROR: invalid volume ")
            && r.stderr.contains("must not contain whitespace")
            && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_volume_whose_host_dir_is_missing_warns_at_setup_and_refuses_at_run() {
    let _lxc = crate::common::lxc_suite(module_path!());
    // The original's setup never looked at volume host dirs; its run failed in LXC.
    // vrun's setup warns and still sets up; run and shell refuse with one line.
    let host = tempfile::tempdir().unwrap();
    let missing = host.path().join("not-yet");
    let opts = ProcOpts {
        cmd: Some("exit 0".into()),
        volumes: vec![(missing.clone(), "/data".into())],
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("missingvol", opts);
    assert!(p.proc.paths.lxc_config().is_file());
    for args in [vec!["run"], vec!["shell", "--", "true"]] {
        let r = p.vrun(args.clone());
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.starts_with("ERROR: volume ") && r.stderr.contains("does not exist"),
            "{args:?}: {}",
            r.stderr
        );
    }
    std::fs::create_dir(&missing).unwrap();
    let r = p.vrun(["run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(p.leftover_cgroups().is_empty());
}

/// EROFS mounts of `root` (a layer root), from the mount table.
fn erofs_mounts_on(root: &std::path::Path) -> usize {
    let root = root.canonicalize().unwrap();
    vrun::mounts::mounts()
        .unwrap()
        .iter()
        .filter(|m| m.fs_type == "erofs" && m.mount_point == root)
        .count()
}

/// Issue 15: EROFS layers are mounted once per host and shared. Two procs of one build
/// and image set up with `--layers erofs` stack the same two layer mounts (one mount
/// each, whatever the number of procs); tearing one down leaves the other running on
/// them; a reboot (every mount under the root dropped) and `vrun run` mount them again;
/// once no proc uses them, `vrun cache gc` unmounts and removes them.
#[test]
fn erofs_layers_are_mounted_once_shared_remounted_after_a_reboot_and_gc_unmounts_them() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("erofs-first", ProcOpts::default());
    let root = p.root.dir().to_owned();
    let (port_a, port_b) = (lxc_proc::free_port(), lxc_proc::free_port());
    let files = [
        p.sibling_file_on_port("erofs-a", port_a),
        p.sibling_file_on_port("erofs-b", port_b),
    ];
    let vrun = |cmd: &str, file: &std::path::Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vrun"))
            .arg(cmd)
            .arg(file)
            .args(extra)
            .env("VR_ROOT", &root)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    /// Stops the runs and tears both procs down even when an assertion fails.
    struct Procs<'a> {
        runs: Vec<(usize, std::process::Child)>,
        vrun: &'a dyn Fn(&str, &std::path::Path, &[&str]) -> std::process::Output,
        files: &'a [std::path::PathBuf; 2],
    }
    impl Procs<'_> {
        fn run(&mut self, i: usize, root: &std::path::Path) {
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_vrun"))
                .arg("run")
                .arg(&self.files[i])
                .args(["--grace", "2"])
                .env("VR_ROOT", root)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            self.runs.push((i, child));
        }
        fn stop(&mut self, i: usize) {
            let Some(k) = self.runs.iter().position(|(j, _)| *j == i) else {
                return;
            };
            let (_, mut child) = self.runs.remove(k);
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
    impl Drop for Procs<'_> {
        fn drop(&mut self) {
            for i in 0..2 {
                self.stop(i);
                (self.vrun)("teardown", &self.files[i], &[]);
            }
        }
    }
    let mut procs = Procs {
        runs: Vec::new(),
        vrun: &vrun,
        files: &files,
    };
    let state = |file: &std::path::Path| {
        let config = vrun::config::ProcConfig::load(file).unwrap();
        let name = config.container_name().unwrap();
        vrun::state::ProcState::load(&p.root.proc(&name).state(), &p.root.cache_dir()).unwrap()
    };
    for file in &files {
        let out = vrun("setup", file, &["--layers", "erofs", "--timings"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(t["build"]["layers"], "erofs", "{t}");
        assert_eq!(t["image"]["layers"], "erofs", "{t}");
    }
    let (a, b) = (state(&files[0]), state(&files[1]));
    assert_eq!(
        (&a.build_layer, &a.image_layer),
        (&b.build_layer, &b.image_layer)
    );
    let layers: Vec<std::path::PathBuf> = [a.build_layer.clone(), a.image_layer.clone()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(layers.len(), 2);
    for l in &layers {
        assert!(l.to_string_lossy().contains("/layers-erofs-v1/"), "{l:?}");
        assert_eq!(erofs_mounts_on(l), 1, "one mount of {l:?} for both procs");
    }
    procs.run(0, &root);
    procs.run(1, &root);
    for port in [port_a, port_b] {
        let page = wait_for(READY, || lxc_proc::http_get(port));
        assert_eq!(page.as_deref(), Some(image::APP_PAGE), "port {port}");
    }
    // Teardown of b: a goes on running on the shared layers, still mounted once.
    procs.stop(1);
    let out = vrun("teardown", &files[1], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lxc_proc::http_get(port_a).as_deref(), Some(image::APP_PAGE));
    for l in &layers {
        assert_eq!(erofs_mounts_on(l), 1, "{l:?} after b's teardown");
    }
    // Reboot: every mount under the root goes (a's run first, as a reboot stops it).
    procs.stop(0);
    let mut below = lxc_proc::mounts_under(&root);
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in below {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    assert!(lxc_proc::mounts_under(&root).is_empty());
    procs.run(0, &root);
    let page = wait_for(READY, || lxc_proc::http_get(port_a));
    assert_eq!(
        page.as_deref(),
        Some(image::APP_PAGE),
        "run after the reboot"
    );
    for l in &layers {
        assert_eq!(erofs_mounts_on(l), 1, "{l:?} mounted again, once");
    }
    // No proc left on the layers (the first proc's own may be directories or the same
    // EROFS layers): gc unmounts them and removes them, one image file each.
    procs.stop(0);
    let out = vrun("teardown", &files[0], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p.vrun(["teardown"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let gc = std::process::Command::new(env!("CARGO_BIN_EXE_vrun"))
        .args(["cache", "gc"])
        .env("VR_ROOT", &root)
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    for l in &layers {
        assert!(!l.exists(), "{l:?} removed");
    }
    assert!(
        lxc_proc::mounts_under(&root).is_empty(),
        "{:?}",
        lxc_proc::mounts_under(&root)
    );
    let bucket = root.join("cache/layers-erofs-v1");
    assert_eq!(std::fs::read_dir(&bucket).unwrap().count(), 0);
}
