//! The parallel bzip2 decoder (`decode::bzip2_par`) against files made by the real tools
//! (`bzip2`, `pbzip2`, `lbzip2`): with 2 and 4 workers it must return exactly what the
//! sequential decoder (1 worker) and `bzip2 -dc` return, and fail exactly as the
//! sequential decoder fails (same message, same kind, same bytes before the error).
//!
//! The heap of this test binary is counted (a global allocator wrapper), so the bomb test
//! can show that a worker does not buffer the output of a hugely expanding stream. The
//! binary holds every suite, so the bomb test measures in a child process of it that runs
//! that test alone; the tests here also take one lock, so that count was theirs alone
//! when this suite was a binary of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vrun::decode::{self, decoder_with, DecodeOptions, Format};

// ---------------------------------------------------------------- heap accounting

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static HEAP: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------- helpers

/// Run `cmd` with `input` on stdin; its stdout.
fn tool(cmd: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Deterministic content shaped like a build: text runs, noise runs, zero runs.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 8] = [
        b"def ",
        b"self",
        b"return ",
        b"import os\n",
        b"(x) ",
        b"42",
        b"\n    ",
        b"yaml",
    ];
    let mut out = Vec::with_capacity(len + 64 * 1024);
    while out.len() < len {
        let run = 1 + (next() % 60_000) as usize;
        match next() % 4 {
            0 | 1 => (0..run / 4).for_each(|_| out.extend_from_slice(words[next() as usize % 8])),
            2 => (0..run / 8).for_each(|_| out.extend_from_slice(&next().to_le_bytes())),
            _ => out.resize(out.len() + run, 0),
        }
    }
    out.truncate(len);
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn options(workers: u32) -> DecodeOptions {
    DecodeOptions {
        bzip2_workers: workers,
        ..DecodeOptions::default()
    }
}

/// Everything a decoder returned before it stopped, and how it stopped. Reads with
/// varied buffer sizes, as the tar parser does.
#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u8>,
    error: Option<(io::ErrorKind, String)>,
}

fn decode_with(workers: u32, data: &[u8]) -> Outcome {
    let mut r = decoder_with(Format::Bzip2, data, options(workers));
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let sizes = [512, 70_000, 1, 8192, 4096 * 3 + 7];
    for i in 0.. {
        let want = sizes[i % sizes.len()];
        match r.read(&mut buf[..want]) {
            Ok(0) => return Outcome { out, error: None },
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                let error = Some((e.kind(), e.to_string()));
                return Outcome { out, error };
            }
        }
    }
    unreachable!()
}

/// Equal errors, but for the offset in a corrupt-data message, which may move by up to 8
/// bytes with the input's buffering (libbz2-rs reads ahead up to 8 bytes when it can).
fn same_error(a: &Option<(io::ErrorKind, String)>, b: &Option<(io::ErrorKind, String)>) -> bool {
    let split = |m: &str| -> (String, u64, String) {
        match m.split_once("(at compressed byte ") {
            Some((head, rest)) => {
                let (offset, tail) = rest.split_once(')').unwrap();
                (head.into(), offset.parse().unwrap(), tail.into())
            }
            None => (m.into(), 0, String::new()),
        }
    };
    match (a, b) {
        (Some((ka, ma)), Some((kb, mb))) => {
            let ((ha, oa, ta), (hb, ob, tb)) = (split(ma), split(mb));
            ka == kb && ha == hb && ta == tb && oa.abs_diff(ob) <= 8
        }
        _ => a == b,
    }
}

/// Decode with 1, 2 and 4 workers; all must agree. Returns the outcome.
fn decode_all_ways(data: &[u8]) -> Outcome {
    let sequential = decode_with(1, data);
    for workers in [2, 4] {
        let parallel = decode_with(workers, data);
        assert!(
            same_error(&parallel.error, &sequential.error),
            "{workers} workers: error differs: {:?} vs {:?}",
            parallel.error,
            sequential.error
        );
        assert!(
            same_output(&parallel, &sequential),
            "{workers} workers: output differs ({} vs {} bytes)",
            parallel.out.len(),
            sequential.out.len()
        );
    }
    sequential
}

/// Equal output; or, when the data is corrupt, output that agrees as far as both go. libbz2
/// checks a block's CRC only after handing out its bytes, and the bytes of the call that
/// meets the mismatch are dropped, so how much of a corrupt block comes out depends on the
/// size of the reads, in the sequential decoder alone as well.
fn same_output(a: &Outcome, b: &Outcome) -> bool {
    let corrupt = a
        .error
        .as_ref()
        .is_some_and(|(_, message)| message.contains("is corrupt"));
    let n = a.out.len().min(b.out.len());
    if corrupt {
        a.out[..n] == b.out[..n]
    } else {
        a.out == b.out
    }
}

/// Decode all ways and compare with `bzip2 -dc` (which also decodes concatenated streams).
fn assert_decodes(data: &[u8], expected: &[u8]) {
    let outcome = decode_all_ways(data);
    assert_eq!(outcome.error, None);
    assert!(outcome.out == expected, "output differs from the original");
    assert!(
        tool(&["bzip2", "-dc"], data) == expected,
        "bzip2 -dc disagrees with the original"
    );
}

fn empty_stream() -> Vec<u8> {
    tool(&["bzip2", "-9", "-c"], b"")
}

// ---------------------------------------------------------------- what the tools write

#[test]
fn pbzip2_multi_stream_file() {
    let _serial = serial();
    let plain = content(4_000_000, 1);
    let packed = tool(&["pbzip2", "-9", "-p2", "-c"], &plain);
    assert_decodes(&packed, &plain);
}

#[test]
fn pbzip2_small_blocks_many_streams() {
    let _serial = serial();
    let plain = content(3_000_000, 2);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    assert_decodes(&packed, &plain);
}

#[test]
fn pbzip2_incompressible_streams_stay_under_the_segment_limit() {
    let _serial = serial();
    let plain = noise(2_800_000, 3);
    let packed = tool(&["pbzip2", "-9", "-p2", "-c"], &plain);
    assert!(packed.len() > plain.len(), "not incompressible");
    assert_decodes(&packed, &plain);
}

#[test]
fn lbzip2_and_bzip2_single_stream_files() {
    let _serial = serial();
    let plain = content(2_500_000, 4);
    for cmd in [
        &["lbzip2", "-9", "-n2", "-c"][..],
        &["bzip2", "-9", "-c"][..],
        &["bzip2", "-1", "-c"][..],
    ] {
        let packed = tool(cmd, &plain);
        assert_decodes(&packed, &plain);
    }
}

#[test]
fn empty_streams_first_between_and_last() {
    let _serial = serial();
    let plain = content(1_500_000, 5);
    let (a, b) = plain.split_at(700_000);
    let (sa, sb) = (tool(&["bzip2", "-c"], a), tool(&["bzip2", "-c"], b));
    let empty = empty_stream();
    let cat = |parts: &[&[u8]]| parts.concat();
    assert_decodes(&cat(&[&empty, &sa, &sb]), &plain);
    assert_decodes(&cat(&[&sa, &empty, &empty, &sb]), &plain);
    assert_decodes(&cat(&[&sa, &sb, &empty]), &plain);
    assert_decodes(&empty, b"");
}

#[test]
fn many_tiny_streams() {
    let _serial = serial();
    let plain = content(600_000, 6);
    let mut packed = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < plain.len() {
        let len = (1 + i * 3571 % 4000).min(plain.len() - at);
        packed.extend(tool(&["bzip2", "-c"], &plain[at..at + len]));
        at += len;
        i += 1;
    }
    assert!(i > 200);
    assert_decodes(&packed, &plain);
    // Hostile variants: each hand-over must not restart the work from scratch.
    let outcome = decode_all_ways(&[&packed[..], b"junk"].concat());
    assert!(outcome.error.unwrap().1.contains("trailing garbage"));
    let outcome = decode_all_ways(&packed[..packed.len() - 1]);
    assert!(outcome.error.unwrap().1.contains("truncated"));
}

// ---------------------------------------------------------------- what must fail the same

#[test]
fn truncation_fails_as_the_sequential_decoder_does() {
    let _serial = serial();
    let plain = content(3_000_000, 7);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let len = packed.len();
    for cut in [0, 10, 100, len / 5, len / 2, len / 2 + 1, len - 20, len - 1] {
        let outcome = decode_all_ways(&packed[..cut]);
        let (kind, message) = outcome.error.unwrap_or_else(|| panic!("cut at {cut}: ok"));
        assert_eq!(
            kind,
            io::ErrorKind::UnexpectedEof,
            "cut at {cut}: {message}"
        );
        assert!(message.contains("truncated"), "cut at {cut}: {message}");
        assert!(plain.starts_with(&outcome.out), "cut at {cut}: wrong bytes");
    }
}

#[test]
fn trailing_garbage_fails_and_zero_padding_passes() {
    let _serial = serial();
    let plain = content(2_000_000, 8);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let with = |tail: &[u8]| [&packed[..], tail].concat();

    for tail in [&b"garbage"[..], b"\n", b"BZh", b"\0\0\0\0x"] {
        let outcome = decode_all_ways(&with(tail));
        let (kind, message) = outcome.error.expect("trailing garbage accepted");
        assert_eq!(kind, io::ErrorKind::InvalidData, "{message}");
        assert!(message.contains("trailing garbage"), "{message}");
        assert!(outcome.out == plain, "the data before the garbage differs");
    }
    // Tape-block padding after the last stream is fine...
    assert_decodes(&with(&[0; 10_240]), &plain);
    // ...but not padding followed by another stream.
    let tail = [&[0u8; 512][..], &empty_stream()].concat();
    let outcome = decode_all_ways(&with(&tail));
    let (_, message) = outcome.error.expect("stream after padding accepted");
    assert!(message.contains("trailing garbage"), "{message}");
}

#[test]
fn corruption_fails_as_the_sequential_decoder_does() {
    let _serial = serial();
    let plain = content(2_000_000, 9);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    for at in [20, packed.len() / 3, packed.len() / 2, packed.len() - 30] {
        let mut bad = packed.clone();
        bad[at] ^= 0x55;
        let outcome = decode_all_ways(&bad);
        let (kind, message) = outcome.error.expect("corruption accepted");
        assert_eq!(kind, io::ErrorKind::InvalidData, "{message}");
    }
    // A stream start planted inside a stream's compressed data: a false candidate that
    // also corrupts that stream.
    let mut planted = packed.clone();
    let at = packed.len() / 2 + 12_345;
    planted[at..at + 10].copy_from_slice(b"BZh91AY&SY");
    let outcome = decode_all_ways(&planted);
    assert!(outcome.error.is_some(), "planted magic accepted");
}

// ---------------------------------------------------------------- resources

/// Set in the child process where [`a_bomb_is_not_buffered`] measures.
const BOMB_CHILD: &str = "VRUN_TEST_BOMB_CHILD";

#[test]
fn a_bomb_is_not_buffered() {
    if std::env::var_os(BOMB_CHILD).is_none() {
        // The heap count is the process's: measure where no other test runs.
        let name = crate::common::test_name(module_path!(), "a_bomb_is_not_buffered");
        let out = Command::new(std::env::current_exe().unwrap())
            .args([&name, "--exact", "--nocapture", "--test-threads=1"])
            .env(BOMB_CHILD, "1")
            .output()
            .expect("run the bomb test in a child process");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} failed:\n{text}");
        assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
        return;
    }
    let _serial = serial();
    // One bzip2 -9 stream of 40 MB of zeros is ~100 bytes. The file: one stream of noise
    // (the first segment), four bombs and then real data (the second segment, decoded by
    // the other worker while the caller has not even finished the first).
    let first = noise(100_000, 10);
    let bomb = tool(&["bzip2", "-9", "-c"], &vec![0u8; 40_000_000]);
    let plain = content(1_000_000, 10);
    let data = [
        &tool(&["bzip2", "-9", "-c"], &first)[..],
        &bomb,
        &bomb,
        &bomb,
        &bomb,
        &tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain),
    ]
    .concat();

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut r = decoder_with(Format::Bzip2, &data[..], options(2));
    let mut buf = vec![0u8; 64 * 1024];
    r.read_exact(&mut buf[..1]).unwrap();
    // A stalled caller (a slow disk): a worker must not run ahead into the bomb.
    std::thread::sleep(Duration::from_secs(2));
    let mut total = 1;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => break,
            n => total += n,
        }
    }
    drop(r);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(total, first.len() + 160_000_000 + plain.len());
    // Two workers' bzip2 states (3.6 MB each for -9), their output chunks, the input
    // held: some MB, nowhere near one bomb's 40 MB.
    assert!(peak < 24 << 20, "peak heap {} MiB", peak >> 20);
}

#[test]
fn dropping_the_reader_early_stops_the_workers() {
    let _serial = serial();
    let plain = content(4_000_000, 11);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for read_first in [0usize, 1, 300_000] {
            let mut r = decoder_with(Format::Bzip2, &packed[..], options(2));
            let mut first = vec![0u8; read_first];
            r.read_exact(&mut first).unwrap();
            assert!(plain.starts_with(&first));
            drop(r);
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("dropping the decoder hung (or panicked)");
}

#[test]
fn open_detects_and_decodes_in_parallel_by_default() {
    let _serial = serial();
    let plain = content(2_000_000, 12);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let (format, mut r) = decode::open(&packed[..]).unwrap();
    assert_eq!(format, Format::Bzip2);
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert!(out == plain);
}
