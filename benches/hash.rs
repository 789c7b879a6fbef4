//! Hashing throughput: what the fetcher does to every body byte before anything else
//! sees it (md5 for proc.yaml's assertion, sha256 for the store's address), alone and
//! together as [`BodyHasher`] feeds them, in the pipeline's 128 KiB slices.
//!
//! `cargo bench --bench hash`. md5 is the one that matters: sha2 picks SHA-NI at run time,
//! md5 has no hardware help, so on this machine md5 costs about three times sha256.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use md5::{Digest, Md5};
use sha2::Sha256;
use vrun::fetch::BodyHasher;

/// A body large enough that per-call overhead vanishes, small enough to stay in RAM.
const BODY: usize = 64 << 20;

/// The fetch channel's chunk size.
const SLICE: usize = 128 * 1024;

fn body() -> Vec<u8> {
    // Deterministic, not constant (a constant buffer could flatter nothing here, but
    // keeps the bench honest against future content-dependent code).
    testkit::noise(BODY, 0x5eed_2026)
}

fn hashing(c: &mut Criterion) {
    let data = body();
    let mut g = c.benchmark_group("hash");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(BODY as u64));
    g.bench_function("md5", |b| {
        b.iter(|| {
            let mut h = Md5::new();
            data.chunks(SLICE).for_each(|s| h.update(s));
            h.finalize()
        })
    });
    g.bench_function("sha256", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            data.chunks(SLICE).for_each(|s| h.update(s));
            h.finalize()
        })
    });
    g.bench_function("body_hasher_md5_sha256", |b| {
        b.iter(|| {
            let mut h = BodyHasher::new();
            data.chunks(SLICE).for_each(|s| h.update(s));
            h.finish()
        })
    });
    g.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);
