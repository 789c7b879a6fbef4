//! The automatic cache policy: after every setup and teardown, keep the store within a
//! size and age budget, as cargo's automatic gc keeps `~/.cargo` in check.
//!
//! Why it exists: Velociraptor cleans a host by listing and deleting `/apps/builds` and
//! `/apps/images` (unused for 7 days, `remote.py`); vrun's store lives in `cache/` and
//! nothing on a real host would ever reclaim it. So the runner does it itself:
//!
//! - **What goes**: unreferenced blobs and layers not used for [`AutoGc::max_age`]
//!   (default [`DEFAULT_MAX_AGE`], Velociraptor's own `MAX_BUILD_AGE`), and, while the
//!   store is over [`AutoGc::max_size`] (default [`DEFAULT_MAX_SIZE`]), unreferenced
//!   entries least recently used first. It is [`Store::gc`] with those options, so it
//!   never removes what a proc's state file or a live overlay references, and the rules
//!   stay those of `vrun cache gc`.
//! - **Never in the way**: it opens the store with [`Store::try_open_exclusive`]; while
//!   any other vrun has the store open (a setup downloading) it does nothing and the next
//!   setup or teardown tries again.
//! - **Cheap when there is nothing to do**: like cargo's `gc.auto.frequency`, the whole
//!   store is looked at most once per [`CHECK_INTERVAL`] (one stat of a stamp file
//!   decides), except right after a setup stored something new, when the size budget may
//!   just have been crossed. The look itself ([`Store::auto_gc_due`]) is one listing of
//!   `blobs-v1/` and `layers-v1/` (a stat each, and each layer's small `layer.json` for
//!   its size); only when it finds something to remove does gc run (which also reads the
//!   md5/url indexes). `cargo bench --bench autogc` measures both.
//!
//! Kept in its own module, over `gc`, so changes to gc's rules apply here unchanged.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Component, Path};
use std::time::{Duration, SystemTime};

use crate::error::StoreError;
use crate::fsutil;
use crate::layer::{read_meta, LayerStorage};
use crate::layout::AUTOGC_STAMP as STAMP;
use crate::maint::{layer_size, GcOptions, GcReport, References, LEFTOVER_MAX_AGE};
use crate::store::Store;

/// Environment variable with the size budget (`20G`, `500M`, bytes; `off` for none).
pub const MAX_SIZE_ENV: &str = "VRUN_CACHE_MAX_SIZE";
/// Environment variable with the age budget (`7d`, `12h`, `2w`; `off` for none).
pub const MAX_AGE_ENV: &str = "VRUN_CACHE_MAX_AGE";

/// Default size budget: room for a few dozen builds and images of a typical app host.
/// Referenced entries count towards it but are never removed, so it is a target, not a
/// hard limit.
pub const DEFAULT_MAX_SIZE: u64 = 20 << 30;

/// Default age budget: what Velociraptor itself allows an unused build or image on a
/// host (`MAX_BUILD_AGE`, `MAX_IMAGE_AGE` in vr.server's `remote.py`).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long after a full look at the store the policy trusts it (unless a setup stored
/// something new): ages are counted in days, so an hour loses nothing.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Whether the policy looked at the store at `cache_dir` less than [`CHECK_INTERVAL`] ago
/// (one stat; no lock needed).
pub fn auto_gc_checked_recently(cache_dir: &Path) -> bool {
    let stamp = cache_dir.join(STAMP);
    std::fs::symlink_metadata(&stamp).is_ok()
        && SystemTime::now()
            .duration_since(fsutil::mtime(&stamp))
            .is_ok_and(|age| age < CHECK_INTERVAL)
}

/// The budgets of the automatic policy; `None` switches one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoGc {
    pub max_size: Option<u64>,
    pub max_age: Option<Duration>,
}

impl Default for AutoGc {
    fn default() -> Self {
        AutoGc {
            max_size: Some(DEFAULT_MAX_SIZE),
            max_age: Some(DEFAULT_MAX_AGE),
        }
    }
}

impl AutoGc {
    /// Both budgets off: the policy does nothing.
    pub fn is_off(&self) -> bool {
        self.max_size.is_none() && self.max_age.is_none()
    }

    fn gc_options(&self) -> GcOptions {
        GcOptions {
            budget: self.max_size,
            older_than: self.max_age,
            dry_run: false,
            // A setup killed by a deploy timeout is retried soon: keep its download.
            keep_partials_for: Some(LEFTOVER_MAX_AGE),
        }
    }
}

impl Store {
    /// Whether [`Store::gc`] with `policy` would remove anything, from one cheap listing
    /// (see the module note). Needs no exclusive lock.
    pub fn auto_gc_due(&self, policy: &AutoGc, refs: &References) -> Result<bool, StoreError> {
        if policy.is_off() {
            return Ok(false);
        }
        let now = SystemTime::now();
        let idle_too_long = |path: &Path, limit: Duration| {
            now.duration_since(fsutil::mtime(path))
                .is_ok_and(|idle| idle >= limit)
        };
        // Which layer dirs are referenced, by name, in one pass over the references
        // ([`References::users_of`] per layer costs a path walk per reference).
        let buckets = [
            self.layout.layers_of(LayerStorage::Dir),
            self.layout.layers_of(LayerStorage::Erofs),
        ];
        let mut everything_referenced = false;
        let names: Vec<std::ffi::OsString> = refs.keys().map(|k| k.dir_name().into()).collect();
        let mut referenced: HashSet<&OsStr> = names.iter().map(|n| n.as_os_str()).collect();
        for path in refs.paths() {
            for bucket in &buckets {
                match path.strip_prefix(bucket) {
                    Ok(rest) => {
                        // Layer names are unique across both buckets.
                        if let Some(Component::Normal(name)) = rest.components().next() {
                            referenced.insert(name);
                        }
                    }
                    Err(_) if bucket.starts_with(path) => everything_referenced = true,
                    Err(_) => {}
                }
            }
        }
        let is_referenced = |dir: &Path| {
            everything_referenced || dir.file_name().is_some_and(|n| referenced.contains(n))
        };
        let mut total = 0u64;
        let mut unreferenced = false;
        for (name, path) in fsutil::sorted_names(&self.layout.blobs())? {
            if !fsutil::is_hex(&name, 64) {
                continue;
            }
            // Blobs are never referenced: they only save a download.
            if policy.max_age.is_some_and(|age| idle_too_long(&path, age)) {
                return Ok(true);
            }
            unreferenced = true;
            total += fsutil::disk_usage(&path);
        }
        for (name, dir) in self.layer_dirs()? {
            let Some(key) = self.key_of(&name, &dir) else {
                continue;
            };
            let used = is_referenced(&dir);
            total += match read_meta(&dir).filter(|m| m.key == key) {
                Some(m) => layer_size(&dir, &key, Some(&m)),
                // An incomplete (damaged) layer: gc removes it whatever its size.
                None if !used => return Ok(true),
                None => layer_size(&dir, &key, None),
            };
            if !used {
                if policy.max_age.is_some_and(|age| idle_too_long(&dir, age)) {
                    return Ok(true);
                }
                unreferenced = true;
            }
        }
        if unreferenced && policy.max_size.is_some_and(|budget| total > budget) {
            return Ok(true);
        }
        for dir in [self.layout.ingest(), self.layout.quarantine()] {
            for (_, path) in fsutil::sorted_names(&dir)? {
                if idle_too_long(&path, LEFTOVER_MAX_AGE) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Apply the policy: `Ok(None)` when nothing was due, else gc's report; either way
    /// the look is stamped ([`auto_gc_checked_recently`]). Needs the store opened
    /// exclusively ([`Store::try_open_exclusive`]).
    pub fn auto_gc(
        &self,
        policy: &AutoGc,
        refs: &References,
    ) -> Result<Option<GcReport>, StoreError> {
        let due = self.auto_gc_due(policy, refs)?;
        let report = if due {
            Some(self.gc(&policy.gc_options(), refs)?)
        } else {
            None
        };
        let stamp = self.layout.root.join(STAMP);
        if std::fs::symlink_metadata(&stamp).is_err() {
            fsutil::write_store_file(&stamp, b"")?;
        }
        fsutil::touch(&stamp)?;
        Ok(report)
    }
}
