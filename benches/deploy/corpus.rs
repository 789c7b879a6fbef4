//! The deterministic corpus: a build-like tree and an image-like tree, packed with GNU tar
//! and the real compressors, cached on disk by (generator version, seed, sizes).
//!
//! Why generate instead of downloading a real build: the figures must be reproducible by
//! anyone, offline, and the same seed must give the same bytes. Why the real compressors
//! (pigz, pbzip2, xz -T2, zstd -T2) rather than the Rust encoders: the archives operators
//! deploy come from those tools, and their output shapes matter to a decoder — pbzip2
//! writes one bzip2 *stream* per 900 kB block (multi-stream), `xz -T` writes independent
//! blocks (parallel-decodable), pigz writes one gzip member. The trees are deleted once
//! packed; only the archives (and `corpus.json`, written last as the completion mark) stay.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::content::{self, TextKind, Vocab};
use crate::sys;

/// Bumped whenever the generator changes the bytes it produces (part of the cache key).
/// The RNG is rand 0.9's `StdRng` (ChaCha12), stable within rand 0.9.
const GENERATOR: &str = "gen2";

/// Archive mtime, so two generations of the same seed give identical archives.
const MTIME: &str = "@1700000000";

/// Build files per MB of tree: 12k files in 250 MB, as in the real app build.
const BUILD_FILES_PER_MB: f64 = 48.0;

/// Image tree size relative to the build (an ~80 MB image next to a 250 MB build).
const IMAGE_SIZE_RATIO: f64 = 0.32;

/// Image files per MB (a few thousand files in ~80 MB: larger binaries than a build).
const IMAGE_FILES_PER_MB: f64 = 37.0;

/// Most files a tree gets, whatever its size: the big RSS variant grows by file size.
const MAX_FILES: usize = 12_000;

/// Archive formats, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Format {
    Gz,
    Bz2,
    Xz,
    Zst,
    Tar,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Gz,
        Format::Bz2,
        Format::Xz,
        Format::Zst,
        Format::Tar,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Gz => "gz",
            Format::Bz2 => "bz2",
            Format::Xz => "xz",
            Format::Zst => "zst",
            Format::Tar => "tar",
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            Format::Gz => ".tar.gz",
            Format::Bz2 => ".tar.bz2",
            Format::Xz => ".tar.xz",
            Format::Zst => ".tar.zst",
            Format::Tar => ".tar",
        }
    }

    /// GNU tar's decompression flag for the baseline pipeline.
    pub fn tar_flag(self) -> Option<&'static str> {
        match self {
            Format::Gz => Some("-z"),
            Format::Bz2 => Some("-j"),
            Format::Xz => Some("-J"),
            Format::Zst => Some("--zstd"),
            Format::Tar => None,
        }
    }
}

/// Byte shares of the three content classes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Mix {
    pub text: f64,
    pub binary: f64,
    pub random: f64,
}

/// Tuned so the build gzips to about a third of its size (issue 6: 80 MB → 251 MB).
const BUILD_MIX: Mix = Mix {
    text: 0.55,
    binary: 0.40,
    random: 0.05,
};
const IMAGE_MIX: Mix = Mix {
    text: 0.45,
    binary: 0.47,
    random: 0.08,
};
/// The RSS variant: mostly incompressible, so its .tar.gz is itself ≥ 1 GiB.
const BIG_MIX: Mix = Mix {
    text: 0.05,
    binary: 0.05,
    random: 0.90,
};

/// What to generate.
#[derive(Clone, Debug)]
pub struct CorpusSpec {
    pub seed: u64,
    pub build_mb: u64,
    /// Generate the image tree too (not for the big RSS variant).
    pub image: bool,
    /// The mostly-incompressible variant for the peak-RSS run (gz only).
    pub big: bool,
}

impl CorpusSpec {
    fn key(&self) -> String {
        format!(
            "{GENERATOR}-seed{:x}-{}mb{}{}",
            self.seed,
            self.build_mb,
            if self.image { "-img" } else { "" },
            if self.big { "-big" } else { "" }
        )
    }
    fn formats(&self) -> Vec<Format> {
        if self.big {
            vec![Format::Gz]
        } else {
            Format::ALL.to_vec()
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Regular-file payload bytes.
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub file: PathBuf,
    pub bytes: u64,
    pub md5: String,
    /// The command that packed it (from the plain tar).
    pub packer: String,
    /// Seconds it took (informative: generation runs once).
    pub pack_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TreeInfo {
    pub stats: TreeStats,
    pub mix: Mix,
    pub archives: BTreeMap<Format, ArchiveInfo>,
}

impl Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
impl<'de> Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown format {s:?}")))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Corpus {
    pub key: String,
    pub dir: PathBuf,
    pub seed: u64,
    pub generator: String,
    pub build: TreeInfo,
    pub image: Option<TreeInfo>,
}

impl Corpus {
    /// Load the cached corpus for `spec` under `dir`, generating it first if absent.
    pub fn ensure(dir: &Path, spec: &CorpusSpec) -> Result<Corpus> {
        let key = spec.key();
        let final_dir = dir.join(&key);
        let marker = final_dir.join("corpus.json");
        if marker.exists() {
            let c: Corpus = serde_json::from_slice(&fs_err::read(&marker)?)
                .with_context(|| format!("{} is not a corpus description", marker.display()))?;
            if c.build.archives.values().all(|a| a.file.exists()) {
                eprintln!("corpus: reusing {}", final_dir.display());
                return Ok(c);
            }
        }
        fs_err::create_dir_all(dir)?;
        let tmp = dir.join(format!("{key}.tmp-{}", std::process::id()));
        let _cleanup = sys::RemoveOnDrop(tmp.clone());
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        fs_err::create_dir_all(&tmp)?;
        eprintln!(
            "corpus: generating {key} (once; cached in {})",
            dir.display()
        );
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let vocab = Vocab::new(&mut rng, 4000);

        let mb = spec.build_mb as f64;
        let build_bytes = (mb * 1024.0 * 1024.0) as u64;
        let build_files = ((mb * BUILD_FILES_PER_MB) as usize).clamp(200, MAX_FILES);
        let mix = if spec.big { BIG_MIX } else { BUILD_MIX };
        let t = Instant::now();
        let tree = tmp.join("build");
        let stats = build_tree(&tree, &mut rng, &vocab, build_bytes, build_files, mix)?;
        eprintln!(
            "corpus: build tree {} files, {} MB in {:.1}s",
            stats.files,
            stats.bytes / 1_000_000,
            t.elapsed().as_secs_f64()
        );
        let archives = pack(&tree, &tmp, &final_dir, "build", &spec.formats())?;
        fs_err::remove_dir_all(&tree)?;
        let build = TreeInfo {
            stats,
            mix,
            archives,
        };

        let image = if spec.image {
            let bytes = (build_bytes as f64 * IMAGE_SIZE_RATIO) as u64;
            let files =
                ((mb * IMAGE_SIZE_RATIO * IMAGE_FILES_PER_MB) as usize).clamp(150, MAX_FILES);
            let tree = tmp.join("image");
            let stats = image_tree(&tree, &mut rng, &vocab, bytes, files, IMAGE_MIX)?;
            eprintln!(
                "corpus: image tree {} files, {} MB",
                stats.files,
                stats.bytes / 1_000_000
            );
            let archives = pack(&tree, &tmp, &final_dir, "image", &spec.formats())?;
            fs_err::remove_dir_all(&tree)?;
            Some(TreeInfo {
                stats,
                mix: IMAGE_MIX,
                archives,
            })
        } else {
            None
        };

        let corpus = Corpus {
            key: key.clone(),
            dir: final_dir.clone(),
            seed: spec.seed,
            generator: GENERATOR.into(),
            build,
            image,
        };
        fs_err::write(tmp.join("corpus.json"), serde_json::to_vec_pretty(&corpus)?)?;
        if final_dir.exists() {
            fs_err::remove_dir_all(&final_dir)?;
        }
        fs_err::rename(&tmp, &final_dir)?;
        Ok(corpus)
    }
}

/// Writes files under a root and counts what it made.
struct TreeWriter {
    root: PathBuf,
    stats: TreeStats,
    dirs: HashSet<PathBuf>,
    names: HashSet<PathBuf>,
}

impl TreeWriter {
    fn new(root: &Path) -> Result<Self> {
        fs_err::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            stats: TreeStats::default(),
            dirs: HashSet::new(),
            names: HashSet::new(),
        })
    }

    fn dir(&mut self, rel: &Path, mode: u32) -> Result<()> {
        let mut cur = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            if self.dirs.insert(cur.clone()) {
                let p = self.root.join(&cur);
                fs_err::create_dir(&p)?;
                fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
                self.stats.dirs += 1;
            }
        }
        fs_err::set_permissions(self.root.join(rel), std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// A fresh name `dir/stem[-n].ext` not used yet.
    fn unique(&mut self, dir: &Path, stem: &str, ext: &str) -> PathBuf {
        let dot = if ext.is_empty() { "" } else { "." };
        let mut p = dir.join(format!("{stem}{dot}{ext}"));
        let mut n = 1;
        while !self.names.insert(p.clone()) {
            n += 1;
            p = dir.join(format!("{stem}-{n}{dot}{ext}"));
        }
        p
    }

    fn file(&mut self, rel: &Path, data: &[u8], mode: u32) -> Result<()> {
        sys::check_interrupted()?;
        if let Some(parent) = rel.parent() {
            if !parent.as_os_str().is_empty() && !self.dirs.contains(parent) {
                self.dir(parent, 0o755)?;
            }
        }
        self.names.insert(rel.to_path_buf());
        let p = self.root.join(rel);
        fs_err::write(&p, data)?;
        fs_err::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        self.stats.files += 1;
        self.stats.bytes += data.len() as u64;
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &str) -> Result<()> {
        self.names.insert(rel.to_path_buf());
        let p = self.root.join(rel);
        std::os::unix::fs::symlink(target, &p)
            .with_context(|| format!("symlink {} -> {target}", p.display()))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, rel: &Path, existing: &Path) -> Result<()> {
        self.names.insert(rel.to_path_buf());
        fs_err::hard_link(self.root.join(existing), self.root.join(rel))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn chown(&self, rel: &Path, uid: u32, gid: u32) -> Result<()> {
        let p = self.root.join(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", p.display()))
    }
}

/// Scale raw sizes so they sum to `budget` bytes.
fn scale(raw: &[f64], budget: u64) -> Vec<usize> {
    let sum: f64 = raw.iter().sum();
    if sum <= 0.0 {
        return vec![0; raw.len()];
    }
    let f = budget as f64 / sum;
    raw.iter()
        .map(|r| ((r * f).round() as usize).max(1))
        .collect()
}

/// Relative path from directory `from_dir` to `to` (both relative to the same root).
fn relative(from_dir: &Path, to: &Path) -> String {
    let a: Vec<_> = from_dir.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut s = String::new();
    for _ in common..a.len() {
        s.push_str("../");
    }
    let rest: Vec<String> = b[common..]
        .iter()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    s.push_str(&rest.join("/"));
    s
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

/// Nested package directories: `n` roots under `base`, each with a few nested subdirs.
fn package_dirs(
    rng: &mut StdRng,
    vocab: &Vocab,
    base: &str,
    n: usize,
    max_sub: usize,
) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for _ in 0..n {
        let root = PathBuf::from(base).join(vocab.rare(rng));
        let mut pkg = vec![root];
        for _ in 0..rng.random_range(0..=max_sub) {
            let parent = pick(rng, &pkg).clone();
            if parent.components().count() < 10 {
                pkg.push(parent.join(vocab.rare(rng)));
            }
        }
        all.extend(pkg);
    }
    all.sort();
    all.dedup();
    all
}

/// The build-like tree: a Python web app with its virtualenv, node modules, static
/// assets, native extensions and shared libraries, a Procfile and uptests.
fn build_tree(
    root: &Path,
    rng: &mut StdRng,
    vocab: &Vocab,
    bytes: u64,
    files: usize,
    mix: Mix,
) -> Result<TreeStats> {
    let mut w = TreeWriter::new(root)?;
    // Fixed files every build has.
    w.file(
        Path::new("Procfile"),
        b"web: bin/start --port $PORT\nworker: bin/worker\n",
        0o644,
    )?;
    w.file(
        Path::new("uptests/web/01_alive"),
        b"#!/bin/sh\nexec curl -fsS \"http://$1:$2/\" >/dev/null\n",
        0o755,
    )?;
    w.file(
        Path::new("bin/start"),
        b"#!/bin/sh\nexec python3 -m app \"$@\"\n",
        0o755,
    )?;
    w.file(
        Path::new("bin/worker"),
        b"#!/bin/sh\nexec python3 -m app.worker\n",
        0o755,
    )?;

    let n_bin = ((files as f64 * 0.02) as usize).max(3);
    let n_rand = ((files as f64 * 0.03) as usize).max(2);
    let n_text = files.saturating_sub(n_bin + n_rand + 4).max(10);

    let py_dirs = package_dirs(
        rng,
        vocab,
        "lib/python3.11/site-packages",
        (n_text / 70).max(2),
        8,
    );
    let node_dirs = package_dirs(rng, vocab, "node_modules", (n_text / 200).max(1), 4);
    let tmpl_dirs = package_dirs(rng, vocab, "templates", 3, 4);
    let mut all_dirs: Vec<PathBuf> = py_dirs.clone();
    all_dirs.extend(node_dirs.iter().cloned());
    w.dir(Path::new("lib"), 0o755)?;
    w.symlink(Path::new("lib/python3"), "python3.11")?;

    // Text: many small files, log-normal sizes (median a few kB, long tail).
    let raw: Vec<f64> = (0..n_text)
        .map(|_| content::lognormal(rng, 3000.0, 1.2, 60.0, 400_000.0))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.text) as u64);
    let mut texts = Vec::new();
    for size in sizes {
        let r = rng.random_range(0..100);
        let (kind, dir) = match r {
            0..=54 => (TextKind::Python, pick(rng, &py_dirs).clone()),
            55..=69 => (TextKind::Js, pick(rng, &node_dirs).clone()),
            70..=75 => (TextKind::Json, pick(rng, &node_dirs).clone()),
            76..=80 => (TextKind::Css, PathBuf::from("static/css")),
            81..=87 => (TextKind::Html, pick(rng, &tmpl_dirs).clone()),
            _ => (TextKind::Prose, pick(rng, &all_dirs).clone()),
        };
        let stem = vocab.rare(rng).to_string();
        let rel = w.unique(&dir, &stem, kind.ext());
        let data = content::text(rng, vocab, kind, size);
        w.file(&rel, &data, 0o644)?;
        texts.push(rel);
    }
    // A few file symlinks between packages (relative, inside the tree).
    for _ in 0..(n_text / 100).max(1) {
        let target = pick(rng, &texts).clone();
        let dir = pick(rng, &py_dirs).clone();
        let stem = vocab.rare(rng).to_string();
        let rel = w.unique(&dir, &stem, "py");
        w.symlink(&rel, &relative(&dir, &target))?;
    }

    // Binaries: native extensions and shared libraries, 40 kB – 8 MB, with .so symlinks.
    let raw: Vec<f64> = (0..n_bin)
        .map(|_| content::loguniform(rng, 40e3, 8e6))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.binary) as u64);
    for (i, size) in sizes.into_iter().enumerate() {
        let data = content::binary(rng, vocab, size);
        let name = vocab.rare(rng).to_string();
        if i % 2 == 0 {
            let (a, b, c) = (
                rng.random_range(0..4),
                rng.random_range(0..20),
                rng.random_range(0..9),
            );
            let real = w.unique(
                Path::new("lib"),
                &format!("lib{name}.so.{a}.{b}"),
                &c.to_string(),
            );
            w.file(&real, &data, 0o755)?;
            let real_name = real.file_name().unwrap().to_string_lossy().into_owned();
            let l1 = w.unique(Path::new("lib"), &format!("lib{name}.so"), &a.to_string());
            w.symlink(&l1, &real_name)?;
            let l0 = w.unique(Path::new("lib"), &format!("lib{name}"), "so");
            w.symlink(&l0, &real_name)?;
        } else {
            let dir = pick(rng, &py_dirs).clone();
            let rel = w.unique(&dir, &format!("_{name}.cpython-311-x86_64-linux-gnu"), "so");
            w.file(&rel, &data, 0o755)?;
        }
    }

    // Incompressible assets: images, fonts, pre-compressed data.
    let raw: Vec<f64> = (0..n_rand)
        .map(|_| content::loguniform(rng, 2e3, 4e6))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.random) as u64);
    for size in sizes {
        let (dir, ext) = *pick(
            rng,
            &[
                ("static/img", "png"),
                ("static/img", "jpg"),
                ("static/fonts", "woff2"),
                ("data", "gz"),
            ],
        );
        let stem = vocab.rare(rng).to_string();
        let rel = w.unique(Path::new(dir), &stem, ext);
        let data = content::random(rng, size);
        w.file(&rel, &data, 0o644)?;
    }
    w.symlink(Path::new("static/latest"), "css")?;
    Ok(w.stats)
}

/// The image-like tree: a small Debian-ish root filesystem with merged /usr, absolute
/// symlinks through /etc/alternatives, hard links, setuid binaries and a few files owned
/// by system users — what the image extraction rules (containerd's) must handle.
fn image_tree(
    root: &Path,
    rng: &mut StdRng,
    vocab: &Vocab,
    bytes: u64,
    files: usize,
    mix: Mix,
) -> Result<TreeStats> {
    let mut w = TreeWriter::new(root)?;
    for (d, mode) in [
        ("etc/alternatives", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("usr/lib/x86_64-linux-gnu", 0o755),
        ("usr/lib64", 0o755),
        ("usr/share/man/man1", 0o755),
        ("var/lib/dpkg/info", 0o755),
        ("var/cache/apt", 0o755),
        ("var/log", 0o755),
        ("var/mail", 0o2775),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
        ("opt", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
    ] {
        w.dir(Path::new(d), mode)?;
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        w.symlink(Path::new(l), t)?;
    }
    let n_bin = ((files as f64 * 0.12) as usize).max(4);
    let n_rand = ((files as f64 * 0.08) as usize).max(2);
    let n_text = files.saturating_sub(n_bin + n_rand).max(10);
    let pkgs: Vec<String> = (0..(files / 12).max(3))
        .map(|_| vocab.rare(rng).to_string())
        .collect();

    let raw: Vec<f64> = (0..n_bin)
        .map(|_| content::loguniform(rng, 20e3, 4e6))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.binary) as u64);
    let mut bins = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        let data = content::binary(rng, vocab, size);
        let name = vocab.rare(rng).to_string();
        if i % 2 == 0 {
            let mode = if i % 40 == 0 { 0o4755 } else { 0o755 };
            let rel = w.unique(Path::new("usr/bin"), &name, "");
            w.file(&rel, &data, mode)?;
            bins.push(rel);
        } else {
            let dir = Path::new("usr/lib/x86_64-linux-gnu");
            let real = w.unique(
                dir,
                &format!("lib{name}.so.{}", i % 7),
                &format!("{}.0", i % 5),
            );
            w.file(&real, &data, 0o644)?;
            let real_name = real.file_name().unwrap().to_string_lossy().into_owned();
            let l = w.unique(dir, &format!("lib{name}.so"), &format!("{}", i % 7));
            w.symlink(&l, &real_name)?;
        }
    }
    w.symlink(
        Path::new("usr/lib64/ld-linux-x86-64.so.2"),
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    )?;
    // Alternatives: absolute symlink chains, resolved in-root by image extraction.
    for bin in bins.iter().take(12).cloned().collect::<Vec<_>>() {
        let alt = vocab.rare(rng).to_string();
        let a = w.unique(Path::new("etc/alternatives"), &alt, "");
        w.symlink(&a, &format!("/{}", bin.display()))?;
        let u = w.unique(Path::new("usr/bin"), &format!("{alt}-alt"), "");
        w.symlink(&u, &format!("/{}", a.display()))?;
    }
    // Hard links, as dpkg ships them (perl, gzip/gunzip…).
    for bin in bins.iter().skip(12).take(6).cloned().collect::<Vec<_>>() {
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        let h = w.unique(Path::new("usr/bin"), &format!("{name}5"), "");
        w.hardlink(&h, &bin)?;
    }

    let raw: Vec<f64> = (0..n_text)
        .map(|_| content::lognormal(rng, 1500.0, 1.3, 30.0, 300_000.0))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.text) as u64);
    for size in sizes {
        let pkg = pick(rng, &pkgs).clone();
        let (rel, kind) = match rng.random_range(0..100) {
            0..=34 => (
                w.unique(
                    &Path::new("usr/lib/python3/dist-packages").join(&pkg),
                    vocab.rare(rng),
                    "py",
                ),
                TextKind::Python,
            ),
            35..=59 => (
                w.unique(&Path::new("usr/share/doc").join(&pkg), "copyright", ""),
                TextKind::Prose,
            ),
            60..=79 => (
                w.unique(Path::new("var/lib/dpkg/info"), &pkg, "list"),
                TextKind::Prose,
            ),
            80..=89 => (
                w.unique(&Path::new("etc").join(&pkg), vocab.rare(rng), "conf"),
                TextKind::Css,
            ),
            _ => (
                w.unique(&Path::new("usr/share").join(&pkg), vocab.rare(rng), "html"),
                TextKind::Html,
            ),
        };
        let data = content::text(rng, vocab, kind, size);
        w.file(&rel, &data, 0o644)?;
    }

    let raw: Vec<f64> = (0..n_rand)
        .map(|_| content::loguniform(rng, 1e3, 1e6))
        .collect();
    let sizes = scale(&raw, (bytes as f64 * mix.random) as u64);
    for (i, size) in sizes.into_iter().enumerate() {
        let pkg = pick(rng, &pkgs).clone();
        let rel = if i % 2 == 0 {
            w.unique(
                &Path::new("usr/share/doc").join(&pkg),
                "changelog.Debian",
                "gz",
            )
        } else {
            w.unique(Path::new("usr/share/man/man1"), &pkg, "1.gz")
        };
        let data = content::random(rng, size);
        w.file(&rel, &data, 0o644)?;
    }

    // System users' files: numeric owners must survive image extraction.
    w.file(
        Path::new("var/log/dpkg.log"),
        b"2024-01-01 startup\n",
        0o640,
    )?;
    w.chown(Path::new("var/log/dpkg.log"), 0, 4)?;
    w.dir(Path::new("var/lib/postgresql"), 0o700)?;
    w.file(Path::new("var/lib/postgresql/PG_VERSION"), b"15\n", 0o600)?;
    w.chown(Path::new("var/lib/postgresql/PG_VERSION"), 100, 102)?;
    w.chown(Path::new("var/lib/postgresql"), 100, 102)?;
    w.chown(Path::new("var/mail"), 0, 8)?;
    Ok(w.stats)
}

/// Pack `tree` with GNU tar into `<tmp>/<name>.tar`, then compress it in every format.
/// Archive paths are recorded as they will be after the rename to `final_dir`.
fn pack(
    tree: &Path,
    tmp: &Path,
    final_dir: &Path,
    name: &str,
    formats: &[Format],
) -> Result<BTreeMap<Format, ArchiveInfo>> {
    let tar_path = tmp.join(format!("{name}.tar"));
    let t = Instant::now();
    let tar_cmd = format!(
        "tar --sort=name --format=gnu --mtime={MTIME} --numeric-owner -C TREE -cf {name}.tar ."
    );
    let st = Command::new("tar")
        .args(["--sort=name", "--format=gnu", &format!("--mtime={MTIME}")])
        .args(["--numeric-owner", "-C"])
        .arg(tree)
        .arg("-cf")
        .arg(&tar_path)
        .arg(".")
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar -c of {} failed: {st}", tree.display());
    }
    let tar_s = t.elapsed().as_secs_f64();
    let tar_len = fs_err::metadata(&tar_path)?.len();
    let mut out = BTreeMap::new();
    for &f in formats {
        sys::check_interrupted()?;
        let file_name = format!("{name}{}", f.suffix());
        let path = tmp.join(&file_name);
        let t = Instant::now();
        let packer = if f == Format::Tar {
            tar_cmd.clone()
        } else {
            let (prog, args) = compressor(f, tar_len);
            let st = Command::new(&prog)
                .args(&args)
                .stdin(File::open(&tar_path)?)
                .stdout(File::create(&path)?)
                .status()
                .with_context(|| format!("running {prog}"))?;
            if !st.success() {
                bail!("{prog} {} failed: {st}", args.join(" "));
            }
            format!(
                "{tar_cmd} && {prog} {} < {name}.tar > {file_name}",
                args.join(" ")
            )
        };
        let pack_s = if f == Format::Tar {
            tar_s
        } else {
            t.elapsed().as_secs_f64()
        };
        let bytes = fs_err::metadata(&path)?.len();
        let md5 = md5_file(&path)?;
        eprintln!(
            "corpus: {file_name} {:.1} MB ({:.1}s)",
            bytes as f64 / 1e6,
            pack_s
        );
        out.insert(
            f,
            ArchiveInfo {
                file: final_dir.join(&file_name),
                bytes,
                md5,
                packer,
                pack_s,
            },
        );
    }
    if !formats.contains(&Format::Tar) {
        fs_err::remove_file(&tar_path)?;
    }
    Ok(out)
}

/// The real compressor for a format, two threads (the machine has two cores).
fn compressor(f: Format, tar_len: u64) -> (String, Vec<String>) {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match f {
        // pigz: one gzip member, as gzip writes; -n: no name/time, deterministic.
        Format::Gz if sys::have("pigz") => ("pigz".into(), s(&["-6", "-n", "-p", "2", "-c"])),
        Format::Gz => ("gzip".into(), s(&["-6", "-n", "-c"])),
        // pbzip2: one bzip2 stream per block → multi-stream, what parallel packers emit.
        Format::Bz2 if sys::have("pbzip2") => ("pbzip2".into(), s(&["-9", "-p2", "-c"])),
        Format::Bz2 if sys::have("lbzip2") => ("lbzip2".into(), s(&["-9", "-n", "2", "-c"])),
        Format::Bz2 => ("bzip2".into(), s(&["-9", "-c"])),
        // xz -T2 with a block size giving ≥ 8 blocks: parallel-decodable multi-block .xz.
        Format::Xz => {
            let block = (tar_len / 8).clamp(1 << 20, 24 << 20) >> 20;
            (
                "xz".into(),
                vec![
                    "-6".into(),
                    "-T2".into(),
                    format!("--block-size={block}MiB"),
                    "-c".into(),
                ],
            )
        }
        Format::Zst => ("zstd".into(), s(&["-3", "-T2", "-q", "-c"])),
        Format::Tar => unreachable!("plain tar is not compressed"),
    }
}

pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = fs_err::File::open(path)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Write `corpus.json`-like stats for humans.
pub fn describe(c: &Corpus, out: &mut impl Write) -> std::io::Result<()> {
    for (label, t) in [("build", Some(&c.build)), ("image", c.image.as_ref())] {
        let Some(t) = t else { continue };
        let s = &t.stats;
        writeln!(
            out,
            "{label}: {} files, {} dirs, {} symlinks, {} hardlinks, {:.1} MB payload",
            s.files,
            s.dirs,
            s.symlinks,
            s.hardlinks,
            s.bytes as f64 / 1e6
        )?;
        let line: Vec<String> = t
            .archives
            .iter()
            .map(|(f, a)| format!("{} {:.1} MB", f.name(), a.bytes as f64 / 1e6))
            .collect();
        writeln!(out, "  archives: {}", line.join(", "))?;
    }
    Ok(())
}
