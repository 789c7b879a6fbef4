//! One EROFS image against a directory tree: writing the build corpus to disk.
//!
//! `sudo cargo bench --bench erofs` (root: it makes loop filesystems and blkio rules).
//!
//! The corpus is the decode/writer benches' build (`benches/common/corpus.rs`: ~12k
//! files, ~250 MB, as `build.tar`). Each side reads `build.tar` (page cache dropped before
//! every run, so it comes from the root disk, the same for all sides) and writes to a fresh
//! loop-mounted ext4 (`ext4`) or the same behind the deploy bench's blkio throttle
//! (`slow`: 40 MiB/s and 1000 IOPS, read and write). Each run includes its own durability:
//!
//! | side | what |
//! |---|---|
//! | `tar` | `tar -xf build.tar -C DIR && sync -f DIR` (GNU tar) |
//! | `dir` | vrun's directory extractor (`extract`, image mode) + `syncfs` |
//! | `erofs` | the tar crate's entries into [`ImageWriter`] + its one fsync |
//! | `erofs-plain` | the same with `inline_tails: false` (every file block-aligned on its own blocks) |
//!
//! Sides run in rotating order (tar, dir, erofs; then dir, erofs, tar; …) for
//! `VRUN_BENCH_PAIRS` rounds (default 3), each as a child process so `wait4` gives its own
//! peak RSS. Reported per side: median and min–max wall seconds, write IOs completed on
//! the loop device (`/sys/block/loopN/stat` field 5, after merging) and write bios seen
//! by the throttle (`blkio.throttle.io_serviced`, what the IOPS limit counts), both
//! before/after with the sync included, bytes on disk, peak RSS. `VRUN_BENCH_FS=ext4,slow` picks targets. Before trusting `slow`, a
//! `dd` of 200 MB + fsync must take ≥ 5 s there (checked; the run stops otherwise).
//!
//! Also: writer memory per entry, from the peak RSS of writing N empty files (N = 20k and
//! 120k) into an image on tmpfs: (rss(120k) − rss(20k)) / 100k.

#[path = "common/corpus.rs"]
mod corpus;
#[path = "deploy/sys.rs"]
#[allow(dead_code)]
mod sys;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use vrun::erofs::{Entry, EntryKind, ImageWriter, Metadata, WriterOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(sys::TRAMPOLINE_FLAG) => return sys::trampoline_main(&args),
        Some("--child-erofs") => {
            return child_erofs(Path::new(&args[2]), Path::new(&args[3]), true)
        }
        Some("--child-erofs-plain") => {
            return child_erofs(Path::new(&args[2]), Path::new(&args[3]), false)
        }
        Some("--child-dir") => return child_dir(Path::new(&args[2]), Path::new(&args[3])),
        Some("--child-rss") => return child_rss(args[2].parse().unwrap(), Path::new(&args[3])),
        _ => {}
    }
    if let Err(e) = run() {
        eprintln!("erofs bench: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Tar entries → image: the sink the pipeline will get, minus its policies (owners and
/// modes kept, as in image mode).
fn child_erofs(tar: &Path, image: &Path, inline_tails: bool) -> ExitCode {
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(tar).unwrap());
    let mut a = tar::Archive::new(f);
    let opts = WriterOptions {
        inline_tails,
        ..WriterOptions::default()
    };
    let mut w = ImageWriter::create(image, opts).unwrap();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let raw = e.path_bytes().into_owned();
        let mut path: &[u8] = &raw;
        while let Some(p) = path.strip_prefix(b"./") {
            path = p;
        }
        let path = path.strip_suffix(b"/").unwrap_or(path);
        let path = if path == b"." { &b""[..] } else { path };
        let meta = Metadata {
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mtime: h.mtime().unwrap_or(0) as i64,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        let link = e.link_name_bytes().map(|l| l.into_owned());
        let kind = match h.entry_type() {
            tar::EntryType::Directory => EntryKind::Directory,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                EntryKind::File { size: e.size() }
            }
            tar::EntryType::Symlink => EntryKind::Symlink {
                target: link.as_deref().unwrap(),
            },
            tar::EntryType::Link => EntryKind::HardLink {
                target: link.as_deref().unwrap(),
            },
            _ => continue,
        };
        let entry = Entry {
            path,
            kind,
            meta: &meta,
        };
        w.add(&entry, &mut e as &mut dyn Read).unwrap();
    }
    w.finish().unwrap();
    ExitCode::SUCCESS
}

fn child_dir(tar: &Path, dest: &Path) -> ExitCode {
    let f = std::fs::File::open(tar).unwrap();
    std::fs::create_dir_all(dest).unwrap();
    vrun::extract::extract(
        f,
        dest,
        vrun::extract::Mode::Image,
        &vrun::extract::Limits::default(),
    )
    .unwrap();
    sys::syncfs(dest).unwrap();
    ExitCode::SUCCESS
}

fn child_rss(n: usize, image: &Path) -> ExitCode {
    let mut w = ImageWriter::create(image, WriterOptions::default()).unwrap();
    let meta = Metadata {
        mode: 0o644,
        ..Metadata::default()
    };
    for i in 0..n {
        // Build-like paths: 100 files a directory, names of 20-odd bytes.
        let p = format!("pkg{:04}/module_file_{i:08}.py", i / 100);
        w.add_file(p.as_bytes(), &meta, 0, &mut std::io::empty())
            .unwrap();
    }
    w.finish().unwrap();
    ExitCode::SUCCESS
}

struct Sample {
    wall: f64,
    ios: u64,
    bios: u64,
    rss_kib: u64,
    bytes: u64,
}

/// Runs a command through the deploy harness's trampoline (so the child's peak RSS is its
/// own, not this process's at fork time): (wall seconds, exit ok, peak RSS KiB).
fn timed(cmd: &mut Command) -> (f64, bool, u64) {
    let scratch = std::env::temp_dir();
    let m = sys::measure(
        cmd,
        std::process::Stdio::inherit(),
        std::process::Stdio::inherit(),
        &scratch,
        std::time::Duration::from_secs(1800),
    )
    .expect("measure");
    (m.wall_s, m.code == 0 && !m.timed_out, m.maxrss_kib)
}

fn loop_device_of(mnt: &Path) -> String {
    let real = mnt.canonicalize().unwrap();
    let m = vrun::mounts::mounts()
        .unwrap()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == real)
        .expect("target is mounted");
    m.source.trim_start_matches("/dev/").to_string()
}

fn writes_completed(dev: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/sys/block/{dev}/stat")).unwrap();
    s.split_whitespace().nth(4).unwrap().parse().unwrap()
}

/// Write bios the block layer's throttle accounted to `dev` (`blkio.throttle.io_serviced`
/// of the root blkio cgroup): the requests the IOPS limit counts, before merging.
fn write_bios(dev: &str) -> u64 {
    let majmin = std::fs::read_to_string(format!("/sys/block/{dev}/dev")).unwrap();
    let majmin = majmin.trim();
    let text = std::fs::read_to_string("/sys/fs/cgroup/blkio/blkio.throttle.io_serviced")
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(majmin) && f.next() == Some("Write"))
                .then(|| f.next().and_then(|n| n.parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

fn du_bytes(p: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run() -> anyhow::Result<()> {
    sys::install_signal_handlers();
    let me = std::env::current_exe()?;
    let pairs: usize = std::env::var("VRUN_BENCH_PAIRS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let fss = std::env::var("VRUN_BENCH_FS").unwrap_or_else(|_| "ext4,slow".into());
    let files = corpus::corpus();
    let tar = files
        .iter()
        .find(|(e, _)| *e == "tar")
        .unwrap()
        .1
        .canonicalize()?;
    println!(
        "corpus {} ({} MB), {pairs} rounds, load average {:.2}",
        tar.display(),
        std::fs::metadata(&tar)?.len() >> 20,
        sys::loadavg()
    );

    let work = PathBuf::from(format!(
        "/var/tmp/vrun-bench-work/erofs-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work)?;
    let _rm = sys::RemoveOnDrop(work.clone());

    // Writer memory per entry.
    {
        let t = sys::TargetFs::create(
            sys::FsKind::Tmpfs,
            &work,
            2 << 30,
            sys::SlowDisk {
                mib_per_s: 0,
                iops: 0,
            },
        )?;
        let mut rss = Vec::new();
        for n in [20_000usize, 120_000] {
            let img = t.path().join(format!("rss-{n}.erofs"));
            let (_, ok, kib) = timed(
                Command::new(&me)
                    .arg("--child-rss")
                    .arg(n.to_string())
                    .arg(&img),
            );
            anyhow::ensure!(ok, "rss child failed");
            rss.push(kib);
            println!(
                "writer, {n} empty files: peak RSS {:.1} MiB",
                kib as f64 / 1024.0
            );
        }
        println!(
            "writer memory per entry: {:.0} bytes",
            (rss[1] - rss[0]) as f64 * 1024.0 / 100_000.0
        );
    }

    for fs_name in fss.split(',') {
        let kind = match fs_name {
            "ext4" => sys::FsKind::Ext4,
            "slow" => sys::FsKind::Slow,
            other => anyhow::bail!("VRUN_BENCH_FS: unknown target {other} (ext4, slow)"),
        };
        let t = sys::TargetFs::create(
            kind,
            &work,
            4 << 30,
            sys::SlowDisk {
                mib_per_s: 40,
                iops: 1000,
            },
        )?;
        println!("\n## {}: {}", kind.name(), t.detail);
        let dev = loop_device_of(t.path());
        if kind == sys::FsKind::Slow {
            sys::drop_caches(t.path())?;
            let (s, ok, _) = timed(
                Command::new("dd")
                    .arg("if=/dev/zero")
                    .arg(format!("of={}", t.path().join("dd").display()))
                    .args(["bs=1M", "count=200", "conv=fsync", "status=none"]),
            );
            anyhow::ensure!(ok, "dd failed");
            println!("throttle check: dd 200 MB + fsync took {s:.1} s (needs >= 5 s)");
            anyhow::ensure!(s >= 5.0, "the throttle does not bite: {s:.1} s");
            t.clear()?;
        }
        let sides = ["tar", "dir", "erofs", "erofs-plain"];
        let mut samples: Vec<Vec<Sample>> = (0..sides.len()).map(|_| Vec::new()).collect();
        for round in 0..pairs {
            for k in 0..sides.len() {
                sys::check_interrupted()?;
                let side = (round + k) % sides.len();
                t.clear()?;
                sys::drop_caches(t.path())?;
                let before = writes_completed(&dev);
                let bios_before = write_bios(&dev);
                let out = t.path().join("out");
                let (wall, ok, rss) = match sides[side] {
                    "tar" => {
                        std::fs::create_dir(&out)?;
                        let tt = Instant::now();
                        let (_, ok, rss) =
                            timed(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&out));
                        let (_, ok2, _) = timed(Command::new("sync").arg("-f").arg(&out));
                        (tt.elapsed().as_secs_f64(), ok && ok2, rss)
                    }
                    "dir" => timed(Command::new(&me).arg("--child-dir").arg(&tar).arg(&out)),
                    side => timed(
                        Command::new(&me)
                            .arg(format!("--child-{side}"))
                            .arg(&tar)
                            .arg(t.path().join("out.erofs")),
                    ),
                };
                anyhow::ensure!(ok, "{} failed", sides[side]);
                let ios = writes_completed(&dev) - before;
                let bios = write_bios(&dev) - bios_before;
                let bytes = if sides[side].starts_with("erofs") {
                    std::fs::metadata(t.path().join("out.erofs"))?.len()
                } else {
                    du_bytes(&out)
                };
                println!(
                    "  round {round} {:11}: {wall:6.2} s, {ios:6} write IOs, {bios:6} write bios, {:4} MB, peak RSS {:5.1} MiB",
                    sides[side],
                    bytes >> 20,
                    rss as f64 / 1024.0
                );
                samples[side].push(Sample {
                    wall,
                    ios,
                    bios,
                    rss_kib: rss,
                    bytes,
                });
            }
        }
        t.clear()?;
        println!(
            "\n| {} | median s | min–max | write IOs | write bios | MB on disk | peak RSS MiB | ratio to tar |",
            kind.name()
        );
        println!("|---|---|---|---|---|---|---|---|");
        let tar_med = median(&mut samples[0].iter().map(|s| s.wall).collect::<Vec<_>>());
        for (k, side) in sides.iter().enumerate() {
            let s = &samples[k];
            let mut walls: Vec<f64> = s.iter().map(|x| x.wall).collect();
            let med = median(&mut walls);
            let mut ios: Vec<f64> = s.iter().map(|x| x.ios as f64).collect();
            let mut bios: Vec<f64> = s.iter().map(|x| x.bios as f64).collect();
            println!(
                "| {side} | {med:.2} | {:.2}–{:.2} | {:.0} | {:.0} | {} | {:.1} | {:.2}× |",
                walls[0],
                walls[walls.len() - 1],
                median(&mut ios),
                median(&mut bios),
                s[0].bytes >> 20,
                s.iter().map(|x| x.rss_kib).max().unwrap() as f64 / 1024.0,
                med / tar_med
            );
        }
        println!("load average after: {:.2}", sys::loadavg());
    }
    Ok(())
}
