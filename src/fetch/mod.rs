//! The download half of the streaming pipeline: HTTP body → md5 + sha256 → a sink.
//!
//! Why push-style. The pipeline (`crate::pipeline`) must overlap network, hashing, the blob
//! tee and decompression with bounded memory. The fetcher therefore owns the network
//! loop and *pushes* each body chunk into a [`BodySink`], awaiting the sink before it
//! reads the next chunk. The sink applies backpressure (typically a bounded channel to
//! the decode thread plus a blob-file write), and because the fetcher does not read
//! while the sink is busy, a slow disk makes the TCP window close instead of memory
//! grow. Every byte goes through [`BodyHasher`] before the sink sees it, so the digests
//! describe exactly what was delivered.
//!
//! Why the sink has `reset`. Transfers break. The fetcher resumes with
//! `Range: bytes=<received>-` and `If-Range: <validator>`; a 206 that continues exactly
//! where we stopped is appended (the sink never notices), but a server that ignores
//! `Range`, or whose resource changed (`If-Range` failed), answers 200 with the whole
//! body. Then the only correct move is to start over: the sink is told to discard
//! everything (truncate the blob, restart the decoder), the hashes restart, and bytes
//! flow again from 0. Splicing two versions of a file is the one outcome we never allow.
//!
//! Why a retry budget and not "retry until it works". Operators need a deploy to fail
//! within a bounded time with a message naming the URL and what happened. Transient
//! faults (connect errors, resets, timeouts, 5xx, 408, 429) get [`HttpOptions::retries`]
//! more attempts with jittered exponential backoff (honouring a capped `Retry-After`);
//! answers that will not change (404, 403, other 4xx) and consumer failures (hash
//! mismatch, disk full) fail at once.
//!
//! A download interrupted in an earlier process (kill -9 mid-setup) can be continued with
//! [`Resume`]: the caller re-hashes the partial blob into a [`BodyHasher`], hands it over
//! with the validator it came with, and the same rules apply (206 appends, 200 restarts;
//! a 416 for a partial that is already whole completes at once).
//!
//! Timeouts are per step, plus a floor on speed: connecting has
//! [`HttpOptions::connect_timeout`], the body has an *idle* limit
//! ([`HttpOptions::read_timeout`]) on each chunk, and the low-speed rule
//! ([`HttpOptions::speed_limit`] over [`HttpOptions::speed_time`]) catches a server that
//! trickles, so a 2 GB image on a slow but steady link is fine and a stalled or trickling
//! one fails within a minute. An overall deadline is optional (`VRUN_DEADLINE`). Long
//! waits are reported as they happen through [`HttpClient::with_notices`].

mod error;
mod http;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

pub use error::{FetchError, FetchErrorKind, TimeoutKind};
pub use http::{
    check_url, FetchRequest, HttpClient, HttpOptions, HttpSetupError, Notify, Resume, Validators,
    DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_CONNECT_TIMEOUT, DEFAULT_NOTICE_AFTER,
    DEFAULT_READ_TIMEOUT, DEFAULT_RETRIES, DEFAULT_SPEED_LIMIT, DEFAULT_SPEED_TIME, MAX_REDIRECTS,
    RETRY_AFTER_CAP,
};
pub use vrun_cache::{BodyDigest, BodyHasher};

/// The consumer of a body. The fetcher calls `chunk` for every piece in order and waits
/// for it to finish before reading more from the network (that wait *is* the
/// backpressure), and calls `reset` when the stream restarts from byte 0.
pub trait BodySink {
    /// Forget every byte delivered so far; the next `chunk` is byte 0 again.
    fn reset(&mut self) -> Result<(), SinkError>;
    /// Consume the next piece of the body.
    fn chunk(&mut self, data: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// A body starts from byte 0 with these validators (called before its first chunk),
    /// so a sink that keeps a resumable partial can record what its bytes belong to.
    fn begin(&mut self, _validators: &Validators) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Why a sink refused a chunk. Wraps the sink's own error so it reaches the caller intact.
pub struct SinkError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl SinkError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        SinkError(e.into())
    }
    /// The sink's original error.
    pub fn into_inner(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self.0
    }
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
impl fmt::Debug for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> Self {
        SinkError::new(e)
    }
}

/// Live byte counts of one download, shared with whoever draws the progress bar.
/// `received` drops back to 0 when the stream restarts.
#[derive(Debug)]
pub struct Progress {
    received: AtomicU64,
    total: AtomicU64,
}

/// `total` value meaning "length not known (yet)".
const UNKNOWN: u64 = u64::MAX;

impl Default for Progress {
    fn default() -> Self {
        Self {
            received: AtomicU64::new(0),
            total: AtomicU64::new(UNKNOWN),
        }
    }
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }
    /// Body bytes delivered to the sink so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Length of the whole body, once a response announced it.
    pub fn total(&self) -> Option<u64> {
        match self.total.load(Ordering::Relaxed) {
            UNKNOWN => None,
            n => Some(n),
        }
    }
    fn set_received(&self, n: u64) {
        self.received.store(n, Ordering::Relaxed);
    }
    fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
}

/// A completed download.
#[derive(Debug, Clone)]
pub struct FetchOutcome {
    pub md5_hex: String,
    pub sha256_hex: String,
    /// Body bytes delivered (after the last restart, i.e. the blob's size).
    pub bytes: u64,
    /// `ETag` / `Last-Modified` of the body delivered, when the server sent them.
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// From the start of `fetch` to the first body byte.
    pub ttfb: Duration,
    /// From the start of `fetch` to the end of the body, retries included.
    pub wall: Duration,
    /// Requests sent.
    pub attempts: u32,
    /// Attempts that continued with a 206 where the previous one stopped.
    pub resumed: u32,
    /// Times the sink was reset because a server answered 200 to a resume.
    pub restarts: u32,
    /// Resumes sent without `If-Range` (no validator; allowed because the request was
    /// `whole_checked`): an md5 mismatch may then be a splice of two versions.
    pub unvalidated_resumes: u32,
    /// md5 of the bytes on the wire, when the server applied a `Content-Encoding` that
    /// was decoded (`md5_hex` is of the decoded body). An md5 in proc.yaml may name either.
    pub wire_md5_hex: Option<String>,
}

impl FetchOutcome {
    /// Check the md5 proc.yaml asserts against the body (or, for a body the server sent
    /// with a `Content-Encoding`, against the bytes on the wire).
    pub fn verify_md5(&self, url: &str, expected: &str) -> Result<(), Md5Mismatch> {
        match verify_md5(url, expected, &self.md5_hex) {
            Err(_)
                if self
                    .wire_md5_hex
                    .as_deref()
                    .is_some_and(|w| verify_md5(url, expected, w).is_ok()) =>
            {
                Ok(())
            }
            r => r,
        }
    }
}

/// Credentials never reach a message or the store (the store crate owns the function).
pub use vrun_cache::redact_url;

/// A proc.yaml md5 that does not match the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("md5 mismatch for {url}: expected {expected}, got {got}")]
pub struct Md5Mismatch {
    pub url: String,
    pub expected: String,
    pub got: String,
}

/// Compare the md5 proc.yaml asserts with the one computed (hex, case-insensitive).
pub fn verify_md5(url: &str, expected: &str, got: &str) -> Result<(), Md5Mismatch> {
    if expected.trim().eq_ignore_ascii_case(got.trim()) {
        Ok(())
    } else {
        Err(Md5Mismatch {
            url: url.to_string(),
            expected: expected.trim().to_string(),
            got: got.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_url("http://user:p@ss@h:8/a@b?x=@"),
            "http://***@h:8/a@b?x=@"
        );
        assert_eq!(redact_url("https://TOKEN@h/x"), "https://***@h/x");
        assert_eq!(redact_url("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn md5_message() {
        assert!(verify_md5("u", "ABC", "abc").is_ok());
        let e = verify_md5("http://h/b.tgz", "aa", "bb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "md5 mismatch for http://h/b.tgz: expected aa, got bb"
        );
    }
}
