//! The store against real files and real processes.
//!
//! Concurrency claims are tested across processes: this test binary re-executes itself
//! (`child_process_entry`, dispatched by the `VRUN_CACHE_TEST_CHILD` variable), so locks
//! are held by another process, as in production.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::ChildGuard;

use md5::Md5;
use sha2::{Digest, Sha256};
use vrun_cache::{
    BlobDigest, EntryKind, GcOptions, Ingest, LayerKey, LayerKind, LayerStorage, References, Store,
    StoreError, TreeStats, UrlRecord,
};

const CHILD_ENV: &str = "VRUN_CACHE_TEST_CHILD";

/// Writes `bytes` as the ingest's download and returns their digest.
fn download(ingest: &Ingest, bytes: &[u8]) -> BlobDigest {
    std::fs::write(ingest.blob_path(), bytes).unwrap();
    BlobDigest {
        sha256: hex::encode(Sha256::digest(bytes)),
        md5: hex::encode(Md5::digest(bytes)),
        size: bytes.len() as u64,
    }
}

/// Fills a staging dir with a small tree.
fn fill_tree(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir.join("app/bin")).unwrap();
    std::fs::write(dir.join("app/Procfile"), format!("web: run {tag}\n")).unwrap();
    std::fs::write(dir.join("app/bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        dir.join("app/bin/run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/run", dir.join("app/run")).unwrap();
    for i in 0..50 {
        std::fs::write(dir.join(format!("app/f{i}")), vec![b'x'; i * 100]).unwrap();
    }
}

fn publish_blob_bytes(store: &Store, bytes: &[u8], url: Option<&str>) -> BlobDigest {
    let ingest = store.new_ingest().unwrap();
    let d = download(&ingest, bytes);
    let rec = url.map(|u| UrlRecord {
        url: u.into(),
        url_sha256: None,
        sha256: String::new(),
        etag: Some("\"e1\"".into()),
        last_modified: None,
        size: 0,
    });
    store.publish_blob(&ingest, &d, rec.as_ref()).unwrap();
    d
}

fn publish_layer(store: &Store, sha: &str, kind: LayerKind, uid: u32) -> (LayerKey, PathBuf) {
    let key = LayerKey::new(sha, kind, uid, uid);
    let ingest = store.new_ingest().unwrap();
    fill_tree(ingest.staging_dir(), sha);
    let root = store.publish_layer(&key, ingest.staging_dir()).unwrap();
    (key, root)
}

fn ingest_names(cache: &Path) -> Vec<String> {
    names(&cache.join("ingest-v1"))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn spawn_child(role: &str, args: &[&str]) -> ChildGuard {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .env("CHILD_ARGS", args.join("\n"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Waits (without a deadline: the test harness's own timeout applies) for a file.
fn wait_for(path: &Path) {
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(mut c: ChildGuard) {
    let status = c.0.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
}

/// Entry point of the child processes the tests spawn. When the variable is unset (a
/// normal test run) there is nothing to do.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let args: Vec<String> = std::env::var("CHILD_ARGS")
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let cache = Path::new(&args[0]);
    match role.as_str() {
        // Lock a key, say so, wait for permission, then do the work and exit.
        "lock-then-work" => {
            let store = Store::open(cache).unwrap();
            let _lock = store.lock(&args[1]).unwrap();
            std::fs::write(&args[2], b"locked").unwrap();
            wait_for(Path::new(&args[3]));
            publish_blob_bytes(&store, args[4].as_bytes(), None);
        }
        // Build a staging tree, wait for the start signal, publish without any lock.
        "race-publish" => {
            let store = Store::open(cache).unwrap();
            let key = LayerKey::new(&args[1], LayerKind::Build, 1000, 1000);
            let ingest = store.new_ingest().unwrap();
            fill_tree(ingest.staging_dir(), &args[1]);
            std::fs::write(&args[2], b"ready").unwrap();
            wait_for(Path::new(&args[3]));
            let root = store.publish_layer(&key, ingest.staging_dir()).unwrap();
            std::fs::write(&args[4], root.to_str().unwrap()).unwrap();
        }
        // Hold the store exclusively (like gc) until told to stop.
        "hold-exclusive" => {
            let _store = Store::open_exclusive(cache).unwrap();
            std::fs::write(&args[1], b"ready").unwrap();
            wait_for(Path::new(&args[2]));
        }
        // Mid-setup: hold a key lock and a half-written ingest, then hang until killed.
        "killed-mid-publish" => {
            let store = Store::open(cache).unwrap();
            let _lock = store.lock(&args[1]).unwrap();
            let ingest = store.new_ingest().unwrap();
            std::fs::write(ingest.blob_path(), b"half of it").unwrap();
            fill_tree(ingest.staging_dir(), "half");
            std::fs::write(&args[2], b"ready").unwrap();
            loop {
                std::thread::park();
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn publish_and_lookup_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();

    let tag = std::fs::read_to_string(cache.join("CACHEDIR.TAG")).unwrap();
    assert!(tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55\n"));
    assert_eq!(
        std::fs::read_to_string(cache.join("VERSION"))
            .unwrap()
            .trim(),
        "1"
    );

    let url = "http://127.0.0.1:1/builds/app.tar.gz";
    let d = publish_blob_bytes(&store, b"tarball bytes", Some(url));
    let blob = store.blob(&d.sha256).expect("published blob found");
    assert_eq!(blob, store.dir().join("blobs-v1/sha256").join(&d.sha256));
    assert_eq!(std::fs::read(&blob).unwrap(), b"tarball bytes");
    assert_eq!(
        std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
        0o444
    );

    assert_eq!(store.lookup_md5(&d.md5).as_deref(), Some(d.sha256.as_str()));
    assert_eq!(
        store.lookup_md5(&d.md5.to_uppercase()).as_deref(),
        Some(d.sha256.as_str())
    );
    assert_eq!(store.lookup_md5(&"0".repeat(32)), None);
    let rec = store.lookup_url(url).expect("url recorded");
    assert_eq!(
        (rec.sha256.as_str(), rec.size, rec.etag.as_deref()),
        (d.sha256.as_str(), 13, Some("\"e1\""))
    );
    assert_eq!(store.lookup_url("http://127.0.0.1:1/other.tar.gz"), None);

    let (key, root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    assert_eq!(store.layer(&key), Some(root.clone()));
    assert_eq!(
        std::fs::read_link(root.join("app/run")).unwrap(),
        Path::new("bin/run")
    );
    let meta = store.layer_meta(&key).unwrap();
    assert_eq!(
        (meta.stats.files, meta.stats.symlinks, meta.stats.dirs),
        (52, 1, 3)
    );
    // Another owner is another layer.
    assert_eq!(
        store.layer(&LayerKey::new(&d.sha256, LayerKind::Build, 1001, 1001)),
        None
    );
    assert_eq!(
        store.layer(&LayerKey::new(&d.sha256, LayerKind::Image, 1000, 1000)),
        None
    );

    // Publishing the same key again keeps the first and discards the new staging.
    let ingest = store.new_ingest().unwrap();
    fill_tree(ingest.staging_dir(), "second");
    assert_eq!(
        store.publish_layer(&key, ingest.staging_dir()).unwrap(),
        root
    );
    assert!(!ingest.staging_dir().exists());
    assert!(std::fs::read_to_string(root.join("app/Procfile"))
        .unwrap()
        .contains(&d.sha256));
    drop(ingest);
    assert!(
        ingest_names(&cache).is_empty(),
        "{:?}",
        ingest_names(&cache)
    );
}

#[test]
fn ingest_is_removed_on_drop_and_never_read() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let ingest = store.new_ingest().unwrap();
    let d = download(&ingest, b"half a download");
    fill_tree(ingest.staging_dir(), "x");
    let dir = ingest.dir().to_owned();
    assert!(dir.starts_with(store.dir().join("ingest-v1")));
    // In flight: nothing is visible under published names.
    assert_eq!(store.blob(&d.sha256), None);
    assert_eq!(store.lookup_md5(&d.md5), None);
    drop(ingest);
    assert!(!dir.exists());

    // A killed process's leftover, even one named like a blob, is never read.
    let leftover = store.dir().join("ingest-v1/123-dead");
    std::fs::create_dir_all(leftover.join("staging")).unwrap();
    std::fs::write(leftover.join(&d.sha256), b"half a download").unwrap();
    assert_eq!(store.blob(&d.sha256), None);
    assert_eq!(
        store.layer(&LayerKey::new(&d.sha256, LayerKind::Build, 0, 0)),
        None
    );
}

#[test]
fn corrupt_entries_are_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let url = "http://127.0.0.1:1/a.tar";
    let d = publish_blob_bytes(&store, b"abc", Some(url));
    std::fs::write(
        store.dir().join("index-v1/md5").join(&d.md5),
        b"not a sha\n",
    )
    .unwrap();
    assert_eq!(store.lookup_md5(&d.md5), None);
    let url_file = store
        .dir()
        .join("index-v1/url")
        .join(vrun_cache::sha256_hex(url.as_bytes()));
    std::fs::write(&url_file, b"{\"url\": 3").unwrap();
    assert_eq!(store.lookup_url(url), None);
    // A well-formed record for another URL under this URL's name is a miss too.
    let other = UrlRecord {
        url: "http://elsewhere/".into(),
        url_sha256: None,
        sha256: d.sha256.clone(),
        etag: None,
        last_modified: None,
        size: 3,
    };
    std::fs::write(&url_file, serde_json::to_vec(&other).unwrap()).unwrap();
    assert_eq!(store.lookup_url(url), None);
    // Path-like queries are refused, not resolved.
    assert_eq!(store.blob("../../etc/passwd"), None);
    assert!(matches!(
        store.publish_blob(
            &store.new_ingest().unwrap(),
            &BlobDigest {
                sha256: "../x".into(),
                ..d.clone()
            },
            None
        ),
        Err(StoreError::BadDigest { .. })
    ));

    // A layer dir without its marker is not a layer; publishing replaces it.
    let key = LayerKey::new(&d.sha256, LayerKind::Image, 0, 0);
    let broken = store.dir().join("layers-v1").join(key.dir_name());
    std::fs::create_dir_all(broken.join("root/etc")).unwrap();
    assert_eq!(store.layer(&key), None);
    let (_, root) = publish_layer(&store, &d.sha256, LayerKind::Image, 0);
    assert!(root.join("app/Procfile").exists());
    assert_eq!(store.layer(&key), Some(root));
    assert_eq!(names(&store.dir().join("quarantine-v1")).len(), 1);
}

#[test]
fn future_layout_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("VERSION"), "2\n").unwrap();
    let err = Store::open(tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::FutureLayout {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&tmp.path().join("VERSION").display().to_string()),
        "{msg}"
    );
    assert_eq!(names(tmp.path()), ["VERSION"], "nothing created");

    std::fs::write(tmp.path().join("VERSION"), "two\n").unwrap();
    assert!(matches!(
        Store::open(tmp.path()),
        Err(StoreError::BadLayoutMarker { .. })
    ));
    assert_eq!(names(tmp.path()), ["VERSION"]);

    // An older layout: its buckets are ignored, never read; the marker is upgraded.
    std::fs::write(tmp.path().join("VERSION"), "0\n").unwrap();
    let old_sha = vrun_cache::sha256_hex(b"old");
    std::fs::create_dir_all(tmp.path().join("blobs-v0/sha256")).unwrap();
    std::fs::write(tmp.path().join("blobs-v0/sha256").join(&old_sha), b"old").unwrap();
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.blob(&old_sha), None);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("VERSION"))
            .unwrap()
            .trim(),
        "1"
    );
}

#[test]
fn key_lock_excludes_another_process_then_recheck_finds_the_work_done() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();
    let locked = tmp.path().join("locked");
    let go = tmp.path().join("go");
    let content = "built by the other process";
    let key = vrun_cache::url_lock_key("http://127.0.0.1:1/app.tar.gz");
    let child = spawn_child(
        "lock-then-work",
        &[
            cache.to_str().unwrap(),
            &key,
            locked.to_str().unwrap(),
            go.to_str().unwrap(),
            content,
        ],
    );
    wait_for(&locked);
    assert!(
        store.try_lock(&key).unwrap().is_none(),
        "the other process holds the key"
    );
    let md5 = hex::encode(Md5::digest(content.as_bytes()));
    assert_eq!(store.lookup_md5(&md5), None);
    std::fs::write(&go, b"").unwrap();
    let _lock = store.lock(&key).unwrap(); // blocks until the child has published and exited
    let sha = store
        .lookup_md5(&md5)
        .expect("re-check under the lock finds the work done");
    assert!(store.blob(&sha).is_some());
    finish(child);
}

#[test]
fn store_lock_makes_setups_wait_for_maintenance() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Store::open(tmp.path()).unwrap());
    // Another process holds the store exclusively, as gc does.
    let ready = tmp.path().join("ready");
    let release = tmp.path().join("release");
    let holder = spawn_child(
        "hold-exclusive",
        &[
            tmp.path().to_str().unwrap(),
            ready.to_str().unwrap(),
            release.to_str().unwrap(),
        ],
    );
    wait_for(&ready);
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = tmp.path().to_owned();
    let opener = std::thread::spawn(move || {
        Store::open_with(&dir, false, |_| tx.send(()).unwrap()).map(|_| ())
    });
    rx.recv().expect("open reports that it waits");
    assert!(!opener.is_finished());
    // The holder finishes: the waiting open proceeds.
    std::fs::write(&release, b"").unwrap();
    opener.join().unwrap().unwrap();
    finish(holder);

    // Maintenance needs the exclusive lock.
    let shared = Store::open(tmp.path()).unwrap();
    assert!(matches!(
        shared.gc(&GcOptions::default(), &References::new()),
        Err(StoreError::NotExclusive { .. })
    ));
    assert!(matches!(
        shared.verify(false),
        Err(StoreError::NotExclusive { .. })
    ));
}

#[test]
fn two_processes_racing_to_publish_one_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();
    let sha = vrun_cache::sha256_hex(b"race");
    let go = tmp.path().join("go");
    let mut children = Vec::new();
    for i in 0..2 {
        let ready = tmp.path().join(format!("ready{i}"));
        let out = tmp.path().join(format!("out{i}"));
        children.push((
            spawn_child(
                "race-publish",
                &[
                    cache.to_str().unwrap(),
                    &sha,
                    ready.to_str().unwrap(),
                    go.to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            ),
            ready,
            out,
        ));
    }
    for (_, ready, _) in &children {
        wait_for(ready);
    }
    std::fs::write(&go, b"").unwrap();
    let mut roots = BTreeSet::new();
    for (child, _, out) in children {
        finish(child);
        roots.insert(std::fs::read_to_string(out).unwrap());
    }
    let key = LayerKey::new(&sha, LayerKind::Build, 1000, 1000);
    let root = store.layer(&key).expect("layer published");
    assert_eq!(
        roots.into_iter().collect::<Vec<_>>(),
        [root.to_str().unwrap().to_owned()]
    );
    assert_eq!(names(&cache.join("layers-v1")), [key.dir_name()]);
    assert!(
        ingest_names(&cache).is_empty(),
        "{:?}",
        ingest_names(&cache)
    );
    assert!(names(&cache.join("quarantine-v1")).is_empty());
    drop(store);
    let report = Store::open_exclusive(&cache).unwrap().verify(true).unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
}

/// Sets an entry's last use to `days` ago with coreutils touch.
fn age(path: &Path, days: u64) {
    let secs = vrun_now() - days * 86400;
    let status = Command::new("touch")
        .arg("-h")
        .arg("-m")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn vrun_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn gc_removes_least_recently_used_unreferenced_entries_within_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();
    let a = publish_blob_bytes(&store, &vec![b'a'; 40_000], Some("http://h/a.tar"));
    let b = publish_blob_bytes(&store, &vec![b'b'; 40_000], None);
    let c = publish_blob_bytes(&store, &vec![b'c'; 40_000], None);
    let (la, la_root) = publish_layer(&store, &a.sha256, LayerKind::Build, 1000);
    let (lb, _) = publish_layer(&store, &b.sha256, LayerKind::Build, 1000);
    drop(store.lock(&lb.lock_key()).unwrap());
    assert_eq!(names(&cache.join("locks-v1")).len(), 2);
    // Ages: blob a 9 days, layer a 8 (oldest layer, but referenced), blob b 7, layer b 6,
    // blob c 1 (newest).
    let layer_dir = |k: &LayerKey| cache.join("layers-v1").join(k.dir_name());
    age(&cache.join("blobs-v1/sha256").join(&a.sha256), 9);
    age(&layer_dir(&la), 8);
    age(&cache.join("blobs-v1/sha256").join(&b.sha256), 7);
    age(&layer_dir(&lb), 6);
    age(&cache.join("blobs-v1/sha256").join(&c.sha256), 1);
    // Ingest dirs: one a killed setup left (nobody holds its flock: it goes, whatever
    // its age), one a live process holds (stays).
    let old_ingest = cache.join("ingest-v1/1-old");
    std::fs::create_dir_all(&old_ingest).unwrap();
    std::fs::write(old_ingest.join("blob"), b"partial").unwrap();
    let live_ingest = cache.join("ingest-v1/2-live");
    std::fs::create_dir_all(&live_ingest).unwrap();
    let live = std::fs::File::open(&live_ingest).unwrap();
    // SAFETY: flock on a valid fd.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&live), libc::LOCK_EX) },
        0
    );
    let torn_index_write = cache.join("index-v1/md5/.tmp-1-dead");
    std::fs::write(&torn_index_write, b"3f").unwrap();

    let mut refs = References::new();
    refs.add(&la_root, "app-v1-prod-abc-web-5000");
    let entries = store.entries(&refs).unwrap();
    assert_eq!(entries.len(), 5);
    let size_of = |key: &str| entries.iter().find(|e| e.key == key).unwrap().size;
    let used: Vec<_> = entries
        .iter()
        .filter(|e| !e.used_by.is_empty())
        .map(|e| e.key.clone())
        .collect();
    assert_eq!(used, [la.dir_name()]);
    drop(store);

    // Budget: room for the referenced layer and blob c only.
    let budget = size_of(&la.dir_name()) + size_of(&c.sha256);
    let store = Store::open_exclusive(&cache).unwrap();
    let opts = GcOptions {
        budget: Some(budget),
        older_than: None,
        dry_run: true,
        keep_partials_for: None,
    };
    let dry = store.gc(&opts, &refs).unwrap();
    let removed: Vec<_> = dry.removed.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        removed,
        [a.sha256.clone(), b.sha256.clone(), lb.dir_name()],
        "LRU order, referenced kept"
    );
    assert_eq!(
        store.entries(&refs).unwrap().len(),
        5,
        "dry run removes nothing"
    );
    assert!(old_ingest.exists());

    let report = store
        .gc(
            &GcOptions {
                dry_run: false,
                ..opts
            },
            &refs,
        )
        .unwrap();
    assert_eq!(report.removed, dry.removed);
    assert_eq!(report.leftovers.len(), 1);
    assert_eq!(report.leftovers[0].path, old_ingest);
    assert!(live_ingest.exists(), "a held ingest dir stays");
    drop(live);
    let left: Vec<_> = store
        .entries(&refs)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(left, [la.dir_name(), c.sha256.clone()]);
    assert!(store.layer(&la).is_some());
    assert_eq!(
        store.lookup_md5(&b.md5),
        None,
        "index entries of removed blobs go too"
    );
    assert_eq!(
        store.lookup_md5(&a.md5).as_deref(),
        Some(&*a.sha256),
        "unless a layer of that blob is still there: the index is how setup finds it"
    );
    assert_eq!(names(&cache.join("ingest-v1")), ["2-live"]);
    assert!(!torn_index_write.exists());
    assert_eq!(
        names(&cache.join("locks-v1")),
        [".store.lock"],
        "idle key locks go"
    );
    assert!(report.kept_bytes <= budget);

    // --older-than: blob c (1 day) stays under a 2-day threshold; nothing else may go.
    let report = store
        .gc(
            &GcOptions {
                budget: None,
                older_than: Some(Duration::from_secs(2 * 86400)),
                dry_run: false,
                keep_partials_for: None,
            },
            &refs,
        )
        .unwrap();
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    // No criteria: every unreferenced entry goes, the referenced layer stays.
    let report = store.gc(&GcOptions::default(), &refs).unwrap();
    assert_eq!(
        report.removed.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EntryKind::Blob]
    );
    assert!(store.layer(&la).is_some());
}

#[test]
fn verify_finds_flipped_byte_and_deleted_file_and_quarantines_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();
    let good = publish_blob_bytes(&store, b"good blob", None);
    let bad = publish_blob_bytes(&store, b"bad blob!", Some("http://h/bad.tar"));
    let (good_layer, _) = publish_layer(&store, &good.sha256, LayerKind::Build, 0);
    let (bad_layer, bad_root) = publish_layer(&store, &bad.sha256, LayerKind::Build, 0);
    drop(store);

    let store = Store::open_exclusive(&cache).unwrap();
    let clean = store.verify(true).unwrap();
    assert!(clean.bad.is_empty(), "{:?}", clean.bad);
    assert_eq!((clean.blobs_checked, clean.layers_checked), (2, 2));

    // Flip one byte of a blob (as root; the file is 0444) and delete a file of a layer.
    let blob = cache.join("blobs-v1/sha256").join(&bad.sha256);
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[3] ^= 0x01;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    std::fs::remove_file(bad_root.join("app/f7")).unwrap();

    // Shallow verify: the blob is caught; the layer's marker and manifest are intact.
    let shallow = store.verify(false).unwrap();
    assert_eq!(shallow.bad.len(), 1, "{:?}", shallow.bad);
    assert_eq!(shallow.bad[0].kind, "blob");
    assert!(
        shallow.bad[0].problems[0].contains("sha256 mismatch"),
        "{:?}",
        shallow.bad[0]
    );
    assert!(shallow.bad[0].quarantined_to.as_ref().unwrap().exists());
    assert_eq!(
        store.blob(&bad.sha256),
        None,
        "quarantined: the next setup refetches"
    );

    let deep = store.verify(true).unwrap();
    assert_eq!(deep.bad.len(), 1, "{:?}", deep.bad);
    assert_eq!(deep.bad[0].kind, "layer");
    assert_eq!(deep.bad[0].key, bad_layer.dir_name());
    assert_eq!(deep.bad[0].problems, ["missing app/f7"]);
    assert_eq!(store.layer(&bad_layer), None);
    assert!(store.layer(&good_layer).is_some());
    assert!(store.blob(&good.sha256).is_some());
    assert!(store.verify(true).unwrap().bad.is_empty());

    // A wrong md5 index entry (the blob itself is sound) is reported and removed.
    std::fs::write(
        cache.join("index-v1/md5").join("0".repeat(32)),
        format!("{}\n", good.sha256),
    )
    .unwrap();
    let report = store.verify(false).unwrap();
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    assert_eq!(report.bad[0].kind, "md5-index");
    assert_eq!(store.lookup_md5(&"0".repeat(32)), None);
    assert_eq!(
        store.lookup_md5(&good.md5).as_deref(),
        Some(good.sha256.as_str())
    );
}

#[test]
fn rehash_before_reuse_quarantines_a_damaged_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let d = publish_blob_bytes(&store, b"reuse me", None);
    assert!(store
        .rehash_blob(&d.sha256, Some(&d.md5.to_uppercase()))
        .unwrap());
    assert!(!store.rehash_blob(&d.sha256, Some(&"1".repeat(32))).unwrap());
    assert!(store.blob(&d.sha256).is_some(), "an intact blob stays");

    let blob = store.blob(&d.sha256).unwrap();
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, b"reuse mE").unwrap();
    assert!(!store.rehash_blob(&d.sha256, Some(&d.md5)).unwrap());
    assert_eq!(
        store.blob(&d.sha256),
        None,
        "damaged blob quarantined: refetch"
    );
    assert!(!store.rehash_blob(&d.sha256, None).unwrap());
}

#[test]
fn kill_9_mid_publish_leaves_no_stale_lock_and_nothing_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let ready = tmp.path().join("ready");
    let sha = vrun_cache::sha256_hex(b"half of it");
    let key = LayerKey::new(&sha, LayerKind::Build, 1000, 1000);
    let mut child = spawn_child(
        "killed-mid-publish",
        &[
            cache.to_str().unwrap(),
            &key.lock_key(),
            ready.to_str().unwrap(),
        ],
    );
    wait_for(&ready);
    let store = Store::open(&cache).unwrap();
    assert!(store.try_lock(&key.lock_key()).unwrap().is_none());
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();

    let _lock = store
        .try_lock(&key.lock_key())
        .unwrap()
        .expect("the kernel released the dead holder's lock");
    assert_eq!(ingest_names(&cache).len(), 1, "the leftover is there...");
    assert_eq!(store.blob(&sha), None, "...but never read");
    assert_eq!(store.layer(&key), None);
    let (_, root) = publish_layer(&store, &sha, LayerKind::Build, 1000);
    assert_eq!(store.layer(&key), Some(root));
}

#[test]
fn shallow_manifest_still_catches_structural_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let sha = vrun_cache::sha256_hex(b"shallow");
    let key = LayerKey::new(&sha, LayerKind::Image, 0, 0);
    let ingest = store.new_ingest().unwrap();
    fill_tree(ingest.staging_dir(), "shallow");
    let root = store
        .publish_layer_with(
            &key,
            ingest.staging_dir(),
            vrun_cache::ManifestMode::Shallow,
        )
        .unwrap();
    assert!(!store.layer_meta(&key).unwrap().content_hashed);
    drop(store);
    let store = Store::open_exclusive(tmp.path()).unwrap();
    assert!(store.verify(true).unwrap().bad.is_empty());
    std::fs::set_permissions(
        root.join("app/bin/run"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let report = store.verify(true).unwrap();
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    assert_eq!(
        report.bad[0].problems,
        ["changed app/bin/run: mode 755 → 777"]
    );
}

/// An EROFS image of a small tree, made by Debian's `mkfs.erofs` (the store only moves
/// and hashes it; vrun's own writer is tested in the root crate), and its sha256.
fn erofs_image(dir: &Path, tag: &str) -> (PathBuf, String) {
    let tree = dir.join(format!("tree-{tag}"));
    fill_tree(&tree, tag);
    let image = dir.join(format!("{tag}.erofs"));
    let out = Command::new("mkfs.erofs")
        .arg(&image)
        .arg(&tree)
        .output()
        .expect("mkfs.erofs (erofs-utils) runs");
    assert!(out.status.success(), "{out:?}");
    let sha = hex::encode(Sha256::digest(std::fs::read(&image).unwrap()));
    (image, sha)
}

fn publish_image(store: &Store, sha: &str, tag: &str) -> (LayerKey, PathBuf, String) {
    let key = LayerKey::new(sha, LayerKind::Build, 1000, 1000).stored_as(LayerStorage::Erofs);
    let ingest = store.new_ingest().unwrap();
    let (image, image_sha) = erofs_image(ingest.dir(), tag);
    std::fs::rename(&image, ingest.image_path()).unwrap();
    let stats = TreeStats {
        files: 52,
        ..TreeStats::default()
    };
    let root = store
        .publish_image_layer(&key, &ingest.image_path(), &image_sha, stats)
        .unwrap();
    (key, root, image_sha)
}

/// Mounts an image read-only through util-linux (a loop device): the store must cope
/// with however vrun mounted it.
fn mount_ro(image: &Path, on: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(image)
        .arg(on)
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts whatever a test left mounted under `dir`, even when it failed.
struct UnmountAll(PathBuf);

impl Drop for UnmountAll {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in text.lines().rev() {
            if let Some(point) = line.split(' ').nth(4) {
                if Path::new(point).starts_with(&self.0) {
                    let _ = Command::new("umount").arg("-l").arg(point).status();
                }
            }
        }
    }
}

#[test]
fn erofs_layer_is_published_as_one_file_beside_dir_layers_of_the_same_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let store = Store::open(&cache).unwrap();
    let d = publish_blob_bytes(&store, b"erofs build", None);
    let (dir_key, dir_root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    let (key, root, image_sha) = publish_image(&store, &d.sha256, "one");
    assert_ne!(key, dir_key, "the storage is part of the key");
    assert_eq!(
        key.dir_name(),
        format!("build-{}-1000-1000.erofs", d.sha256)
    );
    assert_eq!(LayerKey::parse(&key.dir_name()), Some(key.clone()));
    assert_eq!(LayerKey::from_root(&root), Some(key.clone()));
    assert_eq!(LayerKey::from_root(&dir_root), Some(dir_key.clone()));
    let dir = cache.join("layers-erofs-v1").join(key.dir_name());
    assert_eq!(root, dir.join("root"));
    assert_eq!(names(&dir), ["image.erofs", "layer.json", "root"]);
    assert!(names(&root).is_empty(), "the mount point is empty");
    let image = store.layer_image(&key);
    assert_eq!(
        std::fs::metadata(&image).unwrap().permissions().mode() & 0o777,
        0o444
    );
    let meta = store.layer_meta(&key).unwrap();
    assert_eq!(meta.key.storage, LayerStorage::Erofs);
    assert_eq!(meta.image_sha256.as_deref(), Some(image_sha.as_str()));
    let json = std::fs::read_to_string(dir.join("layer.json")).unwrap();
    assert!(json.contains("\"storage\": \"erofs\""), "{json}");
    assert_eq!(store.layer(&key), Some(root.clone()));
    assert!(
        ingest_names(&cache).is_empty(),
        "{:?}",
        ingest_names(&cache)
    );
    // A directory tree cannot be published under an EROFS key, nor an image under a
    // directory key.
    let ingest = store.new_ingest().unwrap();
    assert!(matches!(
        store.publish_layer(&key, ingest.staging_dir()),
        Err(StoreError::WrongStorage { .. })
    ));
    let entries = store.entries(&References::new()).unwrap();
    let e = entries.iter().find(|e| e.key == key.dir_name()).unwrap();
    assert_eq!(e.storage, Some(LayerStorage::Erofs));
    assert_eq!(e.path, root);
    let image_blocks = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(e.size >= image_blocks, "{} < {image_blocks}", e.size);
    // Missing image: not a layer any more.
    std::fs::remove_file(&image).unwrap();
    assert_eq!(store.layer(&key), None);
}

#[test]
fn gc_unmounts_an_unreferenced_erofs_layer_and_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let _cleanup = UnmountAll(tmp.path().to_owned());
    let store = Store::open(&cache).unwrap();
    let a = publish_blob_bytes(&store, b"build a", None);
    let b = publish_blob_bytes(&store, b"build b", None);
    let (ka, root_a, _) = publish_image(&store, &a.sha256, "a");
    let (kb, root_b, _) = publish_image(&store, &b.sha256, "b");
    assert!(
        mount_ro(&store.layer_image(&ka), &root_a),
        "mount -t erofs -o ro,loop (needs root and a kernel with EROFS)"
    );
    assert!(mount_ro(&store.layer_image(&kb), &root_b));
    assert!(vrun_cache::is_mounted(&root_a) && vrun_cache::is_mounted(&root_b));
    assert!(root_a.join("app/Procfile").is_file());
    // b is in use by a proc: it stays, mounted. a goes: unmounted first, then removed.
    let mut refs = References::new();
    refs.add(&root_b, "proc-b");
    drop(store);
    let store = Store::open_exclusive(&cache).unwrap();
    let report = store.gc(&GcOptions::default(), &refs).unwrap();
    let removed: Vec<&str> = report.removed.iter().map(|e| e.key.as_str()).collect();
    assert!(removed.contains(&ka.dir_name().as_str()), "{removed:?}");
    assert!(!removed.contains(&kb.dir_name().as_str()), "{removed:?}");
    assert!(!root_a.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&ka.dir_name()),
        "the removed layer is not mounted anywhere"
    );
    assert!(vrun_cache::is_mounted(&root_b));
    assert!(root_b.join("app/Procfile").is_file());
    assert!(
        ingest_names(&cache).is_empty(),
        "{:?}",
        ingest_names(&cache)
    );
}

#[test]
fn verify_deep_checks_an_erofs_image_by_its_recorded_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let _cleanup = UnmountAll(tmp.path().to_owned());
    let store = Store::open(&cache).unwrap();
    let a = publish_blob_bytes(&store, b"build a", None);
    let b = publish_blob_bytes(&store, b"build b", None);
    let (ka, root_a, image_sha) = publish_image(&store, &a.sha256, "a");
    let (kb, _, _) = publish_image(&store, &b.sha256, "b");
    assert!(mount_ro(&store.layer_image(&ka), &root_a));
    drop(store);
    let report = Store::open_exclusive(&cache).unwrap().verify(true).unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.layers_checked, 2);
    // One flipped byte in the middle of the image (file data, not the superblock): the
    // shallow check cannot see it, the deep one can.
    let image = cache
        .join("layers-erofs-v1")
        .join(ka.dir_name())
        .join("image.erofs");
    let mut bytes = std::fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&image, &bytes).unwrap();
    let shallow = Store::open_exclusive(&cache)
        .unwrap()
        .verify(false)
        .unwrap();
    assert!(shallow.bad.is_empty(), "{:?}", shallow.bad);
    let deep = Store::open_exclusive(&cache).unwrap().verify(true).unwrap();
    assert_eq!(deep.bad.len(), 1, "{:?}", deep.bad);
    assert_eq!(deep.bad[0].key, ka.dir_name());
    assert!(
        deep.bad[0].problems[0].starts_with(&format!(
            "image sha256 mismatch: expected {image_sha}, got "
        )),
        "{:?}",
        deep.bad[0].problems
    );
    // Quarantined, unmounted first; the intact layer is untouched.
    assert!(!root_a.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ka.dir_name()), "{mounts}");
    let store = Store::open(&cache).unwrap();
    assert_eq!(store.layer(&ka), None);
    assert!(store.layer(&kb).is_some());
}
