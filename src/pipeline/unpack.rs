//! The unpack thread: the synchronous half of a fetch, which knows nothing of HTTP.
//!
//! It reads the body's bytes from a bounded channel (or a cached blob file), appends them
//! to the blob, decodes them and extracts the tar stream into staging, then drains the
//! rest so the hashers upstream see every byte. The blob is left to the kernel's writeback
//! (see the `pipeline` note: it is a cache of the download, not part of the layer). See
//! the `pipeline` note for why this is one thread per artifact.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use vrun_cache::{Ingest, LayerStorage, Partial, PartialMeta};

use super::PipelineError;
use crate::decode::{self, DecodeError};
use crate::erofs::{ImageStats, Metadata};
use crate::extract::{self, ErofsSink, ExtractError, ExtractStats, ImageRoot, Limits, Mode};
use crate::fetch::{BodySink, SinkError, Validators};

/// Chunks in flight between the fetcher and the unpack thread. hyper hands out body
/// chunks of up to a few hundred KiB on a fast link, so 16 of them bound the queue to a
/// few MiB (64 let peak RSS reach 69 MiB on a 1.2 GiB archive) while still giving the
/// network slack through short decoder stalls.
pub(super) const CHANNEL_DEPTH: usize = 16;

/// Read size for extracting from a cached blob file.
pub(super) const READ_BUF: usize = 256 * 1024;

/// Mode of a build's `app/` when the archive has no `./` entry to give it one: what the
/// original runner left after its `chown -R` (the app runs with `HOME=/app`).
pub(super) const APP_DIR_MODE: u32 = 0o755;

/// Builds are extracted under `app/` of their layer (the layer is mounted at `/`).
/// `app/` belongs to the proc's user with [`APP_DIR_MODE`] whatever the umask; an
/// archive's `./` entry, when present, then sets it as the build rules say.
pub(super) fn extraction_root(mode: Mode, staging: &Path) -> io::Result<PathBuf> {
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
pub(super) enum UnpackError {
    Decode(DecodeError),
    Extract(ExtractError),
    Io(PathBuf, io::Error),
}

impl UnpackError {
    pub(super) fn with_url(self, url: &str) -> PipelineError {
        let url = url.to_owned();
        match self {
            UnpackError::Decode(source) => PipelineError::Decode { url, source },
            UnpackError::Extract(source) => PipelineError::Extract { url, source },
            UnpackError::Io(path, source) => PipelineError::Io { url, path, source },
        }
    }
}

/// Where an extraction goes in its ingest dir: a staging tree, or one EROFS image.
#[derive(Debug, Clone)]
pub(super) enum Target {
    Dir { staging: PathBuf },
    Image { path: PathBuf },
}

impl Target {
    pub(super) fn new(storage: LayerStorage, ingest: &Ingest) -> Target {
        match storage {
            LayerStorage::Dir => Target::Dir {
                staging: ingest.staging_dir().to_owned(),
            },
            LayerStorage::Erofs => Target::Image {
                path: ingest.image_path(),
            },
        }
    }

    /// The path errors name.
    pub(super) fn path(&self) -> &Path {
        match self {
            Target::Dir { staging } => staging,
            Target::Image { path } => path,
        }
    }

    /// Back to empty, for a download that starts again from byte 0.
    fn reset(&self) -> io::Result<()> {
        match self {
            Target::Dir { staging } => {
                std::fs::remove_dir_all(staging)?;
                std::fs::create_dir(staging)
            }
            Target::Image { path } => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// What an extraction made, beside its stats.
pub(super) struct Unpacked {
    pub(super) format: decode::Format,
    pub(super) stats: ExtractStats,
    /// An EROFS target's image: what the writer wrote and the image's sha256.
    pub(super) image: Option<(ImageStats, String)>,
    /// Every entry written (into the page cache) and the stream drained.
    pub(super) extracted: Instant,
    /// What the target needs on disk is there (for an image: its one fsync; a staging
    /// tree's files are waited for at publish).
    pub(super) flushed: Instant,
}

/// decoder → tar → sink, then drain: the hashers upstream must see every byte, and
/// the channel must close, even when the tar ends early.
pub(super) fn unpack(
    mut raw: impl Read + Send,
    target: &Target,
    mode: Mode,
    limits: &Limits,
) -> Result<Unpacked, UnpackError> {
    let (format, mut decoded) = decode::open(&mut raw).map_err(UnpackError::Decode)?;
    let (stats, image, extracted) = match target {
        Target::Dir { staging } => {
            let dest =
                extraction_root(mode, staging).map_err(|e| UnpackError::Io(staging.clone(), e))?;
            let stats = extract::extract(&mut decoded, &dest, mode, limits)
                .map_err(UnpackError::Extract)?;
            (stats, None, Instant::now())
        }
        Target::Image { path } => {
            let root = match mode {
                Mode::Build { uid, gid } => ImageRoot::Under {
                    name: b"app".to_vec(),
                    meta: app_dir_meta(uid, gid),
                },
                Mode::Image => ImageRoot::Top,
            };
            let mut sink =
                ErofsSink::create(path, mode, limits, root).map_err(UnpackError::Extract)?;
            let stats = extract::extract_into(&mut decoded, &mut sink, mode, limits)
                .map_err(UnpackError::Extract)?;
            let extracted = sink.entries_done().unwrap_or_else(Instant::now);
            (stats, sink.written().cloned(), extracted)
        }
    };
    drop(decoded);
    io::copy(&mut raw, &mut io::sink())
        .map_err(|e| UnpackError::Io(target.path().to_owned(), e))?;
    Ok(Unpacked {
        format,
        stats,
        image,
        extracted,
        flushed: Instant::now(),
    })
}

/// A build's `app/` in an image: what [`extraction_root`] makes on disk, as metadata.
fn app_dir_meta(uid: u32, gid: u32) -> Metadata {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Metadata {
        mode: APP_DIR_MODE,
        uid,
        gid,
        mtime: now.as_secs() as i64,
        mtime_nsec: now.subsec_nanos(),
        xattrs: Vec::new(),
    }
}

/// The unpack thread's end of the channel: the bytes of an interrupted download first
/// (replayed from the partial blob), then every chunk from the network, appended to the
/// blob and handed to the decoder.
pub(super) struct TeeReader {
    replay: Option<io::Take<std::fs::File>>,
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    /// The blob being written, unless setup keeps no blob.
    blob: Option<std::fs::File>,
    /// Why writing the blob failed: reported as such, not as whatever the decoder makes
    /// of the short read that follows ("gzip stream is corrupt" for a full disk).
    blob_error: Option<io::Error>,
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(replay) = &mut self.replay {
            match replay.read(buf)? {
                0 => self.replay = None,
                n => return Ok(n),
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

pub(super) type Worker = JoinHandle<Result<Unpacked, UnpackError>>;

/// The fetcher's end: a bounded channel into a fresh unpack thread, restartable.
pub(super) struct UnpackSink {
    tx: Option<mpsc::Sender<Bytes>>,
    worker: Option<Worker>,
    /// The resumable blob (a [`vrun_cache::Partial`]), unless setup keeps no blob.
    pub(super) partial: Option<Partial>,
    /// Bytes of the partial blob to replay through the decoder before the network's.
    replay: u64,
    url: String,
    target: Target,
    mode: Mode,
    limits: Limits,
}

impl UnpackSink {
    pub(super) fn start(
        partial: Option<Partial>,
        replay: u64,
        url: String,
        target: Target,
        mode: Mode,
        limits: Limits,
    ) -> io::Result<Self> {
        let mut sink = UnpackSink {
            tx: None,
            worker: None,
            partial,
            replay,
            url,
            target,
            mode,
            limits,
        };
        sink.spawn()?;
        Ok(sink)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let target = self.target.clone();
        let blob_path = self.partial.as_ref().map(|p| p.blob_path().to_owned());
        let (blob, replay) = match &blob_path {
            Some(path) => {
                // Never truncate the blob to zero: on ext4 that arms `auto_da_alloc`, so
                // closing the file starts writeback of all of it, and the layer's fsync
                // (the next journal commit) then waits for the blob too — 2.1 s of an
                // 8.6 s slow-disk setup. Starting over is a new file instead.
                if self.replay == 0 {
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(path)?;
                if f.metadata()?.len() != self.replay {
                    f.set_len(self.replay)?;
                }
                let replay = (self.replay > 0)
                    .then(|| std::fs::File::open(path).map(|r| r.take(self.replay)))
                    .transpose()?;
                let mut f = f;
                io::Seek::seek(&mut f, io::SeekFrom::End(0))?;
                (Some(f), replay)
            }
            None => (None, None),
        };
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
                };
                let unpacked = unpack(&mut reader, &target, mode, &limits);
                if let (Some(e), Some(path)) = (reader.blob_error.take(), blob_path) {
                    return Err(UnpackError::Io(path, e));
                }
                unpacked
            })?;
        self.tx = Some(tx);
        self.worker = Some(worker);
        Ok(())
    }

    /// Close the channel and wait for the unpack thread's verdict.
    pub(super) fn finish(&mut self) -> Option<Result<Unpacked, UnpackError>> {
        self.tx = None;
        let worker = self.worker.take()?;
        Some(worker.join().unwrap_or_else(|_| {
            Err(UnpackError::Io(
                self.target.path().to_owned(),
                io::Error::other("unpack thread panicked"),
            ))
        }))
    }
}

impl BodySink for UnpackSink {
    fn reset(&mut self) -> Result<(), SinkError> {
        let _ = self.finish();
        // Start from an empty staging dir (or no image) and an empty blob.
        self.target.reset()?;
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
