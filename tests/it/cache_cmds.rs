//! `vrun cache ls | gc | verify` over a real store and real proc state files.
//!
//! The store and the state files are made with the libraries (`vrun_cache`,
//! `vrun::state`); the commands are the real `vrun` binary (`CARGO_BIN_EXE_vrun`, with
//! `VR_ROOT` set), so what is checked is what an operator sees: stdout, stderr, exit
//! code. The concurrency test runs a "setup" in another process: this binary re-executes
//! itself (`child_process_entry`, selected by `VRUN_CACHE_CMDS_CHILD`), and watches
//! `vrun cache gc`'s stderr for its notice that it waits for the store lock.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::ChildGuard;

use md5::Md5;
use sha2::{Digest, Sha256};
use vrun::paths::Root;
use vrun::state::ProcState;
use vrun_cache::{BlobDigest, LayerKey, LayerKind, Store, UrlRecord};

use crate::common::TestDir;

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
    let key = |layer: &Path| vrun_cache::layer_key_of_root(&store, layer).unwrap();
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

/// The report lines of `vrun cache gc` for removed entries (`removed KIND KEY  SIZE`),
/// leftovers of crashed setups excluded: one per entry it removed.
fn removed_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("removed ") && !l.starts_with("removed leftover "))
        .collect()
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
    let t = TestDir::new();
    let root = Root::new(t.root());
    let store = Store::open(&root.cache_dir()).unwrap();
    let build = publish_blob(&store, &vec![b'b'; 30_000], "http://127.0.0.1:1/app.tar.gz");
    let image = publish_blob(&store, &vec![b'i'; 50_000], "http://127.0.0.1:1/os.tar.xz");
    let (bkey, broot) = publish_layer(&store, &build.sha256, LayerKind::Build, 1000);
    let (ikey, iroot) = publish_layer(&store, &image.sha256, LayerKind::Image, 0);
    let (unused, _) = publish_layer(&store, &build.sha256, LayerKind::Build, 1001);
    set_up_proc(&root, "app-1-prod-abc-web-5000", &broot, Some(&iroot));
    set_up_proc(&root, "app-1-prod-abc-worker-0", &broot, Some(&iroot));
    drop(store);

    let ls = t.vrun(["cache", "ls", "--json"]).run();
    ls.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&ls.stdout).expect("ls --json is JSON");
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

    let ls = t.vrun(["cache", "ls"]).run();
    ls.assert_ok();
    let table = ls.stdout;
    assert_eq!(table.lines().count(), 1 + 5 + 1, "{table}");
    assert!(table.contains(&build.sha256[..12]), "{table}");
    assert!(table.contains("(unused)"), "{table}");
    assert!(table.contains("2 blobs"), "{table}");
    // How each layer is stored (the layers here are directories).
    assert!(table.lines().next().unwrap().contains("STORED"), "{table}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("dir"))
            .count(),
        3,
        "{table}"
    );
}

#[test]
fn gc_keeps_layers_of_set_up_procs() {
    let t = TestDir::new();
    let root = Root::new(t.root());
    let store = Store::open(&root.cache_dir()).unwrap();
    let d = publish_blob(&store, b"build one", "http://127.0.0.1:1/one.tar");
    let (used, used_root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    let (unused, _) = publish_layer(&store, &d.sha256, LayerKind::Build, 1001);
    set_up_proc(&root, "one-proc", &used_root, None);
    drop(store);

    let gc = t.vrun(["cache", "gc"]).run();
    gc.assert_ok();
    let out = gc.stdout.as_str();
    assert!(
        out.contains(&format!("removed build {}", unused.dir_name())),
        "{out}"
    );
    assert!(out.contains("freed"), "{out}");
    assert_eq!(
        removed_lines(out).len(),
        2,
        "the unused layer and the blob: {out}"
    );
    let store = Store::open(&root.cache_dir()).unwrap();
    assert!(store.layer(&used).is_some());
    assert!(store.layer(&unused).is_none());
    assert!(store.blob(&d.sha256).is_none());
    drop(store);

    // A state file gc cannot read: it refuses rather than guess.
    std::fs::create_dir_all(root.proc("broken").dir).unwrap();
    std::fs::write(root.proc("broken").state(), b"{\"version\": 99").unwrap();
    t.vrun(["cache", "gc"]).run().assert_error(&["broken"]);
}

#[test]
fn gc_waits_for_a_running_setup_and_keeps_what_it_published() {
    let t = TestDir::new();
    let root = Root::new(t.root());
    drop(Store::open(&root.cache_dir()).unwrap());
    let published = t.path().join("published");
    let go = t.path().join("go");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &crate::common::test_name(module_path!(), "child_process_entry"),
            "--nocapture",
        ])
        .env(CHILD_ENV, "setup")
        .env(
            "CHILD_ARGS",
            [&t.root(), &published, &go]
                .map(|p| p.to_str().unwrap().to_owned())
                .join("\n"),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    // The setup has published its layer but not yet recorded it: unreferenced right now.
    wait_for(&published);
    let mut gc = t.vrun(["cache", "gc"]).cmd;
    let mut gc = gc
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(gc.stderr.take().unwrap());
    let mut gc = ChildGuard(gc);
    let (tx, rx) = std::sync::mpsc::channel();
    let notices = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            if line.contains("waiting for") {
                let _ = tx.send(());
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("gc waits for the running setup");
    std::fs::write(&go, b"").unwrap();
    let mut out = String::new();
    gc.0.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = gc.0.wait().unwrap();
    let notices = notices.join().unwrap();
    assert!(status.success(), "{status}: {out}{notices}");
    assert!(child.0.wait().unwrap().success());
    let removed = removed_lines(&out);
    assert!(
        removed.len() == 1 && removed[0].starts_with("removed blob "),
        "only the blob goes: {out}"
    );
    let state = ProcState::load(&root.proc("concurrent-proc").state(), &root.cache_dir()).unwrap();
    assert!(state.build_layer.unwrap().join("app/file3").is_file());
}

#[test]
fn verify_lists_bad_entries_and_fails() {
    let t = TestDir::new();
    let root = Root::new(t.root());
    let store = Store::open(&root.cache_dir()).unwrap();
    let d = publish_blob(&store, b"a build to damage", "http://127.0.0.1:1/d.tar");
    let (key, layer_root) = publish_layer(&store, &d.sha256, LayerKind::Build, 1000);
    drop(store);
    let verify = t.vrun(["cache", "verify", "--deep"]).run();
    verify.assert_ok();
    assert!(
        verify.stdout.contains("checked 1 blobs, 1 layers (deep),"),
        "{}",
        verify.stdout
    );

    std::fs::remove_file(layer_root.join("app/file5")).unwrap();
    std::fs::write(layer_root.join("app/file6"), b"changed").unwrap();
    let verify = t.vrun(["cache", "verify", "--deep"]).run();
    verify.assert_error(&["1 bad entries"]);
    let out = verify.stdout.as_str();
    assert!(
        out.contains(&format!(
            "BAD layer {}: missing app/file5; changed app/file6",
            key.dir_name()
        )),
        "{out}"
    );
    assert!(out.contains("quarantined to"), "{out}");
    let store = Store::open(&root.cache_dir()).unwrap();
    assert!(store.layer(&key).is_none(), "the next setup re-extracts it");
}
