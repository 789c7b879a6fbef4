//! Extraction throughput: the plain build-like tar (and its gzip, the real pipeline) into a
//! fresh directory, with the writer inline on the parse thread or on 1, 2 or 4 writer
//! threads. Where to write is `$VRUN_BENCH_DIR` (default `/dev/shm/vrun-bench`); point it at
//! a loop-mounted ext4 to see a real disk — never at `/`, whose inode creation is slow:
//!
//! ```text
//! truncate -s 4G /tmp/x.img && mkfs.ext4 -q /tmp/x.img && mkdir -p /mnt/x && mount -o loop /tmp/x.img /mnt/x
//! VRUN_BENCH_DIR=/mnt/x cargo bench --bench writer
//! ```
//!
//! Each iteration extracts into a new directory; removing it afterwards is not timed.

#[path = "common/corpus.rs"]
mod corpus;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use vrun::decode::{decoder, Format};
use vrun::extract::{extract_with, Limits, Mode, Writers};

const BUILD: Mode = Mode::Build {
    uid: 1000,
    gid: 1000,
};

fn bench_dir() -> PathBuf {
    std::env::var_os("VRUN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/vrun-bench"))
}

fn writers(c: &mut Criterion) {
    let files = corpus::corpus();
    let tar = std::fs::read(&files[0].1).unwrap();
    let gz = std::fs::read(&files.iter().find(|(e, _)| *e == "gz").unwrap().1).unwrap();
    let root = bench_dir().join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let mut n = 0u64;
    let choices = [
        ("inline", Writers::Inline),
        ("threads-1", Writers::Threads(1)),
        ("threads-2", Writers::Threads(2)),
        ("threads-4", Writers::Threads(4)),
    ];
    let only = std::env::var("VRUN_BENCH_ONLY").unwrap_or_default();
    for (input, compressed) in [("tar", false), ("tar.gz", true)] {
        let mut g = c.benchmark_group(format!("extract-{input}"));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(15));
        g.throughput(Throughput::Bytes(tar.len() as u64));
        for (name, w) in choices {
            if !only.is_empty() && !name.contains(&only) {
                continue;
            }
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        n += 1;
                        let dest = root.join(format!("d{n}"));
                        std::fs::create_dir(&dest).unwrap();
                        let start = Instant::now();
                        let stats = if compressed {
                            extract_with(
                                decoder(Format::Gzip, &gz[..]),
                                &dest,
                                BUILD,
                                &Limits::default(),
                                w,
                            )
                        } else {
                            extract_with(&tar[..], &dest, BUILD, &Limits::default(), w)
                        }
                        .unwrap();
                        total += start.elapsed();
                        assert!(stats.files > 10_000);
                        std::fs::remove_dir_all(&dest).unwrap();
                    }
                    total
                })
            });
        }
        g.finish();
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// One-shot figures: our extraction with each writer setting, and GNU tar, on the same
/// filesystem, each into a fresh directory (removed, untimed, before the next case).
fn oneshot(rounds: usize) {
    let files = corpus::corpus();
    let tar_path = files[0].1.clone();
    let gz_path = files.iter().find(|(e, _)| *e == "gz").unwrap().1.clone();
    let tar: &'static [u8] = std::fs::read(&tar_path).unwrap().leak();
    let gz: &'static [u8] = std::fs::read(&gz_path).unwrap().leak();
    let root = bench_dir().join(format!("oneshot-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let counter = std::cell::Cell::new(0u64);
    let fresh = || {
        counter.set(counter.get() + 1);
        let d = root.join(format!("d{}", counter.get()));
        std::fs::create_dir(&d).unwrap();
        d
    };
    let only = std::env::var("VRUN_BENCH_ONLY").unwrap_or_default();
    let mut cases: Vec<corpus::Case<'_>> = Vec::new();
    for (input, compressed) in [("tar", false), ("tar.gz", true)] {
        if !only.is_empty() && !input.ends_with(&only) {
            continue;
        }
        for (name, w) in [
            ("inline", Writers::Inline),
            ("threads-1", Writers::Threads(1)),
            ("threads-2", Writers::Threads(2)),
            ("threads-4", Writers::Threads(4)),
        ] {
            let fresh = &fresh;
            cases.push((
                format!("vrun {input} {name}"),
                Box::new(move || {
                    let dest = fresh();
                    let start = Instant::now();
                    if compressed {
                        extract_with(
                            decoder(Format::Gzip, gz),
                            &dest,
                            BUILD,
                            &Limits::default(),
                            w,
                        )
                    } else {
                        extract_with(tar, &dest, BUILD, &Limits::default(), w)
                    }
                    .unwrap();
                    let t = start.elapsed().as_secs_f64();
                    settle(&dest);
                    t
                }),
            ));
        }
        let (src, flag) = if compressed {
            (&gz_path, "xzf")
        } else {
            (&tar_path, "xf")
        };
        let fresh = &fresh;
        cases.push((
            format!("gnu tar {flag}"),
            Box::new(move || {
                let dest = fresh();
                let t = corpus::time_shell(&format!(
                    "tar {flag} {} -C {}",
                    src.display(),
                    dest.display()
                ));
                std::fs::remove_dir_all(&dest).unwrap();
                t
            }),
        ));
    }
    corpus::oneshot(rounds, tar.len() as u64, &mut cases);
    drop(cases);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Remove an extracted tree and let writeback finish (untimed), so the next case starts
/// from a quiet disk.
fn settle(dest: &std::path::Path) {
    std::fs::remove_dir_all(dest).unwrap();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

criterion_group!(benches, writers);

fn main() {
    if let Some(rounds) = corpus::oneshot_rounds() {
        return oneshot(rounds);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
