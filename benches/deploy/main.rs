//! Deploy-latency harness: `cargo bench --bench deploy -- [options]` (runs as root).
//!
//! What it answers: how long does `vrun setup` take to put a build on disk, compared
//! with the best plain shell pipeline an operator could write
//! (`curl -s URL | tee >(md5sum) | tar x… -C dir; sync`), on a fresh ext4, on tmpfs and on
//! a deliberately slow disk — cold, warm (a second proc of the same build), and with
//! how much memory. See benches/README.md for the method and how to read the output.
//!
//! Shape: a seeded corpus generated once and cached ([`corpus`]), served from memory by
//! the project's loopback HTTP server (`testkit::serve`), extracted onto filesystems the harness creates
//! and destroys ([`sys::TargetFs`]), in alternating A/B pairs ([`runner`]), summarized
//! into medians and ratios ([`report`]). Everything the harness mounts, attaches or
//! throttles is undone on exit, including on error and on Ctrl-C.

mod content;
mod corpus;
mod report;
mod runner;
mod sys;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;

use corpus::{Corpus, CorpusSpec, Format};
use runner::{Artifact, Layers, Only, RunCtx, Scenario};
use sys::{FsKind, SlowDisk};
use testkit::serve::{Server, ServerOptions};

/// Build corpus size (MB of files) of the full run: the 251 MB / 12k-file app.
const DEFAULT_SIZE_MB: u64 = 250;
/// Corpus size for `--quick` smoke runs.
const QUICK_SIZE_MB: u64 = 24;

/// Slow-disk bandwidth: a slow SATA disk or a small cloud volume, so big files are
/// bandwidth-bound…
const SLOW_MIBPS: u64 = 40;
/// …and many small files are IOPS-bound (an fsync costs several I/Os: data, journal, flush).
const SLOW_IOPS: u64 = 1000;

#[derive(Parser, Debug)]
#[command(
    name = "deploy",
    about = "Deploy latency: vrun setup vs curl | tee md5sum | tar x, on ext4, tmpfs and a slow disk"
)]
struct Opts {
    /// A/B pairs per run set (A and B alternate order each pair).
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Archive formats of the build.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "gz,bz2,xz,zst,tar"
    )]
    formats: Vec<Format>,
    /// Target filesystems.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ext4,tmpfs,slow"
    )]
    fs: Vec<FsKind>,
    /// Formats for the build+image scenario.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "gz")]
    image_formats: Vec<Format>,
    /// Skip the build+image scenario.
    #[arg(long)]
    no_image: bool,
    /// How vrun stores layers (`vrun setup --layers`): each is a run set of its own,
    /// against the same baseline.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "dir,erofs")]
    layers: Vec<Layers>,
    /// The vrun binary (default: the one cargo built for this bench).
    #[arg(long)]
    vrun: Option<PathBuf>,
    /// Which sides to run.
    #[arg(long, value_enum, default_value = "both")]
    only: Only,
    /// After each cache drop, leave the tools (vrun, curl, tar, decompressors) cold too;
    /// by default they are read back in, so only the deploy's data path is cold.
    #[arg(long)]
    cold_tools: bool,
    /// Skip the warm (second proc, layer reuse) setups.
    #[arg(long)]
    no_warm: bool,
    /// Corpus cache directory (keyed by generator, seed and size inside).
    #[arg(long, default_value = "/var/tmp/vrun-bench-corpus")]
    corpus_dir: PathBuf,
    /// Where loop images, mount points and scratch files go (never the extraction target).
    #[arg(long, default_value = "/var/tmp/vrun-bench-work")]
    work_dir: PathBuf,
    /// Build tree size in MB (image tree is ~0.32× of it). Default 250, or 24 with --quick.
    #[arg(long)]
    size_mb: Option<u64>,
    /// Small corpus, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Corpus seed.
    #[arg(long, default_value_t = 0x5eed_2026)]
    seed: u64,
    /// Also measure peak RSS on a mostly-incompressible build of this many MB whose
    /// .tar.gz is ≥ 1 GiB (1200 gives ~1.1 GiB). One pair, first --fs only.
    #[arg(long)]
    big_mb: Option<u64>,
    /// Slow disk: bandwidth limit, MiB/s (reads and writes, each).
    #[arg(long, default_value_t = SLOW_MIBPS)]
    slow_mibps: u64,
    /// Slow disk: I/O operations per second (reads and writes, each).
    #[arg(long, default_value_t = SLOW_IOPS)]
    slow_iops: u64,
    /// Kill a run after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// JSON report path (default: <target dir>/deploy-bench.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Generate (or check) the corpus, print its stats and exit.
    #[arg(long)]
    generate_only: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(sys::TRAMPOLINE_FLAG) {
        return sys::trampoline_main(&args);
    }
    sys::install_signal_handlers();
    let opts = Opts::parse();
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The vrun binary cargo built alongside this bench (`target/release/vrun` under
/// `cargo bench`).
fn default_vrun() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vrun"))
}

fn default_json(vrun: &Path) -> PathBuf {
    // <target>/<profile>/vrun → <target>/deploy-bench.json
    vrun.parent()
        .and_then(Path::parent)
        .map(|t| t.join("deploy-bench.json"))
        .unwrap_or_else(|| PathBuf::from("target/deploy-bench.json"))
}

fn artifact(
    server: &Server,
    name: &str,
    tree: &corpus::TreeInfo,
    f: Format,
    image: bool,
) -> Artifact {
    Artifact {
        url_path: name.to_string(),
        url: server.url(name),
        info: tree.archives[&f].clone(),
        image,
        files: tree.stats.files + tree.stats.hardlinks,
    }
}

fn url_name(kind: &str, key: &str, f: Format) -> String {
    format!("{key}/{kind}{}", f.suffix())
}

fn load(files: &mut Vec<(String, Bytes)>, name: String, info: &corpus::ArchiveInfo) -> Result<()> {
    if files.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    files.push((name, Bytes::from(fs_err::read(&info.file)?)));
    Ok(())
}

fn run(opts: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the deploy harness must run as root (it mounts filesystems and drops caches)");
    }
    if opts.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let size_mb = opts.size_mb.unwrap_or(if opts.quick {
        QUICK_SIZE_MB
    } else {
        DEFAULT_SIZE_MB
    });
    let vrun = opts.vrun.clone().unwrap_or_else(default_vrun);
    if opts.only != Only::Baseline && !opts.generate_only && !vrun.is_file() {
        bail!(
            "vrun binary not found at {} (build it, or pass --vrun PATH, or --only baseline)",
            vrun.display()
        );
    }
    for tool in [
        "tar",
        "curl",
        "md5sum",
        "tee",
        "mkfifo",
        "losetup",
        "mkfs.ext4",
        "bash",
    ] {
        if !sys::have(tool) {
            bail!("{tool} is not on PATH; the harness needs it");
        }
    }

    let corpus = Corpus::ensure(
        &opts.corpus_dir,
        &CorpusSpec {
            seed: opts.seed,
            build_mb: size_mb,
            image: true,
            big: false,
        },
    )?;
    let mut desc = Vec::new();
    corpus::describe(&corpus, &mut desc)?;
    eprint!("{}", String::from_utf8_lossy(&desc));
    let big = match opts.big_mb {
        Some(mb) => Some(Corpus::ensure(
            &opts.corpus_dir,
            &CorpusSpec {
                seed: opts.seed,
                build_mb: mb,
                image: false,
                big: true,
            },
        )?),
        None => None,
    };
    if let Some(b) = &big {
        let mut d = Vec::new();
        corpus::describe(b, &mut d)?;
        eprint!("big {}", String::from_utf8_lossy(&d));
    }
    if opts.generate_only {
        return Ok(());
    }

    // Serve every archive a run set needs, from memory.
    let image = corpus.image.as_ref().context("corpus has no image tree")?;
    let image_formats: &[Format] = if opts.no_image {
        &[]
    } else {
        &opts.image_formats
    };
    let mut files = Vec::new();
    for &f in &opts.formats {
        load(
            &mut files,
            url_name("build", &corpus.key, f),
            &corpus.build.archives[&f],
        )?;
    }
    for &f in image_formats {
        load(
            &mut files,
            url_name("build", &corpus.key, f),
            &corpus.build.archives[&f],
        )?;
        load(
            &mut files,
            url_name("image", &corpus.key, f),
            &image.archives[&f],
        )?;
    }
    if let Some(b) = &big {
        load(
            &mut files,
            url_name("build", &b.key, Format::Gz),
            &b.build.archives[&Format::Gz],
        )?;
    }
    let server = Server::start(files, ServerOptions::default())?;

    let work = opts.work_dir.join(format!("run-{}", std::process::id()));
    fs_err::create_dir_all(&work)?;
    let _work_guard = sys::RemoveOnDrop(work.clone());
    let scratch = work.join("scratch");
    fs_err::create_dir_all(&scratch)?;
    let ctx = RunCtx {
        vrun: &vrun,
        server: &server,
        scratch: &scratch,
        only: opts.only,
        warm: !opts.no_warm && opts.only != Only::Baseline,
        timeout: Duration::from_secs(opts.timeout_s),
        warm_tools: !opts.cold_tools,
    };
    let slow = SlowDisk {
        mib_per_s: opts.slow_mibps,
        iops: opts.slow_iops,
    };
    let machine = sys::machine();
    let load_start = sys::loadavg();

    let mut sets = Vec::new();
    let mut failure = None;
    let result: Result<()> = (|| {
        for &fs in &opts.fs {
            for &f in &opts.formats {
                let a = vec![artifact(
                    &server,
                    &url_name("build", &corpus.key, f),
                    &corpus.build,
                    f,
                    false,
                )];
                for &layers in &opts.layers {
                    let target = runner::target_for(fs, &work, corpus.build.stats.bytes, slow)?;
                    sets.push(runner::run_set(
                        &ctx,
                        &target,
                        f,
                        Scenario::Build,
                        layers,
                        &a,
                        opts.pairs,
                    )?);
                }
            }
            for &f in image_formats {
                let a = vec![
                    artifact(
                        &server,
                        &url_name("build", &corpus.key, f),
                        &corpus.build,
                        f,
                        false,
                    ),
                    artifact(&server, &url_name("image", &corpus.key, f), image, f, true),
                ];
                let bytes = corpus.build.stats.bytes + image.stats.bytes;
                for &layers in &opts.layers {
                    let target = runner::target_for(fs, &work, bytes, slow)?;
                    sets.push(runner::run_set(
                        &ctx,
                        &target,
                        f,
                        Scenario::BuildImage,
                        layers,
                        &a,
                        opts.pairs,
                    )?);
                }
            }
        }
        if let (Some(b), Some(&fs)) = (&big, opts.fs.first()) {
            let a = vec![artifact(
                &server,
                &url_name("build", &b.key, Format::Gz),
                &b.build,
                Format::Gz,
                false,
            )];
            for &layers in &opts.layers {
                let target = runner::target_for(fs, &work, b.build.stats.bytes, slow)?;
                sets.push(runner::run_set(
                    &ctx,
                    &target,
                    Format::Gz,
                    Scenario::Big,
                    layers,
                    &a,
                    1,
                )?);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        failure = Some(e);
    }

    // Report whatever was measured, even after a failure.
    let sums: Vec<_> = sets.iter().map(report::summarize_set).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "corpus {} (seed {:#x}):", corpus.key, corpus.seed)?;
    out.write_all(&desc)?;
    writeln!(
        out,
        "machine: {} × {}, load avg {:.2} → {:.2}; caches dropped before every A and B run",
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or("?"),
        load_start,
        sys::loadavg()
    )?;
    report::print_table(&sums, &mut out)?;
    for s in &sets {
        for w in &s.warnings {
            writeln!(out, "warning: {} {} {}: {w}", s.fs, s.format, s.scenario)?;
        }
    }
    let json_path = opts.json.clone().unwrap_or_else(|| default_json(&vrun));
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let doc = serde_json::json!({
        "command": format!("cargo bench --bench deploy -- {}", argv.join(" ")),
        "machine": machine,
        "load_avg": [load_start, sys::loadavg()],
        "method": {
            "pairs": opts.pairs,
            "order": "alternating: even pairs A then B, odd pairs B then A",
            "drop_caches": "syncfs(target); echo 3 > /proc/sys/vm/drop_caches before every A and every B (not before warm)",
            "tools_rewarmed_after_drop": !opts.cold_tools,
            "durability": "baseline ends with sync -f on the target fs; vrun fsyncs before publishing",
            "slow_disk": slow,
            "vrun": vrun,
        },
        "corpus": corpus,
        "big_corpus": big,
        "summary": sums,
        "runs": sets,
        "error": failure.as_ref().map(|e| format!("{e:#}")),
    });
    if let Some(dir) = json_path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    fs_err::write(&json_path, serde_json::to_vec_pretty(&doc)?)?;
    writeln!(out, "json: {}", json_path.display())?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
