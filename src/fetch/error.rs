//! Errors of the HTTP half of the pipeline.
//!
//! Every error names the URL (one struct, [`FetchError`], carries it once for all
//! kinds), says how many attempts were made when there was more than one, and for
//! each kind gives the concrete value an operator needs: the status line, which
//! timeout and its value, the expected and actual `Content-Range`.

use std::time::Duration;

use reqwest::StatusCode;

use super::SinkError;

/// A download that failed, after whatever retries its kind allowed.
///
/// Its message is `GET <url>: <kind>`; the kind is part of what failed at this level, not
/// a cause, so [`FetchError::source`] is the kind's own source (a sink's error's cause),
/// like `#[error(transparent)]` one level down.
#[derive(Debug)]
pub struct FetchError {
    pub url: String,
    /// Requests sent for this download (1 when the failure was not retried).
    pub attempts: u32,
    pub kind: FetchErrorKind,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum FetchErrorKind {
    /// `StatusCode` displays as `404 Not Found`.
    #[error("{status}")]
    Status { status: StatusCode },
    #[error("cannot connect: {reason}")]
    Connect { reason: String },
    /// The proxy chosen from the environment could not be reached (not the server).
    #[error("cannot connect to the proxy {proxy} (from {var}): {reason}")]
    ProxyConnect {
        proxy: String,
        var: &'static str,
        reason: String,
    },
    /// The low-speed rule: fewer than `limit` bytes/s over the last `window` of network
    /// time (what curl's `--speed-limit`/`--speed-time` do). Never retried: the window
    /// spans attempts, so another attempt would only repeat it.
    #[error(
        "too slow: {bytes} bytes in the last {}, below the low-speed limit of {limit} B/s (VRUN_SPEED_LIMIT, VRUN_SPEED_TIME)",
        secs(*window)
    )]
    TooSlow {
        bytes: u64,
        window: Duration,
        limit: u64,
    },
    /// A TLS failure; certificate errors are never retried.
    #[error("{reason}")]
    Tls { reason: String },
    /// A redirect reqwest handed back instead of following (no usable `Location`).
    #[error("{status} {}", match location {
        Some(l) => format!("redirect to {l} was not followed (not an http or https URL)"),
        None => "redirect without a Location header".to_string(),
    })]
    Redirect {
        status: StatusCode,
        location: Option<String>,
    },
    /// A `Content-Encoding` vrun cannot undo (it asks for `identity`).
    #[error("the server applied Content-Encoding: {encoding} although vrun asked for identity; vrun decodes only gzip: serve the file as it is")]
    Encoding { encoding: String },
    #[error("{which} timeout of {} exceeded", secs(*limit))]
    Timeout { which: TimeoutKind, limit: Duration },
    /// The connection broke (reset, closed early, protocol error) after `received`
    /// bytes of the whole body had been delivered.
    #[error("transfer broken after {received} bytes: {reason}")]
    Transfer { received: u64, reason: String },
    /// The body ended cleanly but short of the announced length.
    #[error("body ended after {got} bytes, expected {expected}")]
    Truncated { expected: u64, got: u64 },
    /// A resume answer whose `Content-Range` does not continue where we stopped.
    #[error("resume answered Content-Range {got:?}, expected {expected:?}")]
    ContentRange { expected: String, got: String },
    #[error("206 Partial Content to a request without Range")]
    UnexpectedPartial,
    #[error("invalid url: {reason}")]
    InvalidUrl { reason: String },
    #[error("{reason}")]
    Request { reason: String },
    /// The consumer of the body (blob file, decoder) failed; never retried.
    #[error(transparent)]
    Sink(SinkError),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GET {}: {}{}",
            self.url,
            self.kind,
            attempts_note(self.attempts)
        )
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// Which of the two timeouts fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// TCP (and TLS) connection set-up.
    Connect,
    /// Connect plus waiting for the response head.
    ResponseHead,
    /// No body bytes for this long (per chunk, not for the whole body).
    IdleRead,
    /// The optional overall limit of one download, retries included (`VRUN_DEADLINE`).
    Deadline,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::Connect => "connect",
            TimeoutKind::ResponseHead => "response head (connect + idle read)",
            TimeoutKind::IdleRead => "idle read",
            TimeoutKind::Deadline => "overall deadline (VRUN_DEADLINE)",
        })
    }
}

impl FetchError {
    /// The HTTP status, when the server answered with an error status.
    pub fn status(&self) -> Option<StatusCode> {
        match self.kind {
            FetchErrorKind::Status { status } => Some(status),
            _ => None,
        }
    }
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" (gave up after {attempts} attempts)")
    } else {
        String::new()
    }
}

/// `30s`, `1.5s`, `0.25s`.
pub(crate) fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = FetchError {
            url: "http://h/b.tar.gz".into(),
            attempts: 1,
            kind: FetchErrorKind::Status {
                status: StatusCode::NOT_FOUND,
            },
        };
        assert_eq!(e.to_string(), "GET http://h/b.tar.gz: 404 Not Found");
        let e = FetchError {
            url: "http://h/b".into(),
            attempts: 4,
            kind: FetchErrorKind::Timeout {
                which: TimeoutKind::IdleRead,
                limit: Duration::from_millis(1500),
            },
        };
        assert_eq!(
            e.to_string(),
            "GET http://h/b: idle read timeout of 1.5s exceeded (gave up after 4 attempts)"
        );
        assert_eq!(secs(Duration::from_secs(30)), "30s");
        assert_eq!(secs(Duration::from_millis(250)), "0.25s");
    }
}
