//! A deterministic, build-like corpus for the decode and writer benches.
//!
//! About 12k files / 250 MB, shaped like a real app build: many small text and source files
//! (compressible), some hundred-KB files, a few MB-sized binaries, some incompressible data,
//! symlinks and nested directories. Generated from a fixed seed with our own tiny PRNG, so
//! the bytes never change with a dependency bump. Written once to `$VRUN_BENCH_CORPUS`
//! (default `target/bench-corpus`) as `build.tar` plus `.gz` (pigz -6), `.bz2` (lbzip2 -9,
//! what parallel compressors write), `.xz` (xz -6 -T2, multi-block) and `.zst` (zstd -3).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// SplitMix64: tiny and stable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Log-uniform in [lo, hi).
    pub fn size(&mut self, lo: u64, hi: u64) -> usize {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (l + (h - l) * u).exp() as usize
    }
}

const WORDS: &[&str] = &[
    "def",
    "self",
    "return",
    "import",
    "from",
    "class",
    "if",
    "else",
    "for",
    "in",
    "None",
    "True",
    "value",
    "config",
    "request",
    "response",
    "user",
    "data",
    "items",
    "result",
    "velociraptor",
    "proc",
    "build",
    "settings",
    "yaml",
    "json",
    "logger",
    "error",
    "=",
    "(",
    ")",
    ":",
    "+",
    "->",
    "0",
    "1",
    "42",
    "'utf-8'",
    "\n    ",
    "\n",
    "\n\n",
];

fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
    out
}

fn binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    // Structured binary: runs of repeated words with random bytes between (~2x compressible).
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let v = rng.next();
        if v % 2 == 0 {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            let run = (v >> 8) % 32;
            for _ in 0..run {
                out.extend_from_slice(&(v as u32).to_le_bytes());
            }
        }
    }
    out.truncate(len);
    out
}

fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The plain tar of the build-like tree.
pub fn build_tar() -> Vec<u8> {
    let mut rng = Rng::new(0x5eed);
    let mut b = tar::Builder::new(Vec::with_capacity(270 << 20));
    let mut dirs: Vec<String> = vec!["app".into()];
    let add_dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    add_dir(&mut b, "app");
    for i in 0..700 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let depth = parent.matches('/').count();
        let parent = if depth > 6 { "app".to_string() } else { parent };
        let d = format!("{parent}/pkg{i}");
        add_dir(&mut b, &d);
        dirs.push(d);
    }
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let mut files = Vec::new();
    for i in 0..11_000 {
        let d = &dirs[rng.below(dirs.len() as u64) as usize];
        let p = format!("{d}/module_{i}.py");
        let len = rng.size(100, 40_000);
        file(&mut b, &p, &text(&mut rng, len), 0o644);
        files.push(p);
    }
    for i in 0..600 {
        let d = &dirs[rng.below(dirs.len() as u64) as usize];
        let len = rng.size(30_000, 300_000);
        let (p, data) = if i % 3 == 0 {
            (format!("{d}/lib_{i}.so"), binary(&mut rng, len))
        } else {
            (format!("{d}/asset_{i}.js"), text(&mut rng, len))
        };
        file(&mut b, &p, &data, if i % 3 == 0 { 0o755 } else { 0o644 });
    }
    for i in 0..30 {
        let len = rng.size(1 << 20, 4 << 20);
        file(
            &mut b,
            &format!("app/bin/tool_{i}"),
            &binary(&mut rng, len),
            0o755,
        );
    }
    for i in 0..12 {
        let len = rng.size(1 << 20, 4 << 20);
        file(
            &mut b,
            &format!("app/static/blob_{i}.bin"),
            &random(&mut rng, len),
            0o644,
        );
    }
    for i in 0..300 {
        let target = &files[rng.below(files.len() as u64) as usize];
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        let rel = format!("../{}", target.trim_start_matches("app/"));
        b.append_link(&mut h, format!("app/links/l{i}"), rel)
            .unwrap();
    }
    b.into_inner().unwrap()
}

pub fn corpus_dir() -> PathBuf {
    std::env::var_os("VRUN_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
            PathBuf::from(target).join("bench-corpus")
        })
}

/// The plain build tar alone, generated on first use (no compressed forms).
pub fn build_tar_path() -> PathBuf {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let tar = dir.join("build.tar");
    if !tar.exists() {
        let tmp = dir.join("build.tar.tmp");
        std::fs::write(&tmp, build_tar()).unwrap();
        std::fs::rename(&tmp, &tar).unwrap();
    }
    tar
}

/// Paths of the corpus files, generated on first use: (extension, path).
pub fn corpus() -> Vec<(&'static str, PathBuf)> {
    let dir = corpus_dir();
    let tar = build_tar_path();
    let mut out = vec![("tar", tar.clone())];
    let tools: [(&str, &[&str]); 4] = [
        ("gz", &["pigz", "-6", "-c"]),
        ("bz2", &["lbzip2", "-9", "-c"]),
        ("xz", &["xz", "-6", "-T2", "-c"]),
        ("zst", &["zstd", "-3", "-T2", "-q", "-c"]),
    ];
    for (ext, cmd) in tools {
        let path = dir.join(format!("build.tar.{ext}"));
        if !path.exists() {
            compress(cmd, &tar, &path);
        }
        out.push((ext, path));
    }
    out
}

fn compress(cmd: &[&str], input: &Path, output: &Path) {
    let tmp = output.with_extension("tmp");
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(std::fs::File::create(&tmp).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd:?}");
    std::fs::rename(&tmp, output).unwrap();
}

/// `VRUN_BENCH_ONESHOT=N`: instead of criterion's statistics, run each case N times,
/// interleaved with the others (so machine load hits all cases alike), and print
/// median / min / max. For quick figures on a busy machine.
pub fn oneshot_rounds() -> Option<usize> {
    std::env::var("VRUN_BENCH_ONESHOT").ok()?.parse().ok()
}

/// A named case of a one-shot run, returning the seconds it measured.
pub type Case<'a> = (String, Box<dyn FnMut() -> f64 + 'a>);

/// Run `cases` round-robin for `rounds` rounds.
pub fn oneshot(rounds: usize, bytes: u64, cases: &mut [Case<'_>]) {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            // Alternate direction each round so no case always follows the same one.
            let _ = round;
            times[i].push(f());
        }
        cases.reverse();
        times.reverse();
    }
    if rounds % 2 == 1 {
        cases.reverse();
        times.reverse();
    }
    for ((name, _), t) in cases.iter().zip(times.iter_mut()) {
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        println!(
            "{name:<28} median {med:7.3} s  (min {:.3}, max {:.3}, n={})  median {:6.1} MiB/s, best {:6.1} MiB/s",
            t[0],
            t[t.len() - 1],
            t.len(),
            bytes as f64 / med / (1 << 20) as f64,
            bytes as f64 / t[0] / (1 << 20) as f64
        );
    }
}

/// Time a shell command (the baselines).
pub fn time_shell(cmd: &str) -> f64 {
    let start = std::time::Instant::now();
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
    start.elapsed().as_secs_f64()
}
