//! One download: where to resume, the fetch into the unpack thread, the md5, and the
//! publish of layer and blob; or which failure leaves a partial worth resuming.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use vrun_cache::{BlobDigest, LayerStorage, Partial, Store, UrlRecord};

use super::unpack::{Target, UnpackSink};
use super::{check_whole, publish, Artifact, CacheUse, PipelineError, Prepared, TimingsBuilder};
use crate::extract::Limits;
use crate::fetch::{self, FetchError, FetchRequest, HttpClient, Progress, Resume};

/// A download that failed; `Clean` means "once more from byte 0 may well succeed".
pub(super) enum Retry {
    Clean(PipelineError),
    Fail(PipelineError),
}

impl Retry {
    pub(super) fn into_error(self) -> PipelineError {
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
pub(super) fn worth_resuming(e: &FetchError) -> bool {
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
pub(super) fn resume_point(partial: &Partial, art: &Artifact) -> Option<Resume> {
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
pub(super) async fn download(
    store: &Store,
    http: &HttpClient,
    art: &Artifact,
    storage: LayerStorage,
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
    let target = Target::new(storage, &ingest);
    let mut sink = UnpackSink::start(
        partial,
        replay,
        url.clone(),
        target.clone(),
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
    // Layer first, then the blob (not fsynced: a cache, see the module note). A crash in
    // between leaves a layer no index points to yet; the next setup downloads again and
    // keeps that layer.
    let key = art.key(&digest.sha256, storage);
    let layer = tokio::task::block_in_place(|| {
        let layer = publish(store, &key, &target, &unpacked)?;
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
        key,
        timings: TimingsBuilder::new(url, CacheUse::Miss, outcome.bytes, started)
            .stored(storage)
            .downloaded(outcome.ttfb, download_s)
            .extracted(
                unpacked.format,
                &unpacked.stats,
                unpacked.extracted,
                unpacked.flushed,
            )
            .published(publish_started)
            .build(),
        fallback: None,
    })
}
