//! Setup's fetch: one artifact (a build or an OS image) from its URL to a published,
//! verified layer in the store — in one pass.
//!
//! ```text
//!  tokio task                     │ unpack thread (one per artifact)
//!  HTTP body ─► md5+sha256+count ─┼─► bounded channel ─► tee ─► blob file (ingest)
//!  (fetch::HttpClient)            │                      └──► decoder ─► tar ─► writer(s) ─► staging
//!                                 │  writeback kicks: each finished file, the blob every 8 MiB
//! ```
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
//! end, and the md5 — when proc.yaml gives one — matches. Then the layer and the blob are
//! published (fsync + rename + fsync parent, in `vrun-cache`). Any failure drops the
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
//! file, and the blob every [`FLUSH_EVERY`] input bytes from a [`Flusher`] thread), so the
//! disk writes while the CPU decodes and publish's fsyncs (of vrun's own files only)
//! find little left. (A background `syncfs` did the same job until issue 14: it also
//! flushed every other process's dirty data on the filesystem and made publish wait for
//! it. Per-file `sync_file_range` kicks *on the writer threads* were slower: they moved
//! block allocation there; the kicks now run on a thread of their own.)
//!
//! On a slow disk the blob is a third more bytes to write (gzip), and the disk is the
//! bottleneck: `--no-blob` ([`Artifact::keep_blob`]) keeps only the layer (slow-disk
//! bench: 1.01× → 0.90× the shell pipeline's time).
//!
//! Reuse, cheapest first, under "lock, then re-check" on the URL's key so that two setups
//! of the same build download it once:
//! 1. a published layer for (blob sha256, kind, uid, gid) → `"cache": "layer"`, no I/O;
//! 2. a published blob (found by md5, else by URL) → extract from it (`"blob"`), after
//!    re-hashing it when an md5 is given (a bad blob is discarded and refetched once);
//! 3. otherwise download (`"miss"`).
//!
//! Without an md5 the URL index decides reuse: Velociraptor build and image URLs name one
//! immutable artifact, so a recorded URL is reused without asking the server again (the
//! recorded ETag/Last-Modified serve `If-Range` on resume and `vrun cache ls`).

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use serde::Serialize;
use tokio::sync::mpsc;
use vrun_cache::{
    BlobDigest, LayerKey, LayerKind, ManifestMode, Partial, PartialMeta, Store, UrlRecord,
};

use crate::decode::{self, DecodeError};
use crate::extract::{self, ExtractError, ExtractStats, Limits, Mode};
use crate::fetch::{
    self, BodySink, FetchError, FetchRequest, HttpClient, Md5Mismatch, Progress, Resume, SinkError,
    Validators,
};

/// Chunks in flight between the fetcher and the unpack thread. hyper hands out body
/// chunks of up to a few hundred KiB on a fast link, so 16 of them bound the queue to a
/// few MiB (64 let peak RSS reach 69 MiB on a 1.2 GiB archive) while still giving the
/// network slack through short decoder stalls.
const CHANNEL_DEPTH: usize = 16;

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
    fn key(&self, sha256: &str) -> LayerKey {
        LayerKey::new(sha256, self.kind, self.uid, self.gid)
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
        let reason = match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => return Ok(()),
            Ok(u) => format!("scheme {:?} is not http or https", u.scheme()),
            Err(e) => e.to_string(),
        };
        Err(FetchError {
            url: self.shown_url(),
            attempts: 0,
            kind: fetch::FetchErrorKind::InvalidUrl { reason },
        })
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

/// One artifact's line in `vrun setup --timings`.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactTimings {
    pub url: String,
    pub cache: CacheUse,
    /// Size of the tarball as downloaded (or as cached).
    pub compressed_bytes: u64,
    /// Bytes of file content in the extracted tree.
    pub bytes: u64,
    /// Regular files in the extracted tree, every path counted (a hard link is a file),
    /// as the layer's manifest counts them: a `"layer"` hit reports the same number.
    pub files: u64,
    /// Time to the first body byte; null when nothing was downloaded.
    pub ttfb_s: Option<f64>,
    /// From the start of this artifact to its published layer.
    pub wall_s: f64,
    /// Archive format detected from its magic bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    /// When the first extracted file was complete (streaming: long before the download ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_file_s: Option<f64>,
    /// Download (network + everything it waited on) finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_s: Option<f64>,
    /// Every entry written (to the page cache) and the stream drained, since the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted_s: Option<f64>,
    /// After that, waiting for the background flush that was writing the tree to disk
    /// during the download to finish (long on a slow disk: the disk is the bottleneck).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_wait_s: Option<f64>,
    /// Making blob and layer durable and visible (fsync + rename).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_s: Option<f64>,
    /// Device nodes and fifos an image carried that were skipped (LXC's autodev makes /dev).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_devices: u64,
    /// Extended attributes the archive carried that were not set: all of them in a build
    /// (images set them, `security.capability` included).
    #[serde(skip_serializing_if = "is_zero")]
    pub dropped_xattrs: u64,
    /// POSIX ACLs the archive carried (`SCHILY.acl.*`, `system.posix_acl_*`), not set.
    #[serde(skip_serializing_if = "is_zero")]
    pub dropped_acls: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A layer ready to mount.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The layer's root directory (for a build it holds `app/`).
    pub layer: PathBuf,
    pub timings: ArtifactTimings,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Md5(#[from] Md5Mismatch),
    #[error("{url}: {source}")]
    Decode { url: String, source: DecodeError },
    #[error("{url}: {source}")]
    Extract { url: String, source: ExtractError },
    #[error("{url}: {source}")]
    Store {
        url: String,
        source: vrun_cache::StoreError,
    },
    #[error("{url}: cannot write {path}: {source}")]
    Io {
        url: String,
        path: PathBuf,
        source: io::Error,
    },
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
    if let Some(sha256) = known_sha256(&store, &art) {
        if let Some(blob) = store.blob(&sha256) {
            let (store2, art2, lim2) = (store.clone(), art.clone(), limits.clone());
            let reused = tokio::task::spawn_blocking(move || {
                from_blob(&store2, &art2, &sha256, &blob, &lim2, started)
            })
            .await
            .map_err(|_| PipelineError::Panicked { url: url.clone() })??;
            if let Some(prepared) = reused {
                return Ok(prepared);
            }
        }
    }
    match download(
        &store,
        &http,
        &art,
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
            http.notice(&format!("{e}; the download was resumed without a validator, so it is fetched again from byte 0"));
            download(&store, &http, &art, &limits, progress, started, false)
                .await
                .map_err(Retry::into_error)
        }
        other => other.map_err(Retry::into_error),
    }
}

/// How often a wait for a lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// The URL's key lock, waiting for whoever holds it (another setup downloading the same
/// URL) without blocking a thread, so that a failing sibling artifact or a signal can
/// cancel the wait; after [`fetch::HttpOptions::notice_after`] the wait is announced with
/// the holder's pid and command line.
async fn lock_url(
    store: &Store,
    http: &HttpClient,
    art: &Artifact,
) -> Result<vrun_cache::KeyLock, vrun_cache::StoreError> {
    let key = vrun_cache::url_lock_key(&art.url);
    let began = Instant::now();
    let mut noticed = false;
    loop {
        if let Some(lock) = store.try_lock(&key)? {
            return Ok(lock);
        }
        if !noticed && began.elapsed() >= http.options().notice_after {
            noticed = true;
            let path = store.lock_path(&key);
            http.notice(&format!(
                "waiting for {} to finish with {} (lock {})",
                describe_holders(&path),
                art.shown_url(),
                path.display()
            ));
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// "pid 1234 (vrun setup proc.yaml)" for the processes holding a lock file.
pub fn describe_holders(lock: &Path) -> String {
    let pids = vrun_cache::lock_holders(lock);
    if pids.is_empty() {
        return "another process".to_string();
    }
    let described: Vec<String> = pids
        .iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    b.split(|&c| c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| fetch::redact_url(&String::from_utf8_lossy(a)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmd.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid} ({cmd})")
            }
        })
        .collect();
    described.join(", ")
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
    let key = art.key(&sha256);
    let layer = store.layer(&key)?;
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
        timings: ArtifactTimings {
            url: art.url.clone(),
            cache: CacheUse::Layer,
            compressed_bytes,
            bytes: meta.as_ref().map_or(0, |m| m.stats.bytes),
            files: meta.as_ref().map_or(0, |m| m.stats.files),
            ttfb_s: None,
            wall_s: started.elapsed().as_secs_f64(),
            format: None,
            first_file_s: None,
            download_s: None,
            extracted_s: None,
            flush_wait_s: None,
            publish_s: None,
            skipped_devices: 0,
            dropped_xattrs: 0,
            dropped_acls: 0,
        },
    })
}

/// Extract from a cached blob. `Ok(None)` means the blob failed its md5 and was discarded:
/// the caller downloads it again (once).
fn from_blob(
    store: &Store,
    art: &Artifact,
    sha256: &str,
    blob: &Path,
    limits: &Limits,
    started: Instant,
) -> Result<Option<Prepared>, PipelineError> {
    let url = &art.shown_url();
    let io_err = |source| PipelineError::Io {
        url: url.clone(),
        path: blob.to_owned(),
        source,
    };
    if art.md5.is_some()
        && !store
            .rehash_blob(sha256, art.md5.as_deref())
            .map_err(|source| PipelineError::Store {
                url: url.clone(),
                source,
            })?
    {
        eprintln!(
            "warning: the cached {} of {url} failed its md5 check and was quarantined; downloading it again",
            art.name()
        );
        return Ok(None);
    }
    let store_err = |source| PipelineError::Store {
        url: url.clone(),
        source,
    };
    let ingest = store.new_ingest().map_err(store_err)?;
    let dest =
        extraction_root(art.mode(), ingest.staging_dir()).map_err(|source| PipelineError::Io {
            url: url.clone(),
            path: ingest.staging_dir().to_owned(),
            source,
        })?;
    let file = std::fs::File::open(blob).map_err(io_err)?;
    let compressed_bytes = file.metadata().map_err(io_err)?.len();
    let mut reader = FlushingReader {
        inner: io::BufReader::with_capacity(READ_BUF, file),
        flusher: Flusher::start(None).map_err(|source| PipelineError::Io {
            url: url.clone(),
            path: ingest.staging_dir().to_owned(),
            source,
        })?,
    };
    let (format, stats) =
        unpack(&mut reader, &dest, art.mode(), limits).map_err(|e| e.with_url(url))?;
    check_whole(art, format, &stats)?;
    let extracted = Instant::now();
    drop(reader); // waits for a flush in progress
    let flush_wait = extracted.elapsed();
    let publish_started = Instant::now();
    let key = art.key(sha256);
    let layer = store
        .publish_layer_with(&key, ingest.staging_dir(), LAYER_MANIFEST)
        .map_err(store_err)?;
    Ok(Some(Prepared {
        layer,
        timings: ArtifactTimings {
            url: url.clone(),
            cache: CacheUse::Blob,
            compressed_bytes,
            bytes: stats.bytes,
            files: stats.files + stats.hardlinks,
            ttfb_s: None,
            wall_s: started.elapsed().as_secs_f64(),
            format: Some(format.name()),
            first_file_s: stats
                .first_file_done
                .map(|t| t.duration_since(started).as_secs_f64()),
            download_s: None,
            extracted_s: Some(extracted.duration_since(started).as_secs_f64()),
            flush_wait_s: Some(flush_wait.as_secs_f64()),
            publish_s: Some(publish_started.elapsed().as_secs_f64()),
            skipped_devices: stats.skipped_devices,
            dropped_xattrs: stats.dropped_xattrs,
            dropped_acls: stats.dropped_acls,
        },
    }))
}

/// Read size for extracting from a cached blob file.
const READ_BUF: usize = 256 * 1024;

/// Mode of a build's `app/` when the archive has no `./` entry to give it one: what the
/// original runner left after its `chown -R` (the app runs with `HOME=/app`).
const APP_DIR_MODE: u32 = 0o755;

/// Builds are extracted under `app/` of their layer (the layer is mounted at `/`).
/// `app/` belongs to the proc's user with [`APP_DIR_MODE`] whatever the umask; an
/// archive's `./` entry, when present, then sets it as the build rules say.
fn extraction_root(mode: Mode, staging: &Path) -> io::Result<PathBuf> {
    match mode {
        Mode::Build { uid, gid } => {
            let app = staging.join("app");
            std::fs::create_dir(&app)?;
            std::os::unix::fs::chown(&app, Some(uid), Some(gid))?;
            std::fs::set_permissions(&app, std::fs::Permissions::from_mode(APP_DIR_MODE))?;
            Ok(app)
        }
        Mode::Image => Ok(staging.to_owned()),
    }
}

/// Why the unpack thread stopped, before the URL is attached.
#[derive(Debug)]
enum UnpackError {
    Decode(DecodeError),
    Extract(ExtractError),
    Io(PathBuf, io::Error),
}

impl UnpackError {
    fn with_url(self, url: &str) -> PipelineError {
        let url = url.to_owned();
        match self {
            UnpackError::Decode(source) => PipelineError::Decode { url, source },
            UnpackError::Extract(source) => PipelineError::Extract { url, source },
            UnpackError::Io(path, source) => PipelineError::Io { url, path, source },
        }
    }
}

/// decoder → tar → writer, then drain: the hashers upstream must see every byte, and
/// the channel must close, even when the tar ends early.
fn unpack(
    mut raw: impl Read + Send,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
) -> Result<(decode::Format, ExtractStats), UnpackError> {
    let (format, mut decoded) = decode::open(&mut raw).map_err(UnpackError::Decode)?;
    let stats = extract::extract(&mut decoded, dest, mode, limits).map_err(UnpackError::Extract)?;
    drop(decoded);
    io::copy(&mut raw, &mut io::sink()).map_err(|e| UnpackError::Io(dest.to_owned(), e))?;
    Ok((format, stats))
}

/// The unpack thread's end of the channel: the bytes of an interrupted download first
/// (replayed from the partial blob), then every chunk from the network, appended to the
/// blob and handed to the decoder.
struct TeeReader {
    replay: Option<io::Take<std::fs::File>>,
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    /// The blob being written, unless setup keeps no blob.
    blob: Option<std::fs::File>,
    /// Why writing the blob failed: reported as such, not as whatever the decoder makes
    /// of the short read that follows ("gzip stream is corrupt" for a full disk).
    blob_error: Option<io::Error>,
    flusher: Flusher,
}

/// Blob bytes between two writeback kicks. Measured with `syncfs` kicks on the 262 MB /
/// 12k-file gz bench build on loop ext4: 2, 4, 8 and 32 MiB all cut `publish_s` from
/// 1.2–1.4 s to 0.2–0.3 s; 8 MiB was best or tied.
const FLUSH_EVERY: u64 = 8 << 20;

/// Writes the blob back *during* the download instead of all of it at publish: a thread
/// that starts writeback (`sync_file_range`, [`crate::writeback`]) of the blob bytes
/// written since its last round whenever kicked (kicks while it is busy coalesce). The
/// extracted files get theirs from the writer threads' hand-over. This only starts
/// writeback of vrun's own pages; it used to be a `syncfs`, which also wrote whatever
/// other processes had dirty on the filesystem and made publish wait for it.
struct Flusher {
    tx: Option<crossbeam_channel::Sender<u64>>,
    thread: Option<JoinHandle<()>>,
    /// Input bytes seen, and how many of them had been at the last kick.
    seen: u64,
    kicked: u64,
}

impl Flusher {
    /// A flusher for `blob` (appended to from its current end), or one that does nothing.
    fn start(blob: Option<std::fs::File>) -> io::Result<Flusher> {
        let mut flusher = Flusher {
            tx: None,
            thread: None,
            seen: 0,
            kicked: 0,
        };
        let Some(blob) = blob else {
            return Ok(flusher);
        };
        let mut done = blob.metadata()?.len();
        let (tx, rx) = crossbeam_channel::bounded::<u64>(1);
        flusher.thread = Some(
            std::thread::Builder::new()
                .name("vrun-flush".into())
                .spawn(move || {
                    for upto in rx {
                        let end = done + upto;
                        crate::writeback::start_writeback(&blob, done, end - done);
                        done = end;
                    }
                })?,
        );
        flusher.tx = Some(tx);
        Ok(flusher)
    }

    /// `n` more input bytes went through: kick a flush every [`FLUSH_EVERY`].
    fn advance(&mut self, n: usize) {
        self.seen += n as u64;
        if self.seen - self.kicked >= FLUSH_EVERY {
            if let Some(tx) = &self.tx {
                if tx.try_send(self.seen - self.kicked).is_ok() {
                    self.kicked = self.seen;
                }
            }
        }
    }
}

/// A cached blob read with the same background flush as a download.
struct FlushingReader<R> {
    inner: R,
    flusher: Flusher,
}

impl<R: Read> Read for FlushingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.flusher.advance(n);
        Ok(n)
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(replay) = &mut self.replay {
            match replay.read(buf)? {
                0 => self.replay = None,
                n => {
                    self.flusher.advance(n);
                    return Ok(n);
                }
            }
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    if let Some(blob) = &mut self.blob {
                        if let Err(e) = blob.write_all(&chunk) {
                            let kind = e.kind();
                            self.blob_error = Some(e);
                            return Err(io::Error::new(kind, "cannot write the blob"));
                        }
                    }
                    self.flusher.advance(chunk.len());
                    self.current = chunk;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// What the unpack thread hands back.
struct Unpacked {
    format: decode::Format,
    stats: ExtractStats,
    /// Every entry written (into the page cache) and the stream drained.
    extracted: Instant,
    /// The background flush that was running then has finished too.
    flushed: Instant,
}

type Worker = JoinHandle<Result<Unpacked, UnpackError>>;

/// The fetcher's end: a bounded channel into a fresh unpack thread, restartable.
struct UnpackSink {
    tx: Option<mpsc::Sender<Bytes>>,
    worker: Option<Worker>,
    /// The resumable blob (a [`vrun_cache::Partial`]), unless setup keeps no blob.
    partial: Option<Partial>,
    /// Bytes of the partial blob to replay through the decoder before the network's.
    replay: u64,
    url: String,
    staging: PathBuf,
    mode: Mode,
    limits: Limits,
}

impl UnpackSink {
    fn start(
        partial: Option<Partial>,
        replay: u64,
        url: String,
        staging: &Path,
        mode: Mode,
        limits: Limits,
    ) -> io::Result<Self> {
        let mut sink = UnpackSink {
            tx: None,
            worker: None,
            partial,
            replay,
            url,
            staging: staging.to_owned(),
            mode,
            limits,
        };
        sink.spawn()?;
        Ok(sink)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let dest = extraction_root(self.mode, &self.staging)?;
        let blob_path = self.partial.as_ref().map(|p| p.blob_path().to_owned());
        let (blob, replay) = match &blob_path {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(path)?;
                f.set_len(self.replay)?;
                let replay = (self.replay > 0)
                    .then(|| std::fs::File::open(path).map(|r| r.take(self.replay)))
                    .transpose()?;
                let mut f = f;
                io::Seek::seek(&mut f, io::SeekFrom::End(0))?;
                (Some(f), replay)
            }
            None => (None, None),
        };
        let flusher = Flusher::start(blob.as_ref().map(std::fs::File::try_clone).transpose()?)?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let (mode, limits) = (self.mode, self.limits.clone());
        let worker = std::thread::Builder::new()
            .name("vrun-unpack".into())
            .spawn(move || {
                let mut reader = TeeReader {
                    replay,
                    rx,
                    current: Bytes::new(),
                    blob,
                    blob_error: None,
                    flusher,
                };
                let unpacked = unpack(&mut reader, &dest, mode, &limits);
                if let (Some(e), Some(path)) = (reader.blob_error.take(), blob_path) {
                    return Err(UnpackError::Io(path, e));
                }
                let (format, stats) = unpacked?;
                let extracted = Instant::now();
                drop(reader); // waits for a flush in progress
                Ok(Unpacked {
                    format,
                    stats,
                    extracted,
                    flushed: Instant::now(),
                })
            })?;
        self.tx = Some(tx);
        self.worker = Some(worker);
        Ok(())
    }

    /// Close the channel and wait for the unpack thread's verdict.
    fn finish(&mut self) -> Option<Result<Unpacked, UnpackError>> {
        self.tx = None;
        let worker = self.worker.take()?;
        Some(worker.join().unwrap_or_else(|_| {
            Err(UnpackError::Io(
                self.staging.clone(),
                io::Error::other("unpack thread panicked"),
            ))
        }))
    }
}

impl BodySink for UnpackSink {
    fn reset(&mut self) -> Result<(), SinkError> {
        let _ = self.finish();
        // Start from an empty staging dir and an empty blob.
        std::fs::remove_dir_all(&self.staging)?;
        std::fs::create_dir(&self.staging)?;
        self.replay = 0;
        if let Some(p) = &self.partial {
            p.clear().map_err(SinkError::new)?;
        }
        self.spawn()?;
        Ok(())
    }

    fn chunk(
        &mut self,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send {
        let tx = self.tx.clone();
        async move {
            match tx {
                Some(tx) => tx
                    .send(data)
                    .await
                    .map_err(|_| SinkError::new("the unpack thread stopped")),
                None => Err(SinkError::new("the unpack thread stopped")),
            }
        }
    }

    fn begin(&mut self, v: &Validators) -> Result<(), SinkError> {
        if let Some(p) = &self.partial {
            p.set_meta(&PartialMeta {
                url: self.url.clone(),
                etag: v.etag.clone(),
                last_modified: v.last_modified.clone(),
            })
            .map_err(SinkError::new)?;
        }
        Ok(())
    }
}

impl Drop for UnpackSink {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A download that failed; `Clean` means "once more from byte 0 may well succeed".
enum Retry {
    Clean(PipelineError),
    Fail(PipelineError),
}

impl Retry {
    fn into_error(self) -> PipelineError {
        match self {
            Retry::Clean(e) | Retry::Fail(e) => e,
        }
    }
}

impl From<PipelineError> for Retry {
    fn from(e: PipelineError) -> Self {
        Retry::Fail(e)
    }
}

/// Whether a failed download leaves bytes worth resuming: network trouble does; a
/// definite answer (4xx, a refused redirect or certificate) or bad content does not.
fn worth_resuming(e: &FetchError) -> bool {
    use fetch::FetchErrorKind as K;
    match &e.kind {
        K::Status { status } => {
            status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429
        }
        K::Connect { .. }
        | K::ProxyConnect { .. }
        | K::Timeout { .. }
        | K::Transfer { .. }
        | K::Truncated { .. }
        | K::TooSlow { .. } => true,
        _ => false,
    }
}

/// The resume point a partial download offers: its bytes re-hashed, with the validator
/// they came with. `None` (and the partial cleared) when it cannot be trusted: no
/// validator and no md5 to check the whole.
fn resume_point(partial: &Partial, art: &Artifact) -> Option<Resume> {
    let len = partial.len();
    let meta = partial.meta();
    let validator = meta.as_ref().and_then(|m| {
        m.etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| m.last_modified.clone())
    });
    if len == 0 || meta.is_none() || (validator.is_none() && art.md5.is_none()) {
        let _ = partial.clear();
        return None;
    }
    let file = std::fs::File::open(partial.blob_path()).ok()?;
    let hasher = fetch::BodyHasher::new().hash_reader(file.take(len)).ok()?;
    (hasher.bytes() == len).then_some(Resume { hasher, validator })
}

#[allow(clippy::too_many_arguments)]
async fn download(
    store: &Store,
    http: &HttpClient,
    art: &Artifact,
    limits: &Limits,
    progress: Option<Arc<Progress>>,
    started: Instant,
    may_retry_clean: bool,
) -> Result<Prepared, Retry> {
    let url = &art.shown_url();
    let store_err = |source| PipelineError::Store {
        url: url.clone(),
        source,
    };
    let partial = match art.keep_blob {
        true => Some(store.partial(&art.url).map_err(store_err)?),
        false => None,
    };
    let resume = match (&partial, may_retry_clean) {
        (Some(p), true) => tokio::task::block_in_place(|| resume_point(p, art)),
        (Some(p), false) => {
            p.clear().map_err(store_err)?;
            None
        }
        (None, _) => None,
    };
    let replay = resume.as_ref().map_or(0, |r| r.hasher.bytes());
    let ingest = store.new_ingest().map_err(store_err)?;
    let mut sink = UnpackSink::start(
        partial,
        replay,
        url.clone(),
        ingest.staging_dir(),
        art.mode(),
        limits.clone(),
    )
    .map_err(|source| PipelineError::Io {
        url: url.clone(),
        path: ingest.dir().to_owned(),
        source,
    })?;
    let mut req = FetchRequest::new(&art.url).whole_checked(art.md5.is_some());
    if let Some(r) = resume {
        http.notice(&format!(
            "resuming the {} download of {url} at byte {replay} (left by an interrupted setup)",
            art.name()
        ));
        req = req.resume(r);
    }
    if let Some(p) = progress {
        req = req.progress(p);
    }
    let fetched = http.fetch_request(req, &mut sink).await;
    let download_s = started.elapsed().as_secs_f64();
    let unpacked = tokio::task::block_in_place(|| sink.finish());
    let partial = sink.partial.take();
    let discard = |partial: Option<Partial>| {
        if let Some(p) = partial {
            p.discard();
        }
    };
    let (outcome, unpacked) = match (fetched, unpacked) {
        // The unpack thread's error is the precise one when it made the fetch stop.
        (Err(e), Some(Err(u))) if matches!(e.kind, fetch::FetchErrorKind::Sink(_)) => {
            discard(partial);
            return Err(u.with_url(url).into());
        }
        (Err(e), _) => {
            if !worth_resuming(&e) || partial.as_ref().is_some_and(Partial::is_empty) {
                discard(partial);
            }
            return Err(PipelineError::from(e).into());
        }
        (Ok(_), Some(Err(u))) => {
            discard(partial);
            return Err(u.with_url(url).into());
        }
        (Ok(o), Some(Ok(u))) => (o, u),
        (Ok(_), None) => unreachable!("the sink has a worker until finished"),
    };
    if let Some(expected) = &art.md5 {
        if let Err(e) = outcome.verify_md5(url, expected) {
            discard(partial);
            return Err(match outcome.unvalidated_resumes > 0 && may_retry_clean {
                true => Retry::Clean(e.into()),
                false => Retry::Fail(e.into()),
            });
        }
    }
    if let Err(e) = check_whole(art, unpacked.format, &unpacked.stats) {
        discard(partial);
        return Err(e.into());
    }
    let publish_started = Instant::now();
    let digest = BlobDigest {
        sha256: outcome.sha256_hex.clone(),
        md5: outcome.md5_hex.clone(),
        size: outcome.bytes,
    };
    let record = UrlRecord {
        url: art.url.clone(),
        url_sha256: None,
        sha256: outcome.sha256_hex.clone(),
        etag: outcome.etag.clone(),
        last_modified: outcome.last_modified.clone(),
        size: outcome.bytes,
    };
    // Layer first, then the blob (its writeback started during the download). A crash in
    // between leaves a layer no index points to yet; the next setup downloads again and
    // keeps that layer.
    let layer = tokio::task::block_in_place(|| {
        let layer = store.publish_layer_with(
            &art.key(&digest.sha256),
            ingest.staging_dir(),
            LAYER_MANIFEST,
        )?;
        match &partial {
            Some(p) => {
                store.publish_blob_file(p.blob_path(), &digest, Some(&record))?;
                // The md5 proc.yaml named (the wire bytes' when a Content-Encoding was
                // decoded) leads to this blob too.
                if let Some(expected) = art.md5.as_ref().filter(|m| **m != digest.md5) {
                    store.record_digest(
                        &BlobDigest {
                            md5: expected.clone(),
                            ..digest.clone()
                        },
                        None,
                    )?;
                }
            }
            None => store.record_digest(&digest, Some(&record))?,
        }
        Ok(layer)
    })
    .map_err(store_err)?;
    discard(partial);
    Ok(Prepared {
        layer,
        timings: ArtifactTimings {
            url: url.clone(),
            cache: CacheUse::Miss,
            compressed_bytes: outcome.bytes,
            bytes: unpacked.stats.bytes,
            files: unpacked.stats.files + unpacked.stats.hardlinks,
            ttfb_s: Some(outcome.ttfb.as_secs_f64()),
            wall_s: started.elapsed().as_secs_f64(),
            format: Some(unpacked.format.name()),
            first_file_s: unpacked
                .stats
                .first_file_done
                .map(|t| t.duration_since(started).as_secs_f64()),
            download_s: Some(download_s),
            extracted_s: Some(unpacked.extracted.duration_since(started).as_secs_f64()),
            flush_wait_s: Some(
                unpacked
                    .flushed
                    .duration_since(unpacked.extracted)
                    .as_secs_f64(),
            ),
            publish_s: Some(publish_started.elapsed().as_secs_f64()),
            skipped_devices: unpacked.stats.skipped_devices,
            dropped_xattrs: unpacked.stats.dropped_xattrs,
            dropped_acls: unpacked.stats.dropped_acls,
        },
    })
}
