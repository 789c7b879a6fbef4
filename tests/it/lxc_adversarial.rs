//! The container side of the adversarial suite, on real LXC through the real `vrun` binary:
//! setup fetches a busybox image and an app build from a loopback server into the store,
//! run starts the proc with `lxc-execute`, teardown removes it.
//!
//! - The app runs as its user, with the original runner's capability drop list, and with
//!   `no_new_privs` unless proc.yaml says `user: root` (root keeps the ability to gain
//!   privileges through setuid binaries of its own image; everyone else cannot).
//! - Teardown never deletes a volume's host data, even when the app left symlinks to it
//!   (and to the volume's host path) in its writable layer.
//! - Nothing in proc.yaml can add a line to `proc.lxc`: a newline, `\r` or NUL in any
//!   value that reaches it is refused by setup or run, naming the key.
//! - An image whose `var/run` (or a volume's mount point) is a symlink to an absolute host
//!   path cannot make anything — the extractor, the overlay, the app, LXC's bind mounts —
//!   write to that host path.
//!
//! Every test cleans up (teardown, then unmount, then the temp dir) even when it fails.

use crate::common::image;
use crate::common::lxc_proc;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use image::Entry;
use lxc_proc::{mounts_under, unique};
use testkit::serve::{Server, ServerOptions};

/// A proc under test: its own VR_ROOT, server, and proc.yaml.
struct Proc {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    yaml: PathBuf,
    server: Server,
    version: String,
}

impl Proc {
    fn new(tag: &str, image_extra: &[Entry], build_extra: &[Entry]) -> Proc {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-advlxc-")
            .tempdir()
            .unwrap();
        // Appended after the busybox image's own entries (a later entry wins).
        let image = [
            strip_end(&gunzip(&image::busybox_image())),
            gunzip(&image::tar_gz(image_extra)),
        ]
        .concat();
        let build = image::app_build(build_extra);
        let server = Server::start(
            [("/image.tar", image), ("/build.tgz", build)],
            ServerOptions::default(),
        )
        .unwrap();
        Proc {
            root: tmp.path().join("vr root"),
            yaml: tmp.path().join("proc.yaml"),
            tmp: Some(tmp),
            server,
            version: unique(tag),
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.as_ref().unwrap().path()
    }

    /// A proc.yaml with the image and build, `extra` keys merged over the defaults.
    fn write_yaml(&self, extra: serde_json::Value) {
        let mut doc = serde_json::json!({
            "app_name": "adv", "version": self.version, "config_name": "c",
            "release_hash": "r", "proc_name": "web", "port": 5000,
            "user": "1000", "group": "1000", "cmd": "true",
            "image_name": "busybox", "image_url": self.server.url("/image.tar"),
            "build_url": self.server.url("/build.tgz"),
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                doc.as_object_mut().unwrap().remove(k);
            } else {
                doc[k] = v.clone();
            }
        }
        fs::write(&self.yaml, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }

    fn vrun(&self, cmd: &str) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vrun"))
            .arg(cmd)
            .arg(&self.yaml)
            .env("VR_ROOT", &self.root)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, cmd: &str) -> String {
        let out = self.vrun(cmd);
        assert!(
            out.status.success(),
            "vrun {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn procs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root.join("procs"))
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.yaml.exists() {
            let _ = self.vrun("teardown");
        }
        for p in self.procs() {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let _ = vrun::lxc::remove_cgroups(&name);
            let _ = vrun::mounts::unmount(&p.join("rootfs"));
        }
        let mut lock = PathBuf::from("/run/lxc/lock");
        lock.push(self.root.join("procs").strip_prefix("/").unwrap());
        while lock.starts_with("/run/lxc/lock/") && fs::remove_dir(&lock).is_ok() {
            lock.pop();
        }
        let tmp = self.tmp.take().unwrap();
        // The cache's EROFS layer mounts outlive teardown by design; they are ours here.
        let mut below = mounts_under(tmp.path());
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in below {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let mounted = mounts_under(tmp.path());
        if mounted.is_empty() {
            drop(tmp);
        } else {
            eprintln!(
                "cleanup: leaving {} (mounted: {mounted:?})",
                tmp.path().display()
            );
            let _ = tmp.keep();
        }
    }
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    tar
}

/// Drop the end-of-archive marker and padding (trailing zero blocks) of a tar.
fn strip_end(tar: &[u8]) -> Vec<u8> {
    let mut end = tar.len();
    while end >= 512 && tar[end - 512..end].iter().all(|&b| b == 0) {
        end -= 512;
    }
    tar[..end].to_vec()
}

/// A host dir whose files, modes, times and links must never change.
struct Sentinel {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

fn describe(top: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let below = testkit::walk(top).into_iter().map(|f| f.path);
    for p in std::iter::once(top.to_path_buf()).chain(below) {
        let m = fs::symlink_metadata(&p).unwrap();
        let body = if m.is_dir() {
            String::new()
        } else if m.file_type().is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::from_utf8_lossy(&fs::read(&p).unwrap()).into_owned()
        };
        out.insert(
            p,
            format!(
                "{:o} {}:{} ino {} nlink {} mtime {}.{} ctime {}.{} {body}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.ino(),
                m.nlink(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ),
        );
    }
    out
}

impl Sentinel {
    fn new() -> Sentinel {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-sentinel-")
            .tempdir()
            .unwrap();
        let path = tmp.path().join("host");
        fs::create_dir_all(path.join("sub")).unwrap();
        fs::write(path.join("pidfile"), b"host data").unwrap();
        fs::write(path.join("sub/f"), b"deeper").unwrap();
        let before = describe(&path);
        Sentinel {
            _tmp: tmp,
            path,
            before,
        }
    }
    fn abs(&self) -> String {
        self.path.to_str().unwrap().to_string()
    }
    fn check(&self) {
        assert_eq!(describe(&self.path), self.before, "host sentinel changed");
    }
}

/// `/proc/self/status` fields of the app, as `vrun run` printed them.
fn status_field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} not in {out}"))
        .trim()
}

/// Capability numbers of the original runner's drop list.
const DROPPED: &[(&str, u32)] = &[
    ("setpcap", 8),
    ("sys_module", 16),
    ("sys_rawio", 17),
    ("sys_pacct", 20),
    ("sys_admin", 21),
    ("sys_boot", 22),
    ("sys_nice", 23),
    ("sys_resource", 24),
    ("sys_time", 25),
    ("sys_tty_config", 26),
    ("mknod", 27),
    ("mac_override", 32),
    ("mac_admin", 33),
];

const STATUS_CMD: &str = "grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status";

#[test]
fn app_runs_as_its_user_with_caps_dropped_and_no_new_privs() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let p = Proc::new("caps", &[], &[]);
    p.write_yaml(serde_json::json!({ "cmd": STATUS_CMD }));
    p.ok("setup");
    let out = p.ok("run");
    assert!(status_field(&out, "Uid").starts_with("1000\t1000"), "{out}");
    assert!(status_field(&out, "Gid").starts_with("1000\t1000"), "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "1", "{out}");
    assert_eq!(
        u64::from_str_radix(status_field(&out, "CapEff"), 16).unwrap(),
        0
    );
    let bnd = u64::from_str_radix(status_field(&out, "CapBnd"), 16).unwrap();
    for (name, bit) in DROPPED {
        assert_eq!(
            bnd & (1 << bit),
            0,
            "{name} still in the bounding set: {out}"
        );
    }
    p.ok("teardown");

    // `user: root`: no no_new_privs (documented choice), the drop list still applies.
    p.write_yaml(serde_json::json!({ "cmd": STATUS_CMD, "user": "root", "group": "root" }));
    p.ok("setup");
    let out = p.ok("run");
    assert!(status_field(&out, "Uid").starts_with("0\t0"), "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs"), "0", "{out}");
    let bnd = u64::from_str_radix(status_field(&out, "CapBnd"), 16).unwrap();
    let eff = u64::from_str_radix(status_field(&out, "CapEff"), 16).unwrap();
    for (name, bit) in DROPPED {
        assert_eq!(
            bnd & (1 << bit),
            0,
            "{name} still in the bounding set: {out}"
        );
        assert_eq!(eff & (1 << bit), 0, "{name} still effective: {out}");
    }
    assert_ne!(eff, 0, "root keeps the capabilities not on the list: {out}");
    p.ok("teardown");
}

#[test]
fn teardown_never_deletes_volume_host_data() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let p = Proc::new("vol", &[], &[]);
    let vol = p.dir().join("volume");
    fs::create_dir_all(vol.join("deep")).unwrap();
    fs::write(vol.join("keep.txt"), b"precious").unwrap();
    fs::write(vol.join("deep/keep2"), b"precious too").unwrap();
    fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let hostpath = vol.to_str().unwrap();
    // The app writes into the volume and leaves symlinks to it (by its container path and
    // by its host path) in its writable layer: teardown must not follow any of them.
    let cmd = format!(
        "echo new > /data/new.txt && ln -s /data /tmp/to-volume && ln -s {hostpath} /tmp/to-host \
         && mkdir -p /tmp/d && ln -s /data/deep /tmp/d/deep-link && ls /data"
    );
    p.write_yaml(serde_json::json!({
        "cmd": cmd,
        "volumes": [[hostpath, "/data"]],
    }));
    p.ok("setup");
    let out = p.ok("run");
    assert!(out.contains("keep.txt"), "the volume is mounted: {out}");
    let upper = p.procs()[0].join("upper");
    assert!(fs::symlink_metadata(upper.join("tmp/to-host"))
        .unwrap()
        .is_symlink());
    p.ok("teardown");
    assert!(p.procs().is_empty(), "teardown removed the proc dir");
    assert_eq!(fs::read(vol.join("keep.txt")).unwrap(), b"precious");
    assert_eq!(fs::read(vol.join("deep/keep2")).unwrap(), b"precious too");
    assert_eq!(fs::read(vol.join("new.txt")).unwrap(), b"new\n");
}

#[test]
fn proc_lxc_cannot_be_injected_through_proc_yaml() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let p = Proc::new("inj", &[], &[]);
    let vol = p.dir().join("v");
    fs::create_dir(&vol).unwrap();
    let v = vol.to_str().unwrap().to_string();
    let bad = ["x\nlxc.cap.drop =", "x\rlxc.init.uid = 0", "x\u{0}y"];
    let mut cases: Vec<(&str, serde_json::Value)> = Vec::new();
    for key in [
        "app_name",
        "version",
        "config_name",
        "release_hash",
        "proc_name",
        "user",
        "group",
    ] {
        for b in bad {
            cases.push((key, serde_json::json!({ key: b })));
        }
    }
    for b in bad {
        cases.push((
            "volumes",
            serde_json::json!({ "volumes": [[format!("{v}{b}"), "/data"]] }),
        ));
        cases.push((
            "volumes",
            serde_json::json!({ "volumes": [[v.clone(), format!("/data{b}")]] }),
        ));
        cases.push((
            "mem_limit",
            serde_json::json!({ "mem_limit": format!("256M{b}") }),
        ));
        cases.push((
            "memsw_limit",
            serde_json::json!({ "memsw_limit": format!("512M{b}") }),
        ));
    }
    // ("invalid volume …": names the entry rather than the key, good enough for a human.)
    cases.push((
        "volume",
        serde_json::json!({ "volumes": [[format!("{v} lxc.x"), "/data"]] }),
    ));
    cases.push(("port", serde_json::json!({ "port": "5000\nlxc.x = 1" })));
    for (key, extra) in &cases {
        p.write_yaml(extra.clone());
        // Without artifacts setup is fast: only the refusal is under test here.
        let mut no_fetch = extra.clone();
        no_fetch["build_url"] = serde_json::Value::Null;
        no_fetch["image_url"] = serde_json::Value::Null;
        p.write_yaml(no_fetch);
        let setup = p.vrun("setup");
        let refused = if setup.status.success() {
            let run = p.vrun("run");
            assert!(!run.status.success(), "{key} {extra}: run accepted it");
            run
        } else {
            setup
        };
        let err = String::from_utf8_lossy(&refused.stderr).into_owned();
        assert!(err.starts_with("ERROR: "), "{key} {extra}: {err}");
        assert_eq!(err.lines().count(), 1, "{key} {extra}: {err}");
        assert!(
            err.contains(key),
            "{key} {extra}: error does not name the key: {err}"
        );
        for proc in p.procs() {
            if let Ok(text) = fs::read_to_string(proc.join("proc.lxc")) {
                for line in text.lines() {
                    assert!(
                        line.is_empty() || line.starts_with("lxc."),
                        "injected: {line:?}"
                    );
                }
            }
        }
        let _ = p.vrun("teardown");
    }
    // Values that never reach proc.lxc may hold newlines: cmd (proc.sh), env (env.sh).
    p.write_yaml(serde_json::json!({
        "cmd": "echo one\necho two\necho 'lxc.cap.drop = '",
        "env": {"MULTI": "a\nlxc.init.uid = 0"},
        "build_url": null, "image_url": null,
    }));
    p.ok("setup");
    let proc = &p.procs()[0];
    let out = p.ok("run");
    assert!(out.contains("one\ntwo"), "{out}");
    let text = fs::read_to_string(proc.join("proc.lxc")).unwrap_or_default();
    assert!(
        !text.contains("uid = 0") || text.contains("lxc.init.uid = 1000"),
        "{text}"
    );
    for line in text.lines() {
        assert!(
            line.is_empty() || line.starts_with("lxc."),
            "injected: {line:?}"
        );
    }
    p.ok("teardown");
}

#[test]
fn image_var_run_symlink_to_a_host_path_never_reaches_the_host() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let s = Sentinel::new();
    let abs = s.abs();
    // The image's `var/run` is an absolute symlink to the host sentinel, and the image also
    // carries that path as a directory, so the app's writes succeed — inside the container.
    let image_extra = vec![
        Entry::dir(abs.trim_start_matches('/'), 0o777),
        Entry::symlink("var/run", &abs),
    ];
    // The build writes under var/run too: it lands in app/ (absolute names are stripped,
    // see adversarial.rs; the tar crate's Builder will not write them).
    let build_extra = vec![
        Entry::dir("var", 0o755),
        Entry::dir("var/run", 0o755),
        Entry::file("var/run/from-build", "build", 0o644),
        Entry::file("./var/run/from-build-dot", "build", 0o644),
    ];
    let p = Proc::new("varrun", &image_extra, &build_extra);
    p.write_yaml(serde_json::json!({
        "user": "root", "group": "root",
        "cmd": "echo pwned > /var/run/pidfile && echo pwned > /var/run/new && ls /var/run/",
    }));
    p.ok("setup");
    s.check();
    let out = p.ok("run");
    assert!(out.contains("new"), "{out}");
    s.check();
    let upper = p.procs()[0].join("upper").join(abs.trim_start_matches('/'));
    assert_eq!(fs::read(upper.join("new")).unwrap(), b"pwned\n");
    assert_eq!(fs::read(upper.join("pidfile")).unwrap(), b"pwned\n");
    p.ok("teardown");
    s.check();
}

#[test]
fn volume_mount_point_symlinked_to_a_host_path_is_refused() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let s = Sentinel::new();
    let abs = s.abs();
    let image_extra = vec![Entry::symlink("vol", &format!("{abs}/created-by-mount"))];
    let p = Proc::new("volsym", &image_extra, &[]);
    let vol = p.dir().join("volume");
    fs::create_dir(&vol).unwrap();
    p.write_yaml(serde_json::json!({
        "user": "root", "group": "root",
        "cmd": "echo pwned > /vol/x",
        "volumes": [[vol.to_str().unwrap(), "/vol"]],
    }));
    p.ok("setup");
    // LXC 5 opens mount targets without following symlinks and refuses this one.
    let run = p.vrun("run");
    assert!(!run.status.success(), "run mounted through a symlink");
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("symbolic link"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    s.check();
    assert_eq!(fs::read_dir(&vol).unwrap().count(), 0);
    p.ok("teardown");
    s.check();
}
