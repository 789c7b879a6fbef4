//! vrun driven exactly as a Velociraptor host drives its runner (issue 12), with the real
//! parts: Debian's supervisord (its own config, socket, pidfile and log in a temp dir —
//! never the system one), the system Python's PyYAML writing proc.yaml as vr.server does,
//! vr.common's `proc.conf` template, vr.server's parsing of the uptest output, and
//! vr.builder's build-proc flow. What each step mirrors is named in its comment, from
//! vr.server 8.3 (`remote.py`, `tasks.py`), vr.common 6.1.1 and vr.builder 2.0.0.
//!
//! Each test has its own VR_ROOT (no space in it: supervisord splits `[include] files` on
//! whitespace, and Velociraptor's is `/apps`) and a unique container name; the `Host`
//! guard shuts supervisord down, kills what is left of the proc's containers and unmounts
//! everything under the root before the temp dir goes, even when an assertion fails.

use crate::common::image;
use crate::common::lxc_proc;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::Entry;
use lxc_proc::{free_port, http_get, unique, wait_for, Tarballs};

/// Readiness limit on a loaded 2-core machine (a deadline against hangs, not a timing).
const READY: Duration = Duration::from_secs(60);

/// vr.common 6.1.1 `templates/proc.conf`, verbatim: the program section every proc gets.
const PROC_CONF_TEMPLATE: &str = "[program:%(container_name)s]
command=%(runner)s run %(proc_yaml_path)s
autostart=true
autorestart=true
stdout_logfile=%(log)s
stdout_logfile_maxbytes=10000000
stdout_logfile_backups=1
user=%(user)s
directory=%(container_path)s/app
redirect_stderr=true
stderr_syslog=true
stdout_syslog=true
";

/// The host side of Velociraptor in the system Python (with PyYAML), one subcommand per
/// step; each says which vr.* function it stands for.
const HOST_PY: &str = r#"
import json, os, re, sys, yaml

def container_name(s):
    # vr.common.paths.get_container_name
    return '-'.join([s['app_name'], s['version'], s['config_name'], s['release_hash'],
                     s['proc_name'], str(s['port'])])

cmd = sys.argv[1]
if cmd == 'deploy-proc-yaml':
    # tasks.deploy: yaml.safe_dump(build_proc_info(...), default_flow_style=False);
    # remote.deploy_proc: mkdir -p <procs>/<name>, put it there as proc.yaml.
    procs = sys.argv[2]
    info = json.load(sys.stdin)
    text = yaml.safe_dump(info, default_flow_style=False)
    settings = yaml.safe_load(text)
    proc_path = os.path.join(procs, container_name(settings))
    os.makedirs(proc_path, exist_ok=True)
    path = os.path.join(proc_path, 'proc.yaml')
    with open(path, 'w') as f:
        f.write(text)
    print(path)
elif cmd == 'proc-conf':
    # remote.write_proc_conf: upload_template(proc.conf, vars) into <proc>/proc.conf.
    proc_yaml, template = sys.argv[2], sys.stdin.read()
    settings = yaml.safe_load(open(proc_yaml))
    proc_path = os.path.dirname(proc_yaml)
    v = {
        'proc_yaml_path': proc_yaml,
        'container_name': container_name(settings),
        'container_path': os.path.join(proc_path, 'rootfs'),
        'log': os.path.join(proc_path, 'log'),
        'runner': 'vrun' if settings.get('image_url') is not None else 'vrun_precise',
        'user': 'root',
    }
    with open(os.path.join(proc_path, 'proc.conf'), 'w') as f:
        f.write(template % v)
    print(v['container_name'])
elif cmd == 'parse-uptests':
    # remote.run_uptests: text before the first '[' becomes a failed 'uptester' result;
    # anything json.loads refuses makes the whole output one failed result.
    result = sys.stdin.read()
    m = re.match(r'(?P<prefix>[^\[]*)(?P<json>.*)', result, re.S)
    if m is None:
        parsed = [{'Passed': False, 'Name': 'uptester', 'Output': result}]
    else:
        parts = m.groupdict()
        try:
            parsed = json.loads(parts['json'])
            if parts['prefix']:
                parsed.insert(0, {'Passed': False, 'Name': 'uptester',
                                  'Output': parts['prefix']})
        except ValueError:
            parsed = [{'Passed': False, 'Name': 'uptester', 'Output': result}]
    json.dump(parsed, sys.stdout)
elif cmd == 'buildproc-yaml':
    # vr.builder.build._write_buildproc_yaml: ProcData(...).as_yaml(), i.e. every key of
    # ProcData (missing ones None) through yaml.safe_dump(default_flow_style=False).
    given = json.load(sys.stdin)
    keys = ['app_folder', 'app_name', 'app_repo_type', 'app_repo_url', 'build_md5',
            'build_url', 'buildpack_url', 'buildpack_version', 'cmd', 'config_name', 'env',
            'group', 'host', 'image_md5', 'image_name', 'image_url', 'mem_limit',
            'memsw_limit', 'port', 'proc_name', 'release_hash', 'settings', 'user',
            'version', 'volumes']
    d = dict((k, given.get(k)) for k in keys)
    with open(sys.argv[2], 'w') as f:
        f.write(yaml.safe_dump(d, default_flow_style=False))
    print(container_name(d))
else:
    sys.exit('unknown step ' + cmd)
"#;

/// Run a step of [`HOST_PY`]; its stdout, trimmed.
fn host_py(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(HOST_PY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (python3-yaml)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python step {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A fake Velociraptor app host: a VR_ROOT, a `vrun` on PATH, and (once started) a
/// supervisord of its own.
struct Host {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    supervisord: Option<Child>,
    /// Container names whose leftovers the guard cleans.
    names: Vec<String>,
}

impl Host {
    fn new() -> Host {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-vr-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_owned();
        let root = dir.join("apps");
        std::fs::create_dir_all(root.join("procs")).unwrap();
        // `command=vrun run …`: supervisord finds `vrun` on its PATH, as on a host.
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vrun"), bin.join("vrun")).unwrap();
        let conf = dir.join("supervisord.conf");
        std::fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
                 childlogdir={d}\nnodaemon=true\n\n\
                 [rpcinterface:supervisor]\n\
                 supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles = {procs}/*/proc.conf\n",
                d = dir.display(),
                procs = root.join("procs").display()
            ),
        )
        .unwrap();
        Host {
            tmp: Some(tmp),
            root,
            bin,
            conf,
            supervisord: None,
            names: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.as_ref().unwrap().path()
    }

    /// PATH of everything the host runs: our `vrun` first.
    fn path_env(&self) -> String {
        format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.bin.display())
    }

    /// `vrun ARGS` as vr.server's `sudo` runs it: as root, stderr merged into stdout.
    fn vrun_merged(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new("sh")
            .arg("-c")
            .arg("exec vrun \"$@\" 2>&1")
            .arg("vrun")
            .args(args)
            .env_clear()
            .env("PATH", self.path_env())
            .env("VR_ROOT", &self.root)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Start supervisord (in the foreground, its own process group) and wait for its
    /// socket to answer.
    fn start_supervisord(&mut self) {
        assert!(self.supervisord.is_none());
        let log = std::fs::File::create(self.dir().join("supervisord.out")).unwrap();
        let child = Command::new("/usr/bin/supervisord")
            .arg("-c")
            .arg(&self.conf)
            .env_clear()
            .env("PATH", self.path_env())
            .env("VR_ROOT", &self.root)
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("supervisord (apt-get install supervisor)");
        self.supervisord = Some(child);
        let up = wait_for(READY, || self.ctl(&["pid"]).status.success().then_some(()));
        assert!(up.is_some(), "supervisord never answered: {}", self.log());
    }

    /// `supervisorctl -c CONF ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new("/usr/bin/supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `supervisorctl ARGS`, which must succeed; its stdout.
    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "supervisorctl {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// `supervisorctl shutdown` (supervisord stops every program first), then wait.
    fn stop_supervisord(&mut self) {
        let Some(mut child) = self.supervisord.take() else {
            return;
        };
        let _ = self.ctl(&["shutdown"]);
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        panic!("supervisord did not shut down: {}", self.log());
    }

    /// supervisord's own log.
    fn log(&self) -> String {
        let mut text =
            std::fs::read_to_string(self.dir().join("supervisord.log")).unwrap_or_default();
        text.push_str(
            &std::fs::read_to_string(self.dir().join("supervisord.out")).unwrap_or_default(),
        );
        text
    }

    /// Mount points under the root.
    fn mounts(&self) -> Vec<PathBuf> {
        vrun::mounts::mounts_below(&self.root).unwrap_or_default()
    }

    /// Mounts under the root but the cache's own mounts of its EROFS layers, which stay
    /// after a teardown by design (the next proc of the layer shares them; gc removes).
    fn proc_mounts(&self) -> Vec<PathBuf> {
        let mut v = self.mounts();
        v.retain(|m| vrun_cache::LayerKey::from_root(m).is_none());
        v
    }

    /// Unmount everything under the root, deepest first (what a reboot does).
    fn unmount_all(&self) {
        let mut below = self.mounts();
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in below {
            nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisord.take() {
            let _ = self.ctl(&["shutdown"]);
            let deadline = Instant::now() + READY;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = vrun::lxc::remove_cgroups(name);
        }
        let mut below = self.mounts();
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &below {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let mut lock = PathBuf::from("/run/lxc/lock");
        lock.push(self.root.join("procs").strip_prefix("/").unwrap());
        while lock.starts_with("/run/lxc/lock/") && std::fs::remove_dir(&lock).is_ok() {
            lock.pop();
        }
        let tmp = self.tmp.take().unwrap();
        if self.mounts().is_empty() {
            drop(tmp);
        } else {
            eprintln!("cleanup: leaving {} (still mounted)", tmp.path().display());
            let _ = tmp.keep();
        }
    }
}

/// Cgroup dirs of container `name` (and its TMP containers) in every hierarchy.
fn cgroups_of(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in vrun::lxc::cgroups::hierarchies() {
        for e in std::fs::read_dir(&h).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains(name) {
                out.push(e.path());
            }
        }
    }
    out
}

fn script(path: &str, body: &str) -> Entry {
    Entry::file(path, format!("#!/bin/sh\n{body}\n"), 0o755)
}

/// `build_proc_info` of vr.server's tasks.py for one proc, as JSON for [`HOST_PY`].
fn proc_info(version: &str, port: u16, tarballs: &Tarballs, env: serde_json::Value) -> String {
    serde_json::json!({
        "release_hash": "d41d8cd9",
        "config_name": "prod",
        "settings": {"greeting": "yes", "workers": 2},
        "env": env,
        "version": version,
        "build_md5": null,
        "build_url": tarballs.build_url,
        "buildpack_url": "https://github.com/heroku/heroku-buildpack-python",
        "buildpack_version": "v1",
        "app_name": "vrapp",
        "app_repo_url": "https://example.invalid/vrapp.git",
        "app_repo_type": "git",
        "host": "localhost",
        "proc_name": "web",
        "port": port,
        "user": "nobody",
        "group": "nogroup",
        "volumes": [],
        "mem_limit": null,
        "memsw_limit": null,
        "image_name": "busybox-test",
        "image_url": tarballs.image_url,
        "image_md5": null,
    })
    .to_string()
}

#[test]
fn a_velociraptor_host_deploys_uptests_reboots_and_tears_down_under_supervisord() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut host = Host::new();
    let port = free_port();
    // The Procfile's command finds `vrapp-env` only through env's `PATH: /app/bin:$PATH`.
    let tarballs = Tarballs::serve(&[
        Entry::file(
            "Procfile",
            "web: vrapp-env > /tmp/app.env; exec busybox httpd -f -p $PORT -h /app/www\n",
            0o644,
        ),
        Entry::dir("bin", 0o755),
        script("bin/vrapp-env", "echo \"PATH=$PATH\"; echo \"GREETING=$GREETING\""),
        Entry::dir("uptests", 0o755),
        Entry::dir("uptests/web", 0o755),
        script(
            "uptests/web/01_page",
            "wget -q -O - \"http://$1:$2/\" | grep -q 'hello from the vrun test app' && echo page ok",
        ),
        script(
            "uptests/web/02_path",
            "case \"$PATH\" in /app/bin:?*) echo \"path ok: $PATH\";; *) echo \"bad PATH $PATH\"; exit 1;; esac",
        ),
    ]);
    let info = proc_info(
        &unique("vr"),
        port,
        &tarballs,
        serde_json::json!({"PATH": "/app/bin:$PATH", "GREETING": "hello $USER_UNSET_X"}),
    );

    // The host's supervisord is already running when Velociraptor deploys.
    host.start_supervisord();
    // remote.deploy_proc: proc dir, proc.yaml in it, `vrun setup`, proc.conf, reread, add.
    let procs = host.root.join("procs");
    let proc_yaml = host_py(&["deploy-proc-yaml", &procs.to_string_lossy()], &info);
    let proc_yaml = PathBuf::from(proc_yaml);
    let proc_dir = proc_yaml.parent().unwrap().to_owned();
    let name = proc_dir.file_name().unwrap().to_string_lossy().into_owned();
    host.names.push(name.clone());
    let (code, out) = host.vrun_merged(&["setup", &proc_yaml.to_string_lossy()]);
    assert_eq!(code, 0, "vrun setup: {out}");
    // Right after setup the proc's root is there for the host: the build under
    // rootfs/app (supervisord's directory=), the uptests vr.server looks for, and
    // proc.lxc ("setup creates … LXC config files").
    let rootfs = proc_dir.join("rootfs");
    assert!(
        rootfs.join("app/Procfile").is_file(),
        "rootfs/app is not the build"
    );
    assert!(rootfs.join("app/uptests/web").is_dir());
    assert!(proc_dir.join("proc.lxc").is_file());
    let conf_name = host_py(
        &["proc-conf", &proc_yaml.to_string_lossy()],
        PROC_CONF_TEMPLATE,
    );
    assert_eq!(conf_name, name);
    // Exactly the template's keys in the program section.
    let conf = std::fs::read_to_string(proc_dir.join("proc.conf")).unwrap();
    let keys: Vec<&str> = conf
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(
        keys,
        [
            "command",
            "autostart",
            "autorestart",
            "stdout_logfile",
            "stdout_logfile_maxbytes",
            "stdout_logfile_backups",
            "user",
            "directory",
            "redirect_stderr",
            "stderr_syslog",
            "stdout_syslog"
        ]
    );
    let reread = host.ctl_ok(&["reread"]);
    assert!(reread.contains(&format!("{name}: available")), "{reread}");
    let added = host.ctl_ok(&["add", &name]);
    assert!(added.contains("added process group"), "{added}");
    let page = wait_for(READY, || http_get(port));
    assert!(
        page.is_some_and(|p| p.contains("hello from the vrun test app")),
        "the app never answered: {}\n{}",
        host.log(),
        std::fs::read_to_string(proc_dir.join("log")).unwrap_or_default()
    );

    // `PATH: /app/bin:$PATH` was expanded when env.sh was sourced: /app/bin, then the
    // container's own PATH (not the literal "$PATH").
    let app_env = std::fs::read_to_string(rootfs.join("tmp/app.env")).unwrap();
    let path_line = app_env.lines().next().unwrap();
    let rest = path_line
        .strip_prefix("PATH=/app/bin:")
        .unwrap_or_else(|| panic!("{app_env}"));
    assert!(
        rest.split(':').any(|d| d == "/bin") && !rest.contains('$'),
        "{app_env}"
    );
    assert!(app_env.contains("GREETING=hello \n"), "{app_env}");

    // remote.run_uptests: rootfs exists, rootfs/app/uptests/<proc_name> exists, so
    // `vrun uptest proc.yaml` through sudo (stderr merged), split as vr.server splits it.
    assert!(rootfs.is_dir() && rootfs.join("app/uptests/web").is_dir());
    let (code, merged) = host.vrun_merged(&["uptest", &proc_yaml.to_string_lossy()]);
    assert_eq!(code, 0, "{merged}");
    let parsed: Vec<serde_json::Value> =
        serde_json::from_str(&host_py(&["parse-uptests"], &merged)).unwrap();
    let names: Vec<&str> = parsed.iter().map(|r| r["Name"].as_str().unwrap()).collect();
    assert_eq!(names, ["01_page", "02_path"], "{merged}");
    assert!(parsed.iter().all(|r| r["Passed"] == true), "{merged}");

    // Reboot: supervisord stops, every mount under the root goes; `rootfs/app` is still a
    // directory, so supervisord can chdir there before `vrun run` mounts again.
    host.stop_supervisord();
    host.unmount_all();
    assert!(host.mounts().is_empty());
    assert!(rootfs.join("app").is_dir());
    assert_eq!(std::fs::read_dir(rootfs.join("app")).unwrap().count(), 0);
    assert!(!rootfs.join("tmp").exists(), "nothing is mounted on rootfs");
    host.start_supervisord();
    let page = wait_for(READY, || http_get(port));
    assert!(
        page.is_some(),
        "the app did not come back after the reboot: {}",
        host.log()
    );
    assert!(!host.log().contains("couldn't chdir"), "{}", host.log());
    // RUNNING once it has stayed up for supervisord's startsecs (1 s).
    let running = wait_for(READY, || {
        let out = host.ctl(&["status", &name]);
        String::from_utf8_lossy(&out.stdout)
            .contains("RUNNING")
            .then_some(())
    });
    assert!(running.is_some(), "{}", host.log());

    // remote.delete_proc: stop, remove, `vrun teardown proc.yaml`, `rm -rf` the proc dir.
    host.ctl_ok(&["stop", &name]);
    host.ctl_ok(&["remove", &name]);
    let (code, out) = host.vrun_merged(&["teardown", &proc_yaml.to_string_lossy()]);
    assert_eq!(code, 0, "vrun teardown: {out}");
    let rm = Command::new("rm")
        .arg("-rf")
        .arg(&proc_dir)
        .status()
        .unwrap();
    assert!(rm.success());
    assert!(host.proc_mounts().is_empty(), "{:?}", host.mounts());
    assert!(cgroups_of(&name).is_empty(), "{:?}", cgroups_of(&name));
    assert!(!proc_dir.exists());
    assert!(http_get(port).is_none());
}

#[test]
fn supervisorctl_stop_of_an_app_ignoring_sigterm_is_vruns_own_orderly_stop() {
    let _lxc = crate::common::lxc_suite(module_path!());
    // supervisord's default stopwaitsecs is 10: vrun's default grace (7 s) plus its
    // cleanup must end before supervisord SIGKILLs vrun, so supervisord logs vrun's own
    // exit (137: the app was killed after the grace period), not "terminated by SIGKILL".
    let mut host = Host::new();
    let tarballs = Tarballs::serve(&[]);
    let mut info: serde_json::Value = serde_json::from_str(&proc_info(
        &unique("vrstop"),
        free_port(),
        &tarballs,
        serde_json::json!({}),
    ))
    .unwrap();
    info["cmd"] = "trap '' TERM; echo started; while :; do sleep 1; done".into();
    let procs = host.root.join("procs");
    let proc_yaml = PathBuf::from(host_py(
        &["deploy-proc-yaml", &procs.to_string_lossy()],
        &info.to_string(),
    ));
    let proc_dir = proc_yaml.parent().unwrap().to_owned();
    let name = proc_dir.file_name().unwrap().to_string_lossy().into_owned();
    host.names.push(name.clone());
    host.start_supervisord();
    let (code, out) = host.vrun_merged(&["setup", &proc_yaml.to_string_lossy()]);
    assert_eq!(code, 0, "vrun setup: {out}");
    host_py(
        &["proc-conf", &proc_yaml.to_string_lossy()],
        PROC_CONF_TEMPLATE,
    );
    host.ctl_ok(&["reread"]);
    host.ctl_ok(&["add", &name]);
    let log = proc_dir.join("log");
    let started = wait_for(READY, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("started"))
    });
    assert!(started.is_some(), "{}", host.log());
    host.ctl_ok(&["stop", &name]);
    let sup_log = host.log();
    assert!(
        sup_log.contains(&format!("stopped: {name} (exit status 137)")),
        "{sup_log}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!sup_log.contains("terminated by SIGKILL"), "{sup_log}");
    assert!(cgroups_of(&name).is_empty(), "{:?}", cgroups_of(&name));
    host.ctl_ok(&["remove", &name]);
    let (code, out) = host.vrun_merged(&["teardown", &proc_yaml.to_string_lossy()]);
    assert_eq!(code, 0, "vrun teardown: {out}");
    assert!(host.proc_mounts().is_empty(), "{:?}", host.mounts());
}

#[test]
fn vr_builder_build_proc_sets_up_runs_its_copied_script_and_tears_down() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let mut host = Host::new();
    let tarballs = Tarballs::serve(&[]);
    // vr.builder's working dir: the app checkout (chowned to the build user), a buildpack
    // (a+wx) and the buildpack cache, each a volume at /<name>.
    let here = host.dir().join("work");
    let app = here.join("build/vrapp-1");
    let buildpack = here.join("buildpack-1");
    let cache = here.join("cache/buildpack_cache");
    for d in [&app, &buildpack, &cache] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(buildpack.join("bin-compile"), "x").unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for d in [
        here.join("build"),
        app.clone(),
        here.join("cache"),
        cache.clone(),
        buildpack.clone(),
    ] {
        nix::unistd::chown(&d, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    let volume =
        |name: &str| serde_json::json!([here.join(name).to_string_lossy(), format!("/{name}")]);
    let buildproc = here.join("buildproc.yaml");
    let given = serde_json::json!({
        "app_folder": app.to_string_lossy(),
        "app_name": "vrapp",
        "app_repo_url": "",
        "app_repo_type": "",
        "buildpack_url": "",
        "buildpack_version": "",
        "config_name": "build",
        "env": {"BUILDPACK_DIR": "/buildpack-1"},
        "host": "",
        "port": 0,
        "version": unique("b"),
        "release_hash": "",
        "settings": {},
        "user": "nobody",
        "cmd": "/builder.sh /build/vrapp-1 /cache/buildpack_cache",
        "volumes": [volume("build"), volume("buildpack-1"), volume("cache")],
        "proc_name": "build",
        "image_name": "busybox-test",
        "image_url": tarballs.image_url,
        "image_md5": null,
    });
    let name = host_py(
        &["buildproc-yaml", &buildproc.to_string_lossy()],
        &given.to_string(),
    );
    assert!(name.ends_with("-build--build-0"), "{name}");
    let text = std::fs::read_to_string(&buildproc).unwrap();
    assert!(
        text.contains("build_url: null\n") && text.contains("release_hash: ''\n"),
        "{text}"
    );
    host.names.push(name.clone());
    let run = |cmd: &str| -> (i32, String) {
        // build.py's run(): subprocess.check_call((runner, cmd, 'buildproc.yaml'),
        // stderr=STDOUT), from the working dir.
        let out = Command::new("sh")
            .arg("-c")
            .arg("exec vrun \"$0\" buildproc.yaml 2>&1")
            .arg(cmd)
            .env_clear()
            .env("PATH", host.path_env())
            .env("VR_ROOT", &host.root)
            .current_dir(&here)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run("setup");
    assert_eq!(code, 0, "vrun setup: {out}");
    // _prepare_build: builder.sh copied into <container_path>/ (a+x), <container_path>/app/
    // vendor made, and the app dir chowned to the build user — all on the host, after setup.
    let container_path = host.root.join("procs").join(&name).join("rootfs");
    std::fs::write(
        container_path.join("builder.sh"),
        "#!/bin/sh\nset -e\napp=$1; cache=$2\ntest -d /app/vendor\n\
         echo \"compiled by uid $(id -u) with $BUILDPACK_DIR: $(ls \"$BUILDPACK_DIR\")\" > \"$app/.compile.log\"\n\
         ls -d /app/vendor > \"$cache/seen\"\ntouch \"$app/.postbuild.flag\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        container_path.join("builder.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(container_path.join("app/vendor")).unwrap();
    for d in [
        container_path.join("app"),
        container_path.join("app/vendor"),
    ] {
        nix::unistd::chown(&d, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    let (code, out) = run("run");
    assert_eq!(code, 0, "vrun run: {out}");
    // The script's output is in the host's volumes (assert_compile_finished's flag too).
    let log = std::fs::read_to_string(app.join(".compile.log")).unwrap();
    assert_eq!(
        log,
        format!(
            "compiled by uid {} with /buildpack-1: bin-compile\n",
            nobody.uid
        )
    );
    assert!(app.join(".postbuild.flag").is_file());
    assert_eq!(
        std::fs::read_to_string(cache.join("seen")).unwrap(),
        "/app/vendor\n"
    );
    let (code, out) = run("teardown");
    assert_eq!(code, 0, "vrun teardown: {out}");
    assert!(!host.root.join("procs").join(&name).exists());
    assert!(host.proc_mounts().is_empty(), "{:?}", host.mounts());
    assert!(cgroups_of(&name).is_empty());
    assert!(
        app.join(".compile.log").is_file(),
        "teardown went through a volume"
    );
}
