//! Setup's fetch: one artifact (a build or an OS image) from its URL to a published,
//! verified layer in the store — in one pass.
//!
//! ```text
//!  tokio task                     │ unpack thread (one per artifact)
//!  HTTP body ─► md5+sha256+count ─┼─► bounded channel ─► tee ─► blob file (ingest)
//!  (fetch::HttpClient)            │                      └──► decoder ─► tar ─► writer(s) ─► staging
//!                                 │                                    (or) └─► ErofsSink ─► one image
//!                                 │  writeback kicks: each finished file (the image every
//!                                 │  8 MiB); the blob is left to the kernel
//! ```
//!
//! Where the layer goes is the artifact's [`LayersRequest`], resolved only when something
//! must be extracted ([`crate::layers::decide`]; a layer hit in auto mode takes either
//! storage): a staging tree published with its manifest, or one EROFS image in the
//! ingest dir, hashed beside its writer's one fsync and published by a rename
//! (`vrun_cache::Store::publish_image_layer`). The rest of the pipeline — reuse, locks,
//! resume, md5, blob — does not know which.
//!
//! Why this shape. The network and the hashers live on the async side, where reqwest is;
//! everything after them is synchronous code on a dedicated thread fed by a bounded
//! channel of `Bytes` (uv measured one blocking task per archive 2–3× faster than a
//! `spawn_blocking` hop per file operation, and our own benches agree — see
//! `benches/`). The channel is the backpressure: when the disk is slow the unpack
//! thread stops taking chunks, the fetcher stops reading the socket, and the TCP window
//! closes instead of memory growing. The blob is written on the unpack thread, just
//! before the chunk is decoded, because that write is a page-cache copy and keeping it
//! there saves a third thread on a 2-core host.
//!
//! Nothing is published until everything checks out: the tar end was reached and the
//! rest of the stream drained (so the hash covers every byte), the decoder saw a clean
//! end, and the md5 — when proc.yaml gives one — matches. Then the layer is published
//! (fsync + rename + fsync parent, in `vrun-cache`) and the blob renamed into the store
//! without an fsync (below). Any failure drops the
//! staging tree; the blob is written to the URL's stable partial
//! (`ingest-v1/partial-<sha256(url)>/`, [`vrun_cache::Partial`]), which a failure that a
//! later attempt could cure (network trouble, a cancelled or interrupted setup) keeps and
//! any other failure (bad content, 4xx) removes. The next setup of the URL re-hashes it,
//! replays it through the decoder and continues the download with `Range` + `If-Range`.
//!
//! Durability costs disk time, and on a cold setup the disk was the longest stage: the
//! first version wrote everything to the page cache and flushed it all at publish
//! (`publish_s` 1.0–1.4 s of a 2.2–3.1 s setup of the 262 MB gz bench build on loop
//! ext4). Writeback now starts during the download ([`crate::writeback`]: each finished
//! file, the EROFS image every 8 MiB), so the disk writes while the CPU decodes and
//! publish's fsyncs (of vrun's own files only) find little left. (A background `syncfs` did the same job until issue 14: it also
//! flushed every other process's dirty data on the filesystem and made publish wait for
//! it. Per-file `sync_file_range` kicks *on the writer threads* were slower: they moved
//! block allocation there; the kicks now run on a thread of their own.)
//!
//! The blob is not part of the layer: it is a cache of the download, there so that a
//! proc of the same build for another user, or a layer verify found damaged, is rebuilt
//! without a download. So setup does not wait for it. It is renamed into the store
//! without an fsync and the kernel writes it back after setup returns; before any reuse
//! it is re-hashed (`from_blob`), so a blob torn by a power loss is set aside and
//! downloaded again, never extracted. On a slow disk the blob is a third more bytes to
//! write for a gzip build, and the disk is the bottleneck: until issue 15 its writeback
//! was kicked every 8 MiB during the download and waited for at publish, which put the
//! bandwidth floor of an EROFS setup above 0.4× the shell pipeline (88 MB blob + 232 MB
//! image at 40 MiB/s = 7.6 s; measured 8.64 s against 19.13 s). Not waiting for it
//! took one more thing: the partial was opened and truncated to its resume point, and on
//! ext4 a truncate to zero arms `auto_da_alloc`, whose close then starts writeback of the
//! whole blob — which the layer's fsync (the next journal commit) waited for (strace:
//! `publish_s` 2.1 s of an 8.6 s setup). A download from byte 0 now starts a new file
//! (`unpack.rs`), and the slow-disk setup took 6.4 s with `publish_s` 3 ms. `--no-blob`
//! ([`Artifact::keep_blob`]) still keeps only the layer, for disk space.
//!
//! Reuse, cheapest first, under "lock, then re-check" on the URL's key so that two setups
//! of the same build download it once:
//! 1. a published layer for (blob sha256, kind, uid, gid) → `"cache": "layer"`, no I/O;
//! 2. a published blob (found by md5, else by URL) → extract from it (`"blob"`), after
//!    re-hashing it (a bad blob is set aside and downloaded again, once);
//! 3. otherwise download (`"miss"`).
//!
//! Without an md5 the URL index decides reuse: Velociraptor build and image URLs name one
//! immutable artifact, so a recorded URL is reused without asking the server again (the
//! recorded ETag/Last-Modified serve `If-Range` on resume and `vrun cache ls`).

//!
//! # Where each part lives
//!
//! ```text
//! mod.rs       prepare(): reuse cheapest first (layer, blob, download), check_whole, publish
//! url_lock.rs  one downloader per URL across processes (the key lock and who holds it)
//! download.rs  a download: resume point, fetch into the unpack sink, md5, publish, retry
//! unpack.rs    the unpack thread: channel → tee (blob) → decode → extract, writeback kicks
//! timings.rs   ArtifactTimings (`--timings`), built in one place for all three paths
//! ```
//!
//! The seam is between the async side (`download.rs`, the fetcher and hashers) and the
//! synchronous unpack thread (`unpack.rs`), which knows nothing of HTTP: it reads bytes
//! and turns them into a staging tree. `mod.rs` decides what may be reused and what
//! must hold before anything is published.

mod download;
mod timings;
mod unpack;
mod url_lock;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use vrun_cache::{LayerKey, LayerKind, LayerStorage, ManifestMode, Store, StoreError, TreeStats};

use crate::decode::{self, DecodeError};
use crate::extract::{ExtractError, ExtractStats, Limits, Mode};
use crate::fetch::{self, FetchError, HttpClient, Md5Mismatch, Progress};
use crate::layers::LayersRequest;
use download::{download, Retry};
use timings::TimingsBuilder;
use unpack::{unpack, Target, Unpacked, READ_BUF};
use url_lock::lock_url;

pub use timings::ArtifactTimings;
pub use url_lock::describe_holders;

/// What a layer's manifest records at publish time. Shallow (type, mode, owner, size,
/// link target of every entry; no content hashes): measured on the 12k-file / 250 MB
/// bench build, the full manifest re-read and hashed the whole tree and cost 1.46 s of a
/// 5.1 s cold setup, the shallow one a single `lstat` walk. The blob's sha256 already
/// proves the content that was extracted; `vrun cache verify --deep` still finds missing,
/// extra, resized, re-owned or re-moded files, and a damaged layer is rebuilt from its
/// verified blob.
const LAYER_MANIFEST: ManifestMode = ManifestMode::Shallow;

/// What setup wants in the store.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `"build"` or `"image"`, for messages and `--timings`.
    pub kind: LayerKind,
    pub url: String,
    /// proc.yaml's `build_md5` / `image_md5`, lowercased.
    pub md5: Option<String>,
    /// Build: the proc's user:group; image: 0:0 (owners come from the archive).
    pub uid: u32,
    pub gid: u32,
    /// Keep the downloaded archive in the store beside the extracted layer (the default).
    /// Without it setup writes a third fewer bytes (a gzip build) — what a slow disk
    /// wants — but another user's proc of the same build, or `vrun cache verify` healing
    /// a damaged layer, must download it again (`vrun setup --no-blob`).
    pub keep_blob: bool,
    /// How the layer may be stored: a directory tree, an EROFS image, or auto (reuse
    /// either; a new one is EROFS where this host can mount it). See `crate::layers`.
    pub layers: LayersRequest,
}

impl Artifact {
    fn mode(&self) -> Mode {
        match self.kind {
            LayerKind::Build => Mode::Build {
                uid: self.uid,
                gid: self.gid,
            },
            LayerKind::Image => Mode::Image,
        }
    }
    fn key(&self, sha256: &str, storage: LayerStorage) -> LayerKey {
        LayerKey::new(sha256, self.kind, self.uid, self.gid).stored_as(storage)
    }
    fn name(&self) -> &'static str {
        self.kind.as_str()
    }
    /// The URL as every message and record shows it (credentials redacted).
    pub fn shown_url(&self) -> String {
        fetch::redact_url(&self.url)
    }

    /// Refuse what proc.yaml gives that cannot be right, before any I/O: the URL (see
    /// [`Artifact::check_url`]) and the md5, which must be 32 hex digits (the original
    /// compared it only after the download).
    pub fn check(&self) -> Result<(), ArtifactError> {
        self.check_url().map_err(ArtifactError::Url)?;
        if let Some(md5) = &self.md5 {
            let ok = md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(ArtifactError::Md5 {
                    key: match self.kind {
                        LayerKind::Build => "build_md5",
                        LayerKind::Image => "image_md5",
                    },
                    value: md5.clone(),
                });
            }
        }
        Ok(())
    }

    /// Refuse a URL the HTTP client would refuse, with the same error, so that setup can
    /// check every URL before it creates anything under `$VR_ROOT` (bad input leaves the
    /// host as it was). The client checks again when it sends the request.
    pub fn check_url(&self) -> Result<(), FetchError> {
        fetch::check_url(&self.url)
    }
}

/// What [`Artifact::check`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Url(FetchError),
    #[error("{key}: {value:?} is not an md5 (32 hex digits)")]
    Md5 { key: &'static str, value: String },
}

/// Where a layer came from (`--timings` "cache").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheUse {
    /// Downloaded and extracted now.
    Miss,
    /// Extracted now from a blob already in the store.
    Blob,
    /// Layer already published: nothing downloaded or extracted.
    Layer,
}

/// A layer ready to mount.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The layer's root directory (for a build it holds `app/`); an EROFS layer's image
    /// is mounted there by [`crate::layers::ensure_ready`].
    pub layer: PathBuf,
    /// The layer's key in the store (what the proc's state records).
    pub key: LayerKey,
    pub timings: ArtifactTimings,
    /// Auto mode made a directory layer because EROFS cannot be used here: why (for
    /// the caller to say once).
    pub fallback: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Md5(#[from] Md5Mismatch),
    #[error("{url}")]
    Decode { url: String, source: DecodeError },
    #[error("{url}")]
    Extract { url: String, source: ExtractError },
    #[error("{url}")]
    Store {
        url: String,
        source: vrun_cache::StoreError,
    },
    #[error("{url}: cannot write {path}")]
    Io {
        url: String,
        path: PathBuf,
        source: io::Error,
    },
    /// The layer storage asked for cannot be used on this host.
    #[error(transparent)]
    Layers(#[from] crate::layers::LayersError),
    #[error("{url}: the unpack thread panicked")]
    Panicked { url: String },
    /// An archive with no entries (only end-of-archive blocks): never a real build or
    /// image, and a proc without files would fail later in a more confusing way.
    #[error("{url}: the {what} archive has no entries (only end-of-archive blocks)")]
    Empty { url: String, what: &'static str },
    /// A plain tar that stops at a header boundary without its end-of-archive blocks, with
    /// nothing else to prove it whole. GNU tar extracts it silently; a compressed stream's
    /// own end check or an md5 would prove it complete, and then vrun accepts it too.
    #[error(
        "{url}: the {what} archive (plain tar) ends after entry {after} without its \
         end-of-archive blocks, and with no {what}_md5 nothing proves it complete \
         (give {what}_md5, or serve it compressed)"
    )]
    Unterminated {
        url: String,
        what: &'static str,
        after: String,
    },
}

/// What every extracted archive must satisfy before it is published, however it came
/// (downloaded now or read from a cached blob).
fn check_whole(
    art: &Artifact,
    format: decode::Format,
    stats: &ExtractStats,
) -> Result<(), PipelineError> {
    if stats.entries == 0 {
        return Err(PipelineError::Empty {
            url: art.url.clone(),
            what: art.name(),
        });
    }
    // Without its end blocks a plain tar cut at a header boundary looks complete. A
    // compressed stream has its own trailer, checked by the decoder; an md5 checks all.
    if let Some(after) = &stats.ended_without_marker {
        if format == decode::Format::Tar && art.md5.is_none() {
            return Err(PipelineError::Unterminated {
                url: art.url.clone(),
                what: art.name(),
                after: after.clone(),
            });
        }
    }
    Ok(())
}

/// Get `art` into the store as a layer, reusing whatever is already there.
pub async fn prepare(
    store: Arc<Store>,
    http: HttpClient,
    art: Artifact,
    limits: Limits,
    progress: Option<Arc<Progress>>,
) -> Result<Prepared, PipelineError> {
    let started = Instant::now();
    let url = art.shown_url();
    let store_err = |source| PipelineError::Store {
        url: url.clone(),
        source,
    };

    if let Some(hit) = layer_hit(&store, &art, started) {
        return Ok(hit);
    }
    // One downloader per URL across processes; the others wait here and then reuse.
    let _lock = lock_url(&store, &http, &art).await.map_err(store_err)?;
    if let Some(hit) = layer_hit(&store, &art, started) {
        return Ok(hit);
    }
    // Something is extracted now: decide how it is stored.
    let (storage, fallback) =
        tokio::task::block_in_place(|| crate::layers::decide(art.layers, store.dir()))?;
    let with_fallback = |mut p: Prepared| {
        p.fallback = fallback.clone();
        p
    };
    if let Some(sha256) = known_sha256(&store, &art) {
        if let Some(blob) = store.blob(&sha256) {
            let (store2, art2, lim2, http2) =
                (store.clone(), art.clone(), limits.clone(), http.clone());
            let reused = tokio::task::spawn_blocking(move || {
                let key = art2.key(&sha256, storage);
                from_blob(&store2, &http2, &art2, &key, &blob, &lim2, started)
            })
            .await
            .map_err(|_| PipelineError::Panicked { url: url.clone() })??;
            if let Some(prepared) = reused {
                return Ok(with_fallback(prepared));
            }
        }
    }
    let fetched = match download(
        &store,
        &http,
        &art,
        storage,
        &limits,
        progress.clone(),
        started,
        true,
    )
    .await
    {
        // A resume without a validator (allowed because an md5 checks the whole) may
        // have spliced two versions: once more, from byte 0.
        Err(Retry::Clean(e)) => {
            http.notice(&format!("{}; the download was resumed without a validator, so it is fetched again from byte 0", crate::errors::chain(&e)));
            download(
                &store, &http, &art, storage, &limits, progress, started, false,
            )
            .await
            .map_err(Retry::into_error)
        }
        other => other.map_err(Retry::into_error),
    };
    fetched.map(with_fallback)
}

/// The sha256 the store already associates with this artifact: by md5 when proc.yaml
/// gives one (what proc.yaml asserts wins), else by URL.
fn known_sha256(store: &Store, art: &Artifact) -> Option<String> {
    match &art.md5 {
        Some(md5) => store.lookup_md5(md5),
        None => store.lookup_url(&art.url).map(|r| r.sha256),
    }
}

fn layer_hit(store: &Store, art: &Artifact, started: Instant) -> Option<Prepared> {
    let sha256 = known_sha256(store, art)?;
    let (key, layer) = crate::layers::reusable(art.layers).iter().find_map(|s| {
        let key = art.key(&sha256, *s);
        store.layer(&key).map(|layer| (key, layer))
    })?;
    let _ = store.touch_layer(&key);
    let meta = store.layer_meta(&key);
    let compressed_bytes = store
        .lookup_url(&art.url)
        .filter(|r| r.sha256 == sha256)
        .map(|r| r.size)
        .or_else(|| {
            store
                .blob(&sha256)
                .and_then(|b| b.metadata().ok())
                .map(|m| m.len())
        })
        .unwrap_or(0);
    Some(Prepared {
        layer,
        timings: TimingsBuilder::new(&art.url, CacheUse::Layer, compressed_bytes, started)
            .stored(key.storage)
            .content(
                meta.as_ref().map_or(0, |m| m.stats.bytes),
                meta.as_ref().map_or(0, |m| m.stats.files),
            )
            .build(),
        key,
        fallback: None,
    })
}

/// Extract from a cached blob into the layer `key` (the blob's sha256, stored as the
/// setup decided). `Ok(None)` means the blob failed its md5 and was discarded: the caller
/// downloads it again (once).
fn from_blob(
    store: &Store,
    http: &HttpClient,
    art: &Artifact,
    key: &LayerKey,
    blob: &Path,
    limits: &Limits,
    started: Instant,
) -> Result<Option<Prepared>, PipelineError> {
    let url = &art.shown_url();
    let (sha256, storage) = (&key.blob_sha256, key.storage);
    let io_err = |source| PipelineError::Io {
        url: url.clone(),
        path: blob.to_owned(),
        source,
    };
    // Always re-hashed: a blob is published without an fsync (see the module note), so
    // after a power loss it may be torn under its name.
    if !store
        .rehash_blob(sha256, art.md5.as_deref())
        .map_err(|source| PipelineError::Store {
            url: url.clone(),
            source,
        })?
    {
        http.notice(&format!(
            "warning: the cached {} of {url} failed its checksum and was quarantined; downloading it again",
            art.name()
        ));
        return Ok(None);
    }
    let store_err = |source| PipelineError::Store {
        url: url.clone(),
        source,
    };
    let ingest = store.new_ingest().map_err(store_err)?;
    let target = Target::new(storage, &ingest);
    let file = std::fs::File::open(blob).map_err(io_err)?;
    let compressed_bytes = file.metadata().map_err(io_err)?.len();
    let reader = io::BufReader::with_capacity(READ_BUF, file);
    let unpacked = unpack(reader, &target, art.mode(), limits).map_err(|e| e.with_url(url))?;
    check_whole(art, unpacked.format, &unpacked.stats)?;
    let publish_started = Instant::now();
    let layer = publish(store, key, &target, &unpacked).map_err(store_err)?;
    Ok(Some(Prepared {
        layer,
        key: key.clone(),
        timings: TimingsBuilder::new(url, CacheUse::Blob, compressed_bytes, started)
            .stored(storage)
            .extracted(
                unpacked.format,
                &unpacked.stats,
                unpacked.extracted,
                unpacked.flushed,
            )
            .published(publish_started)
            .build(),
        fallback: None,
    }))
}

/// Publishes what an extraction made in `target` as the layer `key`: a staging tree
/// (durable file by file, then renamed), or an EROFS image (fsynced by its writer, hashed
/// beside that fsync, then renamed).
fn publish(
    store: &Store,
    key: &LayerKey,
    target: &Target,
    unpacked: &Unpacked,
) -> Result<PathBuf, StoreError> {
    match (target, &unpacked.image) {
        (Target::Dir { staging }, _) => store.publish_layer_with(key, staging, LAYER_MANIFEST),
        (Target::Image { path }, Some((image, sha256))) => {
            let s = &unpacked.stats;
            let stats = TreeStats {
                files: s.files + s.hardlinks,
                dirs: image.dirs,
                symlinks: s.symlinks,
                other: 0,
                bytes: s.bytes,
                disk_bytes: image.bytes,
            };
            store.publish_image_layer(key, path, sha256, stats)
        }
        (Target::Image { .. }, None) => unreachable!("an image target's unpack hashes it"),
    }
}
