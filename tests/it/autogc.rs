//! The cache's automatic policy (issue 12, point 10) through the real binary: after setup
//! and teardown, unreferenced layers and blobs beyond the age or size budget go; what a
//! proc uses never does; a busy store is left alone; the hourly stamp keeps it cheap.
//!
//! Velociraptor itself removed builds and images unused for 7 days from `/apps/builds`
//! and `/apps/images` (vr.server `remote.py`, `MAX_BUILD_AGE`); vrun's store is elsewhere,
//! so the runner keeps it bounded itself.

use crate::common;
use crate::common::image;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{ChildGuard, TestDir};
use image::Entry;
use testkit::serve::{Server, ServerOptions};

/// Two different builds (different bytes, so different blobs and layers).
fn serve_builds() -> Server {
    Server::start(
        [
            (
                "/one.tar.gz",
                image::app_build(&[Entry::file("one", "1", 0o644)]),
            ),
            (
                "/two.tar.gz",
                image::app_build(&[Entry::file("two", "2", 0o644)]),
            ),
            (
                "/three.tar.gz",
                image::app_build(&[Entry::file("three", "3", 0o644)]),
            ),
        ],
        ServerOptions::default(),
    )
    .unwrap()
}

/// proc.yaml `<name>.yaml` for build `which` (no image: the host's system dirs).
fn proc_yaml(t: &TestDir, server: &Server, name: &str, which: &str) -> PathBuf {
    let doc = serde_json::json!({
        "app_name": "gc", "version": name, "config_name": "c", "release_hash": "r",
        "proc_name": "web", "port": 5000, "user": "root", "cmd": "true",
        "build_url": server.url(&format!("/{which}.tar.gz")),
    });
    t.write(&format!("{name}.yaml"), &doc.to_string())
}

/// Layers of either storage (directory trees, EROFS images).
fn layers(t: &TestDir) -> Vec<PathBuf> {
    let mut v = dir_entries(&t.root().join("cache/layers-v1"));
    v.extend(dir_entries(&t.root().join("cache/layers-erofs-v1")));
    v.sort();
    v
}

fn blobs(t: &TestDir) -> Vec<PathBuf> {
    dir_entries(&t.root().join("cache/blobs-v1/sha256"))
}

fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The build layer a proc's state.json names (its `layers-v1/<key>` dir).
fn layer_of(t: &TestDir, version: &str) -> PathBuf {
    let state = vrun::state::ProcState::load(
        &t.proc_dir(&format!("gc-{version}-c-r-web-5000"))
            .join("state.json"),
        &t.root().join("cache"),
    )
    .unwrap();
    state.build_layer.unwrap().parent().unwrap().to_owned()
}

/// Set a path's mtime to `days` ago (what "not used for N days" looks like).
fn age(path: &Path, days: u32) {
    let st = Command::new("touch")
        .arg("-m")
        .arg("-d")
        .arg(format!("{days} days ago"))
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn vrun_ok(t: &TestDir, args: &[&Path], env: &[(&str, &str)]) -> String {
    let mut v = t.vrun(args);
    for (k, val) in env {
        v = v.env(k, val);
    }
    let r = v.run();
    r.assert_ok();
    r.stderr
}

#[test]
fn unused_layers_past_the_age_budget_go_and_a_procs_layers_never_do() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let server = serve_builds();
    let t = TestDir::new();
    let (setup, teardown) = (Path::new("setup"), Path::new("teardown"));
    let a = proc_yaml(&t, &server, "a", "one");
    let b = proc_yaml(&t, &server, "b", "two");
    let c = proc_yaml(&t, &server, "c", "three");
    vrun_ok(&t, &[setup, &a], &[]);
    let layer_one = layer_of(&t, "a");
    vrun_ok(&t, &[teardown, &a], &[]);
    // Torn down just now: its layer counts as used now, so it stays for 7 days.
    vrun_ok(&t, &[setup, &b], &[]);
    assert!(layer_one.is_dir());
    // Eight days later (and b's layer even older, but b still uses it).
    let layer_two = layer_of(&t, "b");
    age(&layer_one, 8);
    age(&layer_two, 30);
    for blob in blobs(&t) {
        age(&blob, 8);
    }
    let stderr = vrun_ok(&t, &[setup, &c], &[]);
    assert!(
        stderr.contains(
            "vrun: cache policy (max size 20.00 GiB, max age 7d) removed 3 unused entries"
        ),
        "{stderr}"
    );
    assert!(!layer_one.exists(), "an unused 8-day-old layer was kept");
    assert!(layer_two.is_dir(), "a layer in use by proc b was removed");
    let mut want = vec![layer_of(&t, "c"), layer_two.clone()];
    want.sort();
    assert_eq!(layers(&t), want);
    // Only the blob downloaded just now is left.
    assert_eq!(blobs(&t).len(), 1);
    // b's proc still runs on its layer.
    vrun_ok(&t, &[Path::new("run"), &b], &[]);
}

#[test]
fn the_size_budget_removes_least_recently_used_unreferenced_entries() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let server = serve_builds();
    let t = TestDir::new();
    let (setup, teardown) = (Path::new("setup"), Path::new("teardown"));
    let a = proc_yaml(&t, &server, "a", "one");
    let b = proc_yaml(&t, &server, "b", "two");
    vrun_ok(&t, &[setup, &a], &[]);
    let layer_one = layer_of(&t, "a");
    vrun_ok(&t, &[teardown, &a], &[]);
    // A 1-byte budget: every unreferenced entry goes, the referenced layer stays.
    let stderr = vrun_ok(&t, &[setup, &b], &[("VRUN_CACHE_MAX_SIZE", "1")]);
    assert!(
        stderr.contains("cache policy (max size 1 B, max age 7d) removed"),
        "{stderr}"
    );
    assert!(!layer_one.exists());
    assert_eq!(layers(&t), vec![layer_of(&t, "b")]);
    assert!(blobs(&t).is_empty(), "{:?}", blobs(&t));
    // Switched off: nothing is looked at or removed.
    let before = layers(&t);
    vrun_ok(
        &t,
        &[teardown, &b],
        &[
            ("VRUN_CACHE_MAX_SIZE", "off"),
            ("VRUN_CACHE_MAX_AGE", "off"),
        ],
    );
    assert_eq!(layers(&t), before);
}

#[test]
fn a_busy_store_and_the_hourly_stamp_leave_the_cache_alone() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let server = serve_builds();
    let t = TestDir::new();
    let (setup, teardown) = (Path::new("setup"), Path::new("teardown"));
    let [a, b, c] = [("a", "one"), ("b", "two"), ("c", "three")]
        .map(|(name, build)| proc_yaml(&t, &server, name, build));
    for f in [&a, &b, &c] {
        vrun_ok(&t, &[setup, f], &[]);
    }
    let layer_one = layer_of(&t, "a");
    vrun_ok(&t, &[teardown, &a], &[]);
    age(&layer_one, 8);
    // The last setup (a download) looked at the store just now: within the hour a
    // teardown does not look again, so the 8-day-old layer is still there.
    vrun_ok(&t, &[teardown, &b], &[]);
    assert!(
        layer_one.is_dir(),
        "the policy looked again within the hour"
    );
    // An hour later, but another vrun has the store open (shared, as a setup that is
    // downloading has): the policy skips rather than wait.
    let stamp = t.root().join("cache/autogc-v1.stamp");
    age(&stamp, 1);
    let mut holder = Command::new("flock");
    holder
        .arg("--shared")
        .arg(t.root().join("cache/locks-v1/.store.lock"))
        .args(["sleep", "600"])
        .stdin(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut holder, 0);
    let holder = ChildGuard(holder.spawn().unwrap());
    let lock_path = t.root().join("cache/locks-v1/.store.lock");
    let lock_taken = || {
        // Held by someone iff an exclusive try fails.
        let f = std::fs::File::open(&lock_path).unwrap();
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    };
    common::wait_until(
        "flock to hold the store lock",
        std::time::Duration::from_secs(30),
        lock_taken,
    );
    let stderr = vrun_ok(&t, &[teardown, &c], &[]);
    assert!(!stderr.contains("cache policy"), "{stderr}");
    assert!(layer_one.is_dir(), "the policy ran on a busy store");
    // Free again: the next setup (a layer hit, so only the stale stamp makes it look)
    // removes the layer.
    drop(holder);
    let d = proc_yaml(&t, &server, "d", "two");
    let stderr = vrun_ok(&t, &[setup, &d], &[]);
    assert!(stderr.contains("cache policy"), "{stderr}");
    assert!(!layer_one.exists());
}

#[test]
fn a_bad_budget_is_one_error_line_and_touches_nothing() {
    let _lxc = crate::common::lxc_suite(module_path!());
    let server = serve_builds();
    let t = TestDir::new();
    let a = proc_yaml(&t, &server, "a", "one");
    t.vrun([Path::new("setup"), &a])
        .env("VRUN_CACHE_MAX_AGE", "a week")
        .run()
        .assert_error(&["VRUN_CACHE_MAX_AGE", "a week"]);
    assert!(t.root_entries().is_empty(), "{:?}", t.root_entries());
}
