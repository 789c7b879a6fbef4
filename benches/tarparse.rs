//! Tar parse throughput: vrun's own reader (`vrun::tar`) against the `tar` crate it
//! replaced, on the plain tar of the bench build (12k entries, ~262 MB, GNU headers),
//! from memory: every entry's header parsed and its data read and dropped, nothing
//! written. This is the cost the reader adds to an extraction; the decision it backs is
//! in the module note of `src/tar/mod.rs`.
//!
//! ```text
//! cargo bench --bench tarparse            # 9 alternating rounds
//! VRUN_BENCH_ONESHOT=15 cargo bench --bench tarparse
//! ```

#[path = "common/corpus.rs"]
mod corpus;

use std::io::{self, Read};
use std::time::Instant;

fn drain(r: &mut dyn Read, buf: &mut [u8]) -> u64 {
    let mut n = 0;
    loop {
        match r.read(buf).unwrap() {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list
    }
    let rounds = corpus::oneshot_rounds().unwrap_or(9);
    let tar: &'static [u8] = std::fs::read(corpus::build_tar_path()).unwrap().leak();
    let mut buf = vec![0u8; 256 * 1024];
    let mut buf2 = vec![0u8; 256 * 1024];
    let mut cases: Vec<corpus::Case<'_>> = vec![
        (
            "vrun::tar::Reader".to_string(),
            Box::new(move || {
                let start = Instant::now();
                let mut r = vrun::tar::Reader::new(tar, 1 << 20);
                let (mut entries, mut bytes) = (0u64, 0u64);
                while let Some(e) = r.next_entry().unwrap() {
                    entries += 1;
                    bytes += drain(&mut r.data(), &mut buf);
                    assert!(e.data_len >= bytes.min(e.data_len));
                }
                let t = start.elapsed().as_secs_f64();
                assert!(entries > 10_000 && bytes > 200 << 20);
                t
            }),
        ),
        (
            "tar crate 0.4 entries()".to_string(),
            Box::new(move || {
                let start = Instant::now();
                let mut a = tar::Archive::new(tar);
                let (mut entries, mut bytes) = (0u64, 0u64);
                for e in a.entries().unwrap() {
                    let mut e = e.unwrap();
                    let _ = e.path_bytes();
                    entries += 1;
                    bytes += drain(&mut e, &mut buf2);
                }
                let t = start.elapsed().as_secs_f64();
                assert!(entries > 10_000 && bytes > 200 << 20);
                t
            }),
        ),
    ];
    corpus::oneshot(rounds, tar.len() as u64, &mut cases);
    let _ = io::sink();
}
