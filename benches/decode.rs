//! Decoder throughput on the build-like corpus (see `common/corpus.rs`), one format per
//! benchmark, reported in decompressed bytes per second. xz is measured with 1 and 2
//! threads (liblzma's threaded decoder on a multi-block file).
//!
//! `cargo bench --bench decode` (corpus generated on first run into target/bench-corpus).

#[path = "common/corpus.rs"]
mod corpus;

use std::io::Read;
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

fn decoders(c: &mut Criterion) {
    let files = corpus::corpus();
    let tar_len = std::fs::metadata(&files[0].1).unwrap().len();
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(tar_len));
    for (ext, path) in &files {
        let data = std::fs::read(path).unwrap();
        let format = detect(&data).unwrap();
        let threads: &[u32] = if format == Format::Xz { &[1, 2] } else { &[1] };
        for &xz_threads in threads {
            let name = if format == Format::Xz {
                format!("{ext}-t{xz_threads}")
            } else {
                ext.to_string()
            };
            g.bench_function(name, |b| {
                b.iter(|| {
                    let n = drain(decoder_with(
                        format,
                        &data[..],
                        DecodeOptions { xz_threads },
                    ));
                    assert_eq!(n, tar_len);
                })
            });
        }
    }
    g.finish();
}

/// One-shot figures: our decoders and the CLI tools on the same files.
fn oneshot(rounds: usize) {
    let files = corpus::corpus();
    let tar_len = std::fs::metadata(&files[0].1).unwrap().len();
    let only = std::env::var("VRUN_BENCH_ONLY").unwrap_or_default();
    let mut cases: Vec<corpus::Case<'static>> = Vec::new();
    for (ext, path) in &files {
        if *ext == "tar" || (!only.is_empty() && !ext.contains(&only)) {
            continue;
        }
        let data: &'static [u8] = std::fs::read(path).unwrap().leak();
        let format = detect(data).unwrap();
        let threads: &[u32] = if format == Format::Xz { &[1, 2] } else { &[1] };
        for &xz_threads in threads {
            cases.push((
                format!("vrun {ext} t{xz_threads}"),
                Box::new(move || {
                    let start = std::time::Instant::now();
                    let n = drain(decoder_with(format, data, DecodeOptions { xz_threads }));
                    assert_eq!(n, tar_len);
                    start.elapsed().as_secs_f64()
                }),
            ));
        }
        let tools: &[&str] = match *ext {
            "gz" => &["gzip -dc", "pigz -dc"],
            "bz2" => &["bzip2 -dc", "lbzip2 -dc -n2"],
            "xz" => &["xz -dc -T1", "xz -dc -T2"],
            _ => &["zstd -dc -q"],
        };
        for tool in tools {
            let cmd = format!("{tool} {} > /dev/null", path.display());
            cases.push((tool.to_string(), Box::new(move || corpus::time_shell(&cmd))));
        }
    }
    corpus::oneshot(rounds, tar_len, &mut cases);
}

criterion_group!(benches, decoders);

fn main() {
    if let Some(rounds) = corpus::oneshot_rounds() {
        return oneshot(rounds);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
