//! Every on-disk name of the store, and the layout version marker, in one place.
//!
//! Following uv's cache, each bucket carries its own `-vN` suffix. A future change to
//! one bucket's format bumps that bucket's suffix, so an old vrun simply never looks at
//! the new directory and a new vrun never misreads the old one: they coexist until gc.
//! The store-wide `VERSION` file records the newest layout that has written here; a
//! vrun that finds a bigger number than it knows refuses to touch the store at all,
//! because a future layout may have changed what the shared pieces (locks, CACHEDIR.TAG)
//! mean. A smaller number is upgraded in place: older buckets have other names and are
//! ignored.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::fsutil;
use serde::{Deserialize, Serialize};

/// Layout version this code writes and reads. Bump together with the suffixes below.
pub const LAYOUT_VERSION: u32 = 1;

/// Name of the layout marker file at the store root (contains the version number).
pub const VERSION_FILE: &str = "VERSION";

/// Cache directory tag (<https://bford.info/cachedir/>): backup tools skip the store.
pub const CACHEDIR_TAG: &str = "CACHEDIR.TAG";

/// Empty file whose mtime is the automatic policy's last full look (`policy.rs`).
pub const AUTOGC_STAMP: &str = "autogc-v1.stamp";

/// Contents of [`CACHEDIR_TAG`]; the first line is the standard signature.
pub const CACHEDIR_TAG_BODY: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by vrun.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

/// The buckets of layout version 1, relative to the store root.
pub(crate) const BLOBS: &str = "blobs-v1/sha256";
pub(crate) const INDEX_MD5: &str = "index-v1/md5";
pub(crate) const INDEX_URL: &str = "index-v1/url";
pub(crate) const LAYERS: &str = "layers-v1";
/// EROFS layers live in a bucket of their own, so a vrun that predates them never looks
/// at one (its `verify` would call the names unknown and quarantine them).
pub(crate) const LAYERS_EROFS: &str = "layers-erofs-v1";
pub(crate) const INGEST: &str = "ingest-v1";
pub(crate) const LOCKS: &str = "locks-v1";
pub(crate) const QUARANTINE: &str = "quarantine-v1";

/// Every directory the layout needs, created by [`crate::Store::open`].
pub(crate) const ALL_DIRS: [&str; 8] = [
    BLOBS,
    INDEX_MD5,
    INDEX_URL,
    LAYERS,
    LAYERS_EROFS,
    INGEST,
    LOCKS,
    QUARANTINE,
];

/// How a layer's tree is stored (`layer.json` and the key record it; see `layer.rs`'s note). Here
/// because the storage picks the bucket: the layout names every bucket, and `layer`
/// builds on the layout, never the other way round.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LayerStorage {
    /// An extracted directory tree, `layers-v1/<name>/root/`.
    #[default]
    Dir,
    /// One EROFS image, `layers-erofs-v1/<name>/image.erofs`, mounted read-only on the
    /// layer's `root/` (by vrun, once per host).
    Erofs,
}

impl LayerStorage {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerStorage::Dir => "dir",
            LayerStorage::Erofs => "erofs",
        }
    }

    /// `dir` or `erofs` (what `--layers` and `VRUN_LAYERS` take).
    pub fn parse(s: &str) -> Option<LayerStorage> {
        match s {
            "dir" => Some(LayerStorage::Dir),
            "erofs" => Some(LayerStorage::Erofs),
            _ => None,
        }
    }
}

/// The bucket holding layers stored as `storage`.
pub(crate) fn layers_bucket(storage: LayerStorage) -> &'static str {
    match storage {
        LayerStorage::Dir => LAYERS,
        LayerStorage::Erofs => LAYERS_EROFS,
    }
}

/// Inside a published layer directory `layers-v1/<key>/`:
/// the extracted tree itself (what overlayfs mounts as a lower dir) — for an EROFS layer
/// the empty directory its image is mounted on,
pub(crate) const LAYER_ROOT: &str = "root";
/// the image of an EROFS layer (`layers-erofs-v1/<key>/`), read-only,
pub(crate) const LAYER_IMAGE: &str = "image.erofs";
/// the small metadata file whose presence marks the layer complete,
pub(crate) const LAYER_META: &str = "layer.json";
/// and the per-entry manifest `verify --deep` re-checks.
pub(crate) const LAYER_MANIFEST: &str = "manifest-v1.tsv";

/// Name of the store-wide lock inside [`LOCKS`] (key locks never start with a dot).
pub(crate) const STORE_LOCK: &str = ".store.lock";

/// Resolved paths of one store.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn blobs(&self) -> PathBuf {
        self.root.join(BLOBS)
    }
    pub fn index_md5(&self) -> PathBuf {
        self.root.join(INDEX_MD5)
    }
    pub fn index_url(&self) -> PathBuf {
        self.root.join(INDEX_URL)
    }
    pub fn layers_of(&self, storage: LayerStorage) -> PathBuf {
        self.root.join(layers_bucket(storage))
    }
    pub fn ingest(&self) -> PathBuf {
        self.root.join(INGEST)
    }
    pub fn locks(&self) -> PathBuf {
        self.root.join(LOCKS)
    }
    pub fn quarantine(&self) -> PathBuf {
        self.root.join(QUARANTINE)
    }
    pub fn version_file(&self) -> PathBuf {
        self.root.join(VERSION_FILE)
    }
}

/// Reads the layout marker: `None` when absent (a new store, or one made before markers).
pub(crate) fn read_version(root: &Path) -> Result<Option<u32>, StoreError> {
    let path = root.join(VERSION_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::io("cannot read", &path, source)),
    };
    match text.trim().parse::<u32>() {
        Ok(v) => Ok(Some(v)),
        Err(_) => Err(StoreError::BadLayoutMarker {
            path,
            content: text.chars().take(40).collect(),
        }),
    }
}

/// Refuses a store written by a newer layout, before anything is created in it.
pub(crate) fn check_version(root: &Path) -> Result<Option<u32>, StoreError> {
    let found = read_version(root)?;
    if let Some(found) = found {
        if found > LAYOUT_VERSION {
            return Err(StoreError::FutureLayout {
                path: root.join(VERSION_FILE),
                found,
                supported: LAYOUT_VERSION,
            });
        }
    }
    Ok(found)
}

/// Creates the directories, CACHEDIR.TAG and the marker (idempotent, race-safe: every
/// file is written as temp + rename, so two processes opening a new store at once agree).
pub(crate) fn create(layout: &Layout, found: Option<u32>) -> Result<(), StoreError> {
    for dir in ALL_DIRS {
        let path = layout.root.join(dir);
        fs_err::create_dir_all(&path)?;
    }
    let tag = layout.root.join(CACHEDIR_TAG);
    if !tag.exists() {
        fsutil::write_store_file(&tag, CACHEDIR_TAG_BODY.as_bytes())?;
    }
    if found != Some(LAYOUT_VERSION) {
        fsutil::write_store_file(
            &layout.version_file(),
            format!("{LAYOUT_VERSION}\n").as_bytes(),
        )?;
    }
    Ok(())
}
