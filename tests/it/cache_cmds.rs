//! `vrun cache ls | gc | verify` over a real store and real proc state files.
//!
//! `src/commands/cache.rs` is compiled into this test as-is (it only uses `vrun::`
//! paths). The concurrency test runs a "setup" in another process: this binary
//! re-executes itself (`child_process_entry`, selected by `VRUN_CACHE_CMDS_CHILD`).

#[allow(dead_code)]
#[path = "../../src/commands/cache.rs"]
mod cache_cmd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::ChildGuard;

use md5::Md5;
use sha2::{Digest, Sha256};
use vrun::paths::Root;
use vrun::state::ProcState;
use vrun_cache::{BlobDigest, LayerKey, LayerKind, Store, UrlRecord};

use cache_cmd::GcArgs;

const CHILD_ENV: &str = "VRUN_CACHE_CMDS_CHILD";

fn publish_blob(store: &Store, bytes: &[u8], url: &str) -> BlobDigest {
    let ingest = store.new_ingest().unwrap();
    std::fs::write(ingest.blob_path(), bytes).unwrap();
    let d = BlobDigest {
        sha256: hex::encode(Sha256::digest(bytes)),
        md5: hex::encode(Md5::digest(bytes)),
        size: bytes.len() as u64,
    };
    let rec = UrlRecord {
        url: url.into(),
        url_sha256: None,
        sha256: d.sha256.clone(),
        etag: None,
        last_modified: None,
        size: d.size,
    };
    store.publish_blob(&ingest, &d, Some(&rec)).unwrap();
    d
}

fn publish_layer(store: &Store, sha: &str, kind: LayerKind, uid: u32) -> (LayerKey, PathBuf) {
    let key = LayerKey::new(sha, kind, uid, uid);
    let ingest = store.new_ingest().unwrap();
    let app = ingest.staging_dir().join("app");
    std::fs::create_dir_all(&app).unwrap();
    for i in 0..20 {
        std::fs::write(app.join(format!("file{i}")), vec![b'z'; 1000 * i]).unwrap();
    }
    let root = store.publish_layer(&key, ingest.staging_dir()).unwrap();
    (key, root)
}

/// A proc dir whose state file references `build` (and `image`).
fn set_up_proc(root: &Root, name: &str, build: &Path, image: Option<&Path>) {
    let proc = root.proc(name);
    std::fs::create_dir_all(&proc.dir).unwrap();
    let store = root.cache_dir();
    let key = |layer: &Path| vrun_cache::layout::layer_key_of_root(&store, layer).unwrap();
    ProcState::new(&store, Some(key(build)), image.map(key), 1000, 1000)
        .save(&proc.state())
        .unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn wait_for(path: &Path) {
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Entry point of the "setup" child process; nothing to do in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    assert_eq!(role, "setup");
    let args: Vec<String> = std::env::var("CHILD_ARGS")
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let root = Root::new(&args[0]);
    // Like setup: open the store (shared), publish a layer, then, a moment later, record
    // it in the proc's state file; only then let go of the store.
    let store = Store::open(&root.cache_dir()).unwrap();
    let d = publish_blob(&store, b"the concurrent build", "http://127.0.0.1:1/c.tar");
    let (_, layer) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    std::fs::write(&args[1], b"published").unwrap();
    wait_for(Path::new(&args[2]));
    set_up_proc(&root, "concurrent-proc", &layer, None);
    drop(store);
}

#[test]
fn ls_json_parses_and_matches_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::new(tmp.path());
    let store = Store::open(&root.cache_dir()).unwrap();
    let build = publish_blob(&store, &vec![b'b'; 30_000], "http://127.0.0.1:1/app.tar.gz");
    let image = publish_blob(&store, &vec![b'i'; 50_000], "http://127.0.0.1:1/os.tar.xz");
    let (bkey, broot) = publish_layer(&store, &build.sha256, LayerKind::Build, 1000);
    let (ikey, iroot) = publish_layer(&store, &image.sha256, LayerKind::Image, 0);
    let (unused, _) = publish_layer(&store, &build.sha256, LayerKind::Build, 1001);
    set_up_proc(&root, "app-1-prod-abc-web-5000", &broot, Some(&iroot));
    set_up_proc(&root, "app-1-prod-abc-worker-0", &broot, Some(&iroot));
    drop(store);

    let mut out = Vec::new();
    cache_cmd::ls_to(&root, true, &mut out).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).expect("ls --json is JSON");
    let entries = doc["entries"].as_array().unwrap();

    let cache = std::fs::canonicalize(root.cache_dir()).unwrap();
    let mut on_disk: Vec<String> = names(&cache.join("blobs-v1/sha256"));
    on_disk.extend(names(&cache.join("layers-v1")));
    on_disk.sort();
    let mut listed: Vec<String> = entries
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, on_disk);

    let find = |key: &str| entries.iter().find(|e| e["key"] == key).unwrap();
    let b = find(&build.sha256);
    assert_eq!(b["kind"], "blob");
    assert_eq!(b["md5"], serde_json::json!([build.md5]));
    assert_eq!(
        b["urls"],
        serde_json::json!(["http://127.0.0.1:1/app.tar.gz"])
    );
    let blob_file = cache.join("blobs-v1/sha256").join(&build.sha256);
    assert_eq!(b["path"], blob_file.to_str().unwrap());
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&blob_file).unwrap());
    assert_eq!(b["size"].as_u64().unwrap(), blocks * 512);

    let bl = find(&bkey.dir_name());
    assert_eq!(
        (
            bl["kind"].as_str(),
            bl["layer_kind"].as_str(),
            bl["uid"].as_u64()
        ),
        (Some("layer"), Some("build"), Some(1000))
    );
    assert_eq!(bl["path"], broot.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(bl["files"], 20);
    assert_eq!(
        bl["used_by"],
        serde_json::json!(["app-1-prod-abc-web-5000", "app-1-prod-abc-worker-0"])
    );
    assert_eq!(
        find(&ikey.dir_name())["used_by"].as_array().unwrap().len(),
        2
    );
    assert_eq!(find(&unused.dir_name())["used_by"], serde_json::json!([]));
    assert_eq!(find(&unused.dir_name())["urls"], b["urls"]);

    let mut table = Vec::new();
    cache_cmd::ls_to(&root, false, &mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert_eq!(table.lines().count(), 1 + 5 + 1, "{table}");
    assert!(table.contains(&build.sha256[..12]), "{table}");
    assert!(table.contains("(unused)"), "{table}");
    assert!(table.contains("2 blobs"), "{table}");
}

#[test]
fn gc_keeps_layers_of_set_up_procs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::new(tmp.path());
    let store = Store::open(&root.cache_dir()).unwrap();
    let d = publish_blob(&store, b"build one", "http://127.0.0.1:1/one.tar");
    let (used, used_root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    let (unused, _) = publish_layer(&store, &d.sha256, LayerKind::Build, 1001);
    set_up_proc(&root, "one-proc", &used_root, None);
    drop(store);

    let mut out = Vec::new();
    let report = cache_cmd::gc_to(&root, &GcArgs::default(), &mut out, |_| {}).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!("removed build {}", unused.dir_name())),
        "{out}"
    );
    assert!(out.contains("freed"), "{out}");
    assert_eq!(report.removed.len(), 2, "the unused layer and the blob");
    let store = Store::open(&root.cache_dir()).unwrap();
    assert!(store.layer(&used).is_some());
    assert!(store.layer(&unused).is_none());
    assert!(store.blob(&d.sha256).is_none());
    drop(store);

    // A state file gc cannot read: it refuses rather than guess.
    std::fs::create_dir_all(root.proc("broken").dir).unwrap();
    std::fs::write(root.proc("broken").state(), b"{\"version\": 99").unwrap();
    let err = cache_cmd::gc_to(&root, &GcArgs::default(), &mut Vec::new(), |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("broken"), "{err:#}");
}

#[test]
fn gc_waits_for_a_running_setup_and_keeps_what_it_published() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::new(tmp.path());
    drop(Store::open(&root.cache_dir()).unwrap());
    let published = tmp.path().join("published");
    let go = tmp.path().join("go");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &crate::common::test_name(module_path!(), "child_process_entry"),
            "--nocapture",
        ])
        .env(CHILD_ENV, "setup")
        .env(
            "CHILD_ARGS",
            [tmp.path(), &published, &go]
                .map(|p| p.to_str().unwrap().to_owned())
                .join("\n"),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    // The setup has published its layer but not yet recorded it: unreferenced right now.
    wait_for(&published);
    let (tx, rx) = std::sync::mpsc::channel();
    let gc_root = root.clone();
    let gc = std::thread::spawn(move || {
        cache_cmd::gc_to(&gc_root, &GcArgs::default(), &mut Vec::new(), |_| {
            tx.send(()).unwrap()
        })
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("gc waits for the running setup");
    std::fs::write(&go, b"").unwrap();
    let report = gc.join().unwrap().unwrap();
    assert!(child.0.wait().unwrap().success());
    let removed: Vec<_> = report.removed.iter().map(|e| e.kind).collect();
    assert_eq!(removed, [vrun_cache::EntryKind::Blob], "only the blob goes");
    let state = ProcState::load(&root.proc("concurrent-proc").state(), &root.cache_dir()).unwrap();
    assert!(state.build_layer.unwrap().join("app/file3").is_file());
}

#[test]
fn verify_lists_bad_entries_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::new(tmp.path());
    let store = Store::open(&root.cache_dir()).unwrap();
    let d = publish_blob(&store, b"a build to damage", "http://127.0.0.1:1/d.tar");
    let (key, layer_root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    drop(store);
    let mut out = Vec::new();
    let report = cache_cmd::verify_to(&root, true, &mut out).unwrap();
    assert_eq!((report.blobs_checked, report.layers_checked), (1, 1));

    std::fs::remove_file(layer_root.join("app/file5")).unwrap();
    std::fs::write(layer_root.join("app/file6"), b"changed").unwrap();
    let mut out = Vec::new();
    let err = cache_cmd::verify_to(&root, true, &mut out).unwrap_err();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!(
            "BAD layer {}: missing app/file5; changed app/file6",
            key.dir_name()
        )),
        "{out}"
    );
    assert!(out.contains("quarantined to"), "{out}");
    assert!(err.to_string().contains("1 bad entries"), "{err}");
    let store = Store::open(&root.cache_dir()).unwrap();
    assert!(store.layer(&key).is_none(), "the next setup re-extracts it");
}
