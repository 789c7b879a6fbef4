//! A bounded pipe from the async fetcher to a blocking consumer (decoder, tar reader).
//!
//! Test support: the fetch tests' sink for a blocking reader (it was `vrun::fetch::body_pipe`,
//! but setup's pipeline has its own sink, so only these tests used it).
//!
//! The decoders are synchronous `Read`ers and belong on their own thread (DESIGN §3);
//! the fetcher is async. [`body_pipe`] joins them with a bounded channel of chunks:
//! [`PipeSink`] is the fetcher's [`BodySink`] and waits (without blocking the runtime)
//! when the consumer is behind, which is what keeps memory flat; [`PipeReader`] is a
//! plain `Read` for the consumer thread.
//!
//! Two ends of a body must be told apart from a clean end: a restart (the fetcher
//! reset the sink because a server answered 200 to a resume) surfaces in the reader as
//! an `io::Error` for which [`is_restart`] is true, after which the same reader yields
//! the body again from byte 0, so the consumer discards its work and starts over; and
//! a download that failed (the sink dropped without [`PipeSink::finish`]) surfaces as
//! an `UnexpectedEof` error rather than a clean EOF, so a decoder can never mistake a
//! cut-off download for a short archive.

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use vrun::fetch::{BodySink, SinkError};

enum Msg {
    Data(Bytes),
    Reset,
    End,
}

/// A bounded pipe holding at most `capacity` chunks in flight (reqwest chunks are at most
/// a few hundred KiB, so 32 chunks bound the pipe to a few MiB).
pub fn body_pipe(capacity: usize) -> (PipeSink, PipeReader) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        PipeSink {
            tx,
            pending_reset: false,
        },
        PipeReader {
            rx,
            cur: Bytes::new(),
            ended: false,
        },
    )
}

/// The fetcher's end. Call [`PipeSink::finish`] after a successful fetch.
pub struct PipeSink {
    tx: mpsc::Sender<Msg>,
    pending_reset: bool,
}

/// The consumer's end: a blocking `Read` (do not use it on an async runtime thread).
pub struct PipeReader {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    ended: bool,
}

/// The error carried by the reader when the body restarts from byte 0.
#[derive(Debug, thiserror::Error)]
#[error("the download restarted from byte 0 (the server did not resume)")]
pub struct BodyRestarted;

/// True when a read error from [`PipeReader`] means "start over; the body follows again".
pub fn is_restart(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<BodyRestarted>())
}

impl PipeSink {
    async fn send(&self, m: Msg) -> Result<(), SinkError> {
        self.tx
            .send(m)
            .await
            .map_err(|_| SinkError::new("the body's consumer stopped reading"))
    }

    /// Mark the body complete: the reader sees a clean EOF after the last chunk.
    pub async fn finish(mut self) -> Result<(), SinkError> {
        self.flush_reset().await?;
        self.send(Msg::End).await
    }

    async fn flush_reset(&mut self) -> Result<(), SinkError> {
        if self.pending_reset {
            self.pending_reset = false;
            self.send(Msg::Reset).await?;
        }
        Ok(())
    }
}

impl BodySink for PipeSink {
    fn reset(&mut self) -> Result<(), SinkError> {
        // Delivered in order, ahead of the next chunk (or of the end).
        self.pending_reset = true;
        Ok(())
    }

    async fn chunk(&mut self, data: Bytes) -> Result<(), SinkError> {
        self.flush_reset().await?;
        self.send(Msg::Data(data)).await
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.len());
                buf[..n].copy_from_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.cur = b,
                Some(Msg::Reset) => return Err(io::Error::other(BodyRestarted)),
                Some(Msg::End) => self.ended = true,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download stopped before the end of the body",
                    ))
                }
            }
        }
    }
}
