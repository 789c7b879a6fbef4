//! Decoder throughput on the build-like corpus (see `common/corpus.rs`), one format per
//! benchmark, reported in decompressed bytes per second. xz is measured with 1 and 2
//! threads (liblzma's threaded decoder on a multi-block file), bzip2 with 1 and 2 workers
//! (`decode::bzip2_par`; the corpus's lbzip2 file is one stream, so 2 workers shows the
//! cost of finding that out).
//!
//! `cargo bench --bench decode` (corpus generated on first run into target/bench-corpus).
//!
//! `VRUN_BENCH_BZ2=FILE.tar.bz2` measures that file instead of the corpus, e.g. the
//! pbzip2-packed build of the deploy harness's corpus (where 2 workers pay off):
//! `VRUN_BENCH_ONESHOT=5 VRUN_BENCH_BZ2=/var/tmp/vrun-bench-corpus/<key>/build.tar.bz2
//! cargo bench --bench decode`.

#[path = "common/corpus.rs"]
mod corpus;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use vrun::decode::{decoder_with, detect, DecodeOptions, Format};

fn drain(mut r: impl Read) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return total,
            n => total += n as u64,
        }
    }
}

/// The files to measure, the plain tar first (its length is what every decoder yields),
/// or only `VRUN_BENCH_BZ2` with its decoded length.
fn files() -> (Vec<(&'static str, PathBuf)>, u64) {
    if let Some(path) = std::env::var_os("VRUN_BENCH_BZ2") {
        let path = PathBuf::from(path);
        let data = std::fs::read(&path).unwrap();
        let one = DecodeOptions {
            bzip2_workers: 1,
            ..DecodeOptions::default()
        };
        let len = drain(decoder_with(Format::Bzip2, &data[..], one));
        return (vec![("bz2", path)], len);
    }
    let files = corpus::corpus();
    let tar_len = std::fs::metadata(&files[0].1).unwrap().len();
    (files, tar_len)
}

/// The settings each format is measured with, and a label for them.
fn settings(format: Format) -> Vec<(String, DecodeOptions)> {
    let with = |xz_threads, bzip2_workers| DecodeOptions {
        xz_threads,
        bzip2_workers,
        ..DecodeOptions::default()
    };
    match format {
        Format::Xz => vec![("t1".into(), with(1, 1)), ("t2".into(), with(2, 1))],
        Format::Bzip2 => vec![("w1".into(), with(1, 1)), ("w2".into(), with(1, 2))],
        _ => vec![("t1".into(), with(1, 1))],
    }
}

fn decoders(c: &mut Criterion) {
    let (files, tar_len) = files();
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(tar_len));
    for (ext, path) in &files {
        let data = std::fs::read(path).unwrap();
        let format = detect(&data).unwrap();
        let settings = settings(format);
        for (label, options) in &settings {
            let name = if settings.len() > 1 {
                format!("{ext}-{label}")
            } else {
                ext.to_string()
            };
            g.bench_function(name, |b| {
                b.iter(|| {
                    let n = drain(decoder_with(format, &data[..], *options));
                    assert_eq!(n, tar_len);
                })
            });
        }
    }
    g.finish();
}

/// One-shot figures: our decoders and the CLI tools on the same files.
fn oneshot(rounds: usize) {
    let (files, tar_len) = files();
    let only = std::env::var("VRUN_BENCH_ONLY").unwrap_or_default();
    let mut cases: Vec<corpus::Case<'static>> = Vec::new();
    for (ext, path) in &files {
        if *ext == "tar" || (!only.is_empty() && !ext.contains(&only)) {
            continue;
        }
        let data: &'static [u8] = std::fs::read(path).unwrap().leak();
        let format = detect(data).unwrap();
        for (label, options) in settings(format) {
            let ext = *ext;
            cases.push((
                format!("vrun {ext} {label}"),
                Box::new(move || {
                    let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
                    let n = drain(decoder_with(format, data, options));
                    assert_eq!(n, tar_len);
                    let wall = start.elapsed().as_secs_f64();
                    eprintln!(
                        "  vrun {ext} {label}: {wall:.3} s wall, {:.3} s cpu",
                        cpu_seconds() - cpu
                    );
                    wall
                }),
            ));
        }
        let tools: &[&str] = match *ext {
            "gz" => &["gzip -dc", "pigz -dc"],
            "bz2" => &["bzip2 -dc", "lbzip2 -dc -n2", "pbzip2 -dc -p2"],
            "xz" => &["xz -dc -T1", "xz -dc -T2"],
            _ => &["zstd -dc -q"],
        };
        for tool in tools {
            let cmd = format!("{tool} {} > /dev/null", path.display());
            cases.push((tool.to_string(), Box::new(move || corpus::time_shell(&cmd))));
        }
    }
    // `VRUN_BENCH_CASE=w2`: only the cases whose name contains it.
    if let Ok(only_case) = std::env::var("VRUN_BENCH_CASE") {
        cases.retain(|(name, _)| name.contains(&only_case));
    }
    corpus::oneshot(rounds, tar_len, &mut cases);
}

/// CPU time of this process so far, all threads (the decoders' workers included).
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

criterion_group!(benches, decoders);

fn main() {
    if let Some(rounds) = corpus::oneshot_rounds() {
        return oneshot(rounds);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
