//! `vrun cache ls | gc | verify`: the store made operable, as thin functions over
//! `vrun-cache`.
//!
//! The store cannot know which layers are in use; the root can ([`vrun::references`]:
//! every proc's `state.json` and the live overlays' lower dirs). gc reads them only
//! after it holds the store's exclusive lock: a setup
//! still running holds the shared lock until its state file is written, so a layer it
//! just published is either visible as referenced or not yet published.
//!
//! Output: `ls` prints a table (or, with `--json`, one JSON object) on stdout; gc and
//! verify print their report on stdout too, since the report is what the user asked
//! for. Waiting for the store lock is announced on stderr. verify returns an error when
//! it found bad entries, so the binary exits non-zero after listing them.
//!
//! `tests/it/cache_cmds.rs` drives these commands through the real `vrun` binary and
//! checks what it prints (stdout, the wait notice on stderr, the exit code); nothing
//! compiles this file but the binary, so it can be split like any other command.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use vrun::paths::Root;
use vrun::references::references;
use vrun::units::{human_size, parse_duration, parse_size};
use vrun_cache::{CacheEntry, EntryKind, GcOptions, GcReport, Store, VerifyReport};

/// Hex digits of a sha256 shown in the table (the JSON has the full key), enough to be
/// unique in any real cache and short enough for a terminal row.
const SHORT_HASH: usize = 12;

/// `vrun cache …`, ready to embed in the CLI:
/// `Cache { #[command(subcommand)] command: cache::CacheCommand }` and one dispatch arm
/// calling [`dispatch`].
#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// List cached blobs and layers: size, last use, source, which procs use them
    Ls {
        /// One JSON object on stdout instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove unused blobs and layers, least recently used first
    Gc {
        /// Shrink the cache to at most this size (e.g. 500M, 20G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Remove unused entries not used for this long (e.g. 30d, 12h, 2w)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Print what would be removed; remove nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash blobs and check layers; quarantine and list bad entries
    Verify {
        /// Also check every file of every layer against its manifest
        #[arg(long)]
        deep: bool,
    },
}

/// Runs one `vrun cache` subcommand.
pub fn dispatch(root: &Root, command: &CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Ls { json } => ls(root, *json),
        CacheCommand::Gc {
            max_size,
            older_than,
            dry_run,
        } => gc(
            root,
            &GcArgs {
                max_size: *max_size,
                older_than: *older_than,
                dry_run: *dry_run,
            },
        ),
        CacheCommand::Verify { deep } => verify(root, *deep),
    }
}

/// `vrun cache gc` options, as parsed by the CLI (see [`parse_size`], [`parse_duration`]).
#[derive(Debug, Clone, Default)]
pub struct GcArgs {
    /// `--max-size SIZE`
    pub max_size: Option<u64>,
    /// `--older-than DURATION`
    pub older_than: Option<Duration>,
    /// `--dry-run`
    pub dry_run: bool,
}

/// `vrun cache ls [--json]`.
pub fn ls(root: &Root, json: bool) -> anyhow::Result<()> {
    ls_to(root, json, &mut std::io::stdout().lock())
}

/// `vrun cache gc`.
pub fn gc(root: &Root, args: &GcArgs) -> anyhow::Result<()> {
    gc_to(root, args, &mut std::io::stdout().lock(), announce_wait).map(drop)
}

/// `vrun cache verify [--deep]`.
pub fn verify(root: &Root, deep: bool) -> anyhow::Result<()> {
    verify_to(root, deep, &mut std::io::stdout().lock()).map(drop)
}

fn announce_wait(lock: &Path) {
    eprintln!(
        "vrun: waiting for {} to finish with the cache (lock {})",
        vrun::pipeline::describe_holders(lock),
        lock.display()
    );
}

/// [`ls`] writing to `out`.
pub fn ls_to(root: &Root, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let cache_dir = root.cache_dir();
    let entries = if cache_dir.exists() {
        let store = Store::open_with(&cache_dir, false, announce_wait)?;
        let (refs, warnings) = references(root, store.dir(), false)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        store.entries(&refs)?
    } else {
        Vec::new()
    };
    if json {
        let doc = serde_json::json!({ "cache": cache_dir, "entries": entries });
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
    } else {
        write_table(&entries, out)?;
    }
    Ok(())
}

/// [`gc`] writing its report to `out`; `on_wait` is called if it has to wait for the
/// store lock (running setups).
pub fn gc_to(
    root: &Root,
    args: &GcArgs,
    out: &mut dyn Write,
    on_wait: impl FnOnce(&Path),
) -> anyhow::Result<GcReport> {
    let store = Store::open_with(&root.cache_dir(), true, on_wait)?;
    let (refs, _) = references(root, store.dir(), true)?;
    let opts = GcOptions {
        budget: args.max_size,
        older_than: args.older_than,
        dry_run: args.dry_run,
        // An explicit gc reclaims every partial download no live setup holds.
        keep_partials_for: None,
    };
    let report = store.gc(&opts, &refs)?;
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for e in &report.removed {
        writeln!(
            out,
            "{verb} {:<5} {}  {}",
            kind_label(e),
            e.key,
            human_size(e.size)
        )?;
    }
    for l in &report.leftovers {
        writeln!(
            out,
            "{verb} leftover {}  {}",
            l.path.display(),
            human_size(l.size)
        )?;
    }
    writeln!(
        out,
        "{} {} in {} entries; kept {} in {} entries ({} in use by procs)",
        if report.dry_run {
            "would free"
        } else {
            "freed"
        },
        human_size(report.freed_bytes),
        report.removed.len() + report.leftovers.len(),
        human_size(report.kept_bytes),
        report.kept_entries,
        human_size(report.referenced_bytes),
    )?;
    Ok(report)
}

/// [`verify`] writing to `out`; an error (after listing them) when entries were bad.
pub fn verify_to(root: &Root, deep: bool, out: &mut dyn Write) -> anyhow::Result<VerifyReport> {
    let store = Store::open_with(&root.cache_dir(), true, announce_wait)?;
    let report = store.verify(deep)?;
    for bad in &report.bad {
        writeln!(
            out,
            "BAD {} {}: {}",
            bad.kind,
            bad.key,
            bad.problems.join("; ")
        )?;
        if let Some(to) = &bad.quarantined_to {
            writeln!(out, "    quarantined to {}", to.display())?;
        }
    }
    writeln!(
        out,
        "checked {} blobs, {} layers{}, {} index entries: {} bad",
        report.blobs_checked,
        report.layers_checked,
        if deep { " (deep)" } else { "" },
        report.index_entries_checked,
        report.bad.len()
    )?;
    if !report.bad.is_empty() {
        let keys: Vec<String> = report
            .bad
            .iter()
            .map(|b| format!("{} {}", b.kind, b.key))
            .collect();
        anyhow::bail!(
            "cache verify found {} bad entries (quarantined; the next setup refetches them): {}",
            report.bad.len(),
            keys.join(", ")
        );
    }
    Ok(report)
}

fn kind_label(e: &CacheEntry) -> &'static str {
    match (e.kind, e.layer_kind) {
        (EntryKind::Blob, _) => "blob",
        (EntryKind::Layer, Some(k)) => k.as_str(),
        (EntryKind::Layer, None) => "layer",
    }
}

fn short_key(e: &CacheEntry) -> String {
    let short = &e.blob_sha256[..SHORT_HASH.min(e.blob_sha256.len())];
    match e.kind {
        EntryKind::Blob => short.to_owned(),
        EntryKind::Layer => format!("{short}  {}:{}", e.uid.unwrap_or(0), e.gid.unwrap_or(0)),
    }
}

fn write_table(entries: &[CacheEntry], out: &mut dyn Write) -> std::io::Result<()> {
    let now = SystemTime::now();
    writeln!(
        out,
        "{:<5}  {:<6}  {:<24}  {:>9}  {:>8}  {:<20}  SOURCE",
        "KIND", "STORED", "KEY (SHA256, OWNER)", "SIZE", "LAST USE", "USED BY"
    )?;
    for e in entries {
        let used_by = match e.kind {
            EntryKind::Blob => "-".to_owned(),
            EntryKind::Layer if e.used_by.is_empty() => "(unused)".to_owned(),
            EntryKind::Layer => e.used_by.join(","),
        };
        let mut source: Vec<String> = e.urls.clone();
        source.extend(e.md5.iter().map(|m| format!("md5:{m}")));
        if !e.complete {
            source.insert(0, "INCOMPLETE".to_owned());
        }
        writeln!(
            out,
            "{:<5}  {:<6}  {:<24}  {:>9}  {:>8}  {:<20}  {}",
            kind_label(e),
            e.storage.map_or("-", |s| s.as_str()),
            short_key(e),
            human_size(e.size),
            human_age(now, e.last_used),
            used_by,
            if source.is_empty() {
                "-".to_owned()
            } else {
                source.join(" ")
            }
        )?;
    }
    let (blobs, layers): (Vec<&CacheEntry>, Vec<&CacheEntry>) =
        entries.iter().partition(|e| e.kind == EntryKind::Blob);
    let total = |v: &[&CacheEntry]| v.iter().map(|e| e.size).sum::<u64>();
    writeln!(
        out,
        "{} blobs ({}), {} layers ({}), total {}",
        blobs.len(),
        human_size(total(&blobs)),
        layers.len(),
        human_size(total(&layers)),
        human_size(total(&blobs) + total(&layers))
    )
}

fn human_age(now: SystemTime, unix_secs: u64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs);
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_cache_subcommands() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            command: CacheCommand,
        }
        let gc = Cli::parse_from([
            "cache",
            "gc",
            "--max-size",
            "2G",
            "--older-than",
            "30d",
            "--dry-run",
        ]);
        assert!(matches!(
            gc.command,
            CacheCommand::Gc { max_size: Some(s), older_than: Some(d), dry_run: true }
                if s == 2 << 30 && d == Duration::from_secs(30 * 86400)
        ));
        assert!(Cli::try_parse_from(["cache", "gc", "--max-size", "lots"]).is_err());
        assert!(matches!(
            Cli::parse_from(["cache", "ls", "--json"]).command,
            CacheCommand::Ls { json: true }
        ));
        assert!(matches!(
            Cli::parse_from(["cache", "verify", "--deep"]).command,
            CacheCommand::Verify { deep: true }
        ));
    }
}
