//! One run set: a fresh target filesystem, then N alternating pairs of
//! A = `vrun setup --timings` (cold: fresh VR_ROOT, empty cache) and
//! B = `curl | tee >(md5sum) | tar x… ; sync -f` (the best plain shell pipeline),
//! plus, after each cold A, a warm setup of a second proc of the same build.
//!
//! Why alternate (A,B then B,A): on a shared machine load drifts; interleaving spreads
//! the drift over both sides instead of biasing whichever ran second. Why drop caches
//! before every A and every B: a cold deploy reads nothing from cache, and whichever side
//! ran second would otherwise find the other's dentries and free pages warm. Why
//! `sync -f` on the baseline: vrun fsyncs before it publishes a layer, so a baseline that
//! leaves 250 MB dirty in the page cache would be measured without doing the work that
//! makes a deploy survive a power cut (equal durability). The md5 in the baseline is
//! waited for, and checked afterwards (outside the timing), so both sides verify.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::corpus::{ArchiveInfo, Format};
use crate::sys::{self, FsKind, Measured, TargetFs};
use testkit::serve::Server;

/// What a run set deploys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// The build alone.
    Build,
    /// Build and image fetched together (vrun fetches both concurrently; the baseline
    /// runs its two pipelines in parallel).
    BuildImage,
    /// The ≥ 1 GiB archive, for peak RSS.
    Big,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Build => "build",
            Scenario::BuildImage => "build+image",
            Scenario::Big => "big",
        }
    }
}

/// One artifact to deploy: where the server has it and what it must hash to.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub url_path: String,
    pub url: String,
    pub info: ArchiveInfo,
    /// Image extraction keeps numeric owners (containerd rules).
    pub image: bool,
    /// Regular files plus hard links in the tree (what `--timings` `files` counts).
    pub files: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Vrun,
    Baseline,
    Warm,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub pair: usize,
    pub side: Side,
    pub wall_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    pub maxrss_kib: u64,
    /// GET requests the server saw during this run.
    pub gets: usize,
    /// Baseline only: the same run's time up to `sync -f` (the pipeline without its
    /// sync: whatever the page cache absorbed counts as done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nosync_s: Option<f64>,
    /// vrun's `--timings` JSON, as printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSet {
    pub fs: &'static str,
    pub fs_detail: String,
    pub format: &'static str,
    pub scenario: &'static str,
    /// How vrun stored the layers (`setup --layers`).
    pub layers: &'static str,
    pub pairs: usize,
    pub load_start: f64,
    pub load_end: f64,
    pub samples: Vec<Sample>,
    pub warnings: Vec<String>,
}

/// Which sides to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Both,
    Vrun,
    Baseline,
}

pub struct RunCtx<'a> {
    pub vrun: &'a Path,
    pub server: &'a Server,
    /// Scratch on the host fs (proc.yaml files, logs, fifos) — never on the target.
    pub scratch: &'a Path,
    pub only: Only,
    pub warm: bool,
    pub timeout: Duration,
    /// Re-read the tools after each cache drop (see `sys::warm_tools`).
    pub warm_tools: bool,
}

impl RunCtx<'_> {
    /// The same preparation before every A and every B run.
    fn drop_caches(&self, target: &TargetFs) -> Result<()> {
        sys::drop_caches(target.path())?;
        if self.warm_tools {
            sys::warm_tools(self.vrun);
        }
        Ok(())
    }
}

/// How vrun stores layers in a run set: `vrun setup --layers dir|erofs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layers {
    Dir,
    Erofs,
}

impl Layers {
    pub fn name(self) -> &'static str {
        match self {
            Layers::Dir => "dir",
            Layers::Erofs => "erofs",
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run_set(
    ctx: &RunCtx,
    target: &TargetFs,
    format: Format,
    scenario: Scenario,
    layers: Layers,
    artifacts: &[Artifact],
    pairs: usize,
) -> Result<RunSet> {
    let mut set = RunSet {
        fs: target.kind.name(),
        fs_detail: target.detail.clone(),
        format: format.name(),
        scenario: scenario.name(),
        layers: layers.name(),
        pairs,
        load_start: sys::loadavg(),
        load_end: 0.0,
        samples: Vec::new(),
        warnings: Vec::new(),
    };
    eprintln!(
        "run set: {} {} {} layers={} ({} pairs) on {}",
        set.fs, set.format, set.scenario, set.layers, pairs, target.detail
    );
    for pair in 0..pairs {
        let order: &[Side] = if pair % 2 == 0 {
            &[Side::Vrun, Side::Baseline]
        } else {
            &[Side::Baseline, Side::Vrun]
        };
        for &side in order {
            sys::check_interrupted()?;
            match side {
                Side::Vrun if ctx.only != Only::Baseline => {
                    let (cold, warm) =
                        vrun_pair(ctx, target, artifacts, layers, pair, &mut set.warnings)?;
                    eprintln!(
                        "  pair {pair}: vrun {:.3}s{}",
                        cold.wall_s,
                        warm.as_ref()
                            .map(|w| format!(", warm {:.3}s", w.wall_s))
                            .unwrap_or_default()
                    );
                    set.samples.push(cold);
                    set.samples.extend(warm);
                }
                Side::Baseline if ctx.only != Only::Vrun => {
                    let s = baseline(ctx, target, artifacts, pair)?;
                    eprintln!(
                        "  pair {pair}: baseline {:.3}s (before its sync {:.3}s)",
                        s.wall_s,
                        s.nosync_s.unwrap_or(f64::NAN)
                    );
                    set.samples.push(s);
                }
                _ => {}
            }
            target.clear()?;
        }
    }
    set.load_end = sys::loadavg();
    Ok(set)
}

fn gets(server: &Server, artifacts: &[Artifact]) -> usize {
    artifacts
        .iter()
        .map(|a| server.request_count(&a.url_path))
        .sum()
}

/// proc.yaml for a bench proc. No `cmd`: setup resolves `proc_name` from the Procfile.
fn proc_yaml(artifacts: &[Artifact], proc_name: &str, port: u16) -> String {
    let mut y = format!(
        "app_name: benchapp\nversion: v1\nconfig_name: bench\nrelease_hash: 5eed0001\n\
         proc_name: {proc_name}\nport: {port}\nuser: nobody\ngroup: nogroup\n"
    );
    for a in artifacts {
        let k = if a.image { "image" } else { "build" };
        if a.image {
            y.push_str("image_name: benchimage\n");
        }
        let _ = writeln!(y, "{k}_url: {}\n{k}_md5: {}", a.url, a.info.md5);
    }
    y
}

/// Run `vrun setup --timings YAML` with VR_ROOT=root; stdout and stderr go to files.
fn vrun_setup(
    ctx: &RunCtx,
    root: &Path,
    yaml: &Path,
    layers: Layers,
    tag: &str,
) -> Result<(Measured, PathBuf, PathBuf)> {
    let out = ctx.scratch.join(format!("{tag}.stdout"));
    let err = ctx.scratch.join(format!("{tag}.stderr"));
    let mut c = Command::new(ctx.vrun);
    c.arg("setup")
        .arg("--timings")
        .args(["--layers", layers.name()])
        .arg(yaml)
        .env("VR_ROOT", root);
    let m = sys::measure(
        &c,
        Stdio::from(std::fs::File::create(&out)?),
        Stdio::from(std::fs::File::create(&err)?),
        ctx.scratch,
        ctx.timeout,
    )?;
    Ok((m, out, err))
}

/// The last stdout line that is a JSON object: vrun's `--timings`.
fn parse_timings(stdout: &Path) -> Option<serde_json::Value> {
    let s = std::fs::read_to_string(stdout).ok()?;
    // One object on one line is the contract; tolerate a pretty-printed one too.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(s.trim()) {
        if v.is_object() {
            return Some(v);
        }
    }
    s.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find(|v| v.is_object())
}

fn last_line(p: &Path) -> String {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(no output)".into())
}

fn check_vrun(
    ctx: &RunCtx,
    m: &Measured,
    out: &Path,
    err: &Path,
    what: &str,
) -> Result<serde_json::Value> {
    if m.timed_out {
        bail!(
            "{what}: `{} setup --timings` timed out after {:?}",
            ctx.vrun.display(),
            ctx.timeout
        );
    }
    if m.code != 0 {
        bail!(
            "{what}: `{} setup --timings` exited {}: {}",
            ctx.vrun.display(),
            m.code,
            last_line(err)
        );
    }
    match parse_timings(out) {
        Some(v) if v.get("build").is_some() => Ok(v),
        _ => bail!(
            "{what}: `{} setup --timings` exited 0 but printed no --timings JSON with a \"build\" \
             object on stdout (last line: {:?}); is `setup` with build_url implemented in this binary?",
            ctx.vrun.display(),
            last_line(out)
        ),
    }
}

/// A = cold setup on a fresh VR_ROOT; then (optionally) the warm setup of a second proc.
fn vrun_pair(
    ctx: &RunCtx,
    target: &TargetFs,
    artifacts: &[Artifact],
    layers: Layers,
    pair: usize,
    warnings: &mut Vec<String>,
) -> Result<(Sample, Option<Sample>)> {
    let root = target.path().join(format!("vr-{pair}"));
    fs_err::create_dir_all(&root)?;
    let yaml = ctx.scratch.join(format!("proc-web-{pair}.yaml"));
    fs_err::write(&yaml, proc_yaml(artifacts, "web", 8000))?;
    ctx.drop_caches(target)?;
    let before = gets(ctx.server, artifacts);
    let (m, out, err) = vrun_setup(ctx, &root, &yaml, layers, &format!("vrun-{pair}"))?;
    let timings = check_vrun(ctx, &m, &out, &err, "vrun cold")
        .context("the vrun side failed (use --only baseline to measure the pipeline alone)")?;
    for a in artifacts {
        let k = if a.image { "image" } else { "build" };
        if let Some(n) = timings
            .pointer(&format!("/{k}/files"))
            .and_then(|v| v.as_u64())
        {
            if n != a.files {
                warnings.push(format!(
                    "pair {pair}: vrun reported {k}.files = {n}, the corpus has {} regular files and hard links",
                    a.files
                ));
            }
        }
    }
    let cold = Sample {
        pair,
        side: Side::Vrun,
        wall_s: m.wall_s,
        user_s: m.user_s,
        sys_s: m.sys_s,
        maxrss_kib: m.maxrss_kib,
        gets: gets(ctx.server, artifacts) - before,
        nosync_s: None,
        timings: Some(timings),
    };
    if !ctx.warm {
        return Ok((cold, None));
    }
    // Warm: another proc of the same build, same root, caches as the cold run left them.
    let yaml2 = ctx.scratch.join(format!("proc-worker-{pair}.yaml"));
    fs_err::write(&yaml2, proc_yaml(artifacts, "worker", 8001))?;
    let before = gets(ctx.server, artifacts);
    let (m, out, err) = vrun_setup(ctx, &root, &yaml2, layers, &format!("warm-{pair}"))?;
    let timings = check_vrun(ctx, &m, &out, &err, "vrun warm")?;
    let cache = timings
        .pointer("/build/cache")
        .and_then(|c| c.as_str())
        .unwrap_or("?")
        .to_string();
    if cache != "layer" {
        warnings.push(format!(
            "pair {pair}: warm setup reported build cache {cache:?}, expected \"layer\""
        ));
    }
    let warm = Sample {
        pair,
        side: Side::Warm,
        wall_s: m.wall_s,
        user_s: m.user_s,
        sys_s: m.sys_s,
        maxrss_kib: m.maxrss_kib,
        gets: gets(ctx.server, artifacts) - before,
        nosync_s: None,
        timings: Some(timings),
    };
    Ok((cold, Some(warm)))
}

fn quote(p: &str) -> String {
    format!("'{}'", p.replace('\'', r"'\''"))
}

/// The baseline script: per artifact `curl | tee FIFO | tar x… -C DEST` with `md5sum`
/// reading the FIFO (the same as `tee >(md5sum)`, but waitable), all artifacts in
/// parallel, then `sync -f` on the target (equal durability).
pub fn baseline_script(
    artifacts: &[Artifact],
    format: Format,
    dests: &[PathBuf],
    scratch: &Path,
) -> String {
    let stamp = |name: &str| quote(&scratch.join(name).display().to_string());
    let mut s = format!("set -euo pipefail\ndate +%s%N > {}\n", stamp("t-start"));
    for (i, (a, d)) in artifacts.iter().zip(dests).enumerate() {
        let fifo = quote(&scratch.join(format!("fifo{i}")).display().to_string());
        let sum = quote(&scratch.join(format!("md5-{i}")).display().to_string());
        let flag = format
            .tar_flag()
            .map(|f| format!(" {f}"))
            .unwrap_or_default();
        let owner = if a.image { " --numeric-owner" } else { "" };
        let _ = writeln!(
            s,
            "rm -f {fifo}; mkfifo {fifo}\nmd5sum < {fifo} > {sum} & m{i}=$!\n\
             ( curl -sS --fail {url} | tee {fifo} | tar -x{flag}{owner} -f - -C {dest} ) & p{i}=$!",
            url = quote(&a.url),
            dest = quote(&d.display().to_string()),
        );
    }
    for i in 0..artifacts.len() {
        let _ = writeln!(s, "wait $p{i}; wait $m{i}");
    }
    let _ = writeln!(s, "date +%s%N > {}", stamp("t-sync"));
    let _ = writeln!(s, "sync -f {}", quote(&dests[0].display().to_string()));
    let _ = writeln!(s, "date +%s%N > {}", stamp("t-end"));
    s
}

/// Seconds between two `date +%s%N` stamps the baseline script wrote.
fn stamp_gap(scratch: &Path, from: &str, to: &str) -> Result<f64> {
    let read = |name: &str| -> Result<u128> {
        let t = fs_err::read_to_string(scratch.join(name))?;
        t.trim()
            .parse()
            .with_context(|| format!("stamp {name}: {t:?}"))
    };
    Ok((read(to)? - read(from)?) as f64 / 1e9)
}

/// B = the shell pipeline, caches dropped first, md5 checked after the clock stops.
fn baseline(
    ctx: &RunCtx,
    target: &TargetFs,
    artifacts: &[Artifact],
    pair: usize,
) -> Result<Sample> {
    let format = format_of(&artifacts[0]);
    let scratch = ctx.scratch.join(format!("base-{pair}"));
    fs_err::create_dir_all(&scratch)?;
    let dests: Vec<PathBuf> = artifacts
        .iter()
        .map(|a| {
            target
                .path()
                .join(format!("base-{pair}"))
                .join(if a.image { "image" } else { "build" })
        })
        .collect();
    for d in &dests {
        fs_err::create_dir_all(d)?;
    }
    let script = baseline_script(artifacts, format, &dests, &scratch);
    let err = scratch.join("stderr");
    ctx.drop_caches(target)?;
    let before = gets(ctx.server, artifacts);
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(&script);
    let m = sys::measure(
        &cmd,
        Stdio::null(),
        Stdio::from(std::fs::File::create(&err)?),
        &scratch,
        ctx.timeout,
    )?;
    if m.timed_out || m.code != 0 {
        bail!(
            "baseline pipeline failed (exit {}{}): {}\nscript:\n{script}",
            m.code,
            if m.timed_out { ", timed out" } else { "" },
            last_line(&err)
        );
    }
    // Without its sync: the measured wall time less what the sync took.
    let nosync_s = m.wall_s - stamp_gap(&scratch, "t-sync", "t-end")?;
    for (i, a) in artifacts.iter().enumerate() {
        let got = fs_err::read_to_string(scratch.join(format!("md5-{i}")))?;
        let got = got.split_whitespace().next().unwrap_or("");
        if got != a.info.md5 {
            bail!(
                "baseline md5 mismatch for {}: expected {}, got {got:?}",
                a.url,
                a.info.md5
            );
        }
    }
    Ok(Sample {
        pair,
        side: Side::Baseline,
        wall_s: m.wall_s,
        user_s: m.user_s,
        sys_s: m.sys_s,
        maxrss_kib: m.maxrss_kib,
        gets: gets(ctx.server, artifacts) - before,
        nosync_s: Some(nosync_s),
        timings: None,
    })
}

fn format_of(a: &Artifact) -> Format {
    Format::ALL
        .into_iter()
        .filter(|f| a.url_path.ends_with(f.suffix()))
        .max_by_key(|f| f.suffix().len())
        .unwrap_or(Format::Tar)
}

/// Create the target fs for a run set, sized for the corpus.
pub fn target_for(
    kind: FsKind,
    work: &Path,
    tree_bytes: u64,
    slow: sys::SlowDisk,
) -> Result<TargetFs> {
    // Room for the tree, the cached blob and a second copy, with ext4 overhead.
    let size = (tree_bytes * 3).max(4 << 30);
    TargetFs::create(kind, work, size, slow)
}
