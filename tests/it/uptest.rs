//! `vrun uptest` against real LXC: the original uptester's JSON contract, parallelism,
//! timeouts, and uptests that reach the running app over the network.

use crate::common::image;
use crate::common::lxc_proc;

use std::time::Duration;

use image::Entry;
use lxc_proc::{wait_for, ProcOpts, TestProc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vrun::uptest::{to_json_line, UptestResult};

const READY: Duration = Duration::from_secs(30);

fn script(name: &str, body: &str) -> Entry {
    Entry::file(
        &format!("uptests/web/{name}"),
        format!("#!/bin/sh\n{body}\n"),
        0o755,
    )
}

/// `vrun uptest FILE --timeout SECS`: (exit code, stdout, stderr).
fn uptest(p: &mut TestProc, timeout_secs: u64) -> (i32, String, String) {
    let t = timeout_secs.to_string();
    let r = p.vrun(["uptest", "--timeout", t.as_str()]);
    (r.code, r.stdout, r.stderr)
}

/// stdout must be exactly one JSON array and a newline.
fn parse_exact(stdout: &str) -> Vec<UptestResult> {
    let results: Vec<UptestResult> = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON array ({e}): {stdout:?}"));
    assert_eq!(stdout, to_json_line(&results), "nothing else on stdout");
    results
}

/// Most other slow uptests that one saw running (started, not ended) when its sleep ended.
fn overlap(stamps: &std::path::Path) -> usize {
    let mut max_overlap = 0;
    for i in 3..=8 {
        let me = format!("0{i}_slow");
        let seen = std::fs::read_to_string(stamps.join(format!("{me}.seen"))).unwrap();
        let seen: Vec<&str> = seen.lines().collect();
        let running_too = (3..=8)
            .map(|j| format!("0{j}_slow"))
            .filter(|o| *o != me)
            .filter(|o| {
                seen.contains(&format!("{o}.start").as_str())
                    && !seen.contains(&format!("{o}.end").as_str())
            })
            .count();
        max_overlap = max_overlap.max(running_too);
    }
    max_overlap
}

#[test]
fn uptests_run_in_parallel_in_name_order_with_the_original_json() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let slow = "n=${0##*/}; touch /tmp/st/$n.start; sleep 2; ls /tmp/st > /tmp/st/$n.seen; \
                touch /tmp/st/$n.end";
    let mut files = vec![
        Entry::dir("uptests", 0o755),
        Entry::dir("uptests/web", 0o755),
        script("01_ok", "echo \"ok uid=$(id -u) args=[$1 $2] foo=[$FOO]\""),
        script("02_fail", "echo bad-thing-happened >&2; exit 3"),
        script(".hidden", "echo should not run; exit 1"),
        Entry::file("uptests/web/09_noexec", "#!/bin/sh\nexit 0\n", 0o644),
        script("10_silent", "exit 3"),
        script("11_killed", "kill -9 $$"),
    ];
    for i in 3..=8 {
        files.push(script(&format!("0{i}_slow"), slow));
    }
    let opts = ProcOpts {
        app_files: files,
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("upt", opts);
    let stamps = p.rootfs().join("tmp/st");
    std::fs::create_dir_all(&stamps).unwrap();
    std::fs::set_permissions(&stamps, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();

    let port = p.opts.port;
    let (code, out, err) = uptest(&mut p, 60);
    assert_eq!(code, 0, "{err}");
    // vr.server merges stderr into what it parses: nothing may come before the JSON.
    assert_eq!(err, "", "uptest wrote to stderr");
    let results = parse_exact(&out);
    let names: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "01_ok",
            "02_fail",
            "03_slow",
            "04_slow",
            "05_slow",
            "06_slow",
            "07_slow",
            "08_slow",
            "09_noexec",
            "10_silent",
            "11_killed"
        ]
    );
    let passed: Vec<bool> = results.iter().map(|r| r.passed).collect();
    assert_eq!(
        passed,
        [true, false, true, true, true, true, true, true, false, false, false],
        "{out}"
    );
    // The Go uptester's Output for a script that printed nothing: Go's err.Error().
    assert_eq!(results[9].output, "exit status 3", "{out}");
    assert_eq!(results[10].output, "signal: killed", "{out}");
    assert_eq!(
        results[0].output,
        format!("ok uid=1000 args=[localhost {port}] foo=[bar from env.sh]\n")
    );
    assert!(results[1].output.contains("bad-thing-happened"), "{out}");
    assert!(
        results[8].output.contains("not executable (mode 0644)"),
        "{out}"
    );
    assert!(
        out.contains(r#"{"Name":"01_ok","Output":"ok uid=1000"#),
        "{out}"
    );

    // Parallelism, observed through the stamps the scripts left.
    let max_overlap = overlap(&stamps);
    eprintln!(
        "uptests running alongside one another: up to {}",
        max_overlap + 1
    );
    assert!(max_overlap >= 1, "the slow uptests never overlapped");

    // --jobs 2: never more than two at a time (through the mounted root now).
    let stamps = p.rootfs().join("tmp/st");
    for e in std::fs::read_dir(&stamps).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let r = p.vrun(["uptest", "--jobs", "2", "-v"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(parse_exact(&r.stdout).len(), 11);
    // -v: progress on stderr, one line per uptest after the summary.
    assert!(
        r.stderr.starts_with("vrun: running 11 uptest(s) of web")
            && r.stderr.contains("vrun: uptest 10_silent FAILED"),
        "{}",
        r.stderr
    );
    assert_eq!(
        overlap(&stamps),
        1,
        "--jobs 2 ran a different number at once"
    );
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
}

#[test]
fn hanging_uptest_is_killed_at_the_timeout_and_leaves_nothing() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let opts = ProcOpts {
        app_files: vec![
            Entry::dir("uptests", 0o755),
            Entry::dir("uptests/web", 0o755),
            script("01_hang", "echo hanging; sleep 600"),
        ],
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("hang", opts);
    let (code, out, err) = uptest(&mut p, 2);
    assert_eq!(code, 0, "{err}");
    let results = parse_exact(&out);
    assert_eq!(results.len(), 1);
    assert!(!results[0].passed);
    assert!(results[0].output.contains("hanging"), "{out}");
    assert!(results[0].output.contains("timed out after 2s"), "{out}");
    assert!(
        p.leftover_cgroups().is_empty(),
        "{:?}",
        p.leftover_cgroups()
    );
    assert!(p.leftover_scratch_dirs().is_empty());
    let sleepers = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cmdline")).is_ok_and(|c| c == "sleep\x00600\x00")
        })
        .count();
    assert_eq!(sleepers, 0, "the hanging uptest's sleep survived");
}

#[test]
fn uptests_reach_the_running_app_and_fail_on_a_wrong_port() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let http_uptest = || ProcOpts {
        app_files: vec![
            Entry::dir("uptests", 0o755),
            Entry::dir("uptests/web", 0o755),
            script("01_http", "wget -q -O- \"http://$1:$2/\""),
        ],
        ..ProcOpts::default()
    };
    let mut p = TestProc::new("reach", http_uptest());
    let port = p.opts.port;
    let (pid, _, err) = p.spawn_run(2);
    assert!(
        wait_for(READY, || lxc_proc::http_get(port)).is_some(),
        "{}",
        std::fs::read_to_string(err).unwrap()
    );

    let (code, out, err) = uptest(&mut p, 30);
    assert_eq!(code, 0, "{err}");
    let results = parse_exact(&out);
    assert!(results[0].passed, "{out}");
    assert_eq!(results[0].output, image::APP_PAGE);

    // Another proc.yaml whose port nothing listens on (set up, not running).
    let mut q = TestProc::new("wrongport", http_uptest());
    let (code, out, _) = uptest(&mut q, 30);
    assert_eq!(code, 0);
    let results = parse_exact(&out);
    assert!(!results[0].passed, "{out}");

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert_eq!(p.wait_child(pid), 143);
}

#[test]
fn no_uptests_dir_is_an_empty_array() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("none", ProcOpts::default());
    let (code, out, err) = uptest(&mut p, 5);
    assert_eq!((code, out.as_str()), (0, "[]\n"), "{err}");
}

#[test]
fn uptest_that_cannot_run_at_all_leaves_stdout_empty() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut p = TestProc::new("upnolxc", ProcOpts::default());
    let r = p.vrun_env(
        ["uptest"],
        &[("VRUN_LXC_EXECUTE", "/nonexistent/lxc-execute")],
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "");
    assert!(
        r.stderr.starts_with("ERROR: LXC is not installed"),
        "{}",
        r.stderr
    );
}

#[test]
fn uptest_of_a_proc_not_set_up_fails_with_empty_stdout() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proc.yaml");
    std::fs::write(
        &file,
        "app_name: vrt\nversion: notsetup\nconfig_name: c\nrelease_hash: h\n\
         proc_name: web\nport: 5000\ncmd: 'true'\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vrun"))
        .arg("uptest")
        .arg(&file)
        .env("VR_ROOT", dir.path().join("root"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ERROR: proc is not set up"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!dir.path().join("root").exists(), "uptest created files");
}
