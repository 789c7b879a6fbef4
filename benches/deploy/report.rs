//! Medians, ranges and ratios: the table on stdout and the same numbers as JSON.
//!
//! Medians because a shared 2-core machine has outliers in both directions; the min–max
//! range is printed next to each so a reader sees how noisy the run was. The per-stage
//! breakdown comes from vrun's own `--timings` JSON: every numeric field is collected by
//! its JSON path (`build.ttfb_s`, …), so new or missing fields never break the harness.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::runner::{RunSet, Side};

#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(v: &[f64]) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Stat {
        n,
        median,
        min: s[0],
        max: s[n - 1],
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct SideSummary {
    pub wall_s: Stat,
    /// Baseline: the same runs timed up to their `sync -f`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nosync_s: Option<Stat>,
    pub maxrss_mib_max: f64,
    pub user_s_median: f64,
    pub sys_s_median: f64,
    pub gets_total: usize,
    /// Median of every numeric field of `--timings`, by JSON path.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub timings_median: BTreeMap<String, f64>,
    /// Every string field of `--timings` seen (e.g. `build.cache`), with counts.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub timings_labels: BTreeMap<String, BTreeMap<String, usize>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SetSummary {
    pub fs: &'static str,
    pub format: &'static str,
    pub scenario: &'static str,
    pub layers: &'static str,
    pub vrun: Option<SideSummary>,
    pub baseline: Option<SideSummary>,
    pub warm: Option<SideSummary>,
    /// median(vrun cold) / median(baseline).
    pub ratio: Option<f64>,
    /// median(warm) / median(vrun cold).
    pub warm_ratio: Option<f64>,
    /// median(vrun cold) / median(baseline up to its sync): against the pipeline
    /// without `sync -f`.
    pub nosync_ratio: Option<f64>,
}

fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    nums: &mut Vec<(String, f64)>,
    strs: &mut Vec<(String, String)>,
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, nums, strs);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                nums.push((prefix.to_string(), f));
            }
        }
        serde_json::Value::String(s) if !prefix.ends_with("url") => {
            strs.push((prefix.to_string(), s.clone()))
        }
        _ => {}
    }
}

fn summarize(set: &RunSet, side: Side) -> Option<SideSummary> {
    let samples: Vec<_> = set.samples.iter().filter(|s| s.side == side).collect();
    let wall = stat(&samples.iter().map(|s| s.wall_s).collect::<Vec<_>>())?;
    let mut by_key: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut labels: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for s in &samples {
        if let Some(t) = &s.timings {
            let (mut nums, mut strs) = (Vec::new(), Vec::new());
            flatten("", t, &mut nums, &mut strs);
            for (k, v) in nums {
                by_key.entry(k).or_default().push(v);
            }
            for (k, v) in strs {
                *labels.entry(k).or_default().entry(v).or_default() += 1;
            }
        }
    }
    let med = |v: Vec<f64>| stat(&v).map(|s| s.median).unwrap_or(0.0);
    Some(SideSummary {
        wall_s: wall,
        nosync_s: stat(
            &samples
                .iter()
                .filter_map(|s| s.nosync_s)
                .collect::<Vec<_>>(),
        ),
        maxrss_mib_max: samples.iter().map(|s| s.maxrss_kib).max().unwrap_or(0) as f64 / 1024.0,
        user_s_median: med(samples.iter().map(|s| s.user_s).collect()),
        sys_s_median: med(samples.iter().map(|s| s.sys_s).collect()),
        gets_total: samples.iter().map(|s| s.gets).sum(),
        timings_median: by_key
            .into_iter()
            .filter_map(|(k, v)| stat(&v).map(|s| (k, s.median)))
            .collect(),
        timings_labels: labels,
    })
}

pub fn summarize_set(set: &RunSet) -> SetSummary {
    let vrun = summarize(set, Side::Vrun);
    let baseline = summarize(set, Side::Baseline);
    let warm = summarize(set, Side::Warm);
    let ratio = match (&vrun, &baseline) {
        (Some(a), Some(b)) if b.wall_s.median > 0.0 => Some(a.wall_s.median / b.wall_s.median),
        _ => None,
    };
    let nosync_ratio = match (&vrun, baseline.as_ref().and_then(|b| b.nosync_s.as_ref())) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.wall_s.median / b.median),
        _ => None,
    };
    let warm_ratio = match (&warm, &vrun) {
        (Some(w), Some(a)) if a.wall_s.median > 0.0 => Some(w.wall_s.median / a.wall_s.median),
        _ => None,
    };
    SetSummary {
        fs: set.fs,
        format: set.format,
        scenario: set.scenario,
        layers: set.layers,
        vrun,
        baseline,
        warm,
        ratio,
        warm_ratio,
        nosync_ratio,
    }
}

fn cell(s: &Option<SideSummary>) -> String {
    match s {
        Some(s) => format!(
            "{:.3} ({:.3}–{:.3})",
            s.wall_s.median, s.wall_s.min, s.wall_s.max
        ),
        None => "—".into(),
    }
}

/// The human table (stdout).
pub fn print_table(sums: &[SetSummary], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<6} {:<4} {:<12} {:<6} {:>26} {:>26} {:>6} {:>10} {:>7} {:>8} {:>9} {:>9}",
        "fs",
        "fmt",
        "scenario",
        "layers",
        "vrun cold s (min–max)",
        "baseline s (min–max)",
        "ratio",
        "base nosync",
        "ratio2",
        "warm s",
        "vrun MiB",
        "base MiB"
    )?;
    let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "—".into());
    for s in sums {
        writeln!(
            out,
            "{:<6} {:<4} {:<12} {:<6} {:>26} {:>26} {:>6} {:>10} {:>7} {:>8} {:>9} {:>9}",
            s.fs,
            s.format,
            s.scenario,
            s.layers,
            cell(&s.vrun),
            cell(&s.baseline),
            ratio(s.ratio),
            s.baseline
                .as_ref()
                .and_then(|b| b.nosync_s.as_ref())
                .map(|n| format!("{:.3}", n.median))
                .unwrap_or_else(|| "—".into()),
            ratio(s.nosync_ratio),
            s.warm
                .as_ref()
                .map(|w| format!("{:.3}", w.wall_s.median))
                .unwrap_or_else(|| "—".into()),
            s.vrun
                .as_ref()
                .map(|v| format!("{:.1}", v.maxrss_mib_max))
                .unwrap_or_else(|| "—".into()),
            s.baseline
                .as_ref()
                .map(|v| format!("{:.1}", v.maxrss_mib_max))
                .unwrap_or_else(|| "—".into()),
        )?;
    }
    // Per-stage breakdown from --timings.
    for s in sums {
        for (label, side) in [("vrun cold", &s.vrun), ("vrun warm", &s.warm)] {
            let Some(side) = side else { continue };
            if side.timings_median.is_empty() {
                continue;
            }
            let stages: Vec<String> = side
                .timings_median
                .iter()
                .filter(|(k, _)| k.ends_with("_s"))
                .map(|(k, v)| format!("{k}={v:.3}"))
                .collect();
            let labels: Vec<String> = side
                .timings_labels
                .iter()
                .map(|(k, m)| {
                    let vs: Vec<String> = m.iter().map(|(v, n)| format!("{v}×{n}")).collect();
                    format!("{k}={}", vs.join("/"))
                })
                .collect();
            writeln!(
                out,
                "  {} {} {} {} {label}: {} {}",
                s.fs,
                s.format,
                s.scenario,
                s.layers,
                stages.join(" "),
                labels.join(" ")
            )?;
        }
    }
    Ok(())
}
