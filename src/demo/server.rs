//! The demo's file server: the sample build and image, in memory, on 127.0.0.1.
//!
//! `vrun demo` must deploy without internet, so it serves what it built itself, and the
//! real `vrun setup` fetches it over a real socket as it would from Velociraptor's build
//! server. That needs very little: `GET` and `HEAD` of a few fixed paths, with
//! `Content-Length`, one connection per request (`Connection: close`; reqwest opens
//! another). No `Range` (a `200` with the whole body is a valid answer to a range
//! request, and the demo's downloads do not fail half-way), no validators, no TLS.
//!
//! It is deliberately not the tests' server (`testkit::serve`, a dev-only crate): that
//! one injects faults (failed requests, cuts, stalls, gates, throttles, wrong ranges),
//! logs every request and speaks ranges, validators and TLS, none of which belongs in
//! the product. This one only serves; dropping it stops the accept thread and joins it.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a connection may take to send its request head before it is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request head read; `vrun setup`'s are a few hundred bytes.
const MAX_HEAD_BYTES: u64 = 64 * 1024;

/// A running server; dropping it stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Serve `files` (path → body, paths starting with `/`) on an ephemeral loopback port.
    pub fn start(files: Vec<(&str, Vec<u8>)>) -> io::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let files: Arc<HashMap<String, Vec<u8>>> = Arc::new(
            files
                .into_iter()
                .map(|(path, body)| (path.to_owned(), body))
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("demo-server".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let files = files.clone();
                        // A failed answer is the client's to report (setup names the URL).
                        let _ =
                            std::thread::Builder::new()
                                .name("demo-conn".into())
                                .spawn(move || {
                                    let _ = answer(conn, &files);
                                });
                    }
                })?
        };
        Ok(Server {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.url("")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Read one request head and answer it, then close.
fn answer(conn: TcpStream, files: &HashMap<String, Vec<u8>>) -> io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new((&conn).take(MAX_HEAD_BYTES));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = &conn;
    match (method, files.get(target)) {
        ("GET" | "HEAD", Some(body)) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\
                 Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if method == "GET" {
                out.write_all(body)?;
            }
        }
        ("GET" | "HEAD", None) => out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
        _ => out.write_all(
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    out.flush()?;
    conn.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(server: &Server, request: &str) -> String {
        let mut conn = TcpStream::connect(server.addr).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn serves_its_files_and_nothing_else() {
        let server = Server::start(vec![("/build.tar.gz", b"hello".to_vec())]).unwrap();
        let ok = get(&server, "GET /build.tar.gz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 5\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nhello"), "{ok}");
        let head = get(&server, "HEAD /build.tar.gz HTTP/1.1\r\n\r\n");
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
        let missing = get(&server, "GET /other HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = get(&server, "POST /build.tar.gz HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert_eq!(server.url("/a"), format!("http://{}/a", server.addr));
    }
}
