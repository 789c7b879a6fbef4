//! What the cache's automatic policy costs a setup or teardown (issue 12, point 10).
//!
//! Builds a store the size of a busy app host's — `--builds` build layers with their
//! blobs and md5/url index entries (default 200), `--images` image layers (default 20),
//! `--procs` proc dirs whose state files reference some of them (default 60) — on a
//! fresh filesystem it mounts itself (`--fs tmpfs` or `--fs ext4`, a loop-mounted image;
//! root needed), then times, in-process, over `--runs` runs (default 21):
//!
//! - `stamp`: the check every setup and teardown makes when the store was looked at
//!   within the hour ([`vrun_cache::auto_gc_checked_recently`]: one stat);
//! - `look`: a full look that finds nothing to remove — open the store exclusively
//!   (non-blocking), read every proc's state file and the mount table (what `vrun cache
//!   gc` reads), and [`vrun_cache::Store::auto_gc_due`]; warm, and on ext4 also with
//!   the page cache dropped before each run (`cold`).
//!
//! `cargo bench --bench autogc -- --fs ext4` (as root). Prints medians and min–max.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use md5::Md5;
use sha2::{Digest, Sha256};
use vrun::paths::Root;
use vrun::state::ProcState;
use vrun_cache::layer_key_of_root;
use vrun_cache::{AutoGc, BlobDigest, LayerKey, LayerKind, Store, UrlRecord};

struct Opts {
    fs: String,
    builds: usize,
    images: usize,
    procs: usize,
    runs: usize,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        fs: "tmpfs".into(),
        builds: 200,
        images: 20,
        procs: 60,
        runs: 21,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().expect("a value after the flag");
        match args[i].as_str() {
            "--fs" => o.fs = value(),
            "--builds" => o.builds = value().parse().expect("--builds N"),
            "--images" => o.images = value().parse().expect("--images N"),
            "--procs" => o.procs = value().parse().expect("--procs N"),
            "--runs" => o.runs = value().parse().expect("--runs N"),
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other:?} (--fs tmpfs|ext4 --builds N --images N --procs N --runs N)"),
        }
        i += 2;
    }
    o
}

/// The bench's filesystem: mounted on creation, unmounted (and its image removed) on drop.
struct Target {
    mnt: PathBuf,
    _work: tempfile::TempDir,
}

impl Target {
    fn new(fs: &str) -> Target {
        let work = tempfile::Builder::new()
            .prefix("vrun-autogc-bench-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mnt = work.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let status = match fs {
            "tmpfs" => Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2G", "vrun-bench"])
                .arg(&mnt)
                .status(),
            "ext4" => {
                let img = work.path().join("fs.img");
                let f = std::fs::File::create(&img).unwrap();
                f.set_len(2 << 30).unwrap();
                let mkfs = Command::new("mkfs.ext4")
                    .args(["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                    .arg(&img)
                    .status()
                    .unwrap();
                assert!(mkfs.success(), "mkfs.ext4");
                Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&img)
                    .arg(&mnt)
                    .status()
            }
            other => panic!("--fs {other}: tmpfs or ext4"),
        };
        assert!(status.unwrap().success(), "mount {fs} (run as root)");
        Target { mnt, _work: work }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn digest(bytes: &[u8]) -> BlobDigest {
    BlobDigest {
        sha256: hex::encode(Sha256::digest(bytes)),
        md5: hex::encode(Md5::digest(bytes)),
        size: bytes.len() as u64,
    }
}

/// A blob (with its md5 and url index entries) and a small layer from it.
fn publish(store: &Store, n: usize, kind: LayerKind) -> PathBuf {
    let bytes: Vec<u8> = format!("{kind:?} {n} ")
        .bytes()
        .cycle()
        .take(64 << 10)
        .collect();
    let d = digest(&bytes);
    let ingest = store.new_ingest().unwrap();
    std::fs::write(ingest.blob_path(), &bytes).unwrap();
    let rec = UrlRecord {
        url: format!("http://builds.example/{kind:?}-{n}.tar.gz"),
        url_sha256: None,
        sha256: d.sha256.clone(),
        etag: None,
        last_modified: None,
        size: d.size,
    };
    store.publish_blob(&ingest, &d, Some(&rec)).unwrap();
    let (uid, sub) = match kind {
        LayerKind::Build => (65534, "app"),
        LayerKind::Image => (0, "usr/bin"),
    };
    let key = LayerKey::new(&d.sha256, kind, uid, uid);
    let ingest = store.new_ingest().unwrap();
    let dir = ingest.staging_dir().join(sub);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..20 {
        std::fs::write(dir.join(format!("f{i}")), vec![b'x'; 100 * i]).unwrap();
    }
    store.publish_layer(&key, ingest.staging_dir()).unwrap()
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop caches (as root)");
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<16} median {:>8.3} ms   (min {:.3}, max {:.3}, {} runs)",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

fn main() {
    let o = parse_opts();
    let target = Target::new(&o.fs);
    let root = Root::new(target.mnt.join("apps"));
    let cache = root.cache_dir();
    let started = Instant::now();
    let mut build_layers = Vec::new();
    let mut image_layers = Vec::new();
    {
        let store = Store::open(&cache).unwrap();
        for n in 0..o.builds {
            build_layers.push(publish(&store, n, LayerKind::Build));
        }
        for n in 0..o.images {
            image_layers.push(publish(&store, n, LayerKind::Image));
        }
    }
    for n in 0..o.procs {
        let dir = root
            .proc(&format!("app{n}-v1-prod-abc-web-{}", 5000 + n))
            .dir;
        std::fs::create_dir_all(&dir).unwrap();
        let key = |layer: &PathBuf| layer_key_of_root(&cache, layer).expect("a layer root");
        ProcState::new(
            &cache,
            Some(key(&build_layers[n % build_layers.len()])),
            image_layers.get(n % image_layers.len().max(1)).map(key),
            65534,
            65534,
        )
        .save(&dir.join("state.json"))
        .unwrap();
    }
    println!(
        "store on {}: {} build + {} image layers, as many blobs, {} index entries, {} procs (built in {:.1} s)",
        o.fs,
        o.builds,
        o.images,
        2 * (o.builds + o.images),
        o.procs,
        started.elapsed().as_secs_f64()
    );
    let policy = AutoGc::default();
    // (whole look, of which: open, references, due)
    let look = || -> [Duration; 4] {
        let t = Instant::now();
        let store = Store::try_open_exclusive(&cache)
            .unwrap()
            .expect("nobody else holds it");
        let opened = t.elapsed();
        let (refs, _) = vrun::references::references(&root, store.dir(), true).unwrap();
        let referenced = t.elapsed();
        let due = store.auto_gc_due(&policy, &refs).unwrap();
        let checked = t.elapsed();
        drop(store);
        let d = t.elapsed();
        assert!(!due, "the bench store must have nothing to remove");
        [d, opened, referenced - opened, checked - referenced]
    };
    let report = |what: &str, samples: Vec<[Duration; 4]>| {
        for (i, part) in ["", " open", " refs", " due"].iter().enumerate() {
            summary(
                &format!("{what}{part}"),
                samples.iter().map(|s| s[i]).collect(),
            );
        }
    };
    let stamp = cache.join("autogc-v1.stamp");
    std::fs::write(&stamp, b"").unwrap();
    let mut samples = Vec::new();
    for _ in 0..o.runs {
        let t = Instant::now();
        assert!(vrun_cache::auto_gc_checked_recently(&cache));
        samples.push(t.elapsed());
    }
    summary("stamp", samples);
    look();
    report("look warm", (0..o.runs).map(|_| look()).collect());
    if o.fs == "ext4" {
        let samples = (0..o.runs)
            .map(|_| {
                drop_caches();
                look()
            })
            .collect();
        report("look cold", samples);
    }
}
