//! The HTTP client: reqwest over rustls, with our own retry, resume, timeouts and
//! low-speed rule.
//!
//! reqwest is used for what it does well (connection pooling, TLS, proxies from
//! `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`, redirects) and nothing else: no transparent
//! decompression (the `gzip` feature is off and we send `Accept-Encoding: identity`,
//! because the md5 in proc.yaml is of the file and the decoder stage picks the format by
//! magic), no overall timeout by default, and no built-in read timeout (reqwest's counts
//! from the start of the request). Retry and resume live here because they must
//! cooperate with the sink: a resumed 206 is appended, a 200 restarts the sink.
//!
//! # Never hang silently
//!
//! Every wait on the network runs under a ticker ([`HttpClient::wait_net`]) that enforces,
//! besides the per-step timeouts (connect, response head, idle body):
//! - the **low-speed rule** (curl's `--speed-limit`/`--speed-time`): fewer than
//!   [`HttpOptions::speed_limit`] bytes/s over the last [`HttpOptions::speed_time`] is a
//!   stall, fatal. An idle timer alone never fires on a server sending a byte every two
//!   seconds. The window is measured in *network time*: time spent connecting, waiting
//!   for a head or for body bytes, across attempts — not time the sink held us back (a
//!   slow disk is not a slow server) nor backoff sleeps (our own choice). Because the
//!   window spans attempts, reconnecting to a trickling server cannot escape it.
//! - an optional **overall deadline** ([`HttpOptions::deadline`], `VRUN_DEADLINE`).
//! - **notices**: a wait longer than [`HttpOptions::notice_after`] is reported once on
//!   the caller's notice channel (setup prints it on stderr, tty or not) naming the URL
//!   and what we wait for, so a deploy that waits says why.
//!
//! # Retries count progress
//!
//! [`HttpOptions::retries`] bounds attempts *in a row that delivered no new byte*. A
//! connection cut after every megabyte by a proxy that caps connection lifetime resumes
//! as often as it takes, at once; a server that fails without sending anything gets the
//! usual jittered backoff and gives up after the budget. Time without progress is bounded
//! by the low-speed rule.
//!
//! # Resume never splices two versions
//!
//! A resume sends `Range` with `If-Range` (strong ETag, else Last-Modified), so a changed
//! resource answers 200 and the sink restarts. Without a validator nothing proves the
//! rest belongs to the same version: the download restarts from byte 0, unless the caller
//! says an md5 will check the whole ([`FetchRequest::whole_checked`]); then a resume is
//! sent and [`FetchOutcome::unvalidated_resumes`] tells the caller that a mismatch may be
//! a splice worth one clean retry.
//!
//! # TLS
//!
//! rustls with the *system* trust store (`rustls-native-certs`: `/etc/ssl/certs`, or
//! exactly the certificates in `SSL_CERT_FILE`/`SSL_CERT_DIR` when set), like curl and
//! every OpenSSL tool on the host, so a private CA is added the way operators add it
//! everywhere else; a bundled Mozilla list would also keep trusting CAs the host's admin
//! removed. A certificate error is never retried and is told in one line naming the
//! cause and the trust store in use.
//!
//! # Messages that point at the right culprit
//!
//! A connect error through a proxy names the proxy and the variable it came from
//! (`hyper_util`'s matcher, the one reqwest itself uses, tells which proxy a URL goes
//! through). A refused redirect says where to and why (more than [`MAX_REDIRECTS`],
//! https to plain http, a scheme other than http/https). A body with a
//! `Content-Encoding` although we asked for identity is decoded when it is gzip (the
//! md5 is then checked against the decoded and the wire bytes, see
//! [`FetchOutcome::wire_md5_hex`]) and refused by name otherwise. URLs in messages have
//! their userinfo replaced by `***` ([`super::redact_url`]).

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use md5::Digest as _;
use rand::Rng;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, IF_RANGE, LOCATION, RANGE,
};
use reqwest::StatusCode;

use super::error::{secs, FetchError, FetchErrorKind, TimeoutKind};
use super::{redact_url, BodySink, FetchOutcome, Progress};
use vrun_cache::BodyHasher;

/// Connection set-up limit: a healthy server connects in milliseconds; ten
/// seconds covers a congested link without hanging a deploy on a dead host.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence tolerated while reading the body (per chunk, not overall).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts in a row without a new byte tolerated after the first.
pub const DEFAULT_RETRIES: u32 = 3;
/// First backoff; doubled per fruitless retry and jittered to [½, 1]× so parallel setups
/// that failed together do not retry together.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Largest backoff between two attempts.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Longest `Retry-After` honoured; a server asking for more gets retried after this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);
/// Low-speed rule: below this many bytes/s over [`DEFAULT_SPEED_TIME`] is a stall. 1 KiB/s
/// would take 12 days for a 1 GB image: no deploy wants to wait on that, and any link
/// that works at all is far above it.
pub const DEFAULT_SPEED_LIMIT: u64 = 1024;
/// Window of the low-speed rule. A minute rides out a congested moment or a proxy
/// filling its cache for a moment; a server that accepts and never answers fails in one
/// minute instead of 2.7 (four response-head timeouts plus backoff).
pub const DEFAULT_SPEED_TIME: Duration = Duration::from_secs(60);
/// A wait longer than this is reported on the notice channel (once per wait).
pub const DEFAULT_NOTICE_AFTER: Duration = Duration::from_secs(5);
/// Redirects followed at most (what browsers and curl's `--max-redirs` commonly use).
pub const MAX_REDIRECTS: usize = 10;
/// How often a network wait wakes to check the deadline, the low-speed rule and notices.
const TICK: Duration = Duration::from_millis(100);

/// Environment overrides (seconds, fractional allowed), mainly for tests and demos.
const ENV_CONNECT_TIMEOUT: &str = "VRUN_CONNECT_TIMEOUT";
const ENV_READ_TIMEOUT: &str = "VRUN_READ_TIMEOUT";
const ENV_RETRIES: &str = "VRUN_HTTP_RETRIES";
const ENV_BACKOFF: &str = "VRUN_HTTP_BACKOFF";
const ENV_SPEED_LIMIT: &str = "VRUN_SPEED_LIMIT";
const ENV_SPEED_TIME: &str = "VRUN_SPEED_TIME";
const ENV_DEADLINE: &str = "VRUN_DEADLINE";
const ENV_NOTICE_AFTER: &str = "VRUN_NOTICE_AFTER";

/// Where notices (long waits, retries) go: setup prints them on stderr.
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

/// Tunables of the client: `Default` is the constants above; [`HttpOptions::from_env`] adds the
/// `VRUN_*` overrides.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Idle limit per body chunk. The response head gets connect + read.
    pub read_timeout: Duration,
    /// Attempts in a row without a new byte allowed after the first.
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_after_cap: Duration,
    pub user_agent: String,
    /// Low-speed rule: bytes/s (0 turns the rule off) ...
    pub speed_limit: u64,
    /// ... over this much network time.
    pub speed_time: Duration,
    /// Overall limit of one download, retries and backoff included. None: no limit.
    pub deadline: Option<Duration>,
    /// Report a wait once it lasts this long.
    pub notice_after: Duration,
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
            speed_limit: DEFAULT_SPEED_LIMIT,
            speed_time: DEFAULT_SPEED_TIME,
            deadline: None,
            notice_after: DEFAULT_NOTICE_AFTER,
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
    /// Defaults plus, when set: `VRUN_CONNECT_TIMEOUT`, `VRUN_READ_TIMEOUT`,
    /// `VRUN_HTTP_BACKOFF`, `VRUN_SPEED_TIME`, `VRUN_DEADLINE`, `VRUN_NOTICE_AFTER`
    /// (seconds, e.g. `0.5`), `VRUN_HTTP_RETRIES` (a count) and `VRUN_SPEED_LIMIT`
    /// (bytes per second, 0 = off).
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
        let count = |var: &'static str, reason| -> Result<Option<u64>, HttpSetupError> {
            get(var)
                .map(|value| {
                    value.trim().parse().map_err(|_| HttpSetupError::Env {
                        var,
                        value: value.clone(),
                        reason,
                    })
                })
                .transpose()
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
        if let Some(d) = secs(ENV_SPEED_TIME, false)? {
            self.speed_time = d;
        }
        if let Some(d) = secs(ENV_DEADLINE, false)? {
            self.deadline = Some(d);
        }
        if let Some(d) = secs(ENV_NOTICE_AFTER, false)? {
            self.notice_after = d;
        }
        if let Some(n) = count(ENV_RETRIES, "not a retry count")? {
            self.retries = n.min(u32::MAX as u64) as u32;
        }
        if let Some(n) = count(ENV_SPEED_LIMIT, "not a number of bytes per second")? {
            self.speed_limit = n;
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
    /// The caller will check the whole body against an md5: a resume without a
    /// validator may then be sent (see the module note).
    pub whole_checked: bool,
}

impl<'a> FetchRequest<'a> {
    pub fn new(url: &'a str) -> Self {
        Self {
            url,
            progress: None,
            resume: None,
            whole_checked: false,
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
    pub fn whole_checked(mut self, yes: bool) -> Self {
        self.whole_checked = yes;
        self
    }
}

/// Where an earlier, interrupted download stopped (e.g. a partial blob left by a killed
/// process): the hasher already fed with those bytes (`hasher.bytes()` is the offset),
/// and the `ETag` (strong) or `Last-Modified` they came with. Without a validator the
/// partial bytes are trusted only when the request is `whole_checked`; otherwise the
/// download starts over (the sink is reset).
pub struct Resume {
    pub hasher: BodyHasher,
    pub validator: Option<String>,
}

/// The `ETag` and `Last-Modified` a 200 came with, handed to the sink at `begin` (the
/// store keeps them with a partial download, so a later process can resume it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// How one attempt ended well.
enum Attempted {
    Complete,
}

/// The download client. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    opts: HttpOptions,
    notify: Option<Notify>,
    proxies: Arc<hyper_util::client::proxy::matcher::Matcher>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Network-time accounting of one download for the low-speed rule: wall time minus the
/// time the sink held us back and minus backoff sleeps, and samples of the bytes received
/// (over all attempts) at moments of that clock.
struct Pace {
    started: Instant,
    paused: Duration,
    /// (network time, bytes received so far), oldest first, one per twentieth of the window.
    samples: VecDeque<(Duration, u64)>,
    received: u64,
    slow_noticed: bool,
}

impl Pace {
    fn new() -> Self {
        Pace {
            started: Instant::now(),
            paused: Duration::ZERO,
            samples: VecDeque::from([(Duration::ZERO, 0)]),
            received: 0,
            slow_noticed: false,
        }
    }
    fn now(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.paused)
    }
    fn pause_for(&mut self, d: Duration) {
        self.paused += d;
    }
    /// Record the clock and the count; drop samples the window no longer needs.
    fn sample(&mut self, window: Duration) {
        let now = self.now();
        let step = window / 20;
        if self.samples.back().is_none_or(|&(t, _)| now >= t + step) {
            self.samples.push_back((now, self.received));
        }
        while self.samples.len() > 2 && self.samples[1].0 + window <= now {
            self.samples.pop_front();
        }
    }
    /// Bytes over the last `window` and the span actually covered (< window early on).
    fn recent(&self) -> (u64, Duration) {
        let (t0, b0) = self.samples[0];
        (self.received - b0, self.now().saturating_sub(t0))
    }
}

/// One download in progress.
struct Transfer<'a> {
    url: &'a str,
    /// The URL as messages show it (userinfo redacted).
    shown: String,
    progress: Option<Arc<Progress>>,
    hasher: BodyHasher,
    /// `If-Range` value for resumes (strong ETag, else Last-Modified).
    validator: Option<String>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Length of the whole body (as sent on the wire), once known.
    total: Option<u64>,
    /// Wire bytes of the current response.
    wire: u64,
    whole_checked: bool,
    /// Undoing a `Content-Encoding: gzip` the server applied, with the md5 of the wire
    /// bytes beside it.
    decoding: Option<(flate2::write::MultiGzDecoder<Vec<u8>>, md5::Md5)>,
    wire_md5: Option<String>,
    started: Instant,
    ttfb: Option<Duration>,
    resumed: u32,
    unvalidated_resumes: u32,
    restarts: u32,
    /// The furthest body offset ever delivered: progress is passing it.
    high_water: u64,
    pace: Pace,
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

/// What a network wait is for (notices and timeouts differ).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Head,
    Body,
}

/// Why a redirect was not followed (shown as the reqwest error's source).
#[derive(Debug, thiserror::Error)]
#[error("redirect to {to} refused: {why}")]
struct RedirectRefused {
    to: String,
    why: String,
}

fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let to = redact_url(attempt.url().as_str());
        let why = match attempt.url().scheme() {
            _ if attempt.previous().len() > MAX_REDIRECTS => {
                Some(format!("more than {MAX_REDIRECTS} redirects"))
            }
            "http" | "https" => None,
            other => Some(format!("scheme {other:?} is not http or https")),
        };
        let downgrade = attempt.url().scheme() == "http"
            && attempt
                .previous()
                .last()
                .is_some_and(|u| u.scheme() == "https");
        let why =
            why.or_else(|| downgrade.then(|| "it would leave https for plain http".to_string()));
        match why {
            Some(why) => attempt.error(RedirectRefused { to, why }),
            None => attempt.follow(),
        }
    })
}

impl HttpClient {
    pub fn new(opts: HttpOptions) -> Result<Self, HttpSetupError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .user_agent(opts.user_agent.clone())
            .default_headers(headers)
            .redirect(redirect_policy())
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HttpSetupError::Client(error_chain(&e)))?;
        Ok(Self {
            client,
            opts,
            notify: None,
            proxies: Arc::new(hyper_util::client::proxy::matcher::Matcher::from_system()),
        })
    }

    /// [`HttpOptions::from_env`] then [`HttpClient::new`].
    pub fn from_env() -> Result<Self, HttpSetupError> {
        Self::new(HttpOptions::from_env()?)
    }

    /// Send notices (long waits, retries after a long transfer) to `notify`.
    pub fn with_notices(mut self, notify: Notify) -> Self {
        self.notify = Some(notify);
        self
    }

    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// Send a notice (a wait the user should know about) to the notice channel.
    pub fn notice(&self, text: &str) {
        if let Some(n) = &self.notify {
            n(text);
        }
    }

    /// The proxy `url` goes through (redacted) and the variable that named it.
    fn proxy_for(&self, url: &str) -> Option<(String, &'static str)> {
        let uri: http::Uri = url.parse().ok()?;
        let hit = self.proxies.intercept(&uri)?;
        let https = uri.scheme_str() == Some("https");
        let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
        let var = match https {
            true if set("HTTPS_PROXY") => "HTTPS_PROXY",
            true if set("https_proxy") => "https_proxy",
            false if set("HTTP_PROXY") => "HTTP_PROXY",
            false if set("http_proxy") => "http_proxy",
            _ if set("ALL_PROXY") => "ALL_PROXY",
            _ => "all_proxy",
        };
        Some((redact_url(&hit.uri().to_string()), var))
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
        self.run(req, sink).await
    }

    async fn run<S: BodySink>(
        &self,
        req: FetchRequest<'_>,
        sink: &mut S,
    ) -> Result<FetchOutcome, FetchError> {
        let url = req.url;
        let shown = redact_url(url);
        let error = |attempts, kind| FetchError {
            url: shown.clone(),
            attempts,
            kind,
        };
        check_url(url)?;
        let mut t = Transfer {
            url,
            shown: shown.clone(),
            progress: req.progress,
            hasher: BodyHasher::new(),
            validator: None,
            etag: None,
            last_modified: None,
            total: None,
            wire: 0,
            whole_checked: req.whole_checked,
            decoding: None,
            wire_md5: None,
            started: Instant::now(),
            ttfb: None,
            resumed: 0,
            unvalidated_resumes: 0,
            restarts: 0,
            high_water: 0,
            pace: Pace::new(),
        };
        if let Some(r) = req.resume {
            if r.validator.is_some() || req.whole_checked {
                t.hasher = r.hasher;
                t.validator = r.validator;
                t.high_water = t.hasher.bytes();
            } else if r.hasher.bytes() > 0 {
                // Nothing proves those bytes belong to today's resource: start clean.
                sink.reset()
                    .map_err(|e| error(0, FetchErrorKind::Sink(e)))?;
            }
        }
        t.report();

        let mut attempts = 0u32;
        let mut fruitless = 0u32;
        loop {
            attempts += 1;
            let before = t.high_water;
            let failure = match self.attempt(&mut t, sink).await {
                Ok(Attempted::Complete) => break,
                Err(f) => f,
            };
            let progressed = t.high_water > before;
            if progressed {
                fruitless = 0;
            } else {
                fruitless += 1;
            }
            if !failure.retry || fruitless > self.opts.retries {
                return Err(error(attempts, failure.kind));
            }
            let delay = match failure.retry_after {
                Some(d) => d.min(self.opts.retry_after_cap),
                None if progressed => Duration::ZERO,
                None => self.backoff(fruitless),
            };
            if let Some(limit) = self.opts.deadline {
                if t.started.elapsed() + delay >= limit {
                    return Err(error(
                        attempts,
                        FetchErrorKind::Timeout {
                            which: TimeoutKind::Deadline,
                            limit,
                        },
                    ));
                }
            }
            if t.started.elapsed() >= self.opts.notice_after || delay >= self.opts.notice_after {
                let why = FetchError {
                    url: shown.clone(),
                    attempts: 1,
                    kind: failure.kind,
                };
                self.notice(&format!(
                    "{}; {} (attempt {})",
                    crate::errors::chain(&why),
                    if delay.is_zero() {
                        "resuming at once".to_string()
                    } else {
                        format!("retrying in {}", secs(round_ms(delay)))
                    },
                    attempts + 1
                ));
            }
            tokio::time::sleep(delay).await;
            t.pace.pause_for(delay);
        }

        let wall = t.started.elapsed();
        let digest = t.hasher.finish();
        Ok(FetchOutcome {
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
            unvalidated_resumes: t.unvalidated_resumes,
            wire_md5_hex: t.wire_md5,
        })
    }

    /// Jittered exponential backoff before retry number `n` (1-based).
    fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .opts
            .backoff_base
            .saturating_mul(1u32 << (n.max(1) - 1).min(16))
            .min(self.opts.backoff_max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Await `fut` (a response head or the next body chunk) under the step's timeout, the
    /// low-speed rule, the deadline, and a notice once the wait is long.
    async fn wait_net<F: std::future::Future>(
        &self,
        t: &mut Transfer<'_>,
        fut: F,
        waiting: Waiting,
    ) -> Result<F::Output, Failure> {
        let (which, limit) = match waiting {
            Waiting::Head => (
                TimeoutKind::ResponseHead,
                self.opts.connect_timeout + self.opts.read_timeout,
            ),
            Waiting::Body => (TimeoutKind::IdleRead, self.opts.read_timeout),
        };
        let began = Instant::now();
        let mut noticed = false;
        tokio::pin!(fut);
        loop {
            let out = tokio::select! {
                biased;
                out = &mut fut => Some(out),
                _ = tokio::time::sleep(TICK) => None,
            };
            self.check_pace(t)?;
            if let Some(out) = out {
                return Ok(out);
            }
            let waited = began.elapsed();
            if waited >= limit {
                return Err(Failure::transient(FetchErrorKind::Timeout { which, limit }));
            }
            if !noticed && waited >= self.opts.notice_after {
                noticed = true;
                let so_far = secs(Duration::from_secs(waited.as_secs()));
                let text = match waiting {
                    Waiting::Head => {
                        let via = self
                            .proxy_for(t.url)
                            .map(|(p, _)| format!(" through the proxy {p}"))
                            .unwrap_or_default();
                        format!(
                            "waiting for {} to answer{via} ({so_far} so far; gives up after {})",
                            t.shown,
                            secs(limit)
                        )
                    }
                    Waiting::Body => format!(
                        "no data from {} for {so_far} ({} bytes received; gives up after {} of silence)",
                        t.shown,
                        t.hasher.bytes(),
                        secs(limit)
                    ),
                };
                self.notice(&text);
            }
        }
    }

    /// The low-speed rule and the deadline, checked on every tick and chunk.
    fn check_pace(&self, t: &mut Transfer<'_>) -> Result<(), Failure> {
        if let Some(limit) = self.opts.deadline {
            if t.started.elapsed() >= limit {
                return Err(Failure::fatal(FetchErrorKind::Timeout {
                    which: TimeoutKind::Deadline,
                    limit,
                }));
            }
        }
        let window = self.opts.speed_time;
        let floor = self.opts.speed_limit;
        if floor == 0 {
            return Ok(());
        }
        t.pace.sample(window);
        let (bytes, span) = t.pace.recent();
        let rate_ok = |span: Duration| bytes as f64 >= floor as f64 * span.as_secs_f64();
        if span >= window && !rate_ok(window) {
            return Err(Failure::fatal(FetchErrorKind::TooSlow {
                bytes,
                window,
                limit: floor,
            }));
        }
        // Bytes trickle in (the idle timer keeps being reset): say so once.
        if !t.pace.slow_noticed && bytes > 0 && span >= self.opts.notice_after && !rate_ok(span) {
            t.pace.slow_noticed = true;
            self.notice(&format!(
                "{} is sending {:.0} B/s, below the low-speed limit of {floor} B/s; gives up if that lasts {}",
                t.shown,
                bytes as f64 / span.as_secs_f64(),
                secs(window)
            ));
        }
        Ok(())
    }

    /// One request: send (with Range when we hold bytes), check the answer, stream the body.
    async fn attempt<S: BodySink>(
        &self,
        t: &mut Transfer<'_>,
        sink: &mut S,
    ) -> Result<Attempted, Failure> {
        // Resume only what can be proved to continue the same version (module note).
        if t.hasher.bytes() > 0
            && (t.decoding.is_some() || (t.validator.is_none() && !t.whole_checked))
        {
            t.restart(sink)?;
        }
        t.decoding = None;
        t.wire = 0;
        let offset = t.hasher.bytes();
        let mut req = self.client.get(t.url);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            match &t.validator {
                Some(v) => req = req.header(IF_RANGE, v.as_str()),
                None => t.unvalidated_resumes += 1,
            }
        }
        let mut resp = match self.wait_net(t, req.send(), Waiting::Head).await? {
            Err(e) => return Err(self.classify(&e, t)),
            Ok(r) => r,
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
                t.start_decoding(resp.headers())?;
                let v = Validators {
                    etag: t.etag.clone(),
                    last_modified: t.last_modified.clone(),
                };
                sink.begin(&v)
                    .map_err(|e| Failure::fatal(FetchErrorKind::Sink(e)))?;
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
                if let Some(enc) = content_encoding(resp.headers()) {
                    return Err(Failure::fatal(FetchErrorKind::Encoding { encoding: enc }));
                }
                t.check_content_range(resp.headers(), offset)?;
                if t.etag.is_none() && t.last_modified.is_none() {
                    t.remember_validators(resp.headers());
                }
                t.resumed += 1;
                t.wire = offset;
            }
            s if s.is_redirection() => {
                let location = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(redact_url);
                return Err(Failure::fatal(FetchErrorKind::Redirect {
                    status: s,
                    location,
                }));
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
            let chunk = match self.wait_net(t, resp.chunk(), Waiting::Body).await? {
                Err(e) => return Err(self.classify(&e, t)),
                Ok(None) => break,
                Ok(Some(c)) => c,
            };
            t.deliver(chunk, sink).await?;
        }

        match t.total {
            Some(expected) if expected != t.wire => {
                Err(Failure::transient(FetchErrorKind::Truncated {
                    expected,
                    got: t.wire,
                }))
            }
            _ => {
                t.finish_decoding(sink).await?;
                Ok(Attempted::Complete)
            }
        }
    }

    /// Map a reqwest error to a failure kind; everything but set-up mistakes, refused
    /// redirects and certificate errors is transient.
    fn classify(&self, e: &reqwest::Error, t: &Transfer<'_>) -> Failure {
        let received = t.hasher.bytes();
        if let Some(tls) = find_rustls_error(e) {
            let certificate = matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_)
            );
            let kind = FetchErrorKind::Tls {
                reason: describe_tls(tls, t.url),
            };
            return if certificate {
                Failure::fatal(kind)
            } else {
                Failure::transient(kind)
            };
        }
        let reason = error_chain(e);
        if e.is_timeout() && e.is_connect() {
            Failure::transient(FetchErrorKind::Timeout {
                which: TimeoutKind::Connect,
                limit: self.opts.connect_timeout,
            })
        } else if e.is_connect() {
            match self.proxy_for(t.url) {
                Some((proxy, var)) => {
                    Failure::transient(FetchErrorKind::ProxyConnect { proxy, var, reason })
                }
                None => Failure::transient(FetchErrorKind::Connect { reason }),
            }
        } else if e.is_builder() || e.is_redirect() {
            Failure::fatal(FetchErrorKind::Request { reason })
        } else {
            Failure::transient(FetchErrorKind::Transfer { received, reason })
        }
    }
}

/// `Duration` rounded to milliseconds, for messages.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// A `Content-Encoding` other than identity, lowercased.
fn content_encoding(h: &HeaderMap) -> Option<String> {
    let v = h
        .get(CONTENT_ENCODING)?
        .to_str()
        .ok()?
        .trim()
        .to_ascii_lowercase();
    (!v.is_empty() && v != "identity").then_some(v)
}

/// The rustls error somewhere in a reqwest error chain (io::Error hides its inner error
/// from `source()`, so look inside those too).
fn find_rustls_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = find_rustls_error(inner) {
                    return Some(r);
                }
            }
        }
        cur = err.source();
    }
    None
}

/// Which certificates are trusted, for a certificate error message.
fn trust_store() -> String {
    let file = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty());
    let dir = std::env::var_os("SSL_CERT_DIR").filter(|v| !v.is_empty());
    match (file, dir) {
        (None, None) => "trusting the system store /etc/ssl/certs; set SSL_CERT_FILE to a private CA's certificate".into(),
        (Some(f), None) => format!("trusting only SSL_CERT_FILE={}", f.to_string_lossy()),
        (None, Some(d)) => format!("trusting only SSL_CERT_DIR={}", d.to_string_lossy()),
        (Some(f), Some(d)) => format!(
            "trusting only SSL_CERT_FILE={} and SSL_CERT_DIR={}",
            f.to_string_lossy(),
            d.to_string_lossy()
        ),
    }
}

/// One readable line for a TLS failure.
fn describe_tls(e: &rustls::Error, url: &str) -> String {
    use rustls::CertificateError as C;
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let cause = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "it is signed by an unknown certificate authority".to_string(),
            C::Expired | C::ExpiredContext { .. } => "it has expired".to_string(),
            C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".to_string(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("it is not valid for the name {host}")
            }
            C::Revoked => "it has been revoked".to_string(),
            C::BadSignature => "its signature does not verify".to_string(),
            C::BadEncoding => "it cannot be parsed".to_string(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "it is not meant for a TLS server".to_string()
            }
            C::Other(other) => {
                let text = other.to_string();
                if text.contains("CaUsedAsEndEntity") {
                    "the server presents a CA certificate as its own (a CA cannot be a server's end-entity certificate)".to_string()
                } else if text.contains("EndEntityUsedAsCa") {
                    "the chain uses a server certificate as a CA".to_string()
                } else {
                    text
                }
            }
            other => format!("{other:?}"),
        },
        other => return format!("TLS handshake with {host} failed: {other}"),
    };
    format!(
        "TLS certificate of {host} rejected: {cause} ({})",
        trust_store()
    )
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
            if let Some(total) = self.total.filter(|_| self.decoding.is_none()) {
                p.set_total(total);
            }
        }
    }

    /// A 200 with `Content-Encoding`: decode gzip, refuse the rest.
    fn start_decoding(&mut self, h: &HeaderMap) -> Result<(), Failure> {
        match content_encoding(h).as_deref() {
            None => Ok(()),
            Some("gzip" | "x-gzip") => {
                self.decoding = Some((
                    flate2::write::MultiGzDecoder::new(Vec::new()),
                    md5::Md5::new(),
                ));
                Ok(())
            }
            Some(other) => Err(Failure::fatal(FetchErrorKind::Encoding {
                encoding: other.to_string(),
            })),
        }
    }

    async fn finish_decoding<S: BodySink>(&mut self, sink: &mut S) -> Result<(), Failure> {
        let Some((mut dec, md5)) = self.decoding.take() else {
            return Ok(());
        };
        let bad = |e: std::io::Error| {
            Failure::fatal(FetchErrorKind::Transfer {
                received: 0,
                reason: format!("the body's Content-Encoding: gzip does not decode: {e}"),
            })
        };
        dec.try_finish().map_err(bad)?;
        let rest = std::mem::take(dec.get_mut());
        self.wire_md5 = Some(hex::encode(md5.finalize()));
        self.pass_on(Bytes::from(rest), sink).await
    }

    async fn deliver<S: BodySink>(&mut self, chunk: Bytes, sink: &mut S) -> Result<(), Failure> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
        self.wire += chunk.len() as u64;
        self.pace.received += chunk.len() as u64;
        let data = match &mut self.decoding {
            None => chunk,
            Some((dec, md5)) => {
                md5.update(&chunk);
                dec.write_all(&chunk).map_err(|e| {
                    Failure::fatal(FetchErrorKind::Transfer {
                        received: 0,
                        reason: format!("the body's Content-Encoding: gzip does not decode: {e}"),
                    })
                })?;
                Bytes::from(std::mem::take(dec.get_mut()))
            }
        };
        self.pass_on(data, sink).await
    }

    /// Hash and hand one piece to the sink; the sink's time is not network time.
    async fn pass_on<S: BodySink>(&mut self, data: Bytes, sink: &mut S) -> Result<(), Failure> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(&data);
        let held = Instant::now();
        sink.chunk(data)
            .await
            .map_err(|e| Failure::fatal(FetchErrorKind::Sink(e)))?;
        self.pace.pause_for(held.elapsed());
        self.high_water = self.high_water.max(self.hasher.bytes());
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

/// Refuse a URL vrun will not fetch (unparsable, or not `http`/`https`), as the error a
/// fetch of it would return: the one check, used before any I/O (setup checks every URL
/// before it creates anything) and again when the request is sent.
pub fn check_url(url: &str) -> Result<(), FetchError> {
    let reason = match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => return Ok(()),
        Ok(u) => format!("scheme {:?} is not http or https", u.scheme()),
        Err(e) => e.to_string(),
    };
    Err(FetchError {
        url: redact_url(url),
        attempts: 0,
        kind: FetchErrorKind::InvalidUrl { reason },
    })
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
