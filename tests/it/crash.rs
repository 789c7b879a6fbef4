//! Crash consistency: `kill -9` of the real `vrun setup` at random points, against a
//! throttled loopback server, must never leave a half-written blob or layer where the
//! store serves them, and the next setup must produce exactly the tree a clean setup does.
//!
//! Why this shape: the store's promise is "published by rename, after fsync"; the only way
//! to see that it holds is to stop the process without any chance to clean up, at points
//! the test does not choose (random delays over the whole download → extract → publish
//! span), and then look at what a reader would find. The server is throttled so a setup
//! lasts long enough (about a second) for the kills to land in every stage.
//!
//! After every kill: every blob under `blobs-v1/` hashes to its name, every entry of
//! `layers-v1/` is a complete layer (`layer.json`, manifest, `root/`), every entry of
//! `layers-erofs-v1/` is a complete EROFS layer (`layer.json`, an `image.erofs` with the
//! sha256 it records, `root/`), and nothing is mounted under the root but a published
//! EROFS layer's image on its own `root/` and a proc's overlay — no stale mount (of an
//! ingest dir, a probe image, a layer not or no longer published). After the following
//! setup: the same, and the build layer, the image layer and the proc's files are
//! identical (content, modes, owners, links) to the ones of a clean setup. The layers
//! are those of the storage under test (`VRUN_LAYERS`; EROFS by default).

use crate::common::image;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::{tar_gz, Entry};
use rand::Rng;
use sha2::{Digest, Sha256};
use testkit::serve::{Fault, Server, ServerOptions};
use vrun::state::ProcState;

/// Kills per run of the test (the brief asks for at least 20).
const KILLS: usize = 22;

/// Bytes per second each artifact is served at while kills are aimed: about a second per
/// setup. Recovery setups are served at full speed (they only have to finish).
const THROTTLE: u64 = 1_000_000;

/// A build of ~200 files (0.9 MB, incompressible) with dirs, links and modes.
fn build_tarball() -> Vec<u8> {
    let mut e = vec![
        Entry::dir(".", 0o755),
        Entry::file("Procfile", "web: sleep 1000\n", 0o644),
    ];
    for d in 0..7 {
        e.push(Entry::dir(&format!("lib{d}"), 0o755));
        for f in 0..30 {
            e.push(Entry::file(
                &format!("lib{d}/m{f}.py"),
                testkit::noise(4000 + f * 13, (d * 100 + f) as u64),
                if f % 7 == 0 { 0o755 } else { 0o644 },
            ));
        }
    }
    e.push(Entry::symlink("current", "lib0"));
    e.push(Entry::file("big.bin", testkit::noise(100_000, 99), 0o600));
    tar_gz(&e)
}

/// An OS-image-like tree (1 MB) with foreign owners, setuid and absolute symlinks.
fn image_tarball() -> Vec<u8> {
    let mut e = vec![Entry::dir(".", 0o755)];
    for d in ["bin", "etc", "usr", "usr/lib", "var", "tmp"] {
        e.push(Entry::dir(d, 0o755));
    }
    e.push(Entry::file("bin/su", testkit::noise(50_000, 7), 0o4755));
    e.push(Entry::symlink("bin/sh", "/bin/su"));
    e.push(Entry::symlink("var/run", "/run"));
    for i in 0..100 {
        e.push(
            Entry::file(
                &format!("usr/lib/lib{i}.so"),
                testkit::noise(9000 + i, 1000 + i as u64),
                0o644,
            )
            .owned(100 + i as u32 % 3, 200),
        );
    }
    tar_gz(&e)
}

/// The store as a reader sees it: only complete blobs and layers. Returns the problems.
fn store_problems(cache: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    if let Ok(rd) = fs::read_dir(cache.join("blobs-v1/sha256")) {
        for e in rd {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let sum = hex::encode(Sha256::digest(fs::read(&p).unwrap()));
            if sum != name {
                bad.push(format!("blob {name} hashes to {sum}"));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cache.join("layers-erofs-v1")) {
        for e in rd {
            let p = e.unwrap().path();
            let meta = fs::read(p.join("layer.json"))
                .ok()
                .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok());
            let Some(meta) = meta else {
                bad.push(format!("layer {} has no valid layer.json", p.display()));
                continue;
            };
            match fs::read(p.join("image.erofs")) {
                Ok(img) => {
                    let sum = hex::encode(Sha256::digest(&img));
                    if meta["image_sha256"] != sum.as_str() {
                        bad.push(format!(
                            "layer {}: image hashes to {sum}, layer.json says {}",
                            p.display(),
                            meta["image_sha256"]
                        ));
                    }
                }
                Err(e) => bad.push(format!("layer {} has no image: {e}", p.display())),
            }
            if !p.join("root").is_dir() {
                bad.push(format!("layer {} has no root/", p.display()));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cache.join("layers-v1")) {
        for e in rd {
            let p = e.unwrap().path();
            let meta = fs::read(p.join("layer.json"));
            match meta.map(|m| serde_json::from_slice::<serde_json::Value>(&m)) {
                Ok(Ok(_)) => {}
                other => bad.push(format!(
                    "layer {} has no valid layer.json: {other:?}",
                    p.display()
                )),
            }
            if !p.join("manifest-v1.tsv").is_file() {
                bad.push(format!("layer {} has no manifest", p.display()));
            }
            if !p.join("root").is_dir() {
                bad.push(format!("layer {} has no root/", p.display()));
            }
        }
    }
    bad
}

/// Mounts under `root` that are neither a published EROFS layer's image on its `root/`
/// nor a proc's overlay on its `rootfs/`: stale mounts a crash must never leave.
fn stale_mounts(root: &Path) -> Vec<String> {
    let Ok(root) = root.canonicalize() else {
        return Vec::new();
    };
    let layers = root.join("cache/layers-erofs-v1");
    let mut bad = Vec::new();
    for m in vrun::mounts::mounts().unwrap() {
        if !m.mount_point.starts_with(&root) {
            continue;
        }
        let layer = m.mount_point.parent().filter(|d| {
            m.fs_type == "erofs"
                && d.parent() == Some(layers.as_path())
                && m.mount_point.file_name() == Some("root".as_ref())
                && d.join("layer.json").is_file()
                && d.join("image.erofs").is_file()
        });
        let overlay = m.fs_type == "overlay"
            && m.mount_point.file_name() == Some("rootfs".as_ref())
            && m.mount_point.starts_with(root.join("procs"));
        if layer.is_none() && !overlay {
            bad.push(format!(
                "{} mounted on {}",
                m.fs_type,
                m.mount_point.display()
            ));
        }
    }
    bad
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    yaml: PathBuf,
    server: Server,
}

/// Lazily unmount every mount below `dir`, deepest first; whether none is left.
fn unmount_below(dir: &Path) -> bool {
    let mut below = vrun::mounts::mounts_below(dir).unwrap_or_default();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in below {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    vrun::mounts::mounts_below(dir)
        .unwrap_or_default()
        .is_empty()
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !unmount_below(&self.root) {
            eprintln!("cleanup: still mounted below {}", self.root.display());
        }
    }
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("vrun-crash-")
            .tempdir()
            .unwrap();
        let build = build_tarball();
        let image = image_tarball();
        let build_md5 = hex::encode(md5::Md5::digest(&build));
        let server = Server::start(
            [("/build.tgz", build), ("/image.tgz", image)],
            ServerOptions::default(),
        )
        .unwrap();
        let yaml = tmp.path().join("proc.yaml");
        let doc = serde_json::json!({
            "app_name": "crash", "version": "v1", "config_name": "c", "release_hash": "r1",
            "proc_name": "web", "port": 5000, "user": "1000", "group": "1000",
            "build_url": server.url("/build.tgz"), "build_md5": build_md5,
            "image_url": server.url("/image.tgz"), "image_name": "img",
            "env": {"A": "b"}, "settings": {"k": "v"},
        });
        fs::write(&yaml, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        Fixture {
            root: tmp.path().join("vr root"),
            _tmp: tmp,
            yaml,
            server,
        }
    }

    fn setup(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vrun"));
        c.arg("setup")
            .arg(&self.yaml)
            .env("VR_ROOT", &self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        c
    }

    fn throttle(&self, on: bool) {
        for p in ["/build.tgz", "/image.tgz"] {
            let f = Fault::new();
            self.server
                .set_fault(p, if on { f.throttle(THROTTLE) } else { f });
        }
    }

    /// A complete setup at full speed; the tree it produced.
    fn complete(&self) -> BTreeMap<String, String> {
        self.throttle(false);
        let out = self.setup().output().unwrap();
        assert!(
            out.status.success(),
            "setup after a crash failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.tree()
    }

    /// Build layer, image layer and proc files, keyed so two setups can be compared.
    fn tree(&self) -> BTreeMap<String, String> {
        let procs = self.root.join("procs");
        let proc_dir = fs::read_dir(&procs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let state =
            ProcState::load(&proc_dir.join("state.json"), &self.root.join("cache")).unwrap();
        let mut all = BTreeMap::new();
        for (tag, dir) in [
            ("build", state.build_layer.clone().unwrap()),
            ("image", state.image_layer.clone().unwrap()),
            ("upper", proc_dir.join("upper")),
        ] {
            for (k, v) in testkit::tree(&dir) {
                all.insert(format!("{tag}:{k}"), v);
            }
        }
        all.insert(
            "state".into(),
            format!("{:?} {:?}", state.build_layer, state.image_layer),
        );
        all
    }

    /// Start a setup and SIGKILL its process group after `after`.
    fn kill_after(&self, after: Duration) -> &'static str {
        self.throttle(true);
        let mut child = self.setup().spawn().unwrap();
        let started = Instant::now();
        while started.elapsed() < after {
            if let Some(_status) = child.try_wait().unwrap() {
                return "finished before the kill";
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(9) {
            "killed"
        } else {
            "finished before the kill"
        }
    }

    fn wipe(&self, keep_blobs: bool) {
        // setup leaves the proc's overlay mounted: never delete through it.
        assert!(unmount_below(&self.root), "still mounted below the root");
        if !keep_blobs {
            let _ = fs::remove_dir_all(&self.root);
            return;
        }
        let _ = fs::remove_dir_all(self.root.join("procs"));
        for bucket in ["cache/layers-v1", "cache/layers-erofs-v1"] {
            let _ = fs::remove_dir_all(self.root.join(bucket));
            let _ = fs::create_dir(self.root.join(bucket));
        }
    }
}

#[test]
fn kill_9_at_random_points_never_exposes_a_partial_blob_or_layer() {
    let fx = Fixture::new();
    // How long a throttled setup takes: the span the kills are spread over.
    fx.throttle(true);
    let started = Instant::now();
    assert!(fx.setup().status().unwrap().success());
    let clean_time = started.elapsed();
    fx.wipe(true);
    let started = Instant::now();
    assert!(fx.setup().status().unwrap().success());
    let blob_time = started.elapsed();
    fx.wipe(false);
    let clean = fx.complete();
    assert!(
        clean.keys().any(|k| k.starts_with("build:app/lib6/")),
        "{clean:?}"
    );
    let bucket = crate::common::layers_bucket();
    assert_eq!(
        fs::read_dir(fx.root.join("cache").join(bucket))
            .unwrap()
            .count(),
        2,
        "the clean setup's build and image layers are in {bucket}"
    );
    let mut rng = rand::rng();
    let mut killed = 0;
    let mut log = Vec::new();
    let mut round = 0;
    while killed < KILLS {
        round += 1;
        assert!(round < KILLS * 4, "too few kills landed: {log:?}");
        // Most rounds start from nothing (kills land in download + extract + publish);
        // every third keeps the blobs (kills land in extraction from a cached blob).
        let keep_blobs = round % 3 == 0;
        fx.wipe(keep_blobs);
        // Sometimes two kills in a row before the setup that must succeed.
        let kills_this_round = if round % 4 == 0 { 2 } else { 1 };
        for _ in 0..kills_this_round {
            let full = if keep_blobs { blob_time } else { clean_time };
            let span = full.mul_f64(1.1).as_millis().max(50) as u64;
            let at = Duration::from_millis(rng.random_range(5..span));
            let what = fx.kill_after(at);
            log.push(format!(
                "round {round}: {what} at {at:?} (blobs kept: {keep_blobs})"
            ));
            if what == "killed" {
                killed += 1;
            }
            let bad = store_problems(&fx.root.join("cache"));
            assert!(bad.is_empty(), "after kill at {at:?}: {bad:?}\n{log:?}");
            let stale = stale_mounts(&fx.root);
            assert!(stale.is_empty(), "after kill at {at:?}: {stale:?}\n{log:?}");
        }
        let tree = fx.complete();
        let leftovers = fs::read_dir(fx.root.join("cache/ingest-v1"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        log.push(format!(
            "round {round}: recovered; ingest-v1 entries left: {leftovers}"
        ));
        let bad = store_problems(&fx.root.join("cache"));
        assert!(bad.is_empty(), "after recovery: {bad:?}");
        let stale = stale_mounts(&fx.root);
        assert!(stale.is_empty(), "after recovery: {stale:?}");
        if tree != clean {
            let diff: Vec<_> = clean
                .iter()
                .filter(|(k, v)| tree.get(*k) != Some(v))
                .map(|(k, _)| k)
                .chain(tree.keys().filter(|k| !clean.contains_key(*k)))
                .take(10)
                .collect();
            panic!("tree after recovery differs from a clean setup: {diff:?}\n{log:?}");
        }
    }
    eprintln!(
        "{killed} kills in {round} rounds (setup {clean_time:?}, from blobs {blob_time:?}):\n{}",
        log.join("\n")
    );
}
