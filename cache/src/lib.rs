//! vrun's content-addressed store: downloaded tarballs (blobs) named by sha256, indexes
//! from md5 and URL to sha256, and extracted trees (layers) that procs mount read-only.
//!
//! # Why it is shaped so
//!
//! The original runner cached tarballs by the URL's basename (two builds called
//! `app.tar.gz` collided), never checked a fresh download, and let two setups sharing an
//! image race each other. Here:
//!
//! - **Content addressing.** A blob's name is the sha256 of its bytes, computed by the
//!   fetch pipeline in the same pass as the md5 proc.yaml asserts (md5 collisions are
//!   practical; md5 only verifies). A layer's name is (blob sha256, kind, uid, gid), so
//!   a build extracted for another owner is another layer, and a layer never changes
//!   after it is published.
//! - **Publish = fsync + rename + fsync parent.** Everything is assembled in `ingest-v1/`
//!   on the same filesystem and appears under its published name with one rename. Only
//!   published names are ever read, so anything a killed process left in ingest is
//!   invisible until gc removes it. Extracted trees are made durable with an fsync
//!   of each of their files and directories (several in flight at once), which costs what
//!   vrun wrote and not what the rest of the filesystem has dirty (a `syncfs` did). A layer may exist without its blob (setup's
//!   `--no-blob`, for slow disks): the md5/URL index then still leads to the layer, and
//!   gc keeps those index entries while such a layer does.
//! - **Locks, then re-check.** One writer per key across processes (flock on
//!   `locks-v1/<key>.lock`); the waiter re-checks and finds the work done. A store-wide
//!   lock, shared by every user and exclusive for gc/verify, keeps maintenance from
//!   deleting what a setup is about to use.
//! - **Versioned layout** (uv-style `-v1` bucket suffixes, all in [`layout`]): a store
//!   written by a newer layout is refused with a message naming the marker file; old
//!   buckets are ignored, never misread.
//! - **Operable.** [`Store::entries`], [`Store::gc`] and [`Store::verify`] back
//!   `vrun cache ls|gc|verify`; each layer carries a manifest so `verify --deep` can
//!   prove it is still what was extracted.
//!
//! ```text
//! <cache>/CACHEDIR.TAG  VERSION
//!   blobs-v1/sha256/<hex>        index-v1/md5/<md5>   index-v1/url/<sha256(url)>
//!   layers-v1/<kind>-<sha256>-<uid>-<gid>/{root/, layer.json, manifest-v1.tsv}
//!   layers-erofs-v1/<kind>-<sha256>-<uid>-<gid>.erofs/{image.erofs, root/, layer.json}
//!   ingest-v1/<random>/  ingest-v1/partial-<sha256(url)>/{blob, partial.json}
//!   locks-v1/<key>.lock  quarantine-v1/<time>-<random>-<what>
//! ```
//!
//! Typical use by setup:
//!
//! ```no_run
//! # fn main() -> Result<(), vrun_cache::StoreError> {
//! use vrun_cache::{LayerKey, LayerKind, Store};
//! let store = Store::open("/apps/cache".as_ref())?;
//! let url = "http://builds/app.tar.gz";
//! let _guard = store.lock(&vrun_cache::url_lock_key(url))?;
//! // re-check under the lock: lookup_md5 / lookup_url, then blob() and layer()
//! let ingest = store.new_ingest()?;
//! // ... stream the download into ingest.blob_path(), extract into ingest.staging_dir() ...
//! # let digest: vrun_cache::BlobDigest = unimplemented!();
//! store.publish_blob(&ingest, &digest, None)?;
//! let key = LayerKey::new(&digest.sha256, LayerKind::Build, 1000, 1000);
//! let root = store.publish_layer(&key, ingest.staging_dir())?;
//! # let _ = root; Ok(()) }
//! ```

mod error;
mod fsutil;
mod hash;
mod layer;
pub mod layout;
mod lock;
mod maint;
mod manifest;
mod policy;
mod store;

pub use error::StoreError;
pub use fsutil::{remove_stale_temps, write_atomic};
pub use hash::{BodyDigest, BodyHasher};
pub use layer::{
    is_mounted, layer_key_of_root, layer_root, LayerKey, LayerKind, LayerMeta, LayerStorage,
    ManifestMode,
};
pub use lock::{lock_holders, KeyLock};
pub use maint::{
    BadEntry, CacheEntry, EntryKind, GcOptions, GcReport, Leftover, References, VerifyReport,
    LEFTOVER_MAX_AGE,
};
pub use manifest::TreeStats;
pub use policy::{
    auto_gc_checked_recently, AutoGc, CHECK_INTERVAL, DEFAULT_MAX_AGE, DEFAULT_MAX_SIZE,
    MAX_AGE_ENV, MAX_SIZE_ENV,
};
pub use store::{
    blob_lock_key, url_lock_key, BlobDigest, Ingest, Partial, PartialMeta, Store, UrlRecord,
};

/// `url` with its userinfo (`user:password@`) replaced by `***@`, for every message and
/// everything stored: credentials in a build URL must not reach logs or the cache index.
/// Works on any string shaped `scheme://authority…`; anything else is returned as is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// sha256 of some bytes as lowercase hex (the store's naming function).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
