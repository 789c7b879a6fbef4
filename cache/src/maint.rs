//! Operating the store: list what it holds, collect garbage, verify it.
//!
//! The store cannot know which layers are in use (that is in each proc's state file and
//! in the kernel's mount table, both vrun's business), so callers pass [`References`]:
//! the layers in use and by whom — by key where a proc's state names them, by path
//! where only the kernel's mount table does. gc never removes a referenced layer; blobs are
//! never in use once extracted, they only save a download.
//!
//! gc and verify require the store opened exclusively ([`Store::open_exclusive`]): they
//! wait for running setups and setups wait for them. Deleting is rename-then-remove and
//! quarantining is a rename, so a crash in the middle never leaves a half entry under a
//! published name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::fsutil;
use crate::layer::{read_meta, unmount_root, LayerKey, LayerKind, LayerMeta, LayerStorage};
use crate::layout::{LAYER_IMAGE, LAYER_MANIFEST, LAYER_META, LAYER_ROOT};
use crate::manifest::Manifest;
use crate::store::{read_md5_entry, read_url_entry, Store};

/// Quarantine leftovers younger than this are kept by gc: a day leaves time to look at
/// what verify or a failed check set aside. (Ingest leftovers go as soon as no live
/// process holds them: [`Store::remove_unheld_ingest`].)
pub const LEFTOVER_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How many manifest differences verify reports per layer (the rest are counted).
const MAX_DIFFS_REPORTED: usize = 5;

/// Layers in use, and who uses them (proc names, "mounted on …"): by key (what a proc's
/// state file records) or by path (an overlay's lower dir in the mount table).
#[derive(Debug, Default, Clone)]
pub struct References {
    keys: BTreeMap<LayerKey, BTreeSet<String>>,
    users: BTreeMap<PathBuf, BTreeSet<String>>,
}

impl References {
    pub fn new() -> References {
        References::default()
    }

    /// Marks `path` (a layer root or anything inside a layer dir) as used by `user`.
    pub fn add(&mut self, path: impl AsRef<Path>, user: impl Into<String>) {
        let path = path.as_ref();
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        self.users.entry(path).or_default().insert(user.into());
    }

    /// Marks the layer `key` as used by `user`.
    pub fn add_key(&mut self, key: &LayerKey, user: impl Into<String>) {
        self.keys
            .entry(key.clone())
            .or_default()
            .insert(user.into());
    }

    /// Who uses the layer `key`, stored in `layer_dir` (`layers-v1/<key>`).
    pub fn users_of(&self, key: &LayerKey, layer_dir: &Path) -> Vec<String> {
        let mut out: BTreeSet<String> = self.keys.get(key).cloned().unwrap_or_default();
        for (path, users) in &self.users {
            if path.starts_with(layer_dir) || layer_dir.starts_with(path) {
                out.extend(users.iter().cloned());
            }
        }
        out.into_iter().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.users.is_empty()
    }

    /// Every path marked as used (canonical where it existed when added).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.users.keys().map(PathBuf::as_path)
    }

    /// Every key marked as used.
    pub fn keys(&self) -> impl Iterator<Item = &LayerKey> {
        self.keys.keys()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Blob,
    Layer,
}

/// One row of `vrun cache ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub kind: EntryKind,
    /// Blob: its sha256. Layer: its directory name (`<kind>-<sha256>-<uid>-<gid>`).
    pub key: String,
    /// Blob: the file. Layer: its root (what a proc mounts).
    pub path: PathBuf,
    /// Bytes on disk (allocated blocks).
    pub size: u64,
    /// Unix seconds of the last use (publish or reuse).
    pub last_used: u64,
    /// The blob (for a layer: the blob it was extracted from).
    pub blob_sha256: String,
    /// md5s recorded for the blob.
    pub md5: Vec<String>,
    /// URLs recorded as serving the blob.
    pub urls: Vec<String>,
    /// Layers only: build or image, owner, file count.
    pub layer_kind: Option<LayerKind>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub files: Option<u64>,
    /// Layers only: a directory tree or an EROFS image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<LayerStorage>,
    /// Layers only: false when its `layer.json` is missing or unreadable (gc removes it,
    /// verify quarantines it, setup never uses it).
    pub complete: bool,
    /// Who uses it (from [`References`]); empty for blobs.
    pub used_by: Vec<String>,
}

/// Options of [`Store::gc`].
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Remove least-recently-used unreferenced entries until the store is at most this big.
    pub budget: Option<u64>,
    /// Remove unreferenced entries not used for this long.
    pub older_than: Option<Duration>,
    /// Report what would go, remove nothing.
    pub dry_run: bool,
    /// Keep resumable partial downloads that no setup holds but that were written to less
    /// than this long ago (the automatic policy: a setup killed by a deploy timeout is
    /// usually retried soon, and its partial is worth resuming). `None`, as `vrun cache
    /// gc` runs, removes every unheld partial.
    pub keep_partials_for: Option<Duration>,
}

/// A removed ingest/quarantine leftover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leftover {
    pub path: PathBuf,
    pub size: u64,
}

/// What gc freed (or, with `dry_run`, would free).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed: Vec<CacheEntry>,
    pub leftovers: Vec<Leftover>,
    pub freed_bytes: u64,
    /// Size of the entries kept (referenced ones included).
    pub kept_bytes: u64,
    pub kept_entries: usize,
    /// Size of the kept entries gc was not allowed to remove (referenced layers).
    pub referenced_bytes: u64,
}

/// One problem found by verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadEntry {
    /// "blob", "layer", "md5-index", "url-index" or "unknown".
    pub kind: String,
    pub key: String,
    pub path: PathBuf,
    pub problems: Vec<String>,
    /// Where it was moved (it is no longer used; the next setup refetches).
    pub quarantined_to: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub layers_checked: usize,
    pub index_entries_checked: usize,
    pub deep: bool,
    pub bad: Vec<BadEntry>,
}

/// The md5 and URL indexes read backwards: sha256 → (md5s, urls), with the index files.
#[derive(Default)]
struct ReverseIndex {
    md5: HashMap<String, Vec<(String, PathBuf)>>,
    urls: HashMap<String, Vec<(String, PathBuf)>>,
    /// Index files that do not parse (verify quarantines them).
    corrupt: Vec<(String, PathBuf)>,
    checked: usize,
}

impl Store {
    fn reverse_index(&self) -> Result<ReverseIndex, StoreError> {
        let mut rev = ReverseIndex::default();
        for (name, path) in fsutil::sorted_names(&self.layout.index_md5())? {
            if name.starts_with(".tmp-") {
                continue;
            }
            rev.checked += 1;
            match read_md5_entry(&path).filter(|_| fsutil::is_hex(&name, 32)) {
                Some(sha) => rev.md5.entry(sha).or_default().push((name, path)),
                None => rev.corrupt.push(("md5-index".into(), path)),
            }
        }
        for (name, path) in fsutil::sorted_names(&self.layout.index_url())? {
            if name.starts_with(".tmp-") {
                continue;
            }
            rev.checked += 1;
            match read_url_entry(&path).filter(|r| r.key_sha256() == name) {
                Some(rec) => rev
                    .urls
                    .entry(rec.sha256)
                    .or_default()
                    .push((rec.url, path)),
                None => rev.corrupt.push(("url-index".into(), path)),
            }
        }
        Ok(rev)
    }

    /// Every blob and layer, oldest use first.
    pub fn entries(&self, refs: &References) -> Result<Vec<CacheEntry>, StoreError> {
        let rev = self.reverse_index()?;
        let md5_of = |sha: &str| -> Vec<String> {
            rev.md5
                .get(sha)
                .map(|v| v.iter().map(|(m, _)| m.clone()).collect())
                .unwrap_or_default()
        };
        let urls_of = |sha: &str| -> Vec<String> {
            rev.urls
                .get(sha)
                .map(|v| v.iter().map(|(u, _)| u.clone()).collect())
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (name, path) in fsutil::sorted_names(&self.layout.blobs())? {
            if !fsutil::is_hex(&name, 64) {
                continue;
            }
            out.push(CacheEntry {
                kind: EntryKind::Blob,
                size: fsutil::disk_usage(&path),
                last_used: unix(fsutil::mtime(&path)),
                md5: md5_of(&name),
                urls: urls_of(&name),
                blob_sha256: name.clone(),
                key: name,
                path,
                layer_kind: None,
                uid: None,
                gid: None,
                files: None,
                storage: None,
                complete: true,
                used_by: Vec::new(),
            });
        }
        for (name, dir) in self.layer_dirs()? {
            let Some(key) = self.key_of(&name, &dir) else {
                continue;
            };
            let meta = read_meta(&dir).filter(|m| m.key == key);
            out.push(CacheEntry {
                kind: EntryKind::Layer,
                size: layer_size(&dir, &key, meta.as_ref()),
                last_used: unix(fsutil::mtime(&dir)),
                md5: md5_of(&key.blob_sha256),
                urls: urls_of(&key.blob_sha256),
                blob_sha256: key.blob_sha256.clone(),
                key: name,
                path: dir.join(LAYER_ROOT),
                layer_kind: Some(key.kind),
                uid: Some(key.uid),
                gid: Some(key.gid),
                files: meta.as_ref().map(|m| m.stats.files),
                storage: Some(key.storage),
                complete: meta.is_some(),
                used_by: refs.users_of(&key, &dir),
            });
        }
        out.sort_by(|a, b| (a.last_used, &a.key).cmp(&(b.last_used, &b.key)));
        Ok(out)
    }

    /// Removes unreferenced blobs and layers, least recently used first, until the store
    /// fits `budget` and nothing unreferenced is older than `older_than`. With neither
    /// given, every unreferenced entry goes. Ingest and quarantine leftovers older than
    /// [`LEFTOVER_MAX_AGE`] go too, and index entries of removed blobs.
    pub fn gc(&self, opts: &GcOptions, refs: &References) -> Result<GcReport, StoreError> {
        if !self.exclusive {
            return Err(StoreError::NotExclusive { what: "gc" });
        }
        let entries = self.entries(refs)?;
        let now = SystemTime::now();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        let everything = opts.budget.is_none() && opts.older_than.is_none();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        for entry in entries {
            let referenced = !entry.used_by.is_empty();
            let too_old = opts.older_than.is_some_and(|age| {
                now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(entry.last_used))
                    .is_ok_and(|idle| idle >= age)
            });
            let over_budget = opts.budget.is_some_and(|b| total > b);
            if referenced || !(everything || too_old || over_budget) {
                report.kept_entries += 1;
                report.kept_bytes += entry.size;
                if referenced {
                    report.referenced_bytes += entry.size;
                }
                continue;
            }
            total -= entry.size;
            report.freed_bytes += entry.size;
            if !opts.dry_run {
                match entry.kind {
                    EntryKind::Blob => self.remove_entry(&entry.path)?,
                    EntryKind::Layer => {
                        self.remove_layer(entry.path.parent().expect("layer root has a parent"))?
                    }
                }
            }
            report.removed.push(entry);
        }
        if !opts.dry_run {
            self.remove_dangling_index()?;
            self.remove_idle_key_locks()?;
        }
        for left in self.remove_unheld_ingest(opts.dry_run, opts.keep_partials_for)? {
            report.freed_bytes += left.size;
            report.leftovers.push(left);
        }
        for (_, path) in fsutil::sorted_names(&self.layout.quarantine())? {
            let age = now.duration_since(fsutil::mtime(&path)).unwrap_or_default();
            if age < LEFTOVER_MAX_AGE {
                continue;
            }
            let size = fsutil::disk_usage(&path);
            if !opts.dry_run {
                fsutil::remove_tree(&path)
                    .map_err(|e| StoreError::io("cannot remove", &path, e))?;
            }
            report.freed_bytes += size;
            report.leftovers.push(Leftover { path, size });
        }
        Ok(report)
    }

    /// Ingest entries no live process holds: what a killed or crashed setup left (its
    /// staging tree, a partial download no setup is continuing). A live writer holds an
    /// flock on its ingest dir ([`crate::Ingest`], [`crate::Partial`]), and the kernel
    /// drops that lock when the process dies, even on `kill -9`, so a free lock proves
    /// the entry is garbage now, whatever its age. (A partial download removed here is
    /// downloaded from byte 0 by the next setup.) With `keep_partials_for`, an unheld
    /// partial download written to more recently than that stays, to be resumed.
    /// Kept apart from the policy decisions of [`Store::gc`] so callers with their own
    /// policy can reuse it.
    pub fn remove_unheld_ingest(
        &self,
        dry_run: bool,
        keep_partials_for: Option<Duration>,
    ) -> Result<Vec<Leftover>, StoreError> {
        let mut out = Vec::new();
        let now = SystemTime::now();
        for (name, path) in fsutil::sorted_names(&self.layout.ingest())? {
            if !crate::lock::is_unheld(&path) {
                continue;
            }
            if let Some(keep) = keep_partials_for {
                let blob = path.join("blob");
                let recent = name.starts_with("partial-")
                    && blob.is_file()
                    && now.duration_since(fsutil::mtime(&blob)).unwrap_or_default() < keep;
                if recent {
                    continue;
                }
            }
            let size = fsutil::disk_usage(&path);
            if !dry_run {
                fsutil::remove_tree(&path)
                    .map_err(|e| StoreError::io("cannot remove", &path, e))?;
            }
            out.push(Leftover { path, size });
        }
        Ok(out)
    }

    /// Key lock files accumulate (one per URL and layer ever fetched). Every key lock is
    /// taken through a `Store`, which holds the store lock shared, so while gc holds it
    /// exclusively no key lock is held or awaited and the files can go.
    fn remove_idle_key_locks(&self) -> Result<(), StoreError> {
        for (name, path) in fsutil::sorted_names(&self.layout.locks())? {
            if name != crate::layout::STORE_LOCK {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Index entries whose blob and layers are all gone are misses anyway; gc tidies them
    /// away, with the temp files of index writes a killed process left (no writer is
    /// alive under the exclusive lock). An entry whose blob was never kept (`--no-blob`)
    /// stays while a layer of its sha256 does: it is how setup finds that layer.
    fn remove_dangling_index(&self) -> Result<(), StoreError> {
        for dir in [
            self.layout.index_md5(),
            self.layout.index_url(),
            self.layout.root.clone(),
        ] {
            for (name, path) in fsutil::sorted_names(&dir)? {
                if name.starts_with(".tmp-") {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let rev = self.reverse_index()?;
        let layered: std::collections::HashSet<String> = self
            .layer_dirs()?
            .into_iter()
            .filter_map(|(name, dir)| self.key_of(&name, &dir).map(|k| k.blob_sha256))
            .collect();
        for (sha, files) in rev.md5.iter().chain(rev.urls.iter()) {
            if !self.blob_path(sha).is_file() && !layered.contains(sha) {
                for (_, path) in files {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(())
    }

    /// Re-hashes every blob (sha256 against its name, md5 against the md5 index), checks
    /// every layer's metadata and manifest and, when `deep`, every file of every layer
    /// against its manifest. Bad entries are quarantined; all of them are returned.
    pub fn verify(&self, deep: bool) -> Result<VerifyReport, StoreError> {
        if !self.exclusive {
            return Err(StoreError::NotExclusive { what: "verify" });
        }
        let rev = self.reverse_index()?;
        let mut report = VerifyReport {
            deep,
            index_entries_checked: rev.checked,
            ..VerifyReport::default()
        };
        for (kind, path) in &rev.corrupt {
            let key = file_name(path);
            report.bad.push(self.quarantined(
                kind,
                &key,
                path,
                vec!["unreadable index entry".into()],
            )?);
        }
        for (name, path) in fsutil::sorted_names(&self.layout.blobs())? {
            if name.starts_with(".tmp-") {
                continue;
            }
            if !fsutil::is_hex(&name, 64) || !path.is_file() {
                report.bad.push(self.quarantined(
                    "unknown",
                    &name,
                    &path,
                    vec!["not a blob name".into()],
                )?);
                continue;
            }
            report.blobs_checked += 1;
            let (sha, md5) = crate::hash::hash_file(&path)?;
            if sha != name {
                report.bad.push(self.quarantined(
                    "blob",
                    &name,
                    &path,
                    vec![format!("sha256 mismatch: expected {name}, got {sha}")],
                )?);
                continue;
            }
            for (recorded, index_path) in rev.md5.get(&name).into_iter().flatten() {
                if *recorded != md5 {
                    report.bad.push(self.quarantined(
                        "md5-index",
                        recorded,
                        index_path,
                        vec![format!(
                            "md5 index maps {recorded} to blob {name}, whose md5 is {md5}"
                        )],
                    )?);
                }
            }
        }
        for (name, dir) in self.layer_dirs()? {
            let Some(key) = self.key_of(&name, &dir) else {
                let problems = vec!["not a layer name".into()];
                let _ = unmount_root(&dir.join(LAYER_ROOT));
                report
                    .bad
                    .push(self.quarantined("unknown", &name, &dir, problems)?);
                continue;
            };
            report.layers_checked += 1;
            let problems = match key.storage {
                LayerStorage::Dir => check_layer(&dir, &key, deep),
                LayerStorage::Erofs => check_image_layer(&dir, &key, deep),
            };
            if !problems.is_empty() {
                unmount_root(&dir.join(LAYER_ROOT))?;
                report
                    .bad
                    .push(self.quarantined("layer", &name, &dir, problems)?);
            }
        }
        Ok(report)
    }

    fn quarantined(
        &self,
        kind: &str,
        key: &str,
        path: &Path,
        problems: Vec<String>,
    ) -> Result<BadEntry, StoreError> {
        let to = self.quarantine(path, &format!("{kind}-{key}"))?;
        Ok(BadEntry {
            kind: kind.to_owned(),
            key: key.to_owned(),
            path: path.to_owned(),
            problems,
            quarantined_to: Some(to),
        })
    }
}

/// A layer dir's `layer.json`, if it is there and records `key` (both storages start so).
fn layer_meta_for(dir: &Path, key: &LayerKey) -> Result<LayerMeta, String> {
    let meta = read_meta(dir)
        .ok_or_else(|| "layer.json missing or unreadable (incomplete layer)".to_owned())?;
    if meta.key != *key {
        return Err(format!(
            "layer.json records key {}, not {}",
            meta.key.dir_name(),
            key.dir_name()
        ));
    }
    Ok(meta)
}

/// Problems of one layer dir (empty when it is sound).
fn check_layer(dir: &Path, key: &LayerKey, deep: bool) -> Vec<String> {
    let meta = match layer_meta_for(dir, key) {
        Ok(meta) => meta,
        Err(problem) => return vec![problem],
    };
    let root = dir.join(LAYER_ROOT);
    if !root.is_dir() {
        return vec![format!("{} is missing", root.display())];
    }
    let manifest_path = dir.join(LAYER_MANIFEST);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(t) => t,
        Err(e) => return vec![format!("cannot read {}: {e}", manifest_path.display())],
    };
    let actual = crate::sha256_hex(text.as_bytes());
    if actual != meta.manifest_sha256 {
        return vec![format!(
            "manifest sha256 mismatch: expected {}, got {actual}",
            meta.manifest_sha256
        )];
    }
    if !deep {
        return Vec::new();
    }
    let Some(recorded) = Manifest::parse(&text) else {
        return vec![format!("{} does not parse", manifest_path.display())];
    };
    match Manifest::scan(&root, meta.content_hashed) {
        Ok(now) => recorded.diff(&now, MAX_DIFFS_REPORTED),
        Err(e) => vec![format!("cannot scan layer: {e}")],
    }
}

/// Problems of one EROFS layer dir: `layer.json`, the image and its mount point; `deep`
/// re-hashes the image against the sha256 recorded at publish (every byte of the tree,
/// its metadata included, is in that one file).
fn check_image_layer(dir: &Path, key: &LayerKey, deep: bool) -> Vec<String> {
    let meta = match layer_meta_for(dir, key) {
        Ok(meta) => meta,
        Err(problem) => return vec![problem],
    };
    let Some(expected) = meta.image_sha256.as_deref() else {
        return vec!["layer.json records no image sha256".into()];
    };
    let image = dir.join(LAYER_IMAGE);
    if !image.is_file() {
        return vec![format!("{} is missing", image.display())];
    }
    let root = dir.join(LAYER_ROOT);
    if !root.is_dir() {
        return vec![format!("{} is missing", root.display())];
    }
    if !deep {
        return Vec::new();
    }
    match crate::hash::hash_file(&image) {
        Ok((sha, _)) if sha == expected => Vec::new(),
        Ok((sha, _)) => vec![format!(
            "image sha256 mismatch: expected {expected}, got {sha}"
        )],
        Err(e) => vec![format!("cannot read {}: {e}", image.display())],
    }
}

/// Bytes a layer takes on disk. An EROFS layer is its image and `layer.json`, never what
/// is mounted on its root (that is the image again).
pub(crate) fn layer_size(dir: &Path, key: &LayerKey, meta: Option<&LayerMeta>) -> u64 {
    match (key.storage, meta) {
        (LayerStorage::Erofs, _) => {
            fsutil::disk_usage(&dir.join(LAYER_IMAGE)) + fsutil::disk_usage(&dir.join(LAYER_META))
        }
        (LayerStorage::Dir, Some(m)) => {
            m.stats.disk_bytes + fsutil::disk_usage(&dir.join(LAYER_MANIFEST))
        }
        (LayerStorage::Dir, None) => fsutil::disk_usage(dir),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
