//! The store handle: opening (version check, layout, store lock), key locks, ingest dirs,
//! blobs and their md5/URL indexes.
//!
//! Publishing a blob: the bytes were written to an ingest file by the fetch pipeline while
//! it hashed them; here the file's size is checked, it is made read-only and renamed to
//! its sha256 name, and then the index entries (md5 → sha256, url → record) appear, each
//! as temp + rename. Unlike a layer, a blob is *not* fsynced: it is a cache of the
//! download that only saves a later download, the setup that made it has its layer
//! durable already, and on a slow disk waiting for the blob's writeback was a quarter of
//! a cold EROFS setup (issue 15). So after a power loss a blob may be missing or torn
//! under its name: whoever extracts from it re-hashes it first
//! ([`Store::rehash_blob`], which sets a bad one aside), and `verify --deep` checks it;
//! if the blob is gone (gc, quarantine, never written back), the lookup is a miss.
//!
//! Index entries are hints, never trusted blindly: a corrupt or foreign file is a miss.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::fsutil::{self, check_hex};
use crate::layout::{self, Layout, LAYOUT_VERSION, STORE_LOCK};
use crate::lock::{self, KeyLock, LockMode};

/// Mode of published blobs: nobody should write to a content-addressed file.
const BLOB_MODE: u32 = 0o444;

/// An open store. Holds the store-wide lock (shared, or exclusive for maintenance) until
/// dropped (why: see the crate docs, "Locks, then re-check").
#[derive(Debug)]
pub struct Store {
    pub(crate) layout: Layout,
    pub(crate) exclusive: bool,
    _store_lock: KeyLock,
}

/// Digest of a downloaded blob, computed by the fetch pipeline in the same pass that
/// wrote the ingest file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobDigest {
    pub sha256: String,
    pub md5: String,
    pub size: u64,
}

/// What the store remembers about a URL, so a later setup without an md5 can revalidate
/// (ETag / Last-Modified) instead of downloading again.
///
/// `url` is the URL as it may be shown: its userinfo (credentials) is redacted
/// ([`crate::redact_url`]) before it is written; the entry's file name, and `url_sha256`,
/// are the sha256 of the full URL, which is how lookups find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlRecord {
    pub url: String,
    /// sha256 of the full URL (absent in entries written before credentials were redacted,
    /// where it is the sha256 of `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_sha256: Option<String>,
    pub sha256: String,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
    pub size: u64,
}

/// An in-flight download/extraction: `ingest-v1/<random>/` holding `blob` (the download)
/// and `staging/` (the extraction). Removed with everything left in it when dropped;
/// what was published has been renamed out by then. A process killed before Drop leaves
/// the dir behind, but nothing ever reads ingest names: gc removes them after a day.
#[derive(Debug)]
pub struct Ingest {
    dir: PathBuf,
    blob: PathBuf,
    staging: PathBuf,
    /// An flock on the dir itself: gc removes ingest dirs nobody holds.
    _held: KeyLock,
}

/// The resumable download of one URL: `ingest-v1/partial-<sha256(url)>/` holding `blob`
/// (the bytes received so far) and `partial.json` (the validator they came with). Its
/// name is stable, so a setup killed half-way (kill -9, or a deploy timeout's TERM) leaves
/// it for the next setup of the same URL to continue with `Range` + `If-Range`; an flock
/// on the dir marks it in use, so gc removes it only when no live setup holds it. Take the
/// URL's key lock ([`url_lock_key`]) before [`Store::partial`]. Dropping a `Partial`
/// keeps it; [`Partial::discard`] removes it (after a publish, or a failure that a resume
/// could not cure).
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    blob: PathBuf,
    meta: PathBuf,
    _held: KeyLock,
}

/// What `partial.json` records about a partial download.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialMeta {
    /// The URL, redacted (for people looking at the store).
    pub url: String,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
}

impl Partial {
    /// The bytes received so far (may be absent or empty).
    pub fn blob_path(&self) -> &Path {
        &self.blob
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// What was recorded with the bytes; `None` when there is nothing to resume.
    pub fn meta(&self) -> Option<PartialMeta> {
        let bytes = std::fs::read(&self.meta).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// Bytes held (0 when there is no blob).
    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.blob).map_or(0, |m| m.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Record the validators of the body being written (atomically; private: it names
    /// the URL).
    pub fn set_meta(&self, meta: &PartialMeta) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(meta).expect("partial meta serializes");
        fsutil::write_store_file_private(&self.meta, &body)
    }
    /// Forget the bytes and the record (the dir stays, still held, for a fresh start).
    pub fn clear(&self) -> Result<(), StoreError> {
        for p in [&self.blob, &self.meta] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("cannot remove", p, e)),
            }
        }
        Ok(())
    }
    /// Remove the partial download altogether.
    pub fn discard(self) {
        let _ = fsutil::remove_tree(&self.dir);
    }
}

impl Ingest {
    /// The ingest directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Where the fetch pipeline writes the downloaded bytes (not created here).
    pub fn blob_path(&self) -> &Path {
        &self.blob
    }
    /// An empty directory to extract into; hand it to [`Store::publish_layer`].
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }
    /// Where to write an EROFS image (not created here); hand it to
    /// [`Store::publish_image_layer`].
    pub fn image_path(&self) -> PathBuf {
        self.dir.join("layer.erofs")
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = fsutil::remove_tree(&self.dir);
    }
}

impl Store {
    /// Opens (creating if needed) the store at `dir` for normal use: takes the store lock
    /// shared, waiting while gc or verify run.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, false, |_| {})
    }

    /// Opens the store for maintenance (gc, verify): takes the store lock exclusively,
    /// waiting until every other `Store` on it is dropped — in this process too, so never
    /// call it while holding a `Store` of the same directory.
    ///
    /// A setup must keep its shared `Store` until its proc state file names the layers
    /// it uses; otherwise gc could run in between and remove a layer nobody references yet.
    pub fn open_exclusive(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, true, |_| {})
    }

    /// Like [`Store::open`]/[`Store::open_exclusive`]; `on_wait(lock_path)` is called once
    /// before blocking when the lock is held by someone else (to tell the user why we wait).
    pub fn open_with(
        dir: &Path,
        exclusive: bool,
        on_wait: impl FnOnce(&Path),
    ) -> Result<Store, StoreError> {
        let store = Store::open_or_give_up(dir, exclusive, |lock| {
            on_wait(lock);
            true
        })?;
        Ok(store.expect("a store that waits for its lock opens"))
    }

    /// Opens the store exclusively only if nobody else has it open right now: `Ok(None)`
    /// instead of waiting (the automatic cache policy must never hold up a deploy).
    pub fn try_open_exclusive(dir: &Path) -> Result<Option<Store>, StoreError> {
        Store::open_or_give_up(dir, true, |_| false)
    }

    /// The open: when the lock is taken, `wait(lock_path)` says whether to block for it.
    fn open_or_give_up(
        dir: &Path,
        exclusive: bool,
        wait: impl FnOnce(&Path) -> bool,
    ) -> Result<Option<Store>, StoreError> {
        if dir.exists() {
            layout::check_version(dir)?;
        }
        fs_err::create_dir_all(dir)?;
        let root = fs_err::canonicalize(dir)?;
        let found = layout::check_version(&root)?;
        let layout = Layout { root };
        layout::create(&layout, found)?;

        let mode = if exclusive {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        let lock_path = layout.locks().join(STORE_LOCK);
        let store_lock = match lock::acquire(&lock_path, mode, false)? {
            Some(l) => l,
            None if wait(&lock_path) => {
                lock::acquire(&lock_path, mode, true)?.expect("blocking lock returns a lock")
            }
            None => return Ok(None),
        };
        // Whoever we waited for may have been a newer vrun: check again under the lock.
        if layout::check_version(&layout.root)? != Some(LAYOUT_VERSION) {
            layout::create(&layout, layout::read_version(&layout.root)?)?;
        }
        Ok(Some(Store {
            layout,
            exclusive,
            _store_lock: store_lock,
        }))
    }

    /// The store's root directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.layout.root
    }

    /// Blocking exclusive lock for one key, across processes. Take it, then re-check
    /// (`blob`, `layer`, `lookup_*`) before doing the work: the holder you waited for
    /// has probably done it. Keys: see [`url_lock_key`], [`crate::LayerKey::lock_key`].
    pub fn lock(&self, key: &str) -> Result<KeyLock, StoreError> {
        let path = self.layout.locks().join(lock::lock_file_name(key));
        Ok(lock::acquire(&path, LockMode::Exclusive, true)?.expect("blocking lock returns a lock"))
    }

    /// Non-blocking [`Store::lock`]: `None` when another holder has it (so the caller can
    /// say "waiting for …" and then call `lock`).
    pub fn try_lock(&self, key: &str) -> Result<Option<KeyLock>, StoreError> {
        let path = self.layout.locks().join(lock::lock_file_name(key));
        lock::acquire(&path, LockMode::Exclusive, false)
    }

    /// A fresh ingest dir on the store's filesystem (so publishing is a rename).
    pub fn new_ingest(&self) -> Result<Ingest, StoreError> {
        let dir = self.layout.ingest().join(fsutil::random_name());
        fs_err::create_dir(&dir)?;
        let held = match lock::acquire_dir(&dir, false) {
            Ok(Some(l)) => l,
            Ok(None) => unreachable!("a fresh random dir is not locked"),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let ingest = Ingest {
            blob: dir.join("blob"),
            staging: dir.join("staging"),
            dir,
            _held: held,
        };
        fs_err::create_dir(&ingest.staging)?;
        Ok(ingest)
    }

    fn partial_dir(&self, url: &str) -> PathBuf {
        self.layout
            .ingest()
            .join(format!("partial-{}", crate::sha256_hex(url.as_bytes())))
    }

    /// Bytes of `url` a partial download holds now (0 when none), without taking it.
    pub fn partial_bytes(&self, url: &str) -> u64 {
        std::fs::metadata(self.partial_dir(url).join("blob")).map_or(0, |m| m.len())
    }

    /// The partial download of `url` (created empty if there is none), held until dropped.
    /// Hold the URL's key lock first: that lock is what keeps two setups apart; this one
    /// only tells gc the dir is in use.
    pub fn partial(&self, url: &str) -> Result<Partial, StoreError> {
        let dir = self.partial_dir(url);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io("cannot create", &dir, e)),
        }
        let held = lock::acquire_dir(&dir, true)?.expect("blocking lock returns a lock");
        Ok(Partial {
            blob: dir.join("blob"),
            meta: dir.join("partial.json"),
            dir,
            _held: held,
        })
    }

    /// The lock file of a key (for naming who holds it, [`crate::lock_holders`]).
    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.layout.locks().join(lock::lock_file_name(key))
    }

    /// Path of blob files by sha256 (whether or not present).
    pub(crate) fn blob_path(&self, sha256: &str) -> PathBuf {
        self.layout.blobs().join(sha256)
    }

    /// The published blob with this sha256, if present. Records a use (for gc's LRU).
    pub fn blob(&self, sha256: &str) -> Option<PathBuf> {
        if !fsutil::is_hex(sha256, 64) {
            return None;
        }
        let path = self.blob_path(sha256);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                let _ = fsutil::touch(&path);
                Some(path)
            }
            _ => None,
        }
    }

    /// Re-hashes a published blob before reuse: `Ok(true)` when its bytes still match its
    /// name (and `expect_md5`, when given). Otherwise the blob is quarantined, so it is
    /// refetched, and `Ok(false)` returned; a missing blob is `Ok(false)` too. Hold the
    /// blob's or URL's key lock while calling this.
    pub fn rehash_blob(&self, sha256: &str, expect_md5: Option<&str>) -> Result<bool, StoreError> {
        check_hex("sha256", sha256, 64)?;
        let path = self.blob_path(sha256);
        if !path.is_file() {
            return Ok(false);
        }
        let (sha, md5) = crate::hash::hash_file(&path)?;
        let md5_ok = expect_md5.is_none_or(|m| m.eq_ignore_ascii_case(&md5));
        if sha == sha256 && md5_ok {
            let _ = fsutil::touch(&path);
            return Ok(true);
        }
        if sha != sha256 {
            self.quarantine(&path, &format!("blob-{sha256}"))?;
        } else if let Some(m) = expect_md5 {
            // The blob is intact but is not the one this md5 names: the index lied.
            let entry = self.layout.index_md5().join(m.to_ascii_lowercase());
            if fsutil::is_hex(&m.to_ascii_lowercase(), 32)
                && read_md5_entry(&entry).as_deref() == Some(sha256)
            {
                let _ = std::fs::remove_file(entry);
            }
        }
        Ok(false)
    }

    /// Records a use of a blob now (also done by [`Store::blob`]).
    pub fn touch_blob(&self, sha256: &str) -> Result<(), StoreError> {
        check_hex("sha256", sha256, 64)?;
        fsutil::touch(&self.blob_path(sha256))
    }

    /// Publishes the ingest's downloaded file as `blobs-v1/sha256/<sha256>` and records
    /// the md5 (and the URL, when given) in the indexes. The digest is the caller's: the
    /// pipeline hashed these bytes as it wrote them; re-reading here would double the I/O.
    /// If the blob already exists (another process won), ours is left for the ingest's
    /// Drop and the existing one is returned. Not fsynced (module note): extract from it
    /// only after [`Store::rehash_blob`].
    pub fn publish_blob(
        &self,
        ingest: &Ingest,
        d: &BlobDigest,
        url: Option<&UrlRecord>,
    ) -> Result<PathBuf, StoreError> {
        self.publish_blob_file(ingest.blob_path(), d, url)
    }

    /// [`Store::publish_blob`] for a downloaded file anywhere on the store's filesystem
    /// (a [`Partial`]'s blob). The file is moved.
    pub fn publish_blob_file(
        &self,
        file: &Path,
        d: &BlobDigest,
        url: Option<&UrlRecord>,
    ) -> Result<PathBuf, StoreError> {
        check_hex("sha256", &d.sha256, 64)?;
        check_hex("md5", &d.md5, 32)?;
        let dest = self.blob_path(&d.sha256);
        if !dest.is_file() {
            let f = fs_err::File::open(file)?;
            let actual = f.metadata()?.len();
            if actual != d.size {
                return Err(StoreError::SizeMismatch {
                    path: file.to_owned(),
                    expected: d.size,
                    actual,
                });
            }
            // No fsync (module note): the kernel writes the blob back after setup returns.
            fs_err::set_permissions(file, std::fs::Permissions::from_mode(BLOB_MODE))?;
            drop(f);
            fs_err::rename(file, &dest)?;
        }
        self.record_digest(d, url)?;
        Ok(dest)
    }

    /// Records md5 → sha256 (and the URL, when given) without a blob: what setup does when
    /// it keeps only the extracted layer (`--no-blob`). Lookups by md5 or URL then find
    /// the layer by its key; gc keeps such entries while a layer of that sha256 exists.
    pub fn record_digest(&self, d: &BlobDigest, url: Option<&UrlRecord>) -> Result<(), StoreError> {
        check_hex("sha256", &d.sha256, 64)?;
        check_hex("md5", &d.md5, 32)?;
        fsutil::write_store_file_private(
            &self.layout.index_md5().join(&d.md5),
            format!("{}\n", d.sha256).as_bytes(),
        )?;
        if let Some(rec) = url {
            let rec = UrlRecord {
                sha256: d.sha256.clone(),
                size: d.size,
                ..rec.clone()
            };
            self.record_url(&rec)?;
        }
        Ok(())
    }

    /// The sha256 recorded for an md5, if any. A malformed query or entry is a miss. The
    /// blob itself may be gone since: check with [`Store::blob`].
    pub fn lookup_md5(&self, md5: &str) -> Option<String> {
        let md5 = md5.to_ascii_lowercase();
        if !fsutil::is_hex(&md5, 32) {
            return None;
        }
        read_md5_entry(&self.layout.index_md5().join(&md5))
    }

    /// What was recorded for this exact URL, if anything. A corrupt entry, or one whose
    /// URL differs (hash collision, foreign file), is a miss.
    pub fn lookup_url(&self, url: &str) -> Option<UrlRecord> {
        let rec = read_url_entry(&self.url_index_path(url))?;
        let key = crate::sha256_hex(url.as_bytes());
        (rec.url == crate::redact_url(url) && rec.key_sha256() == key).then_some(rec)
    }

    /// Records (or replaces) what is known about a URL. `rec.url` is the full URL; what
    /// is written has its credentials redacted, in a file only the owner can read.
    pub fn record_url(&self, rec: &UrlRecord) -> Result<(), StoreError> {
        check_hex("sha256", &rec.sha256, 64)?;
        let stored = UrlRecord {
            url: crate::redact_url(&rec.url),
            url_sha256: Some(crate::sha256_hex(rec.url.as_bytes())),
            ..rec.clone()
        };
        let body = serde_json::to_vec_pretty(&stored).expect("url record serializes");
        fsutil::write_store_file_private(&self.url_index_path(&rec.url), &body)
    }

    fn url_index_path(&self, url: &str) -> PathBuf {
        self.layout
            .index_url()
            .join(crate::sha256_hex(url.as_bytes()))
    }

    /// Moves `path` under `quarantine-v1/` (so nothing reads it by its published name any
    /// more) and returns where it went.
    pub(crate) fn quarantine(&self, path: &Path, label: &str) -> Result<PathBuf, StoreError> {
        let secs = crate::unix_now();
        let dest = self
            .layout
            .quarantine()
            .join(format!("{secs}-{}-{label}", fsutil::random_name()));
        fs_err::rename(path, &dest)?;
        Ok(dest)
    }

    /// Removes a published entry: first renamed into ingest (atomic disappearance, so a
    /// crash mid-delete leaves no half-entry under a published name), then deleted.
    pub(crate) fn remove_entry(&self, path: &Path) -> Result<(), StoreError> {
        let trash = self
            .layout
            .ingest()
            .join(format!("{}.trash", fsutil::random_name()));
        match fs_err::rename(path, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        fsutil::remove_tree(&trash).map_err(|e| StoreError::io("cannot remove", &trash, e))
    }
}

impl UrlRecord {
    /// The sha256 of the full URL this record is about (its index file's name).
    pub fn key_sha256(&self) -> String {
        self.url_sha256
            .clone()
            .unwrap_or_else(|| crate::sha256_hex(self.url.as_bytes()))
    }
}

/// The key to lock while fetching a URL (its sha256 is unknown until downloaded).
pub fn url_lock_key(url: &str) -> String {
    format!("url-{}", crate::sha256_hex(url.as_bytes()))
}

/// The key to lock while publishing a blob.
pub fn blob_lock_key(sha256: &str) -> String {
    format!("blob-{sha256}")
}

pub(crate) fn read_md5_entry(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let sha = text.trim();
    fsutil::is_hex(sha, 64).then(|| sha.to_owned())
}

pub(crate) fn read_url_entry(path: &Path) -> Option<UrlRecord> {
    let bytes = std::fs::read(path).ok()?;
    let rec: UrlRecord = serde_json::from_slice(&bytes).ok()?;
    fsutil::is_hex(&rec.sha256, 64).then_some(rec)
}
