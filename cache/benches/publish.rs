//! What publishing a layer costs: fsync of the tree against one `syncfs`, quiet and with
//! another process writing to the same filesystem.
//!
//! Builds a tree shaped like a large app build (default 12,000 files, 80 MiB in 100
//! dirs) four times in the store's ingest dir and measures, on the page-cache-hot tree
//! exactly as the extractor leaves it:
//!
//! 0. quiet and busy (a `dd` writing beside it): one `syncfs` (what publish did before
//!    issue 14) against `publish_layer` (writes back only the tree: `sync_file_range` per file, then the journal commit of one fsync), for a 200 KB build
//!    and the large tree;
//! 1. making it durable with one `syncfs`;
//! 2. making it durable with an fsync per file and directory on one thread;
//! 3. the whole `publish_layer`: manifest walk + sha256 of every file, fsyncs, rename,
//!    and within it the manifest's share (`layer.json`'s `manifest_seconds`); then the
//!    same with a shallow manifest (no content hashes);
//! 4. `verify --deep` of the published layers and `entries()` (what `cache ls` reads).
//!
//! Run: `cargo bench -p vrun-cache --bench publish -- [FILES] [MIB] [DIR]`
//! (DIR defaults to a temp dir under /var/tmp: it must be a real disk, not tmpfs).

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use vrun_cache::{LayerKey, LayerKind, References, Store};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let files: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(12_000);
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(80);
    let base = args
        .get(2)
        .map(String::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let tmp = tempfile::tempdir_in(&base).expect("bench dir");
    let store = Store::open(&tmp.path().join("cache")).unwrap();
    println!(
        "tree: {files} files, {mib} MiB, in {}",
        tmp.path().display()
    );

    quiet_and_busy(&store, tmp.path(), files, mib);

    let a = store.new_ingest().unwrap();
    let t = Instant::now();
    write_tree(a.staging_dir(), files, mib << 20, 1);
    println!(
        "write tree (page cache): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let f = std::fs::File::open(a.staging_dir()).unwrap();
    // SAFETY: plain syscall on a valid fd.
    assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
    println!(
        "1. durable with one syncfs: {:.3} s",
        t.elapsed().as_secs_f64()
    );

    let b = store.new_ingest().unwrap();
    write_tree(b.staging_dir(), files, mib << 20, 2);
    let t = Instant::now();
    fsync_tree(b.staging_dir());
    println!(
        "2. durable with fsync per file+dir (one thread): {:.3} s",
        t.elapsed().as_secs_f64()
    );

    let c = store.new_ingest().unwrap();
    write_tree(c.staging_dir(), files, mib << 20, 3);
    let key = LayerKey::new(
        vrun_cache::sha256_hex(b"bench"),
        LayerKind::Build,
        1000,
        1000,
    );
    let t = Instant::now();
    store.publish_layer(&key, c.staging_dir()).unwrap();
    let total = t.elapsed().as_secs_f64();
    let meta = store.layer_meta(&key).unwrap();
    println!(
        "3. publish_layer: {total:.3} s, of which manifest (walk + sha256 of {} files, {} MiB): {:.3} s",
        meta.stats.files,
        meta.stats.bytes >> 20,
        meta.manifest_seconds
    );
    let t = Instant::now();
    let read = read_tree(&store.layer(&key).unwrap());
    println!(
        "   of which walk + read of every file (no hashing): {:.3} s ({} MiB)",
        t.elapsed().as_secs_f64(),
        read >> 20
    );
    let t = Instant::now();
    let digest = vrun_cache::sha256_hex(&vec![7u8; mib << 20]);
    println!(
        "   of which sha256 of {mib} MiB in memory: {:.3} s ({})",
        t.elapsed().as_secs_f64(),
        &digest[..8]
    );
    let d = store.new_ingest().unwrap();
    write_tree(d.staging_dir(), files, mib << 20, 4);
    let shallow_key = LayerKey::new(
        vrun_cache::sha256_hex(b"shallow"),
        LayerKind::Build,
        1000,
        1000,
    );
    let t = Instant::now();
    store
        .publish_layer_with(
            &shallow_key,
            d.staging_dir(),
            vrun_cache::ManifestMode::Shallow,
        )
        .unwrap();
    println!(
        "   publish_layer_with(Shallow): {:.3} s, of which manifest (walk, no hashing): {:.3} s",
        t.elapsed().as_secs_f64(),
        store.layer_meta(&shallow_key).unwrap().manifest_seconds
    );
    drop((a, b, c, d));
    drop(store);

    let store = Store::open_exclusive(&tmp.path().join("cache")).unwrap();
    let t = Instant::now();
    let report = store.verify(true).unwrap();
    assert!(report.bad.is_empty());
    println!(
        "4. verify --deep (page cache hot): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let n = store.entries(&References::new()).unwrap().len();
    println!(
        "   entries() for ls: {n} entries in {:.6} s",
        t.elapsed().as_secs_f64()
    );
}

/// `files` files spread over 100 dirs, sizes varying around the mean, `seed` varies bytes.
fn write_tree(dir: &Path, files: usize, bytes: usize, seed: u8) {
    let mean = bytes / files;
    let mut buf = vec![0u8; mean * 2];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    for d in 0..100 {
        std::fs::create_dir_all(dir.join(format!("app/d{d}"))).unwrap();
    }
    for i in 0..files {
        let size = mean / 2 + (i * 7919) % mean;
        let mut f = std::fs::File::create(dir.join(format!("app/d{}/f{i}", i % 100))).unwrap();
        f.write_all(&buf[..size]).unwrap();
    }
}

/// Another process writing to the same filesystem as fast as it can, never syncing (an
/// app's logs or data on a shared /apps): `dd` from /dev/zero. Killed and its file
/// removed on drop.
struct Bystander {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Bystander {
    fn start(dir: &Path) -> Bystander {
        let file = dir.join("bystander.bin");
        let child = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", file.display()))
            .args(["bs=1M", "count=4096", "status=none"])
            .spawn()
            .expect("dd");
        // Let it build up a backlog of dirty pages.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        Bystander { child, file }
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Issue 14: publish's durability must cost what vrun wrote, not what the filesystem has
/// dirty. For a small build (20 files, 200 KB) and the large tree: the old way (one
/// `syncfs`) and `publish_layer` (writes back only the tree: `sync_file_range` per file, then the journal commit of one fsync), quiet and with a
/// [`Bystander`]; medians of 3 rounds.
fn quiet_and_busy(store: &Store, dir: &Path, files: usize, mib: usize) {
    let mut n = 0u64;
    for (label, files, bytes) in [
        ("small build, 20 files, 200 KB", 20, 200_000),
        ("large tree", files, mib << 20),
    ] {
        for busy in [false, true] {
            let (mut old, mut new) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let by = busy.then(|| Bystander::start(dir));
                let a = store.new_ingest().unwrap();
                write_tree(a.staging_dir(), files, bytes, 9);
                let t = Instant::now();
                let f = std::fs::File::open(a.staging_dir()).unwrap();
                // SAFETY: plain syscall on a valid fd.
                assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
                old.push(t.elapsed().as_secs_f64());
                drop(a);
                if busy {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                }
                let c = store.new_ingest().unwrap();
                write_tree(c.staging_dir(), files, bytes, 10);
                n += 1;
                let key = LayerKey::new(
                    vrun_cache::sha256_hex(&n.to_le_bytes()),
                    LayerKind::Build,
                    1000,
                    1000,
                );
                let t = Instant::now();
                store
                    .publish_layer_with(&key, c.staging_dir(), vrun_cache::ManifestMode::Shallow)
                    .unwrap();
                new.push(t.elapsed().as_secs_f64());
                drop(by);
                // Settle outside the measurement.
                // SAFETY: plain syscall on a valid fd.
                assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
            }
            println!(
                "0. {label}, {}: syncfs {:.3} s, publish_layer (writes back only the tree) {:.3} s",
                if busy {
                    "busy (dd writing beside it)"
                } else {
                    "quiet"
                },
                median(old),
                median(new)
            );
        }
    }
}

fn fsync_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fsync_tree(&path);
        } else {
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        }
    }
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn read_tree(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            total += read_tree(&path);
        } else if meta.is_file() {
            total += std::fs::read(&path).unwrap().len() as u64;
        }
    }
    total
}
