//! The loopback HTTP server the harness downloads from.
//!
//! Stand-in until `vrun::serve` (src/serve.rs, the project's fault-injecting test server)
//! is on main: this keeps the same shape (`Server::start(files, opts)`, `url`,
//! `request_count`) so switching is the one line in `main.rs` that imports it. Bodies are
//! served from memory, so dropping the page cache before a run never makes the *server*
//! read from disk: both sides see the same network stage (loopback, ~GB/s).
//!
//! HTTP/1.1 with keep-alive, `Content-Length`, a strong `ETag`, and `Range: bytes=N-`
//! (vrun may resume); one thread per connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

/// Body bytes per `write`: large enough to keep loopback saturated.
const WRITE_PIECE: usize = 256 * 1024;

/// Server behaviour; the field names follow `vrun::serve::ServerOptions`.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Send a strong `ETag` (vrun's URL index may use it).
    pub etag: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { etag: true }
    }
}

struct Shared {
    files: HashMap<String, Bytes>,
    opts: ServerOptions,
    counts: Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
}

pub struct Server {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    open: Arc<AtomicUsize>,
}

impl Server {
    pub fn start<P: Into<String>>(
        files: impl IntoIterator<Item = (P, Bytes)>,
        opts: ServerOptions,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let files = files
            .into_iter()
            .map(|(p, b)| {
                let p: String = p.into();
                (
                    if p.starts_with('/') {
                        p
                    } else {
                        format!("/{p}")
                    },
                    b,
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            files,
            opts,
            counts: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let conns = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let (s, c, o) = (Arc::clone(&shared), Arc::clone(&conns), Arc::clone(&open));
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(h) = stream.try_clone() {
                    c.lock().unwrap().push(h);
                }
                let s = Arc::clone(&s);
                let o = Arc::clone(&o);
                o.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve(stream, &s);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Server {
            addr,
            shared,
            accept: Some(accept),
            conns,
            open,
        })
    }

    pub fn url(&self, path: &str) -> String {
        let p = path.trim_start_matches('/');
        format!("http://{}/{p}", self.addr)
    }

    /// GET/HEAD requests seen for a path.
    pub fn request_count(&self, path: &str) -> usize {
        let p = format!("/{}", path.trim_start_matches('/'));
        *self.shared.counts.lock().unwrap().get(&p).unwrap_or(&0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Connection threads exit once their socket is shut down.
        for _ in 0..100 {
            if self.open.load(Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn serve(stream: TcpStream, s: &Shared) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts
            .next()
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_string();
        let mut range_start = None;
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim());
                if n == "range" {
                    range_start = v
                        .strip_prefix("bytes=")
                        .and_then(|x| x.strip_suffix('-'))
                        .and_then(|x| x.parse::<usize>().ok());
                } else if n == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        *s.counts.lock().unwrap().entry(path.clone()).or_default() += 1;
        let Some(body) = s.files.get(&path) else {
            w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        };
        let etag = if s.opts.etag {
            format!("ETag: \"{:x}\"\r\n", body.len())
        } else {
            String::new()
        };
        let (status, start) = match range_start {
            Some(n) if n < body.len() => ("206 Partial Content", n),
            _ => ("200 OK", 0),
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\n{etag}Content-Length: {}\r\n",
            body.len() - start
        );
        if start > 0 {
            head.push_str(&format!(
                "Content-Range: bytes {start}-{}/{}\r\n",
                body.len() - 1,
                body.len()
            ));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())?;
        if method != "HEAD" {
            for piece in body[start..].chunks(WRITE_PIECE) {
                if s.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                w.write_all(piece)?;
            }
        }
        w.flush()?;
        if close {
            return Ok(());
        }
    }
}
