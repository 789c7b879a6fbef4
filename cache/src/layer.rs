//! Layers: extracted trees, keyed by (blob sha256, kind, uid, gid), immutable once
//! published.
//!
//! A published layer is a directory `layers-v1/<key>/` holding `root/` (the tree that
//! overlayfs mounts), `layer.json` (key, publish time, counts) and `manifest-v1.tsv`.
//! All three are assembled in an ingest dir and appear together with one rename, so
//! there is no state where the tree is visible but incomplete: a layer exists
//! completely or not at all. `layer.json` is still checked on every lookup (a layer
//! damaged by hand, or by a full disk on a filesystem without ordered renames, is a miss).
//!
//! Durability: every file of the tree written back before the rename
//! ([`fsutil::sync_tree`]: on ext4/xfs `sync_file_range` of each file's pages, whose
//! metadata the journal commit of the next fsync carries; elsewhere an fsync of each file
//! and directory), then an fsync of the manifest, `layer.json` and their directory, then
//! of `layers-v1/` after the rename. It runs beside the manifest walk (I/O
//! wait next to CPU on cached inodes; the walk took 0.14–0.18 s of the 262 MB /
//! 12k-file bench build's publish). This used to be one `syncfs`, which waits for every
//! dirty page of the filesystem: with another process writing to the same filesystem,
//! publishing a 200 KB build took 3.6 s instead of 0.03 s (issue 14). An fsync per
//! file was measured too and rejected: 14 s for a 12k-file tree that one `syncfs` made
//! durable in 0.34 s (each fsync is a journal commit and a device flush). vrun's
//! writeback kicks during extraction mean its data is mostly on disk by publish
//! (`cargo bench -p vrun-cache --bench publish` gives all of it, quiet and busy).
//!
//! Metadata lives beside the tree, not inside it, so nothing of the store shows up in
//! the container's filesystem.
//!
//! # EROFS layers
//!
//! A layer may instead be one EROFS image ([`LayerStorage::Erofs`], issue 15):
//! `layers-erofs-v1/<name>.erofs/` holds `image.erofs` (0444), `layer.json` (which records
//! the image's sha256 instead of a manifest) and an empty `root/`, the store-owned mount
//! point vrun mounts the image on, read-only, once per host. The storage is part of the
//! key, so the same build may exist both ways, and its own bucket keeps a vrun that
//! predates EROFS layers from misreading them. Publishing is the same assembly in ingest
//! and one rename, but the data is one file the writer already fsynced (an `fdatasync`
//! here finds nothing to do); removing the layer is one unlink of that file, whatever
//! the tree held. The store never mounts (that needs vrun's mount code: file-backed or a
//! loop device), but it does unmount its own mount points: gc and verify take the image
//! off `root/` (lazily, so a running proc's overlay keeps working) before they remove or
//! quarantine the layer, and never delete through a mount.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::fsutil::{self, check_hex};
pub use crate::layout::LayerStorage;
use crate::layout::{layers_bucket, LAYER_IMAGE, LAYER_MANIFEST, LAYER_META, LAYER_ROOT};
use crate::manifest::{Manifest, TreeStats};
use crate::store::Store;

/// Format of `layer.json`; a different number is not a layer this code can vouch for.
pub(crate) const LAYER_META_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// An app build, owned by the proc's user (its bytes live under `app/`).
    Build,
    /// An OS image, numeric ownership kept as in the archive.
    Image,
}

impl LayerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Build => "build",
            LayerKind::Image => "image",
        }
    }
}

/// What a layer is made of. The same blob extracted for another owner is another layer,
/// and so is the same tree stored another way ([`LayerStorage`]).
/// For images the owner is not applied; pass 0, 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerKey {
    pub blob_sha256: String,
    pub kind: LayerKind,
    pub uid: u32,
    pub gid: u32,
    /// Absent in keys written before EROFS layers existed: those are directories.
    #[serde(default)]
    pub storage: LayerStorage,
}

/// Suffix of an EROFS layer's name (so every layer name is unique across buckets).
const EROFS_SUFFIX: &str = ".erofs";

impl LayerKey {
    /// A directory layer's key ([`LayerKey::stored_as`] for another storage).
    pub fn new(blob_sha256: impl Into<String>, kind: LayerKind, uid: u32, gid: u32) -> LayerKey {
        LayerKey {
            blob_sha256: blob_sha256.into(),
            kind,
            uid,
            gid,
            storage: LayerStorage::Dir,
        }
    }

    /// Refuses a key of another storage than `expected` (publishing a tree under an
    /// EROFS key, or an image under a directory key).
    fn check_storage(&self, expected: LayerStorage) -> Result<(), StoreError> {
        match self.storage == expected {
            true => Ok(()),
            false => Err(StoreError::WrongStorage {
                key: self.dir_name(),
                expected: expected.as_str(),
            }),
        }
    }

    /// The same layer stored as `storage`.
    pub fn stored_as(mut self, storage: LayerStorage) -> LayerKey {
        self.storage = storage;
        self
    }

    /// The layer's name: `<kind>-<sha256>-<uid>-<gid>` for a directory (under
    /// `layers-v1/`), the same with `.erofs` for an image (under `layers-erofs-v1/`).
    pub fn dir_name(&self) -> String {
        format!(
            "{}-{}-{}-{}{}",
            self.kind.as_str(),
            self.blob_sha256,
            self.uid,
            self.gid,
            match self.storage {
                LayerStorage::Dir => "",
                LayerStorage::Erofs => EROFS_SUFFIX,
            }
        )
    }

    /// The key to [`Store::lock`] while extracting this layer.
    pub fn lock_key(&self) -> String {
        format!("layer-{}", self.dir_name())
    }

    /// Inverse of [`LayerKey::dir_name`]; `None` for any other name.
    pub fn parse(name: &str) -> Option<LayerKey> {
        let (base, storage) = match name.strip_suffix(EROFS_SUFFIX) {
            Some(base) => (base, LayerStorage::Erofs),
            None => (name, LayerStorage::Dir),
        };
        let mut parts = base.split('-');
        let kind = match parts.next()? {
            "build" => LayerKind::Build,
            "image" => LayerKind::Image,
            _ => return None,
        };
        let sha = parts.next()?;
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !fsutil::is_hex(sha, 64) {
            return None;
        }
        let key = LayerKey::new(sha, kind, uid, gid).stored_as(storage);
        (key.dir_name() == name).then_some(key)
    }

    /// The key of the layer whose root (what a proc mounts) is `root`:
    /// `…/layers-v1/<name>/root` or `…/layers-erofs-v1/<name>/root`.
    pub fn from_root(root: &Path) -> Option<LayerKey> {
        if root.file_name()? != LAYER_ROOT {
            return None;
        }
        let dir = root.parent()?;
        let key = LayerKey::parse(dir.file_name()?.to_str()?)?;
        let bucket = dir.parent()?.file_name()?;
        (bucket == crate::layout::layers_bucket(key.storage)).then_some(key)
    }

    fn validate(&self) -> Result<(), StoreError> {
        check_hex("layer blob sha256", &self.blob_sha256, 64)
    }
}

/// Contents of `layer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    pub format: u32,
    pub key: LayerKey,
    /// Unix seconds of the publishing rename.
    pub published_at: u64,
    #[serde(flatten)]
    pub stats: TreeStats,
    /// sha256 of `manifest-v1.tsv`, so a damaged manifest is detected rather than trusted.
    /// Empty for an EROFS layer, which has no manifest: its image's sha256 proves it.
    #[serde(default)]
    pub manifest_sha256: String,
    /// Time spent walking and hashing the staging tree for the manifest (cost accounting).
    pub manifest_seconds: f64,
    /// Whether the manifest holds content hashes ([`ManifestMode::Full`]).
    #[serde(default = "yes")]
    pub content_hashed: bool,
    /// EROFS layers: sha256 of `image.erofs` as published (`verify --deep` re-hashes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
}

fn yes() -> bool {
    true
}

/// How much of a layer [`Store::publish_layer_with`] records for `verify --deep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestMode {
    /// Type, mode, owner, size and link target of every entry, and the sha256 of every
    /// regular file: deep verify proves every byte. Costs a second read of the tree
    /// (from the page cache) and its hashing, on several threads.
    #[default]
    Full,
    /// Everything but the content hashes: one `lstat` per entry. Deep verify still
    /// finds missing, extra, resized, re-owned or re-moded entries, not edited bytes.
    Shallow,
}

/// Removes a directory on Drop unless disarmed: the publish path's cleanup.
struct TempTree(Option<PathBuf>);

impl Drop for TempTree {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fsutil::remove_tree(&p);
        }
    }
}

impl Store {
    pub(crate) fn layer_dir(&self, key: &LayerKey) -> PathBuf {
        self.layout.layers_of(key.storage).join(key.dir_name())
    }

    /// Every entry of both layer buckets, as (name, path), sorted by name within each.
    pub(crate) fn layer_dirs(&self) -> Result<Vec<(String, PathBuf)>, StoreError> {
        let mut out = fsutil::sorted_names(&self.layout.layers_of(LayerStorage::Dir))?;
        out.extend(fsutil::sorted_names(
            &self.layout.layers_of(LayerStorage::Erofs),
        )?);
        Ok(out)
    }

    /// The key of a listed layer dir, if its name is a key that belongs in its bucket.
    pub(crate) fn key_of(&self, name: &str, dir: &Path) -> Option<LayerKey> {
        LayerKey::parse(name).filter(|k| self.layer_dir(k) == dir)
    }

    /// The root of the published layer, only if completely published. Records a use.
    /// For an EROFS layer the root is the (possibly not yet mounted) mount point of
    /// [`Store::layer_image`].
    pub fn layer(&self, key: &LayerKey) -> Option<PathBuf> {
        key.validate().ok()?;
        let dir = self.layer_dir(key);
        let meta = read_meta(&dir)?;
        if meta.key != *key {
            return None;
        }
        let root = dir.join(LAYER_ROOT);
        if !std::fs::symlink_metadata(&root)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            return None;
        }
        if key.storage == LayerStorage::Erofs
            && !std::fs::symlink_metadata(dir.join(LAYER_IMAGE)).is_ok_and(|m| m.is_file())
        {
            return None;
        }
        let _ = fsutil::touch(&dir);
        Some(root)
    }

    /// The image file of an EROFS layer (whether or not published).
    pub fn layer_image(&self, key: &LayerKey) -> PathBuf {
        self.layer_dir(key).join(LAYER_IMAGE)
    }

    /// Records a use of a layer now (also done by [`Store::layer`]).
    pub fn touch_layer(&self, key: &LayerKey) -> Result<(), StoreError> {
        key.validate()?;
        fsutil::touch(&self.layer_dir(key))
    }

    /// The metadata of a published layer.
    pub fn layer_meta(&self, key: &LayerKey) -> Option<LayerMeta> {
        key.validate().ok()?;
        read_meta(&self.layer_dir(key)).filter(|m| m.key == *key)
    }

    /// Publishes `staging` (an extracted tree on the store's filesystem, normally
    /// [`crate::Ingest::staging_dir`]) as the layer `key` and returns the layer's root.
    /// The staging dir is consumed (moved or removed).
    ///
    /// If the layer already exists (another process won the race; callers normally
    /// prevent this with [`Store::lock`]), the staging tree is discarded and the existing
    /// layer returned. A damaged layer under the same name is quarantined and replaced.
    pub fn publish_layer(&self, key: &LayerKey, staging: &Path) -> Result<PathBuf, StoreError> {
        self.publish_layer_with(key, staging, ManifestMode::Full)
    }

    /// [`Store::publish_layer`] choosing how much the manifest records.
    pub fn publish_layer_with(
        &self,
        key: &LayerKey,
        staging: &Path,
        mode: ManifestMode,
    ) -> Result<PathBuf, StoreError> {
        key.validate()?;
        key.check_storage(LayerStorage::Dir)?;
        if !fs_err::symlink_metadata(staging)?.is_dir() {
            return Err(StoreError::NotADirectory {
                path: staging.to_owned(),
            });
        }
        if let Some(root) = self.layer(key) {
            let _ = fsutil::remove_tree(staging);
            return Ok(root);
        }

        // The tree's data goes to disk while the manifest walk (CPU on inodes still in
        // cache) runs beside it; then only the two small files are left.
        let content_hashed = mode == ManifestMode::Full;
        let (flushed, scanned) = std::thread::scope(|s| {
            let flush = s.spawn(|| fsutil::sync_tree(staging));
            let started = Instant::now();
            let scanned = Manifest::scan(staging, content_hashed)
                .map(|m| (m, started.elapsed().as_secs_f64()));
            (flush.join().expect("fsync does not panic"), scanned)
        });
        flushed?;
        let (manifest, manifest_seconds) = scanned?;
        let manifest_text = manifest.to_text();

        let wrapper = self
            .layout
            .ingest()
            .join(format!("{}.layer", fsutil::random_name()));
        fs_err::create_dir(&wrapper)?;
        let mut cleanup = TempTree(Some(wrapper.clone()));
        fs_err::rename(staging, wrapper.join(LAYER_ROOT))?;
        fs_err::write(wrapper.join(LAYER_MANIFEST), &manifest_text)?;
        let meta = LayerMeta {
            format: LAYER_META_FORMAT,
            key: key.clone(),
            published_at: crate::unix_now(),
            stats: manifest.stats,
            manifest_sha256: crate::sha256_hex(manifest_text.as_bytes()),
            manifest_seconds,
            content_hashed,
            image_sha256: None,
        };
        let meta_json = serde_json::to_vec_pretty(&meta).expect("layer meta serializes");
        fs_err::write(wrapper.join(LAYER_META), meta_json)?;
        // These fsyncs come after the tree was written back: on a journaling filesystem
        // the first one commits the journal with every inode and name of the tree.
        for small in [LAYER_MANIFEST, LAYER_META] {
            fs_err::File::open(wrapper.join(small))?.sync_all()?;
        }
        fsutil::fsync_dir(&wrapper)?;

        self.rename_layer_into_place(key, &wrapper, &mut cleanup)
    }
}

impl Store {
    /// Publishes `image` (an EROFS image file on the store's filesystem, normally
    /// [`crate::Ingest::image_path`], whose sha256 the caller computed) as the EROFS layer
    /// `key` and returns the layer's root: the empty directory vrun mounts it on. The
    /// image is moved. As with [`Store::publish_layer`], an existing layer wins and a
    /// damaged one is quarantined.
    ///
    /// Durability: an `fdatasync` of the image (free when the writer already synced it,
    /// as vrun's does), then `layer.json` and the layer dir, the rename, and the bucket.
    pub fn publish_image_layer(
        &self,
        key: &LayerKey,
        image: &Path,
        image_sha256: &str,
        stats: TreeStats,
    ) -> Result<PathBuf, StoreError> {
        key.validate()?;
        check_hex("image sha256", image_sha256, 64)?;
        key.check_storage(LayerStorage::Erofs)?;
        if !fs_err::symlink_metadata(image)?.is_file() {
            return Err(StoreError::NotAFile {
                path: image.to_owned(),
            });
        }
        if let Some(root) = self.layer(key) {
            let _ = std::fs::remove_file(image);
            return Ok(root);
        }
        fs_err::File::open(image)?.sync_data()?;
        let wrapper = self
            .layout
            .ingest()
            .join(format!("{}.layer", fsutil::random_name()));
        fs_err::create_dir(&wrapper)?;
        let mut cleanup = TempTree(Some(wrapper.clone()));
        let root = wrapper.join(LAYER_ROOT);
        fs_err::create_dir(&root)?;
        fs_err::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        let placed = wrapper.join(LAYER_IMAGE);
        fs_err::rename(image, &placed)?;
        fs_err::set_permissions(&placed, std::fs::Permissions::from_mode(IMAGE_MODE))?;
        let meta = LayerMeta {
            format: LAYER_META_FORMAT,
            key: key.clone(),
            published_at: crate::unix_now(),
            stats,
            manifest_sha256: String::new(),
            manifest_seconds: 0.0,
            content_hashed: true,
            image_sha256: Some(image_sha256.to_owned()),
        };
        let meta_json = serde_json::to_vec_pretty(&meta).expect("layer meta serializes");
        fs_err::write(wrapper.join(LAYER_META), meta_json)?;
        fs_err::File::open(wrapper.join(LAYER_META))?.sync_all()?;
        fsutil::fsync_dir(&wrapper)?;
        self.rename_layer_into_place(key, &wrapper, &mut cleanup)
    }

    /// The last step of both publishes: rename the assembled `wrapper` to the layer's
    /// name (quarantining a damaged layer of that name once), then fsync the bucket.
    fn rename_layer_into_place(
        &self,
        key: &LayerKey,
        wrapper: &Path,
        cleanup: &mut TempTree,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.layer_dir(key);
        for attempt in 0..2 {
            match std::fs::rename(wrapper, &dest) {
                Ok(()) => {
                    cleanup.0 = None;
                    fsutil::fsync_dir(&self.layout.layers_of(key.storage))?;
                    return Ok(dest.join(LAYER_ROOT));
                }
                Err(e) if is_exists(&e) => {
                    if let Some(root) = self.layer(key) {
                        return Ok(root); // the other writer won; ours goes with `cleanup`
                    }
                    if attempt == 0 {
                        self.quarantine_layer(&dest, key)?;
                        continue;
                    }
                    return Err(StoreError::io(
                        &format!("cannot publish layer from {} to", wrapper.display()),
                        &dest,
                        e,
                    ));
                }
                Err(e) => {
                    return Err(StoreError::io(
                        &format!("cannot publish layer from {} to", wrapper.display()),
                        &dest,
                        e,
                    ))
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Moves a layer dir to quarantine, first unmounting an EROFS layer's image from its
    /// root (see [`unmount_root`]).
    pub(crate) fn quarantine_layer(
        &self,
        dir: &Path,
        key: &LayerKey,
    ) -> Result<PathBuf, StoreError> {
        unmount_root(&dir.join(LAYER_ROOT))?;
        self.quarantine(dir, &key.dir_name())
    }

    /// Removes a layer dir (rename, then delete: O(1) for an EROFS layer, whose image is
    /// one file), first unmounting an EROFS layer's image from its root.
    pub(crate) fn remove_layer(&self, dir: &Path) -> Result<(), StoreError> {
        unmount_root(&dir.join(LAYER_ROOT))?;
        self.remove_entry(dir)
    }
}

/// Mode of a published EROFS image: nobody writes to a layer.
const IMAGE_MODE: u32 = 0o444;

/// Mounts stacked on a layer root that [`unmount_root`] takes off before giving up (vrun
/// mounts one; two racing mounters that both lost their lock could leave two).
const MAX_STACKED: usize = 8;

/// Whether something is mounted on `root` (its device differs from its parent's): one
/// `stat` pair, no mount table to read.
pub fn is_mounted(root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (
        std::fs::symlink_metadata(root),
        root.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    here.dev() != parent.dev()
}

/// Takes every mount off a layer's root (lazily, `MNT_DETACH`: a running proc's overlay
/// keeps its own reference to the image and goes on working; the loop device of a loop
/// mount is released with the last user). The store owns this mount point, so removing
/// or quarantining a layer is never blocked by, and never deletes through, its mount.
pub(crate) fn unmount_root(root: &Path) -> Result<(), StoreError> {
    for _ in 0..MAX_STACKED {
        if !is_mounted(root) {
            return Ok(());
        }
        nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| StoreError::io("cannot unmount the layer image from", root, e.into()))?;
    }
    if is_mounted(root) {
        return Err(StoreError::StillMounted {
            path: root.to_owned(),
        });
    }
    Ok(())
}

fn is_exists(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
        || e.kind() == ErrorKind::AlreadyExists
}

/// Reads `layer.json` of a layer dir; `None` if missing, corrupt or of another format.
pub(crate) fn read_meta(layer_dir: &Path) -> Option<LayerMeta> {
    let bytes = std::fs::read(layer_dir.join(LAYER_META)).ok()?;
    let meta: LayerMeta = serde_json::from_slice(&bytes).ok()?;
    (meta.format == LAYER_META_FORMAT).then_some(meta)
}

/// Where the root of layer `key` is in the store at `store_dir`, without opening the
/// store: what a proc's state file (which records keys) resolves to (`vrun::state`).
pub fn layer_root(store_dir: &Path, key: &LayerKey) -> PathBuf {
    store_dir
        .join(layers_bucket(key.storage))
        .join(key.dir_name())
        .join(LAYER_ROOT)
}

/// The key of a layer root in the store at `store_dir`, the inverse of [`layer_root`]:
/// how a state file of version 1, which recorded paths, is read.
pub fn layer_key_of_root(store_dir: &Path, root: &Path) -> Option<LayerKey> {
    let name = root.parent()?.file_name()?.to_str()?;
    let key = LayerKey::parse(name)?;
    (layer_root(store_dir, &key) == root).then_some(key)
}
