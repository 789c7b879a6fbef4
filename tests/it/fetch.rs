//! The HTTP half of the pipeline against a real loopback server (`testkit::serve`) that
//! injects the faults real networks produce: error statuses, cut connections, stalls,
//! ignored ranges, slow links, proxies.
//!
//! Tests that need process-wide environment (proxy variables, `VRUN_READ_TIMEOUT`) run
//! the `child_*` tests of this same binary in a child process with that environment, so
//! they never race the other tests' clients.

mod pipe;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::Digest;
use testkit::serve::{Fault, Server, ServerOptions};
use vrun::fetch::{
    verify_md5, BodyHasher, BodySink, FetchError, FetchErrorKind, FetchOutcome, FetchRequest,
    HttpClient, HttpOptions, Progress, Resume, SinkError, TimeoutKind,
};

/// A sink that keeps every byte and counts resets.
#[derive(Default)]
struct Collect {
    data: Vec<u8>,
    resets: u32,
    chunks: u32,
}

impl BodySink for Collect {
    fn reset(&mut self) -> Result<(), SinkError> {
        self.data.clear();
        self.resets += 1;
        Ok(())
    }
    async fn chunk(&mut self, data: Bytes) -> Result<(), SinkError> {
        self.data.extend_from_slice(&data);
        self.chunks += 1;
        Ok(())
    }
}

/// Deterministic incompressible-looking bytes (xorshift), so a splice would show.
fn body(len: usize, seed: u64) -> Bytes {
    Bytes::from(testkit::noise(len, seed))
}

/// Small timeouts and near-zero backoff so fault tests stay fast.
fn quick() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        retries: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..HttpOptions::default()
    }
}

fn client(opts: HttpOptions) -> HttpClient {
    HttpClient::new(opts).expect("client")
}

/// One plain fetch of `url` into `sink` by a new client with [`quick`]'s options: the
/// request most of these tests make.
async fn quick_fetch<S: BodySink>(url: &str, sink: &mut S) -> Result<FetchOutcome, FetchError> {
    client(quick()).fetch(url, sink).await
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(md5::Md5::digest(b))
}
fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn serve_one(path: &str, data: Bytes, opts: ServerOptions) -> Server {
    Server::start([(path.to_string(), data)], opts).expect("server")
}

/// Run `child_name` (an ignored test of this binary) with exactly these proxy/VRUN vars.
fn run_child(child_name: &str, env: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        &crate::common::test_name(module_path!(), child_name),
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "VRUN_CONNECT_TIMEOUT",
        "VRUN_READ_TIMEOUT",
        "VRUN_HTTP_RETRIES",
        "VRUN_HTTP_BACKOFF",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {child_name} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {child_name} did not run:\n{text}"
    );
}

#[tokio::test]
async fn plain_download_has_right_bytes_and_digests() {
    let data = body(3 * 1024 * 1024 + 17, 1);
    let server = serve_one("/b.tar.gz", data.clone(), ServerOptions::default());
    let url = server.url("/b.tar.gz");
    let progress = Arc::new(Progress::new());
    let mut sink = Collect::default();
    let out = client(quick())
        .fetch_request(
            FetchRequest::new(&url).progress(progress.clone()),
            &mut sink,
        )
        .await
        .unwrap();

    // Independent digests: coreutils over a file of the served bytes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b");
    std::fs::write(&file, &data).unwrap();
    let sum = |tool: &str| {
        let o = Command::new(tool).arg(&file).output().unwrap();
        String::from_utf8(o.stdout).unwrap()[..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(out.md5_hex, sum("md5sum"));
    assert_eq!(out.sha256_hex, sum("sha256sum"));
    assert_eq!(out.bytes, data.len() as u64);
    assert!(
        sink.data == data,
        "delivered bytes differ from served bytes"
    );
    assert_eq!(
        (out.attempts, out.resumed, out.restarts, sink.resets),
        (1, 0, 0, 0)
    );
    assert!(out.etag.is_some() && out.last_modified.is_some());
    assert!(out.ttfb <= out.wall);
    assert_eq!(progress.received(), data.len() as u64);
    assert_eq!(progress.total(), Some(data.len() as u64));

    let reqs = server.requests("/b.tar.gz");
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_eq!(
        r.header("user-agent"),
        Some(concat!("vrun/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(r.range, None);
}

#[tokio::test]
async fn final_statuses_fail_at_once_naming_url_and_status() {
    let server = serve_one("/b.tar.gz", body(1000, 2), ServerOptions::default());
    let url = server.url("/missing.tar.gz");
    let err = quick_fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), format!("GET {url}: 404 Not Found"));
    assert_eq!(err.attempts, 1);
    assert_eq!(server.request_count("/missing.tar.gz"), 1);

    for status in [403u16, 410, 400] {
        server.set_fault("/b.tar.gz", Fault::new().fail(1, status));
        let before = server.request_count("/b.tar.gz");
        let url = server.url("/b.tar.gz");
        let err = quick_fetch(&url, &mut Collect::default())
            .await
            .unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(status), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("GET {url}: {status} ")));
        assert_eq!(
            server.request_count("/b.tar.gz") - before,
            1,
            "{status} retried"
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let data = body(200_000, 3);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().fail(2, 500));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert_eq!(out.attempts, 3);
    let statuses: Vec<u16> = server.requests("/b.tgz").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert!(sink.data == data);
    assert_eq!(out.md5_hex, md5_hex(&data));

    // Budget exhausted: 4 requests (1 + 3 retries), then the error says so.
    server.set_fault("/b.tgz", Fault::new().fail(10, 503));
    let before = server.request_count("/b.tgz");
    let url = server.url("/b.tgz");
    let err = quick_fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("GET {url}: 503 Service Unavailable (gave up after 4 attempts)")
    );
    assert_eq!(server.request_count("/b.tgz") - before, 4);

    // 408 is transient too.
    server.set_fault("/b.tgz", Fault::new().fail(1, 408));
    let out = quick_fetch(&url, &mut Collect::default()).await.unwrap();
    assert_eq!(out.attempts, 2);
}

#[tokio::test]
async fn dropped_connection_resumes_with_range_and_if_range() {
    const CUT: u64 = 300_000;
    let data = body(1_000_000, 4);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().drop_after(CUT, 1));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert!(sink.data == data, "resumed body differs");
    assert_eq!(
        (out.sha256_hex.as_str(), out.bytes),
        (sha256_hex(&data).as_str(), 1_000_000)
    );
    assert_eq!(
        (out.attempts, out.resumed, out.restarts, sink.resets),
        (2, 1, 0, 0)
    );

    let reqs = server.requests("/b.tgz");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=300000-"));
    assert_eq!(reqs[1].if_range, out.etag, "If-Range must carry the ETag");
    assert_eq!(reqs[1].status, 206);
}

#[tokio::test]
async fn resume_uses_last_modified_when_there_is_no_etag() {
    let data = body(500_000, 5);
    let opts = ServerOptions {
        etag: false,
        ..ServerOptions::default()
    };
    let server = serve_one("/b.tgz", data.clone(), opts);
    server.set_fault("/b.tgz", Fault::new().drop_after(123_457, 1));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert!(sink.data == data);
    let reqs = server.requests("/b.tgz");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=123457-"));
    assert!(out.last_modified.is_some());
    assert_eq!(reqs[1].if_range, out.last_modified);
}

#[tokio::test]
async fn chunked_body_cut_is_detected_and_resumed() {
    let data = body(700_000, 6);
    let opts = ServerOptions {
        content_length: false,
        ..ServerOptions::default()
    };
    let server = serve_one("/b.tgz", data.clone(), opts);
    server.set_fault("/b.tgz", Fault::new().drop_after(250_000, 1));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert!(sink.data == data);
    assert_eq!(out.resumed, 1);
    assert_eq!(
        server.requests("/b.tgz")[1].range.as_deref(),
        Some("bytes=250000-")
    );
}

#[tokio::test]
async fn ignored_range_restarts_the_sink_cleanly() {
    let data = body(800_000, 7);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().drop_after(400_000, 1).ignore_range());
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert_eq!(sink.resets, 1);
    assert!(sink.data == data, "restarted body differs");
    assert_eq!(out.md5_hex, md5_hex(&data));
    assert_eq!(out.bytes, data.len() as u64);
    assert_eq!((out.attempts, out.resumed, out.restarts), (2, 0, 1));
    let reqs = server.requests("/b.tgz");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=400000-"));
    assert_eq!(reqs[1].status, 200);
}

#[tokio::test]
async fn changed_resource_fails_if_range_and_restarts() {
    // A partial download of version 1, resumed after the server moved to version 2:
    // If-Range no longer matches, the server sends all of v2, the sink starts over.
    let v1 = body(400_000, 8);
    let v2 = body(450_000, 9);
    let server = serve_one("/b.tgz", v1.clone(), ServerOptions::default());
    let url = server.url("/b.tgz");
    let first = quick_fetch(&url, &mut Collect::default()).await.unwrap();
    server.insert("/b.tgz", v2.clone()).unwrap();

    let mut sink = Collect {
        data: v1[..100_000].to_vec(),
        ..Collect::default()
    };
    let mut hasher = BodyHasher::new();
    hasher.update(&v1[..100_000]);
    let resume = Resume {
        hasher,
        validator: first.etag.clone(),
    };
    let out = client(quick())
        .fetch_request(FetchRequest::new(&url).resume(resume), &mut sink)
        .await
        .unwrap();
    assert!(sink.data == v2);
    assert_eq!((sink.resets, out.restarts), (1, 1));
    assert_eq!(out.sha256_hex, sha256_hex(&v2));
    let last = server.requests("/b.tgz").pop().unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=100000-"));
    assert_eq!(last.if_range, first.etag);
}

#[tokio::test]
async fn resume_from_a_partial_blob_sends_only_the_rest() {
    let data = body(600_000, 10);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    let url = server.url("/b.tgz");
    let etag = quick_fetch(&url, &mut Collect::default())
        .await
        .unwrap()
        .etag;
    let sent_before = server.bytes_sent("/b.tgz");

    let held = 250_000;
    let mut sink = Collect {
        data: data[..held].to_vec(),
        ..Collect::default()
    };
    let hasher = BodyHasher::new().hash_reader(&data[..held]).unwrap();
    let resume = Resume {
        hasher,
        validator: etag,
    };
    let out = client(quick())
        .fetch_request(FetchRequest::new(&url).resume(resume), &mut sink)
        .await
        .unwrap();
    assert!(sink.data == data);
    assert_eq!((out.resumed, out.restarts, out.bytes), (1, 0, 600_000));
    assert_eq!(out.md5_hex, md5_hex(&data));
    assert_eq!(
        server.bytes_sent("/b.tgz") - sent_before,
        (data.len() - held) as u64
    );
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let data = body(10_000, 11);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().fail(1, 429).retry_after("1"));
    let started = Instant::now();
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    // The test backoff is 10-50 ms; only Retry-After explains a full second.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After ignored"
    );
    assert_eq!(out.attempts, 2);
    assert!(sink.data == data);

    // A Retry-After beyond the cap is cut to the cap.
    server.set_fault("/b.tgz", Fault::new().fail(1, 503).retry_after("3600"));
    let opts = HttpOptions {
        retry_after_cap: Duration::from_millis(100),
        ..quick()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        client(opts).fetch(&server.url("/b.tgz"), &mut Collect::default()),
    )
    .await
    .expect("Retry-After not capped")
    .unwrap();
    assert_eq!(out.attempts, 2);
}

#[tokio::test]
async fn connection_refused_names_url_after_retries() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/b.tar.gz");
    let opts = HttpOptions {
        retries: 2,
        ..quick()
    };
    let err = client(opts)
        .fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err.kind, FetchErrorKind::Connect { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("GET {url}: cannot connect: ")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(msg.ends_with("(gave up after 3 attempts)"), "{msg}");
    eprintln!("{msg}");
}

#[tokio::test]
async fn bad_urls_are_refused_before_any_request() {
    let err = quick_fetch("ftp://h/b.tgz", &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "GET ftp://h/b.tgz: invalid url: scheme \"ftp\" is not http or https"
    );
}

#[tokio::test]
async fn stall_beyond_idle_timeout_without_progress_fails_after_retries() {
    let data = body(100_000, 12);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    // Every response stalls before its first body byte: no attempt makes progress.
    server.set_fault(
        "/b.tgz",
        Fault::new().stall_after(0, Duration::from_secs(30), 100),
    );
    let opts = HttpOptions {
        read_timeout: Duration::from_secs(1),
        retries: 1,
        ..quick()
    };
    let url = server.url("/b.tgz");
    let mut sink = Collect::default();
    let err = client(opts).fetch(&url, &mut sink).await.unwrap_err();
    assert!(
        matches!(
            err.kind,
            FetchErrorKind::Timeout {
                which: TimeoutKind::IdleRead,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("GET {url}: idle read timeout of 1s exceeded (gave up after 2 attempts)")
    );
    assert_eq!(server.requests("/b.tgz").len(), 2);
    assert!(sink.data.is_empty());
}

#[tokio::test]
async fn stalls_after_progress_do_not_spend_the_retry_budget() {
    // Issue 14 point 4: each attempt gets 10 000 new bytes, then stalls; with one retry
    // allowed, the old client gave up after 20 000 bytes. Progress resets the budget.
    let data = body(100_000, 12);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault(
        "/b.tgz",
        Fault::new().stall_after(10_000, Duration::from_secs(30), 100),
    );
    let opts = HttpOptions {
        read_timeout: Duration::from_millis(300),
        retries: 1,
        ..quick()
    };
    let mut sink = Collect::default();
    let out = client(opts)
        .fetch(&server.url("/b.tgz"), &mut sink)
        .await
        .unwrap();
    assert_eq!(out.attempts, 10);
    assert_eq!(out.resumed, 9);
    let reqs = server.requests("/b.tgz");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=10000-"));
    assert!(sink.data == data);
}

#[tokio::test]
async fn a_short_stall_within_the_idle_timeout_is_fine() {
    let data = body(100_000, 13);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault(
        "/b.tgz",
        Fault::new().stall_after(50_000, Duration::from_millis(300), 1),
    );
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert_eq!(out.attempts, 1);
    assert!(sink.data == data);
}

#[test]
fn env_timeouts_apply() {
    let data = body(50_000, 14);
    let server = serve_one("/b.tgz", data, ServerOptions::default());
    server.set_fault(
        "/b.tgz",
        Fault::new().stall_after(0, Duration::from_secs(30), 100),
    );
    run_child(
        "child_env_stall",
        &[
            ("VRUN_TEST_URL", &server.url("/b.tgz")),
            ("VRUN_READ_TIMEOUT", "0.5"),
            ("VRUN_HTTP_RETRIES", "1"),
            ("VRUN_HTTP_BACKOFF", "0.01"),
        ],
    );
    assert_eq!(server.request_count("/b.tgz"), 2);
}

#[tokio::test]
#[ignore = "run by env_timeouts_apply in a child process"]
async fn child_env_stall() {
    let url = std::env::var("VRUN_TEST_URL").unwrap();
    let http = HttpClient::from_env().unwrap();
    assert_eq!(http.options().read_timeout, Duration::from_millis(500));
    let err = http.fetch(&url, &mut Collect::default()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("GET {url}: idle read timeout of 0.5s exceeded (gave up after 2 attempts)")
    );
}

#[test]
fn http_proxy_is_used_and_no_proxy_bypasses_it() {
    let origin_body = body(40_000, 15);
    let proxy_body = body(40_000, 16);
    let origin = serve_one("/b.tgz", origin_body.clone(), ServerOptions::default());
    // The "proxy" serves absolute-form targets by their path, with different bytes.
    let proxy = serve_one("/b.tgz", proxy_body.clone(), ServerOptions::default());
    let url = origin.url("/b.tgz");

    run_child(
        "child_fetch_expecting",
        &[
            ("VRUN_TEST_URL", &url),
            ("VRUN_TEST_SHA256", &sha256_hex(&proxy_body)),
            ("HTTP_PROXY", &proxy.base_url()),
        ],
    );
    assert_eq!(origin.request_count("/b.tgz"), 0);
    let via = proxy.requests("/b.tgz");
    assert_eq!(via.len(), 1);
    assert!(via[0].proxied, "not sent as a proxy request: {:?}", via[0]);
    assert_eq!(via[0].target, url);

    for no_proxy in ["127.0.0.1", "localhost,127.0.0.1"] {
        run_child(
            "child_fetch_expecting",
            &[
                ("VRUN_TEST_URL", &url),
                ("VRUN_TEST_SHA256", &sha256_hex(&origin_body)),
                ("HTTP_PROXY", &proxy.base_url()),
                ("NO_PROXY", no_proxy),
            ],
        );
    }
    assert_eq!(origin.request_count("/b.tgz"), 2);
    assert_eq!(proxy.request_count("/b.tgz"), 1);
}

#[tokio::test]
#[ignore = "run by http_proxy_is_used_and_no_proxy_bypasses_it in a child process"]
async fn child_fetch_expecting() {
    let url = std::env::var("VRUN_TEST_URL").unwrap();
    let want = std::env::var("VRUN_TEST_SHA256").unwrap();
    let out = quick_fetch(&url, &mut Collect::default()).await.unwrap();
    assert_eq!(out.sha256_hex, want);
}

/// A sink that holds the first chunk until the server stops making progress, then
/// records how far ahead of it the server got and aborts the download.
struct Stalled<'a> {
    server: &'a Server,
    path: &'a str,
    received: u64,
    seen: Option<(u64, u64)>,
}

impl BodySink for Stalled<'_> {
    fn reset(&mut self) -> Result<(), SinkError> {
        Err(SinkError::new("unexpected reset"))
    }
    async fn chunk(&mut self, data: Bytes) -> Result<(), SinkError> {
        self.received += data.len() as u64;
        let mut last = u64::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.server.bytes_sent(self.path);
            if now == last {
                break;
            }
            last = now;
        }
        self.seen = Some((last, self.received));
        Err(SinkError::new("sink saw enough"))
    }
}

#[tokio::test]
async fn a_slow_sink_stops_the_network_instead_of_filling_memory() {
    const TOTAL: usize = 128 * 1024 * 1024;
    let server = serve_one(
        "/big.tgz",
        Bytes::from(vec![7u8; TOTAL]),
        ServerOptions::default(),
    );
    let mut sink = Stalled {
        server: &server,
        path: "/big.tgz",
        received: 0,
        seen: None,
    };
    let err = quick_fetch(&server.url("/big.tgz"), &mut sink)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, FetchErrorKind::Sink(_)), "{err}");
    assert_eq!(err.attempts, 1, "a sink failure must not be retried");
    let (sent, received) = sink.seen.unwrap();
    eprintln!("server sent {sent} bytes while the sink had taken {received}");
    // What the server pushed beyond what the sink took sits in kernel socket buffers
    // and hyper's read buffer: bounded by those, not by the body size.
    assert!(
        sent - received <= 48 * 1024 * 1024 && sent < TOTAL as u64,
        "fetch read ahead {} of {TOTAL} bytes while the sink was blocked",
        sent - received
    );
    assert_eq!(server.request_count("/big.tgz"), 1);
}

#[test]
fn md5_mismatch_message_is_exact() {
    let e = verify_md5("http://h/b.tgz", "0123", "abcd").unwrap_err();
    assert_eq!(
        e.to_string(),
        "md5 mismatch for http://h/b.tgz: expected 0123, got abcd"
    );
}

#[test]
fn server_answers_head_ranges_and_unsatisfiable_ranges() {
    use std::io::{Read, Write};
    let server = serve_one(
        "/x",
        Bytes::from_static(b"0123456789"),
        ServerOptions::default(),
    );
    let raw = |req: &str| {
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let head = raw("HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Length: 10\r\n") && head.ends_with("\r\n\r\n"));
    let part = raw("GET /x HTTP/1.1\r\nRange: bytes=4-6\r\nConnection: close\r\n\r\n");
    assert!(
        part.starts_with("HTTP/1.1 206 Partial Content\r\n"),
        "{part}"
    );
    assert!(part.contains("Content-Range: bytes 4-6/10\r\n") && part.ends_with("\r\n\r\n456"));
    let stale =
        raw("GET /x HTTP/1.1\r\nRange: bytes=4-\r\nIf-Range: \"old\"\r\nConnection: close\r\n\r\n");
    assert!(stale.starts_with("HTTP/1.1 200 OK\r\n") && stale.ends_with("0123456789"));
    let past = raw("GET /x HTTP/1.1\r\nRange: bytes=10-\r\nConnection: close\r\n\r\n");
    assert!(past.starts_with("HTTP/1.1 416 ") && past.contains("Content-Range: bytes */10\r\n"));
    let none = raw("GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(none.starts_with("HTTP/1.1 404 Not Found\r\n"));
}

#[tokio::test]
async fn throttled_server_still_delivers_exactly() {
    let data = body(64 * 1024, 17);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().throttle(256 * 1024));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    assert!(sink.data == data);
    // The last of 64 KiB at 256 KiB/s leaves the server 0.2 s after the first.
    assert!(out.wall >= Duration::from_millis(200));
}

#[tokio::test]
async fn serves_files_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let data = body(1_234_567, 18);
    std::fs::write(&path, &data).unwrap();
    let server = Server::start([("/f.tgz", path)], ServerOptions::default()).unwrap();
    server.set_fault("/f.tgz", Fault::new().drop_after(777_777, 1));
    let mut sink = Collect::default();
    let out = quick_fetch(&server.url("/f.tgz"), &mut sink).await.unwrap();
    assert!(sink.data == data);
    assert_eq!(out.resumed, 1);
}

/// Loopback throughput of a 256 MiB body through the whole client (hashes included) into
/// a sink that drops the bytes. A figure, not a test: run it in release,
/// `cargo test --release --test it -- --ignored --nocapture fetch::loopback_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly in release"]
async fn loopback_throughput() {
    struct Discard(u64);
    impl BodySink for Discard {
        fn reset(&mut self) -> Result<(), SinkError> {
            self.0 = 0;
            Ok(())
        }
        async fn chunk(&mut self, data: Bytes) -> Result<(), SinkError> {
            self.0 += data.len() as u64;
            Ok(())
        }
    }
    /// CPU seconds of this process (client and server threads): robust on a busy box.
    fn cpu_s() -> f64 {
        // SAFETY: getrusage only fills the struct we pass.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut ru);
            ru
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    fn report(what: &str, wall: Duration, cpu: f64) {
        let mb = TOTAL as f64 / 1e6;
        let wall = wall.as_secs_f64();
        eprintln!(
            "{what}: {mb:.0} MB in {wall:.3} s = {:.0} MB/s, {cpu:.2} CPU s",
            mb / wall
        );
    }
    const TOTAL: usize = 256 * 1024 * 1024;
    let data = body(TOTAL, 19);
    let server = serve_one("/big.tgz", data.clone(), ServerOptions::default());
    let url = server.url("/big.tgz");
    let http = client(HttpOptions::default());
    for round in 0..3 {
        let mut sink = Discard(0);
        let cpu = cpu_s();
        let out = http.fetch(&url, &mut sink).await.unwrap();
        assert_eq!(sink.0, TOTAL as u64);
        report(
            &format!("vrun fetch (md5+sha256, server included), round {round}"),
            out.wall,
            cpu_s() - cpu,
        );
    }

    // The same transfer without our layer (no hashes, no timeouts): reqwest alone.
    let raw = reqwest::Client::new();
    let (t, cpu) = (Instant::now(), cpu_s());
    let mut resp = raw.get(&url).send().await.unwrap();
    let mut n = 0u64;
    while let Some(c) = resp.chunk().await.unwrap() {
        n += c.len() as u64;
    }
    assert_eq!(n, TOTAL as u64);
    report(
        "reqwest alone (server included)",
        t.elapsed(),
        cpu_s() - cpu,
    );

    let (t, cpu) = (Instant::now(), cpu_s());
    let mut h = BodyHasher::new();
    for c in data.chunks(128 * 1024) {
        h.update(c);
    }
    assert_eq!(h.finish().bytes, TOTAL as u64);
    report("md5+sha256 alone, one thread", t.elapsed(), cpu_s() - cpu);
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_response_head_timeout() {
    let server = serve_one("/b.tgz", body(1000, 20), ServerOptions::default());
    server.set_fault(
        "/b.tgz",
        Fault::new().delay_head(Duration::from_secs(30), 10),
    );
    let opts = HttpOptions {
        connect_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(500),
        retries: 0,
        ..quick()
    };
    let url = server.url("/b.tgz");
    let err = client(opts)
        .fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("GET {url}: response head (connect + idle read) timeout of 0.8s exceeded")
    );
    assert_eq!(server.request_count("/b.tgz"), 1);
}

/// A listener whose accept queue is full: further SYNs are dropped, so connecting hangs
/// exactly as with a blackholed host. Returns the listener (closing it on drop), the
/// fillers keeping the queue full, and the address.
fn full_backlog_listener() -> (
    std::net::TcpListener,
    Vec<std::net::TcpStream>,
    std::net::SocketAddr,
) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a fresh fd that we own and hand to TcpListener.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        std::net::TcpListener::from_raw_fd(fd)
    };
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (listener, fillers, addr),
        }
    }
    panic!("accept queue never filled up");
}

#[tokio::test]
async fn a_host_that_does_not_accept_hits_the_connect_timeout() {
    let (_listener, _fillers, addr) = full_backlog_listener();
    let url = format!("http://{addr}/b.tgz");
    let opts = HttpOptions {
        connect_timeout: Duration::from_millis(300),
        retries: 1,
        ..quick()
    };
    let err = client(opts)
        .fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("GET {url}: connect timeout of 0.3s exceeded (gave up after 2 attempts)")
    );
}

#[tokio::test]
async fn fetch_runs_on_a_spawned_task() {
    // The lead runs build and image downloads as concurrent tasks: the future must be Send.
    let data = body(100_000, 21);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    let url = server.url("/b.tgz");
    let http = client(quick());
    let task = tokio::spawn(async move {
        let mut sink = Collect::default();
        let out = http.fetch(&url, &mut sink).await.map(|o| o.bytes);
        (out, sink)
    });
    let (out, sink) = task.await.unwrap();
    assert_eq!(out.unwrap(), data.len() as u64);
    assert!(sink.data == data);
}

#[tokio::test]
async fn a_resume_that_does_not_continue_where_we_stopped_is_refused() {
    let data = body(1_000_000, 22);
    let server = serve_one("/b.tgz", data, ServerOptions::default());
    server.set_fault(
        "/b.tgz",
        Fault::new().drop_after(300_000, 1).shift_range(10),
    );
    let url = server.url("/b.tgz");
    let err = quick_fetch(&url, &mut Collect::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "GET {url}: resume answered Content-Range \"bytes 300010-999999/1000000\", \
             expected \"bytes 300000-999999/1000000\" (gave up after 2 attempts)"
        )
    );
    assert_eq!(
        server.request_count("/b.tgz"),
        2,
        "a bad Content-Range is not retried"
    );
}

/// Read a pipe to the end on a plain thread, starting over on each restart.
fn drain_pipe(
    mut r: pipe::PipeReader,
) -> std::thread::JoinHandle<(Vec<u8>, u32, std::io::Result<()>)> {
    use std::io::Read;
    std::thread::spawn(move || {
        let (mut got, mut restarts) = (Vec::new(), 0);
        let mut buf = vec![0u8; 10_000];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return (got, restarts, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if pipe::is_restart(&e) => {
                    got.clear();
                    restarts += 1;
                }
                Err(e) => return (got, restarts, Err(e)),
            }
        }
    })
}

#[tokio::test]
async fn pipe_carries_the_body_and_its_restart_to_a_blocking_reader() {
    let data = body(2_000_000, 23);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    server.set_fault("/b.tgz", Fault::new().drop_after(900_000, 1).ignore_range());
    let (mut sink, reader) = pipe::body_pipe(4);
    let consumer = drain_pipe(reader);
    let out = quick_fetch(&server.url("/b.tgz"), &mut sink).await.unwrap();
    sink.finish().await.unwrap();
    let (got, restarts, end) = consumer.join().unwrap();
    end.unwrap();
    assert_eq!((restarts, out.restarts), (1, 1));
    assert!(got == data);
}

#[tokio::test]
async fn pipe_reader_sees_a_failed_download_as_an_error_not_eof() {
    let server = serve_one("/b.tgz", body(10, 24), ServerOptions::default());
    let (mut sink, reader) = pipe::body_pipe(4);
    let consumer = drain_pipe(reader);
    quick_fetch(&server.url("/nope.tgz"), &mut sink)
        .await
        .unwrap_err();
    drop(sink);
    let (_, _, end) = consumer.join().unwrap();
    assert_eq!(end.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn pipe_consumer_that_stops_fails_the_fetch_without_retry() {
    let server = serve_one("/b.tgz", body(4_000_000, 25), ServerOptions::default());
    let (mut sink, reader) = pipe::body_pipe(2);
    drop(reader);
    let url = server.url("/b.tgz");
    let err = client(quick()).fetch(&url, &mut sink).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("GET {url}: the body's consumer stopped reading")
    );
    assert_eq!(server.request_count("/b.tgz"), 1);
}

#[tokio::test]
async fn the_consumer_has_the_first_bytes_while_the_server_still_holds_the_rest() {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    const HELD: u64 = 600_000;
    let data = body(1_000_000, 26);
    let server = Server::empty(ServerOptions::default()).unwrap();
    server.insert("/b.tgz", data.clone()).unwrap();
    server.set_fault("/b.tgz", Fault::new().gate_after(HELD));
    let (mut sink, mut reader) = pipe::body_pipe(4);
    let seen = Arc::new(AtomicU64::new(0));
    let seen_by_reader = Arc::clone(&seen);
    let consumer = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            seen_by_reader.store(got.len() as u64, Ordering::SeqCst);
        }
    });
    let http = client(quick());
    let url = server.url("/b.tgz");
    let download = tokio::spawn(async move {
        let out = http.fetch(&url, &mut sink).await;
        sink.finish().await.unwrap();
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.load(Ordering::SeqCst) < HELD {
        assert!(
            Instant::now() < deadline,
            "consumer never got the first bytes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.load(Ordering::SeqCst), HELD);
    assert_eq!(server.bytes_sent("/b.tgz"), HELD);
    assert!(!download.is_finished());
    server.open_gate("/b.tgz");
    let out = download.await.unwrap().unwrap();
    assert_eq!(out.attempts, 1);
    assert!(consumer.join().unwrap() == data);
}

#[tokio::test]
async fn resuming_a_complete_or_oversized_partial() {
    let data = body(300_000, 27);
    let server = serve_one("/b.tgz", data.clone(), ServerOptions::default());
    let url = server.url("/b.tgz");
    let etag = quick_fetch(&url, &mut Collect::default())
        .await
        .unwrap()
        .etag;

    // Everything is already here: the server says 416 */300000 and we are done.
    let mut sink = Collect {
        data: data.to_vec(),
        ..Collect::default()
    };
    let resume = Resume {
        hasher: BodyHasher::new().hash_reader(&data[..]).unwrap(),
        validator: etag.clone(),
    };
    let out = client(quick())
        .fetch_request(FetchRequest::new(&url).resume(resume), &mut sink)
        .await
        .unwrap();
    assert_eq!((out.bytes, out.restarts, sink.resets), (300_000, 0, 0));
    assert_eq!(out.md5_hex, md5_hex(&data));
    assert_eq!(server.requests("/b.tgz").last().unwrap().status, 416);

    // More than the body: those bytes cannot be this resource; start over.
    let mut junk = data.to_vec();
    junk.extend_from_slice(b"trailing");
    let mut sink = Collect {
        data: junk.clone(),
        ..Collect::default()
    };
    let resume = Resume {
        hasher: BodyHasher::new().hash_reader(&junk[..]).unwrap(),
        validator: etag,
    };
    let out = client(quick())
        .fetch_request(FetchRequest::new(&url).resume(resume), &mut sink)
        .await
        .unwrap();
    assert!(sink.data == data);
    assert_eq!((out.restarts, sink.resets, out.attempts), (1, 1, 2));
    assert_eq!(out.sha256_hex, sha256_hex(&data));
}
