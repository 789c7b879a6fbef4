//! The HTTP client: reqwest over rustls, with our own retry, resume and idle timeout.
//!
//! reqwest is used for what it does well (connection pooling, TLS, proxies from
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, redirects) and nothing else: no transparent
//! decompression (the `gzip` feature is off and we send `Accept-Encoding: identity`,
//! because the md5 in proc.yaml is of the bytes on the wire and the decoder stage picks
//! the format by magic), no overall timeout (big images on slow links are legitimate),
//! and no built-in read timeout (reqwest's counts from the start of the request; ours
//! is an idle limit on each body chunk). Retry and resume live here because they must
//! cooperate with the sink: a resumed 206 is appended, a 200 restarts the sink.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE,
};
use reqwest::StatusCode;

use super::error::{FetchError, FetchErrorKind, TimeoutKind};
use super::hash::BodyHasher;
use super::{BodySink, FetchOutcome, Progress};

/// Connection set-up limit (DESIGN §3): a healthy server connects in milliseconds; ten
/// seconds covers a congested link without hanging a deploy on a dead host.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence tolerated while reading the body (per chunk, not overall).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra attempts after the first for transient failures (DESIGN §3).
pub const DEFAULT_RETRIES: u32 = 3;
/// First backoff; doubled per retry and jittered to [½, 1]× so parallel setups that
/// failed together do not retry together.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Largest backoff between two attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Longest `Retry-After` honoured; a server asking for more gets retried after this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);

/// Environment overrides (seconds, fractional allowed), mainly for tests and demos.
const ENV_CONNECT_TIMEOUT: &str = "VRUN_CONNECT_TIMEOUT";
const ENV_READ_TIMEOUT: &str = "VRUN_READ_TIMEOUT";
const ENV_RETRIES: &str = "VRUN_HTTP_RETRIES";
const ENV_BACKOFF: &str = "VRUN_HTTP_BACKOFF";

/// Tunables of the client. `Default` is DESIGN §3; [`HttpOptions::from_env`] adds the
/// `VRUN_*` overrides.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Idle limit per body chunk. The response head gets connect + read.
    pub read_timeout: Duration,
    /// Retries after the first attempt (so at most `retries + 1` requests).
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_after_cap: Duration,
    pub user_agent: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            retry_after_cap: RETRY_AFTER_CAP,
            user_agent: concat!("vrun/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Setting up the client failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot build the http client: {0}")]
    Client(String),
}

impl HttpOptions {
    /// Defaults plus `VRUN_CONNECT_TIMEOUT`, `VRUN_READ_TIMEOUT`, `VRUN_HTTP_BACKOFF`
    /// (seconds, e.g. `0.5`) and `VRUN_HTTP_RETRIES` (a count) when set.
    pub fn from_env() -> Result<Self, HttpSetupError> {
        Self::default().with_env_from(|k| std::env::var(k).ok())
    }

    fn with_env_from(
        mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, HttpSetupError> {
        let secs =
            |var: &'static str, min_zero: bool| -> Result<Option<Duration>, HttpSetupError> {
                let Some(value) = get(var) else {
                    return Ok(None);
                };
                let bad = |reason| HttpSetupError::Env {
                    var,
                    value: value.clone(),
                    reason,
                };
                let n: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("not a number of seconds"))?;
                if !(n > 0.0 || (min_zero && n == 0.0)) {
                    return Err(bad("must be a positive number of seconds"));
                }
                Duration::try_from_secs_f64(n)
                    .map(Some)
                    .map_err(|_| bad("out of range"))
            };
        if let Some(d) = secs(ENV_CONNECT_TIMEOUT, false)? {
            self.connect_timeout = d;
        }
        if let Some(d) = secs(ENV_READ_TIMEOUT, false)? {
            self.read_timeout = d;
        }
        if let Some(d) = secs(ENV_BACKOFF, true)? {
            self.backoff_base = d;
        }
        if let Some(value) = get(ENV_RETRIES) {
            self.retries = value.trim().parse().map_err(|_| HttpSetupError::Env {
                var: ENV_RETRIES,
                value: value.clone(),
                reason: "not a retry count",
            })?;
        }
        Ok(self)
    }
}

/// A download to perform. [`HttpClient::fetch`] is the common case.
pub struct FetchRequest<'a> {
    pub url: &'a str,
    /// Updated as bytes arrive, for progress bars.
    pub progress: Option<Arc<Progress>>,
    /// Continue a download whose first bytes the sink already holds.
    pub resume: Option<Resume>,
}

impl<'a> FetchRequest<'a> {
    pub fn new(url: &'a str) -> Self {
        Self {
            url,
            progress: None,
            resume: None,
        }
    }
    pub fn progress(mut self, p: Arc<Progress>) -> Self {
        self.progress = Some(p);
        self
    }
    pub fn resume(mut self, r: Resume) -> Self {
        self.resume = Some(r);
        self
    }
}

/// Where an earlier, interrupted download stopped (e.g. a partial blob left by a killed
/// process): the hasher already fed with those bytes (`hasher.bytes()` is the offset),
/// and the `ETag` (strong) or `Last-Modified` they came with. Without a validator the
/// partial bytes are not trusted: the download starts over (the sink is reset).
pub struct Resume {
    pub hasher: BodyHasher,
    pub validator: Option<String>,
}

/// What the store remembers about a URL's last download (its `ETag` and `Last-Modified`),
/// for asking the server "only if it changed" ([`HttpClient::fetch_if_changed`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// How one attempt ended well.
enum Attempted {
    Complete,
    /// 304: the resource still matches the caller's validators; no body was sent.
    NotModified,
}

/// The download client. Cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    opts: HttpOptions,
}

/// One download in progress.
struct Transfer<'a> {
    url: &'a str,
    progress: Option<Arc<Progress>>,
    hasher: BodyHasher,
    /// `If-Range` value for resumes (strong ETag, else Last-Modified).
    validator: Option<String>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Length of the whole body, once known.
    total: Option<u64>,
    /// Validators for a conditional first request (If-None-Match / If-Modified-Since).
    conditional: Option<Validators>,
    started: Instant,
    ttfb: Option<Duration>,
    resumed: u32,
    restarts: u32,
}

/// Why one attempt ended early, and whether another may follow.
struct Failure {
    kind: FetchErrorKind,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn fatal(kind: FetchErrorKind) -> Self {
        Self {
            kind,
            retry: false,
            retry_after: None,
        }
    }
    fn transient(kind: FetchErrorKind) -> Self {
        Self {
            kind,
            retry: true,
            retry_after: None,
        }
    }
}

impl HttpClient {
    pub fn new(opts: HttpOptions) -> Result<Self, HttpSetupError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .user_agent(opts.user_agent.clone())
            .default_headers(headers)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HttpSetupError::Client(error_chain(&e)))?;
        Ok(Self { client, opts })
    }

    /// [`HttpOptions::from_env`] then [`HttpClient::new`].
    pub fn from_env() -> Result<Self, HttpSetupError> {
        Self::new(HttpOptions::from_env()?)
    }

    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// Download `url` into `sink`.
    pub async fn fetch<S: BodySink>(
        &self,
        url: &str,
        sink: &mut S,
    ) -> Result<FetchOutcome, FetchError> {
        self.fetch_request(FetchRequest::new(url), sink).await
    }

    /// Download with progress reporting and/or from a resume point.
    pub async fn fetch_request<S: BodySink>(
        &self,
        req: FetchRequest<'_>,
        sink: &mut S,
    ) -> Result<FetchOutcome, FetchError> {
        let out = self.run(req, None, sink).await?;
        Ok(out.expect("only a conditional request can end without a body"))
    }

    /// Download only if the resource no longer matches `known` (the ETag/Last-Modified
    /// of the copy the caller holds): `Ok(None)` when the server answers 304 Not
    /// Modified, in which case the sink saw nothing. Validators that are both absent
    /// make this an ordinary download.
    pub async fn fetch_if_changed<S: BodySink>(
        &self,
        req: FetchRequest<'_>,
        known: &Validators,
        sink: &mut S,
    ) -> Result<Option<FetchOutcome>, FetchError> {
        self.run(req, Some(known.clone()), sink).await
    }

    async fn run<S: BodySink>(
        &self,
        req: FetchRequest<'_>,
        conditional: Option<Validators>,
        sink: &mut S,
    ) -> Result<Option<FetchOutcome>, FetchError> {
        let url = req.url;
        let error = |attempts, kind| FetchError {
            url: url.to_string(),
            attempts,
            kind,
        };
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => {
                let reason = format!("scheme {:?} is not http or https", u.scheme());
                return Err(error(0, FetchErrorKind::InvalidUrl { reason }));
            }
            Err(e) => {
                let reason = e.to_string();
                return Err(error(0, FetchErrorKind::InvalidUrl { reason }));
            }
        }
        let mut t = Transfer {
            url,
            progress: req.progress,
            hasher: BodyHasher::new(),
            validator: None,
            etag: None,
            last_modified: None,
            total: None,
            conditional,
            started: Instant::now(),
            ttfb: None,
            resumed: 0,
            restarts: 0,
        };
        if let Some(r) = req.resume {
            if r.validator.is_some() {
                t.hasher = r.hasher;
                t.validator = r.validator;
            } else if r.hasher.bytes() > 0 {
                // Nothing proves those bytes belong to today's resource: start clean.
                sink.reset()
                    .map_err(|e| error(0, FetchErrorKind::Sink(e)))?;
            }
        }
        t.report();

        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let failure = match self.attempt(&mut t, sink).await {
                Ok(Attempted::Complete) => break,
                Ok(Attempted::NotModified) => return Ok(None),
                Err(f) => f,
            };
            if !failure.retry || attempts > self.opts.retries {
                return Err(error(attempts, failure.kind));
            }
            let delay = match failure.retry_after {
                Some(d) => d.min(self.opts.retry_after_cap),
                None => self.backoff(attempts),
            };
            tokio::time::sleep(delay).await;
        }

        let wall = t.started.elapsed();
        let digest = t.hasher.finish();
        Ok(Some(FetchOutcome {
            md5_hex: digest.md5_hex,
            sha256_hex: digest.sha256_hex,
            bytes: digest.bytes,
            etag: t.etag,
            last_modified: t.last_modified,
            ttfb: t.ttfb.unwrap_or(wall),
            wall,
            attempts,
            resumed: t.resumed,
            restarts: t.restarts,
        }))
    }

    /// Jittered exponential backoff before retry number `n` (1-based).
    fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .opts
            .backoff_base
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(self.opts.backoff_max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// One request: send (with Range when we hold bytes), check the answer, stream the body.
    async fn attempt<S: BodySink>(
        &self,
        t: &mut Transfer<'_>,
        sink: &mut S,
    ) -> Result<Attempted, Failure> {
        let offset = t.hasher.bytes();
        let mut req = self.client.get(t.url);
        if let Some(v) = t.conditional.as_ref().filter(|_| offset == 0) {
            if let Some(etag) = &v.etag {
                req = req.header(IF_NONE_MATCH, etag.as_str());
            }
            if let Some(date) = &v.last_modified {
                req = req.header(IF_MODIFIED_SINCE, date.as_str());
            }
        }
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            if let Some(v) = &t.validator {
                req = req.header(IF_RANGE, v.as_str());
            }
        }
        let head_limit = self.opts.connect_timeout + self.opts.read_timeout;
        let mut resp = match tokio::time::timeout(head_limit, req.send()).await {
            Err(_) => {
                return Err(Failure::transient(FetchErrorKind::Timeout {
                    which: TimeoutKind::ResponseHead,
                    limit: head_limit,
                }))
            }
            Ok(Err(e)) => return Err(self.classify(&e, offset)),
            Ok(Ok(r)) => r,
        };

        let status = resp.status();
        match status {
            StatusCode::OK => {
                if offset > 0 {
                    // Range ignored or If-Range failed: the whole body follows.
                    t.restart(sink)?;
                }
                t.total = resp.content_length();
                t.remember_validators(resp.headers());
            }
            StatusCode::NOT_MODIFIED if offset == 0 && t.conditional.is_some() => {
                return Ok(Attempted::NotModified);
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                // We hold at least the whole body: done if exactly, else start over.
                let total = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().strip_prefix("bytes */"))
                    .and_then(|n| n.parse::<u64>().ok());
                if total == Some(offset) {
                    t.total = total;
                    t.report();
                    return Ok(Attempted::Complete);
                }
                t.restart(sink)?;
                return Err(Failure::transient(FetchErrorKind::Status { status }));
            }
            StatusCode::PARTIAL_CONTENT => {
                if offset == 0 {
                    return Err(Failure::fatal(FetchErrorKind::UnexpectedPartial));
                }
                t.check_content_range(resp.headers(), offset)?;
                if t.etag.is_none() && t.last_modified.is_none() {
                    t.remember_validators(resp.headers());
                }
                t.resumed += 1;
            }
            s if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS =>
            {
                return Err(Failure {
                    kind: FetchErrorKind::Status { status: s },
                    retry: true,
                    retry_after: retry_after(resp.headers()),
                });
            }
            s => return Err(Failure::fatal(FetchErrorKind::Status { status: s })),
        }
        t.report();

        loop {
            let chunk = match tokio::time::timeout(self.opts.read_timeout, resp.chunk()).await {
                Err(_) => {
                    return Err(Failure::transient(FetchErrorKind::Timeout {
                        which: TimeoutKind::IdleRead,
                        limit: self.opts.read_timeout,
                    }))
                }
                Ok(Err(e)) => return Err(self.classify(&e, t.hasher.bytes())),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            t.deliver(chunk, sink).await?;
        }

        match t.total {
            Some(expected) if expected != t.hasher.bytes() => {
                Err(Failure::transient(FetchErrorKind::Truncated {
                    expected,
                    got: t.hasher.bytes(),
                }))
            }
            _ => Ok(Attempted::Complete),
        }
    }

    /// Map a reqwest error to a failure kind; everything but set-up mistakes is transient.
    fn classify(&self, e: &reqwest::Error, received: u64) -> Failure {
        let reason = error_chain(e);
        if e.is_timeout() && e.is_connect() {
            Failure::transient(FetchErrorKind::Timeout {
                which: TimeoutKind::Connect,
                limit: self.opts.connect_timeout,
            })
        } else if e.is_connect() {
            Failure::transient(FetchErrorKind::Connect { reason })
        } else if e.is_builder() || e.is_redirect() {
            Failure::fatal(FetchErrorKind::Request { reason })
        } else {
            Failure::transient(FetchErrorKind::Transfer { received, reason })
        }
    }
}

impl Transfer<'_> {
    /// Forget every byte delivered: the sink, the hashes and the progress start over.
    fn restart<S: BodySink>(&mut self, sink: &mut S) -> Result<(), Failure> {
        sink.reset()
            .map_err(|e| Failure::fatal(FetchErrorKind::Sink(e)))?;
        self.hasher = BodyHasher::new();
        self.restarts += 1;
        self.report();
        Ok(())
    }

    fn report(&self) {
        if let Some(p) = &self.progress {
            p.set_received(self.hasher.bytes());
            if let Some(total) = self.total {
                p.set_total(total);
            }
        }
    }

    async fn deliver<S: BodySink>(&mut self, chunk: Bytes, sink: &mut S) -> Result<(), Failure> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
        self.hasher.update(&chunk);
        sink.chunk(chunk)
            .await
            .map_err(|e| Failure::fatal(FetchErrorKind::Sink(e)))?;
        self.report();
        Ok(())
    }

    fn remember_validators(&mut self, h: &HeaderMap) {
        let get = |name| {
            h.get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        self.etag = get(reqwest::header::ETAG);
        self.last_modified = get(reqwest::header::LAST_MODIFIED);
        // If-Range needs a strong validator (RFC 9110 §13.1.5): a weak ETag cannot be
        // used, a Last-Modified date can.
        self.validator = self
            .etag
            .clone()
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| self.last_modified.clone());
    }

    /// A resume must continue exactly at `offset`, to the end, of the same-length body.
    fn check_content_range(&mut self, h: &HeaderMap, offset: u64) -> Result<(), Failure> {
        let got = h
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let expected = match self.total {
            Some(total) => format!("bytes {offset}-{}/{total}", total.saturating_sub(1)),
            None => format!("bytes {offset}-<last>/<total>"),
        };
        let mismatch = || {
            Failure::fatal(FetchErrorKind::ContentRange {
                expected: expected.clone(),
                got: got.clone(),
            })
        };
        let (start, end, total) = parse_content_range(&got).ok_or_else(mismatch)?;
        if start != offset {
            return Err(mismatch());
        }
        match (self.total, total) {
            (Some(known), Some(t)) if known != t => return Err(mismatch()),
            (_, Some(t)) if end + 1 != t => return Err(mismatch()),
            (None, Some(t)) => self.total = Some(t),
            _ => {}
        }
        Ok(())
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (start, end, total).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = b.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (end >= start).then_some((start, end, total))
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The useful part of an error chain: reqwest's top line repeats the URL (which our
/// message already names), the sources say what happened.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        // hyper-util's "client error (Connect)" wrapper says nothing the next line doesn't.
        let wrapper = msg.starts_with("client error (");
        if !wrapper && !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(
            parse_content_range("bytes 10-19/20"),
            Some((10, 19, Some(20)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        assert_eq!(parse_content_range("bytes */20"), None);
        assert_eq!(parse_content_range("bytes 5-4/20"), None);
    }

    #[test]
    fn env_overrides() {
        let env = |k: &str| match k {
            "VRUN_READ_TIMEOUT" => Some("1.5".to_string()),
            "VRUN_HTTP_RETRIES" => Some("1".to_string()),
            "VRUN_HTTP_BACKOFF" => Some("0".to_string()),
            _ => None,
        };
        let o = HttpOptions::default().with_env_from(env).unwrap();
        assert_eq!(o.read_timeout, Duration::from_millis(1500));
        assert_eq!(o.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(o.retries, 1);
        assert_eq!(o.backoff_base, Duration::ZERO);

        let bad = |k: &str| (k == "VRUN_CONNECT_TIMEOUT").then(|| "-1".to_string());
        let e = HttpOptions::default().with_env_from(bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable VRUN_CONNECT_TIMEOUT=\"-1\": must be a positive number of seconds"
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }
}
