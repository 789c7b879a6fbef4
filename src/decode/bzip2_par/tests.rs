//! The parallel decoder's own parts: the candidate scan, the segment decoder, the path a
//! file takes (parallel or handed over), and hand-overs forced by false candidates and by
//! input errors. Files come from the real `bzip2` and `pbzip2`; tests/it/decode_bzip2.rs
//! covers the public API.

use std::io::{self, Read, Write};
use std::process::{Command, Stdio};

use super::*;

fn tool(cmd: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

/// Half text, half noise, so streams are of mixed sizes.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (out.len() / 50_000) % 2 == 0 {
            out.extend_from_slice(format!("line {} of {}\n", x % 1000, seed).as_bytes());
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
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

/// What a reader returned before it stopped, and how it stopped (error kind and message).
fn outcome(mut r: impl Read) -> (Vec<u8>, Option<String>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 10_000];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(format!("{:?}: {e}", e.kind()))),
        }
    }
}

/// The same error, but for the offset of a corrupt-data message, which may move by up to
/// 8 bytes with the input's buffering (see `Members::error_offset`).
fn assert_same_error(got: &Option<String>, expected: &Option<String>, what: &str) {
    let split = |m: &str| -> (String, u64, String) {
        match m.split_once("(at compressed byte ") {
            Some((head, rest)) => {
                let (offset, tail) = rest.split_once(')').unwrap();
                (head.into(), offset.parse().unwrap(), tail.into())
            }
            None => (m.into(), 0, String::new()),
        }
    };
    match (got, expected) {
        (Some(g), Some(e)) => {
            let ((gh, go, gt), (eh, eo, et)) = (split(g), split(e));
            assert!(
                gh == eh && gt == et && go.abs_diff(eo) <= 8,
                "{what}: {g:?} != {e:?}"
            );
        }
        _ => assert_eq!(got, expected, "{what}"),
    }
}

fn sequential(data: impl Read) -> (Vec<u8>, Option<String>) {
    outcome(Members::resume(Format::Bzip2, options(1), data, 0, 0))
}

#[test]
fn candidates_are_stream_starts_with_a_block() {
    let mut buf = vec![0u8; 100];
    buf[40..50].copy_from_slice(b"BZh91AY&SY");
    assert_eq!(find_stream_start(&buf, 0), Some(40));
    assert_eq!(find_stream_start(&buf, 40), Some(40));
    assert_eq!(find_stream_start(&buf, 41), None);
    assert_eq!(
        find_stream_start(&buf[..49], 0),
        None,
        "magic cut off by the end"
    );
    assert_eq!(find_stream_start(&buf[..50], 0), Some(40));
    assert_eq!(find_stream_start(&buf, 200), None);
    assert_eq!(find_stream_start(&[], 0), None);
    buf[43] = b'0';
    assert_eq!(find_stream_start(&buf, 0), None, "level 0");
    buf[43] = b'1';
    buf[49] = b'Z';
    assert_eq!(find_stream_start(&buf, 0), None, "no block magic");
    // An empty stream (`BZh9` then the end-of-stream magic) is not a candidate.
    let empty = tool(&["bzip2", "-c"], b"");
    assert_eq!(find_stream_start(&empty, 0), None);
    let one = tool(&["bzip2", "-c"], b"x");
    assert_eq!(find_stream_start(&[&b"BBZ"[..], &one].concat(), 0), Some(3));
}

#[test]
fn a_segment_must_be_whole_streams() {
    let (a, b) = (content(300_000, 1), content(200_000, 2));
    let (sa, sb) = (tool(&["bzip2", "-c"], &a), tool(&["bzip2", "-c"], &b));
    let empty = tool(&["bzip2", "-c"], b"");
    let stop = AtomicBool::new(false);
    let decode = |seg: &[u8]| {
        let mut out = Vec::new();
        let streams = decode_segment(seg, &stop, |chunk| {
            assert!(chunk.len() <= OUTPUT_CHUNK);
            out.extend(chunk);
            true
        });
        (streams, out)
    };
    let ab = [&sa[..], &empty, &sb].concat();
    assert_eq!(decode(&ab), (Some(3), [&a[..], &b].concat()));
    assert_eq!(decode(&sa).0, Some(1));
    assert_eq!(decode(&ab[..ab.len() - 1]).0, None, "truncated");
    assert_eq!(decode(&ab[..sa.len() + 3]).0, None, "truncated magic");
    assert_eq!(decode(&[&sa[..], &[0]].concat()).0, None, "padding");
    assert_eq!(decode(&[&sa[..], b"x"].concat()).0, None, "garbage");
    assert_eq!(decode(&ab[1..]).0, None, "not at a stream start");
    // A false candidate: the segment starts or ends inside a stream's data.
    let mid = sa.len() / 2;
    assert_eq!(decode(&sa[..mid]).0, None);
    assert_eq!(decode(&[&b"BZh91AY&SY"[..], &sa[mid..]].concat()).0, None);
    let mut planted = sa.clone();
    planted[mid..mid + 10].copy_from_slice(b"BZh91AY&SY");
    assert_eq!(decode(&planted).0, None, "corrupt");
    // A refusing receiver or the stop flag end the work.
    assert_eq!(decode_segment(&sa, &stop, |_| false), None);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(decode(&sa).0, None);
}

#[test]
fn a_pbzip2_file_is_decoded_by_the_workers() {
    let plain = content(3_000_000, 3);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let mut r = ParallelBzip2::new(&packed[..], options(2));
    let (out, error) = outcome(&mut r);
    assert_eq!(error, None);
    assert!(out == plain);
    assert_eq!(r.hand_overs, 0, "handed over to the sequential decoder");
    assert_eq!(
        r.to_parallel, 1,
        "the first stream is decoded on the caller's thread"
    );
    let streams = packed
        .windows(STREAM_START_LEN)
        .filter(|w| is_stream_start(w));
    let segments = (streams.count() / 4).max(2) as u64;
    assert!(
        r.decoded() >= segments,
        "{} segments by workers",
        r.decoded()
    );
    assert_eq!(r.pool.threads.len(), 2);
}

#[test]
fn a_single_stream_file_streams_without_threads() {
    let mut x = 4u64;
    let plain: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect();
    let packed = tool(&["bzip2", "-1", "-c"], &plain);
    assert!(packed.len() > 2 * MAX_SEGMENT);
    // The first bytes out need no more input than the sequential decoder needs.
    let mut input = &packed[..];
    let mut r = ParallelBzip2::new(&mut input, options(2));
    let mut first = vec![0u8; 1000];
    r.read_exact(&mut first).unwrap();
    drop(r);
    assert!(packed.len() - input.len() <= 2 * crate::decode::INPUT_BUFFER);

    let mut r = ParallelBzip2::new(&packed[..], options(2));
    let (out, error) = outcome(&mut r);
    assert_eq!(error, None);
    assert!(out == plain);
    assert_eq!((r.decoded(), r.hand_overs), (0, 0));
    assert!(r.pool.threads.is_empty(), "threads started for one stream");
}

/// Real candidates, and on every third look a false one 30 000 bytes past `from` (inside
/// a stream, mostly) when that comes first.
fn with_false_cuts(buf: &[u8], from: usize) -> Option<usize> {
    thread_local!(static LOOKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
    let real = find_stream_start(buf, from);
    let fake = from + 30_000;
    if fake + STREAM_START_LEN > buf.len() {
        return real;
    }
    let looks = LOOKS.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    match real {
        Some(at) if at <= fake => Some(at),
        _ if looks % 3 == 0 => Some(fake),
        real => real,
    }
}

#[test]
fn false_candidates_hand_over_with_the_same_output() {
    let plain = content(2_000_000, 5);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let mut r = ParallelBzip2::with_cuts(&packed[..], options(2), with_false_cuts);
    let (out, error) = outcome(&mut r);
    assert_eq!(error, None);
    assert!(out == plain, "{} of {} bytes", out.len(), plain.len());
    assert!(r.hand_overs > 0);
    assert!(r.to_parallel > 1, "the workers did not take over again");
    assert!(r.decoded() > 0);
}

#[test]
fn false_candidates_over_bad_input_fail_as_the_sequential_decoder_does() {
    let plain = content(2_000_000, 6);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    let mut corrupt = packed.clone();
    corrupt[packed.len() / 2] ^= 0x10;
    let cases = [
        ("truncated", packed[..packed.len() - 7].to_vec()),
        ("corrupt", corrupt),
        ("garbage", [&packed[..], b"junk"].concat()),
        ("padded", [&packed[..], &[0; 100]].concat()),
    ];
    for (what, data) in cases {
        let expected = sequential(&data[..]);
        for cuts in [find_stream_start as FindCut, with_false_cuts] {
            let got = outcome(ParallelBzip2::with_cuts(&data[..], options(2), cuts));
            assert_same_error(&got.1, &expected.1, what);
            // A corrupt block's bytes come out before its CRC is checked, as many as the
            // reads happened to take (see tests/it/decode_bzip2.rs `same_output`).
            let n = got.0.len().min(expected.0.len());
            let same = match what {
                "corrupt" => got.0[..n] == expected.0[..n],
                _ => got.0 == expected.0,
            };
            assert!(same, "{what}: output differs");
        }
    }
}

/// Yields `data`, then fails with `error` instead of ending.
struct FailingAfter<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for FailingAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer went away",
            ));
        }
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn an_input_error_surfaces_as_in_the_sequential_decoder() {
    let plain = content(2_000_000, 7);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    for at in [0, 5, 100_000, packed.len() / 2, packed.len()] {
        let input = || FailingAfter {
            data: &packed[..at],
            chunk: 16 * 1024,
        };
        let expected = sequential(input());
        let got = outcome(ParallelBzip2::new(input(), options(2)));
        assert!(expected.1.is_some());
        assert_same_error(&got.1, &expected.1, &format!("error at {at}"));
        assert!(got.0 == expected.0, "error at {at}: output differs");
    }
}

/// Hands out `data` in pieces of at most `piece` bytes, as a network does.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn input_in_small_pieces_still_goes_to_the_workers() {
    let plain = content(1_500_000, 8);
    let packed = tool(&["pbzip2", "-1", "-b1", "-p2", "-c"], &plain);
    // Odd sizes, so stream starts straddle the reads at every possible split.
    for piece in [3, 7, 4093, 65_537] {
        let input = Pieces {
            data: &packed,
            piece,
        };
        let mut r = ParallelBzip2::new(input, options(2));
        let (out, error) = outcome(&mut r);
        assert_eq!(error, None, "pieces of {piece}");
        assert!(out == plain, "pieces of {piece}: output differs");
        assert_eq!(r.hand_overs, 0, "pieces of {piece}");
        assert!(
            r.decoded() >= 2,
            "pieces of {piece}: {} segments",
            r.decoded()
        );
    }
}
