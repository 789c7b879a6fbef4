//! The cache's automatic policy ([`vrun_cache::AutoGc`]) as setup and teardown run it.
//!
//! The budgets come from the environment Velociraptor starts vrun with —
//! `VRUN_CACHE_MAX_SIZE` (default 20G) and `VRUN_CACHE_MAX_AGE` (default 7d), `off` to
//! switch one off — and are checked before the command touches anything, so a typo is a
//! one-line error like any other bad input. The policy runs after the command's own work
//! is done and the store is released; it can only print a warning, never fail a deploy
//! that succeeded. It looks at the whole store after a setup that stored something new,
//! else at most once an hour ([`vrun_cache::CHECK_INTERVAL`]). Teardown first records a
//! use of the torn-down proc's layers, so "age" means time since a proc last used a
//! layer, not since it was downloaded.
//!
//! A module of its own, beside `cache.rs` (both use `vrun::references`), so the policy and
//! gc's rules can change independently.

use std::time::Duration;

use anyhow::Context;
use vrun::paths::Root;
use vrun::state::ProcState;
use vrun_cache::{AutoGc, Store, MAX_AGE_ENV, MAX_SIZE_ENV};

use vrun::references::references;
use vrun::units::{human_size, parse_duration, parse_size};

/// The policy from the environment (defaults where unset).
pub fn policy() -> anyhow::Result<AutoGc> {
    policy_from(|var| std::env::var(var).ok())
}

fn policy_from(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<AutoGc> {
    let off = |v: &str| matches!(v.trim(), "off" | "none" | "0");
    let defaults = AutoGc::default();
    let max_size = match lookup(MAX_SIZE_ENV) {
        None => defaults.max_size,
        Some(v) if off(&v) => None,
        Some(v) => Some(
            parse_size(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!("environment variable {MAX_SIZE_ENV} (the cache's size budget, or off)")
                })?,
        ),
    };
    let max_age = match lookup(MAX_AGE_ENV) {
        None => defaults.max_age,
        Some(v) if off(&v) => None,
        Some(v) => Some(
            parse_duration(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!("environment variable {MAX_AGE_ENV} (the cache's age budget, or off)")
                })?,
        ),
    };
    Ok(AutoGc { max_size, max_age })
}

/// Run the policy after a setup (the store already released by the caller);
/// `stored_new`: it downloaded or extracted something, so look at the store now.
pub fn after_setup(root: &Root, policy: &AutoGc, stored_new: bool) {
    if let Err(e) = run(root, policy, None, stored_new) {
        warn(&e);
    }
}

/// Run the policy after a teardown of a proc whose state was `used` (if readable).
pub fn after_teardown(root: &Root, policy: &AutoGc, used: Option<&ProcState>) {
    if let Err(e) = run(root, policy, used, false) {
        warn(&e);
    }
}

fn warn(e: &anyhow::Error) {
    eprintln!(
        "WARNING: automatic cache gc skipped: {}",
        super::one_line(e)
    );
}

fn run(
    root: &Root,
    policy: &AutoGc,
    used: Option<&ProcState>,
    look_now: bool,
) -> anyhow::Result<()> {
    let cache_dir = root.cache_dir();
    if policy.is_off() || !cache_dir.is_dir() {
        return Ok(());
    }
    if let Some(state) = used {
        touch_layers(&cache_dir, state)?;
    }
    if !look_now && vrun_cache::auto_gc_checked_recently(&cache_dir) {
        return Ok(());
    }
    // Someone else has the store open (a setup downloading, gc, verify): do nothing now;
    // the next setup or teardown tries again.
    let Some(store) = Store::try_open_exclusive(&cache_dir)? else {
        return Ok(());
    };
    let (refs, _) = references(root, store.dir(), true)?;
    let Some(report) = store.auto_gc(policy, &refs)? else {
        return Ok(());
    };
    let removed = report.removed.len() + report.leftovers.len();
    if removed > 0 {
        eprintln!(
            "vrun: cache policy ({}) removed {removed} unused entries, {}; the cache holds {}",
            describe(policy),
            human_size(report.freed_bytes),
            human_size(report.kept_bytes)
        );
    }
    Ok(())
}

/// Record a use, now, of the layers (and their blobs) a torn-down proc used.
fn touch_layers(cache_dir: &std::path::Path, state: &ProcState) -> anyhow::Result<()> {
    let store = Store::open_with(cache_dir, false, |_| {})?;
    for (key, _) in state.layers() {
        let _ = store.touch_layer(key);
        let _ = store.touch_blob(&key.blob_sha256);
    }
    Ok(())
}

fn describe(policy: &AutoGc) -> String {
    let size = policy
        .max_size
        .map(|b| format!("max size {}", human_size(b)));
    let age = policy
        .max_age
        .map(|d| format!("max age {}", human_duration(d)));
    [size, age]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s % 86400 == 0 => format!("{}d", s / 86400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_from_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(policy_from(env(&[])).unwrap(), AutoGc::default());
        let p = policy_from(env(&[(MAX_SIZE_ENV, "500M"), (MAX_AGE_ENV, "off")])).unwrap();
        assert_eq!((p.max_size, p.max_age), (Some(500 << 20), None));
        assert!(
            policy_from(env(&[(MAX_SIZE_ENV, "off"), (MAX_AGE_ENV, "none")]))
                .unwrap()
                .is_off()
        );
        let err = policy_from(env(&[(MAX_AGE_ENV, "lots")])).unwrap_err();
        assert!(format!("{err:#}").contains(MAX_AGE_ENV), "{err:#}");
        assert_eq!(
            describe(&AutoGc::default()),
            "max size 20.00 GiB, max age 7d"
        );
    }
}
