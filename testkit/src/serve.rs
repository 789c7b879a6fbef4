//! A small loopback HTTP/1.1 file server with fault injection, for tests and benches.
//!
//! NOT a production server. It exists because every claim vrun makes about downloads
//! (resume, retries, timeouts, streaming, exactly one GET per build) has to be shown
//! against a real socket, and the interesting cases are the ones a well-behaved server
//! never produces: a 500 that goes away, a connection cut half-way, a stall longer
//! than the idle timeout, a server that ignores `Range`, a slow link. So the server
//! takes a map of path → body and, per path, a [`Fault`] plan, and it logs every
//! request (method, target, `Range`, `If-Range`, all headers) so a test can assert
//! what the client actually sent.
//!
//! Why hand-written HTTP/1.1 on std threads rather than a framework: it is a few
//! hundred lines, needs no framework, runs without a tokio runtime (the deploy bench and the
//! LXC tests drive `vrun setup` as a child process while this serves), and every
//! byte on the wire is under the test's control, which is the whole point of fault
//! injection. One thread accepts; each connection gets a thread (keep-alive is
//! supported, since reqwest pools connections). Dropping the [`Server`] shuts every
//! socket down and joins every thread, so a test never leaks a listener.
//!
//! Served: `GET` and `HEAD`; `Content-Length` (or chunked framing when
//! [`ServerOptions::content_length`] is off); `ETag` and `Last-Modified` (each
//! switchable); `Range: bytes=N-` / `bytes=N-M` with `If-Range` (strong ETag or
//! exact Last-Modified), answering 206 with `Content-Range`, or 416 past the end;
//! conditional GETs (`If-None-Match`, `If-Modified-Since` → 304).
//!
//! Faults ([`Fault`], per path): fail the first N requests with a status (plus
//! `Retry-After`), delay the response head, cut the connection after K body bytes,
//! stall for D after K bytes, hold the body at K bytes until [`Server::open_gate`],
//! ignore `Range`, serve a range other than the one asked for, throttle to R bytes/s.
//! Also: trickle K bytes per pause, never answer, cut every connection after K bytes,
//! replace the body with a new version after N bodies (with or without validators, per
//! [`ServerOptions`]), redirect, label bodies with a `Content-Encoding`, and serve HTTPS
//! ([`ServerOptions::tls_from_pem`], rustls with the ring provider reqwest already uses).
//! A request-target in absolute form (`GET http://host/path`) is served by its path
//! and logged with [`RequestRecord::proxied`] set, so the same server can stand in
//! for an HTTP proxy in proxy tests.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Largest request head accepted; requests from our own client are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Body bytes written per `write` call: large enough to saturate loopback (a 256 MB body
/// goes out in ~1000 writes), small enough that drop/stall points land exactly.
const WRITE_PIECE: usize = 256 * 1024;

/// How often blocked sleeps (stall, throttle) look at the stop flag, so Drop is prompt.
const STOP_POLL: Duration = Duration::from_millis(20);

/// What a path serves: bytes in memory, or a file read on each request.
#[derive(Clone, Debug)]
pub enum Body {
    Bytes(Bytes),
    File(PathBuf),
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::Bytes(b)
    }
}
impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body::Bytes(Bytes::from(v))
    }
}
impl From<&'static [u8]> for Body {
    fn from(v: &'static [u8]) -> Self {
        Body::Bytes(Bytes::from_static(v))
    }
}
impl From<&'static str> for Body {
    fn from(v: &'static str) -> Self {
        Body::Bytes(Bytes::from_static(v.as_bytes()))
    }
}
impl From<PathBuf> for Body {
    fn from(p: PathBuf) -> Self {
        Body::File(p)
    }
}

/// Server-wide behaviour. `Default` is a well-behaved server: lengths, validators, ranges.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Send an `ETag` (a strong validator that changes whenever a path's body is replaced).
    pub etag: bool,
    /// Send `Last-Modified` (unique per body version, one-second resolution).
    pub last_modified: bool,
    /// Send `Content-Length`; when false, bodies use chunked transfer encoding.
    pub content_length: bool,
    /// Honour `Range`; when false every GET answers 200 with the whole body.
    pub ranges: bool,
    /// Serve HTTPS with this configuration ([`ServerOptions::tls_from_pem`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServerOptions {
    /// Serve HTTPS with a PEM certificate chain (server first) and its PEM private key.
    pub fn tls_from_pem(mut self, chain_pem: &[u8], key_pem: &[u8]) -> io::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: rustls::pki_types::pem::Error| io::Error::other(e.to_string());
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(bad)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| io::Error::other(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.tls = Some(Arc::new(config));
        Ok(self)
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            etag: true,
            last_modified: true,
            content_length: true,
            ranges: true,
            tls: None,
        }
    }
}

/// Fault plan for one path. Counters are per path: "the first N requests" counts every
/// request to that path; "the first M bodies" counts only responses that send a body
/// (so `fail(2, 500)` and `drop_after(k, 1)` compose: 500, 500, cut, then whole).
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// Answer the first `fail_first` requests with `fail_status` instead of the body.
    pub fail_first: u32,
    pub fail_status: u16,
    /// `Retry-After` value sent with the failures (seconds or an HTTP date).
    pub retry_after: Option<String>,
    /// Close the connection after this many body bytes, for the first `drop_bodies` bodies.
    pub drop_after: Option<u64>,
    pub drop_bodies: u32,
    /// Stop sending for `stall_for` after this many body bytes, for the first `stall_bodies`.
    pub stall_after: Option<u64>,
    pub stall_for: Duration,
    pub stall_bodies: u32,
    /// Answer 200 with the whole body even when a `Range` was asked for.
    pub ignore_range: bool,
    /// Send at most this many body bytes per second.
    pub throttle: Option<u64>,
    /// Wait this long before sending the response head, for the first `delay_head_first`
    /// requests (a server that accepts but does not answer; time-to-first-byte).
    pub delay_head: Duration,
    pub delay_head_first: u32,
    /// Serve ranges this many bytes later than asked (a broken server or cache), with a
    /// truthful `Content-Range` for what is actually sent.
    pub shift_range: u64,
    /// Hold every body at this many bytes until [`Server::open_gate`] is called for the
    /// path (deterministic "the download is not finished yet" for streaming tests).
    pub gate_after: Option<u64>,
    /// Send the body this many bytes at a time with this pause between pieces (a server
    /// whose every byte resets an idle timer).
    pub trickle: Option<(u64, Duration)>,
    /// Once this many bodies were sent, replace the path's body with this one (a new
    /// version appears between two requests; new validators when the server sends them).
    pub replace_after: Option<(u32, Body)>,
    /// Answer every request with this redirect status and `Location`.
    pub redirect: Option<(u16, String)>,
    /// Send this `Content-Encoding` header with bodies (the body is served as stored).
    pub content_encoding: Option<String>,
}

impl Fault {
    pub fn new() -> Self {
        Self::default()
    }
    /// Fail the first `n` requests with `status`.
    pub fn fail(mut self, n: u32, status: u16) -> Self {
        self.fail_first = n;
        self.fail_status = status;
        self
    }
    /// Send `Retry-After: value` with the failures.
    pub fn retry_after(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }
    /// Cut the connection after `bytes` body bytes for the first `bodies` bodies.
    pub fn drop_after(mut self, bytes: u64, bodies: u32) -> Self {
        self.drop_after = Some(bytes);
        self.drop_bodies = bodies;
        self
    }
    /// Pause `duration` after `bytes` body bytes for the first `bodies` bodies.
    pub fn stall_after(mut self, bytes: u64, duration: Duration, bodies: u32) -> Self {
        self.stall_after = Some(bytes);
        self.stall_for = duration;
        self.stall_bodies = bodies;
        self
    }
    /// Ignore `Range` headers (always 200 with the whole body).
    pub fn ignore_range(mut self) -> Self {
        self.ignore_range = true;
        self
    }
    /// Wait `duration` before answering the first `n` requests.
    pub fn delay_head(mut self, duration: Duration, n: u32) -> Self {
        self.delay_head = duration;
        self.delay_head_first = n;
        self
    }
    /// Hold bodies after `bytes` until [`Server::open_gate`].
    pub fn gate_after(mut self, bytes: u64) -> Self {
        self.gate_after = Some(bytes);
        self
    }
    /// Answer `Range: bytes=N-` with bytes from `N + by`.
    pub fn shift_range(mut self, by: u64) -> Self {
        self.shift_range = by;
        self
    }
    /// Limit the body to `bytes_per_sec`.
    pub fn throttle(mut self, bytes_per_sec: u64) -> Self {
        self.throttle = Some(bytes_per_sec.max(1));
        self
    }
    /// Send `bytes` body bytes, then pause `every`, and so on.
    pub fn trickle(mut self, bytes: u64, every: Duration) -> Self {
        self.trickle = Some((bytes.max(1), every));
        self
    }
    /// Accept the connection and never answer (a wedged server or proxy).
    pub fn never_answer(self) -> Self {
        self.delay_head(Duration::from_secs(24 * 3600), u32::MAX)
    }
    /// Cut every connection after `bytes` body bytes (a proxy capping connection length).
    pub fn cut_every(self, bytes: u64) -> Self {
        self.drop_after(bytes, u32::MAX)
    }
    /// After `bodies` bodies, serve `body` instead (a new version of the file).
    pub fn replace_after(mut self, bodies: u32, body: impl Into<Body>) -> Self {
        self.replace_after = Some((bodies, body.into()));
        self
    }
    /// Redirect every request (`status` 301/302/307/308) to `location`.
    pub fn redirect(mut self, status: u16, location: impl Into<String>) -> Self {
        self.redirect = Some((status, location.into()));
        self
    }
    /// Label bodies with `Content-Encoding: value`.
    pub fn content_encoding(mut self, value: impl Into<String>) -> Self {
        self.content_encoding = Some(value.into());
        self
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// The request-target exactly as sent (absolute form when sent through a proxy).
    pub target: String,
    /// The path it was served as (no scheme, authority or query).
    pub path: String,
    /// True when the target was in absolute form, i.e. the client used us as a proxy.
    pub proxied: bool,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// Every header, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The status the server answered (before any injected cut or stall).
    pub status: u16,
}

impl RequestRecord {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The running server. Stops (closes every socket, joins every thread) on Drop.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    opts: ServerOptions,
    stop: AtomicBool,
    state: Mutex<State>,
    conns: Mutex<Vec<Connection>>,
}

struct Connection {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Resource>,
    faults: HashMap<String, FaultState>,
    sent: HashMap<String, Arc<AtomicU64>>,
    gates: HashMap<String, Arc<AtomicBool>>,
    log: Vec<RequestRecord>,
    generation: u64,
    last_modified_secs: u64,
}

#[derive(Clone)]
struct Resource {
    body: Body,
    len: u64,
    etag: String,
    last_modified: String,
}

#[derive(Default)]
struct FaultState {
    fault: Fault,
    requests: u32,
    bodies: u32,
    replaced: bool,
}

impl Server {
    /// Bind 127.0.0.1 on an ephemeral port and serve `files` (path → body; a missing
    /// leading `/` is added). File bodies must exist now: their length is read here.
    pub fn start<P, B>(
        files: impl IntoIterator<Item = (P, B)>,
        opts: ServerOptions,
    ) -> io::Result<Server>
    where
        P: Into<String>,
        B: Into<Body>,
    {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            opts,
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            conns: Mutex::new(Vec::new()),
        });
        let mut server = Server {
            addr,
            shared,
            accept: None,
        };
        for (path, body) in files {
            server.insert(path, body)?;
        }
        let accept_shared = Arc::clone(&server.shared);
        server.accept = Some(
            std::thread::Builder::new()
                .name("vrun-serve-accept".into())
                .spawn(move || accept_loop(listener, accept_shared))?,
        );
        Ok(server)
    }

    /// A server with no paths yet (add them with [`Server::insert`]).
    pub fn empty(opts: ServerOptions) -> io::Result<Server> {
        Self::start(Vec::<(String, Body)>::new(), opts)
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Full URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), normalize(path))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Add or replace a path's body. Replacing gives it a new ETag and Last-Modified.
    pub fn insert(&self, path: impl Into<String>, body: impl Into<Body>) -> io::Result<()> {
        let path = normalize(&path.into());
        let body = body.into();
        let len = match &body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(p) => std::fs::metadata(p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?
                .len(),
        };
        self.shared.lock().put(path, body, len);
        Ok(())
    }

    /// Install (or replace) the fault plan of a path and reset its counters.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.shared.lock().faults.insert(
            normalize(path),
            FaultState {
                fault,
                ..FaultState::default()
            },
        );
    }

    /// Every request so far, in arrival order.
    pub fn log(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// The requests for one path, in arrival order.
    pub fn requests(&self, path: &str) -> Vec<RequestRecord> {
        let path = normalize(path);
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Number of requests for one path (any method, any outcome).
    pub fn request_count(&self, path: &str) -> usize {
        self.requests(path).len()
    }

    /// Let bodies held by [`Fault::gate_after`] continue (now and for later requests).
    pub fn open_gate(&self, path: &str) {
        let mut st = self.shared.lock();
        let gate = st.gates.entry(normalize(path)).or_default();
        gate.store(true, Ordering::SeqCst);
    }

    /// Body bytes handed to the kernel for a path so far, over all requests.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        self.shared
            .lock()
            .sent
            .get(&normalize(path))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

impl State {
    /// Add or replace a path's body with fresh validators.
    fn put(&mut self, path: String, body: Body, len: u64) {
        self.generation += 1;
        // Unique per version even when two inserts share a second, so If-Range by date
        // never mistakes a replaced body for the old one.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_modified_secs = now.max(self.last_modified_secs + 1);
        let last_modified =
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(self.last_modified_secs));
        let etag = format!("\"v{}-{len:x}\"", self.generation);
        self.files.insert(
            path,
            Resource {
                body,
                len,
                etag,
                last_modified,
            },
        );
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the test's assertions down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    /// Sleep `d`, waking early when the server stops. Returns false if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(STOP_POLL));
        }
    }
}

fn normalize(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopped() {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let conn_shared = Arc::clone(&shared);
        let Ok(thread) = std::thread::Builder::new()
            .name("vrun-serve-conn".into())
            .spawn(move || serve_connection(stream, &conn_shared))
        else {
            continue;
        };
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished connections so a long bench does not accumulate handles.
        conns.retain(|c| !c.thread.is_finished());
        conns.push(Connection {
            stream: handle,
            thread,
        });
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    close: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let Ok(raw) = stream.try_clone() else {
        return;
    };
    let conn: Box<dyn Stream> = match &shared.opts.tls {
        None => Box::new(stream),
        Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
            Ok(tls) => Box::new(rustls::StreamOwned::new(tls, stream)),
            Err(_) => return,
        },
    };
    let mut reader = BufReader::new(conn);
    while !shared.stopped() {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        match respond(shared, reader.get_mut(), &req) {
            Ok(true) if !req.close => continue,
            _ => {
                let _ = reader.get_mut().flush();
                let _ = raw.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Read one request head (and discard a body if one is announced). `None` on clean EOF.
fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head_bytes = 0usize;
    let mut line = String::new();
    // Tolerate blank lines between requests (RFC 9112 §2.2).
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        head_bytes += line.len();
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut close = version == "HTTP/1.0";
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head_bytes += line.len();
        if head_bytes > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        close: false,
    };
    if let Some(c) = req.header("connection") {
        close |= c.eq_ignore_ascii_case("close");
    }
    req.close = close;
    if let Some(n) = req
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        io::copy(&mut r.take(n), &mut io::sink())?;
    }
    Ok(Some(req))
}

/// What to send, decided under the state lock, written without it.
enum Plan {
    Status {
        status: u16,
        retry_after: Option<String>,
        extra: Option<String>,
    },
    Body(BodyPlan),
    /// 304 with the current validators.
    NotModified(Resource),
}

struct BodyPlan {
    status: u16,
    res: Resource,
    start: u64,
    end: u64, // exclusive
    drop_after: Option<u64>,
    stall: Option<(u64, Duration)>,
    gate: Option<(u64, Arc<AtomicBool>)>,
    throttle: Option<u64>,
    trickle: Option<(u64, Duration)>,
    content_encoding: Option<String>,
    sent: Arc<AtomicU64>,
}

/// Answer one request. `Ok(true)` keeps the connection open.
fn respond(shared: &Shared, w: &mut dyn Write, req: &Request) -> io::Result<bool> {
    let (path, proxied) = split_target(&req.target);
    let (plan, delay) = plan(shared, req, &path, proxied);
    if let Some(d) = delay {
        if !shared.sleep(d) {
            return Ok(false);
        }
    }
    let head_only = req.method == "HEAD";
    match plan {
        Plan::Status {
            status,
            retry_after,
            extra,
        } => {
            let body = format!("{status} {}\n", reason(status));
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
                reason(status),
                body.len()
            );
            if let Some(ra) = retry_after {
                head.push_str(&format!("Retry-After: {ra}\r\n"));
            }
            if let Some(extra) = extra {
                head.push_str(&extra);
            }
            head.push_str("\r\n");
            w.write_all(head.as_bytes())?;
            if !head_only {
                w.write_all(body.as_bytes())?;
            }
            Ok(true)
        }
        Plan::Body(p) => write_body(shared, w, p, head_only),
        Plan::NotModified(res) => {
            let mut head = String::from("HTTP/1.1 304 Not Modified\r\n");
            push_validators(&mut head, &shared.opts, &res);
            head.push_str("\r\n");
            w.write_all(head.as_bytes())?;
            Ok(true)
        }
    }
}

fn split_target(target: &str) -> (String, bool) {
    let (rest, proxied) = match target.split_once("://") {
        Some((_, after)) => (after.find('/').map_or("/", |i| &after[i..]), true),
        None => (target, false),
    };
    let path = rest.split(['?', '#']).next().unwrap_or("/");
    (normalize(path), proxied)
}

/// Decide the answer (and any delay before it) and log the request.
fn plan(shared: &Shared, req: &Request, path: &str, proxied: bool) -> (Plan, Option<Duration>) {
    let opts = &shared.opts;
    let mut st = shared.lock();
    let st = &mut *st;
    let fs = st.faults.entry(path.to_string()).or_default();
    fs.requests += 1;
    let request_no = fs.requests; // 1-based
    let fault = fs.fault.clone();
    if let Some((after, body)) = &fault.replace_after {
        if fs.bodies >= *after && !fs.replaced {
            fs.replaced = true;
            let len = match body {
                Body::Bytes(b) => b.len() as u64,
                Body::File(p) => std::fs::metadata(p).map_or(0, |m| m.len()),
            };
            st.put(path.to_string(), body.clone(), len);
        }
    }

    let mut record = RequestRecord {
        method: req.method.clone(),
        target: req.target.clone(),
        path: path.to_string(),
        proxied,
        range: req.header("range").map(str::to_string),
        if_range: req.header("if-range").map(str::to_string),
        headers: req.headers.clone(),
        status: 0,
    };

    let plan = if req.method != "GET" && req.method != "HEAD" {
        Plan::Status {
            status: 405,
            retry_after: None,
            extra: Some("Allow: GET, HEAD\r\n".into()),
        }
    } else if let Some((status, location)) = &fault.redirect {
        Plan::Status {
            status: *status,
            retry_after: None,
            extra: Some(format!("Location: {location}\r\n")),
        }
    } else if request_no <= fault.fail_first {
        Plan::Status {
            status: fault.fail_status,
            retry_after: fault.retry_after.clone(),
            extra: None,
        }
    } else if let Some(res) = st
        .files
        .get(path)
        .filter(|res| not_modified(opts, req, res))
        .cloned()
    {
        Plan::NotModified(res)
    } else if let Some(res) = st.files.get(path).cloned() {
        let range = if opts.ranges && !fault.ignore_range {
            req.header("range")
                .and_then(parse_range)
                .map(|(a, b)| (a + fault.shift_range, b))
        } else {
            None
        };
        let range = range.filter(|_| match req.header("if-range") {
            None => true,
            Some(v) => {
                (opts.etag && v == res.etag && !v.starts_with("W/"))
                    || (opts.last_modified && v == res.last_modified)
            }
        });
        match range {
            Some((start, _)) if start >= res.len => Plan::Status {
                status: 416,
                retry_after: None,
                extra: Some(format!("Content-Range: bytes */{}\r\n", res.len)),
            },
            Some((start, end)) => {
                let end = end.map_or(res.len, |e| (e + 1).min(res.len)).max(start + 1);
                body_plan(st, req, path, res, (206, start, end), &fault)
            }
            None => {
                let len = res.len;
                body_plan(st, req, path, res, (200, 0, len), &fault)
            }
        }
    } else {
        Plan::Status {
            status: 404,
            retry_after: None,
            extra: None,
        }
    };
    record.status = match &plan {
        Plan::Status { status, .. } => *status,
        Plan::Body(b) => b.status,
        Plan::NotModified(_) => 304,
    };
    st.log.push(record);
    let delay = (request_no <= fault.delay_head_first).then_some(fault.delay_head);
    (plan, delay)
}

/// `(status, start, end)`: what part of `res` to send. Only GETs count as bodies.
fn body_plan(
    st: &mut State,
    req: &Request,
    path: &str,
    res: Resource,
    (status, start, end): (u16, u64, u64),
    fault: &Fault,
) -> Plan {
    let fs = st.faults.entry(path.to_string()).or_default();
    if req.method == "GET" {
        fs.bodies += 1;
    }
    // A HEAD before any GET is checked against body 1's plan (it sends no body anyway).
    let body_no = fs.bodies.max(1);
    let sent = Arc::clone(st.sent.entry(path.to_string()).or_default());
    Plan::Body(BodyPlan {
        status,
        res,
        start,
        end,
        drop_after: fault.drop_after.filter(|_| body_no <= fault.drop_bodies),
        stall: fault
            .stall_after
            .filter(|_| body_no <= fault.stall_bodies)
            .map(|k| (k, fault.stall_for)),
        throttle: fault.throttle,
        trickle: fault.trickle,
        content_encoding: fault.content_encoding.clone(),
        gate: fault
            .gate_after
            .map(|k| (k, Arc::clone(st.gates.entry(path.to_string()).or_default()))),
        sent,
    })
}

fn push_validators(head: &mut String, opts: &ServerOptions, res: &Resource) {
    if opts.etag {
        head.push_str(&format!("ETag: {}\r\n", res.etag));
    }
    if opts.last_modified {
        head.push_str(&format!("Last-Modified: {}\r\n", res.last_modified));
    }
}

/// Conditional GET (RFC 9110 §13.2.2): If-None-Match decides when present (weak
/// comparison), else If-Modified-Since against Last-Modified.
fn not_modified(opts: &ServerOptions, req: &Request, res: &Resource) -> bool {
    if let Some(tags) = req.header("if-none-match") {
        let ours = res.etag.trim_start_matches("W/");
        return opts.etag
            && tags
                .split(',')
                .map(|t| t.trim())
                .any(|t| t == "*" || t.trim_start_matches("W/") == ours);
    }
    match (req.header("if-modified-since"), opts.last_modified) {
        (Some(since), true) => {
            match (
                httpdate::parse_http_date(since),
                httpdate::parse_http_date(&res.last_modified),
            ) {
                (Ok(since), Ok(modified)) => modified <= since,
                _ => false,
            }
        }
        _ => false,
    }
}

/// `bytes=N-` or `bytes=N-M` → (N, Some(M)); anything else (suffix, multi-range) → None,
/// which serves the whole body, as RFC 9110 allows.
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    match end {
        Some(e) if e < start => None,
        _ => Some((start, end)),
    }
}

fn write_body(
    shared: &Shared,
    w: &mut dyn Write,
    p: BodyPlan,
    head_only: bool,
) -> io::Result<bool> {
    let opts = &shared.opts;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/octet-stream\r\n",
        p.status,
        reason(p.status)
    );
    if opts.ranges {
        head.push_str("Accept-Ranges: bytes\r\n");
    }
    push_validators(&mut head, opts, &p.res);
    if let Some(enc) = &p.content_encoding {
        head.push_str(&format!("Content-Encoding: {enc}\r\n"));
    }
    if p.status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {}-{}/{}\r\n",
            p.start,
            p.end.saturating_sub(1),
            p.res.len
        ));
    }
    if opts.content_length {
        head.push_str(&format!("Content-Length: {}\r\n", p.end - p.start));
    } else {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if head_only {
        return Ok(true);
    }

    let mut source = Source::open(&p.res.body, p.start)?;
    let total = p.end - p.start;
    let mut done = 0u64; // body bytes of this response written
    let mut stalled = false;
    let began = Instant::now();
    let mut buf = vec![0u8; WRITE_PIECE];
    while done < total {
        if shared.stopped() {
            return Ok(false);
        }
        if let Some(k) = p.drop_after {
            if done >= k {
                return Ok(false);
            }
        }
        if let Some((k, d)) = p.stall {
            if !stalled && done >= k {
                stalled = true;
                w.flush()?;
                if !shared.sleep(d) {
                    return Ok(false);
                }
            }
        }
        if let Some((k, gate)) = &p.gate {
            if done >= *k && !gate.load(Ordering::SeqCst) {
                w.flush()?;
                while !gate.load(Ordering::SeqCst) {
                    if !shared.sleep(STOP_POLL) {
                        return Ok(false);
                    }
                }
            }
        }
        // Cut the piece at the next fault point so drops and stalls land on the byte.
        let mut want = (total - done).min(WRITE_PIECE as u64);
        if let Some(k) = p.drop_after.filter(|&k| k > done) {
            want = want.min(k - done);
        }
        if let Some((k, _)) = p.stall.filter(|&(k, _)| !stalled && k > done) {
            want = want.min(k - done);
        }
        if let Some((k, _)) = p
            .gate
            .as_ref()
            .filter(|(k, g)| *k > done && !g.load(Ordering::SeqCst))
        {
            want = want.min(k - done);
        }
        if let Some(rate) = p.throttle {
            // Twenty pieces a second keeps the rate smooth without a syscall per byte.
            want = want.min((rate / 20).max(1));
        }
        if let Some((n, _)) = p.trickle {
            want = want.min(n);
        }
        let piece = source.read(&mut buf[..want as usize], want)?;
        if piece.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into()); // file shrank under us
        }
        if opts.content_length {
            w.write_all(piece)?;
        } else {
            w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
            w.write_all(piece)?;
            w.write_all(b"\r\n")?;
        }
        done += piece.len() as u64;
        p.sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
        if let Some((_, every)) = p.trickle {
            w.flush()?;
            if done < total && !shared.sleep(every) {
                return Ok(false);
            }
        }
        if let Some(rate) = p.throttle {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let elapsed = began.elapsed();
            if due > elapsed && !shared.sleep(due - elapsed) {
                return Ok(false);
            }
        }
    }
    if !opts.content_length {
        w.write_all(b"0\r\n\r\n")?;
    }
    w.flush()?;
    Ok(true)
}

enum Source<'a> {
    Bytes(&'a Bytes, usize),
    File(File),
}

impl<'a> Source<'a> {
    fn open(body: &'a Body, start: u64) -> io::Result<Self> {
        Ok(match body {
            Body::Bytes(b) => Source::Bytes(b, start as usize),
            Body::File(path) => {
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(start))?;
                Source::File(f)
            }
        })
    }

    /// Up to `want` next bytes (fewer only at end of data).
    fn read<'b>(&'b mut self, buf: &'b mut [u8], want: u64) -> io::Result<&'b [u8]> {
        match self {
            Source::Bytes(b, pos) => {
                let end = (*pos + want as usize).min(b.len());
                let s = &b[*pos..end];
                *pos = end;
                Ok(s)
            }
            Source::File(f) => {
                let mut n = 0;
                while n < buf.len() {
                    match f.read(&mut buf[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                Ok(&buf[..n])
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=10-19"), Some((10, Some(19))));
        assert_eq!(parse_range("bytes=-5"), None);
        assert_eq!(parse_range("bytes=5-1"), None);
        assert_eq!(parse_range("bytes=0-1,4-5"), None);
        assert_eq!(parse_range("items=0-"), None);
    }

    #[test]
    fn targets_split() {
        assert_eq!(split_target("/a/b.tgz?x=1"), ("/a/b.tgz".into(), false));
        assert_eq!(
            split_target("http://127.0.0.1:9/a.tgz"),
            ("/a.tgz".into(), true)
        );
        assert_eq!(split_target("http://h"), ("/".into(), true));
    }
}
